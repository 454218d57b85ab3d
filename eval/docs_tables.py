"""Figure tables of the docs, rendered from the committed results JSON they restate, never typed by hand.

A page marks each generated table with ``<!-- table:NAME -->`` and ``<!-- /table:NAME -->``; :data:`TABLES` maps
``NAME`` to a function that builds the Markdown from the JSON files in ``docs/figures/`` (or a zoo record).
``python scripts/render_docs_tables.py`` rewrites every marked block; ``tests/test_docs_tables.py`` fails when a
page's block differs from what its JSON renders, so a published figure cannot drift from the run behind it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from eval.run_folder import read_record

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ROOT / "docs" / "figures"
ZOO = ROOT / "manifold_defense" / "zoo" / "weights"

__all__ = ["TABLES", "render", "render_page", "stale_blocks"]


def _json(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    return read_record(path) if isinstance(data, dict) and "sha256" in data else data


def _row(cells: list[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def tstar_table() -> str:
    """DiffPure's t* sweep on the validation split (``diffpure-tstar``)."""
    rec = _json(FIGURES / "diffpure_tstar.json")
    probe = f"BPDA + EOT probe, Linf {rec['protocol']['probe_eps']}"
    header = ["t*", "clean accuracy (worst of draws)", probe, "UNet passes / image", "chosen"]
    lines = [_row(header), _row(["---"] * 5)]
    for r in rec["rows"]:
        chosen = "**yes**" if r["t_star"] == rec.get("chosen") else ""
        lines.append(_row([r["t_star"], f"{r['clean_accuracy']:.3f} (n {r['n']})",
                           f"{r['probe_accuracy']:.3f} (n {r['probe_n']})", r["network_passes_per_image"], chosen]))  # fmt: skip
    test = rec.get("test")
    if test:
        lines.append("")
        lines.append(f"At the chosen t* = {test['t_star']}, defended clean accuracy on the first {test['n']} test "
                     f"images (worst of {test['draws']} draws): **{test['clean_accuracy']:.3f}**.")  # fmt: skip
    return "\n".join(lines)


def cost_table() -> str:
    """Seconds and network passes per purified image, side by side (``purifier-cost``)."""
    rec = _json(FIGURES / "purifier_cost.json")
    lines = [_row(["purifier", "network passes / image", "seconds / image (median of rounds)", "time / DiffPure's"]),
             _row(["---"] * 4)]  # fmt: skip
    for name, r in rec["purifiers"].items():
        lines.append(_row([name, f"{r['passes_per_image']:g} ({r['network']})", f"{r['seconds_per_image']:.3f}",
                           f"{r['time_over_diffpure']:g}x"]))  # fmt: skip
    lines.append("")
    lines.append(f"{rec['n']} test images, {rec['device']}, {rec['threads']} thread(s); load average "
                 f"{rec['load_average_before'][0]} before, {rec['load_average_after'][0]} after.")  # fmt: skip
    return "\n".join(lines)


def samples_table() -> str:
    """Sample quality of ``mnist-ddpm`` beside ``mnist-gan`` at the same sample count (``measure-zoo``)."""
    ddpm = json.loads((ZOO / "mnist-ddpm.json").read_text())["figures"]["samples"]
    gan = _json(FIGURES / "gan_samples_equal_n.json")
    floor = ddpm["floor_train_vs_test"]
    keys = [("mnist_score", "MNIST score", ">= 9.0"), ("frechet_features", "Fréchet distance, classifier features",
            "<= 50"), ("confident_fraction", "share classified with confidence >= 0.9", ""),
            ("histogram_min_max", "class histogram min/max", ""), ("histogram_tv", "class TV from the test balance", "")]  # fmt: skip
    lines = [_row(["figure", "mnist-ddpm", "mnist-gan", "real-data floor", "target"]), _row(["---"] * 5)]
    for key, label, target in keys:
        lines.append(_row([label, f"{ddpm[key]:.4g}", f"{gan[key]:.4g}", f"{floor[key]:.4g}", target]))
        if key == "frechet_features":
            above = [f"{m[key] - floor[key]:.4g}" for m in (ddpm, gan)]
            lines.append(_row(["Fréchet distance above the floor (same count)", *above, "0", ""]))
    lines.append("")
    lines.append(f"{floor['n']} samples each against the first {floor['n']} test images; {ddpm['sampler']}; "
                 f"{ddpm['seconds_per_sample']} s per sample.")  # fmt: skip
    return "\n".join(lines)


TABLES: dict[str, Callable[[], str]] = {"diffpure-tstar": tstar_table, "purifier-cost": cost_table,
                                        "ddpm-samples": samples_table}  # fmt: skip
_BLOCK = re.compile(r"(<!-- table:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(^<!-- /table:(?P=name) -->)", re.S | re.M)


def render(name: str) -> str:
    """The Markdown of table ``name`` (``KeyError`` for an unknown one)."""
    return TABLES[name]()


def render_page(text: str) -> str:
    """``text`` with every marked table block rewritten from its JSON."""
    return _BLOCK.sub(lambda m: m.group(1) + render(m.group("name")) + "\n" + m.group(4), text)


def stale_blocks(text: str) -> list[str]:
    """Names of the marked blocks of ``text`` that differ from what their JSON renders."""
    return [m.group("name") for m in _BLOCK.finditer(text) if m.group("body") != render(m.group("name")) + "\n"]
