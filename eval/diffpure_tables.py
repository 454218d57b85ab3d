"""The DiffPure evaluation's figure tables in ``docs/diffusion.md``, rendered from committed results JSON.

Sources (under ``docs/figures/``): ``diffpure_cascade_results.json`` and ``diffpure_fixed_cascade_results.json``
(the harness's ``results.json`` of the ``robustness --defenses diffpure --majority`` and ``--defenses
diffpure-fixed`` runs, merged) and ``diffpure_exact.json`` (``diffpure-exact``'s
``exact.json``). Registered in :data:`eval.docs_tables.TABLES`; an absent source renders a line saying which run
writes it, never a figure.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from eval.cli import console_spelling
from eval.leaderboard_rows import standard_error
from eval.run_folder import read_record

FIGURES = Path(__file__).resolve().parent.parent / "docs" / "figures"
CASCADE = "diffpure_cascade_results.json"
#: The fixed-noise defense's run (its own folder and results; merged into the tables beside ``CASCADE``).
FIXED = "diffpure_fixed_cascade_results.json"
EXACT = "diffpure_exact.json"

__all__ = ["cascade_table", "cost_table", "exact_table", "transfer_table"]


def _load(name: str) -> dict[str, Any] | None:
    path = FIGURES / name
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return read_record(path) if isinstance(data, dict) and "sha256" in data else data


def _cascade() -> dict[str, Any] | None:
    """The ``diffpure`` run's results with the ``diffpure-fixed`` run's defenses added (same threats and points;
    each defense's run, for its command and stage time, under ``runs``); either alone when only it exists."""
    parts = [r for r in (_load(CASCADE), _load(FIXED)) if r is not None]
    if not parts:
        return None
    rec = dict(parts[0])
    rec["runs"] = {}
    rec["defenses"] = {}
    for part in parts:
        if part["threat_models"] != parts[0]["threat_models"] or part["n"] != parts[0]["n"]:
            raise ValueError(f"expected {CASCADE} and {FIXED} on the same threats and points, got "
                             f"{[(p['threat_models'], p['n']) for p in parts]}")  # fmt: skip
        rec["defenses"] |= part["defenses"]
        rec["runs"] |= {name: part for name in part["defenses"]}
    return rec


def _row(cells: list[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


#: What a stage's inner model is when it names no surrogate of its own.
_INNER = {"pgd": "bare classifier", "unrolled-pgd": "exact-gradient stand-in", "bpda-pgd": "inner model",
          "bpda-eot-pgd": "inner model"}  # fmt: skip


def _missing(name: str) -> str:
    return f"(not measured yet: `docs/figures/{name}` is absent; the commands on this page write it)"


def _converged(d: Mapping[str, Any], tk: str) -> str:
    conv = d["attacks"].get("convergence", {}).get(tk, {})
    if conv.get("status") == "skipped" and str(conv.get("reason", "")).startswith("not run"):
        return "**not run** (run stopped: upper bound)"
    for c in d["checks"]:
        if c["flag"] == "not-converged" and c["where"] == tk:
            return {"ok": "yes", "flag": "**no** (upper bound)"}.get(c["status"], c["status"])
    return "not checked"


def _stages(rec: Mapping[str, Any]) -> list[str]:
    """The cascade's stages that ran on some defense and threat, in cascade order."""
    names: list[str] = []
    for d in rec["defenses"].values():
        for attack, per in d["attacks"].items():
            if attack not in names and any(e.get("status") == "ran" for e in per.values()):
                names.append(attack)
    return names


def cascade_table() -> str:
    """Robust accuracy after each stage of the cascade, worst case with its standard error, convergence, majority."""
    rec = _cascade()
    if rec is None:
        return _missing(f"{CASCADE}` nor `{FIXED}")
    stages = [s for s in _stages(rec) if s not in ("clean", "convergence")]
    head = ["threat", "defense", "clean", *stages, "convergence rerun", "**worst case** (± s.e.)", "converged",
            "majority vote"]  # fmt: skip
    lines = [_row(head), _row(["---"] * len(head))]
    for tk in rec["threat_models"]:
        for name, d in rec["defenses"].items():
            cells = []
            for s in stages:
                e = d["attacks"].get(s, {}).get(tk, {})
                cells.append(f"{e['accuracy']:.2f}" if e.get("status") == "ran" else "-")
            conv = d["attacks"].get("convergence", {}).get(tk, {})
            rerun = (f"{conv['figure_before']:.2f} -> {conv['accuracy']:.2f} ({conv['rerun_of']})"
                     if conv.get("status") == "ran" else "-")  # fmt: skip
            w = d["worst_case"][tk]
            maj = d.get("majority_vote")
            lines.append(_row([tk, name, f"{d['clean']:.2f}", *cells, rerun, f"**{w:.2f}** ± {standard_error(w, int(d['n'])):.2f}",
                               _converged(d, tk), f"{maj['accuracy'][tk]:.2f}" if maj else "-"]))  # fmt: skip
    first = next(iter(rec["defenses"].values()))
    verdicts = "; ".join(f"`{name}` the worst of {d['draws']} fresh purification(s)" + (
        "" if d["randomized"] else " (deterministic)") for name, d in rec["defenses"].items())  # fmt: skip
    lines += ["", f"n = {first['n']} (the first test images); verdicts: {verdicts}."]
    for name, run in rec["runs"].items():
        lines += ["", f"`{name}`: stage time {run['seconds_stages']} s on {run['device']}, {run['threads']} "
                  f"thread(s); command: `{console_spelling(run['command'])}`."]  # fmt: skip
    return "\n".join(lines)


def transfer_table() -> str:
    """Per stage that attacked through a surrogate: how many of its successes transferred to the real purifier."""
    rec = _cascade()
    if rec is None:
        return _missing(f"{CASCADE}` nor `{FIXED}")
    head = ["threat", "defense", "stage (surrogate)", "attacked", "fooled the surrogate", "transferred",
            "did not transfer", "broken without fooling it"]  # fmt: skip
    lines = [_row(head), _row(["---"] * len(head))]
    for tk in rec["threat_models"]:
        for name, d in rec["defenses"].items():
            for attack, per in d["attacks"].items():
                t = per.get(tk, {}).get("transfer")
                if not t:
                    continue
                subs = t.get("by_surrogate") or {}
                inner = per[tk].get("rerun_of", attack)  # the convergence rerun: its stage's inner model
                label = f"{attack} ({', '.join(subs) if subs else _INNER.get(inner, 'surrogate')})"
                if attack == "convergence":
                    label = f"convergence: {inner} again ({_INNER.get(inner, 'surrogate')})"
                lines.append(_row([tk, name, label, t["attacked"], t["surrogate_broken"], t["transferred"],
                                   t["not_transferred"], t["broken_without_surrogate"]]))  # fmt: skip
    return "\n".join(lines)


def exact_table() -> str:
    """Exact-gradient PGD through the whole reverse process, beside the cascade on the same first points."""
    rec, cascade = _load(EXACT), _cascade()
    if rec is None:
        return _missing(EXACT)
    p = rec["protocol"]
    head = ["threat", "PGD steps (exact gradient)", "attacked", "robust (worst of draws)", "cascade on the same points",
            "broken by exact only", "seconds"]  # fmt: skip
    lines = [_row(head), _row(["---"] * len(head))]
    for r in rec["rows"]:
        cell, extra = "-", "-"
        if cascade is not None and "diffpure" in cascade["defenses"]:
            points = cascade["defenses"]["diffpure"].get("robust_points", {}).get(r["threat"])
            if points is not None:
                kept = {i for i in points if i < r["n"]}
                cell = f"{len(kept) / r['n']:.2f} ({len(kept)} of {r['n']})"
                extra = str(len(kept - set(r["robust"])))
        lines.append(_row([r["threat"], r["pgd_steps"], r.get("attacked", r["n"]),
                           f"{r['accuracy']:.2f} ({len(r['robust'])} of {r['n']})", cell, extra, r["seconds"]]))  # fmt: skip
    mode = "each count on the points the shorter ones left (cumulative)" if p.get("cumulative") else "each count alone"
    lines += ["", f"t* = {p['t_star']}, {p['steps']} DDIM steps, EOT {p['eot']}, worst of {p['draws']} draws, first "
              f"{p['n']} test images, {mode}; command: `{console_spelling(rec['command'])}`."]  # fmt: skip
    return "\n".join(lines)


def cost_table() -> str:
    """What the evaluation cost: real purifications per point and process seconds, per threat and defense."""
    rec = _cascade()
    if rec is None:
        return _missing(f"{CASCADE}` nor `{FIXED}")
    head = ["defense", "threat", "real purifications / point", "process seconds", "costliest stage"]
    lines = [_row(head), _row(["---"] * len(head))]
    for name, d in rec["defenses"].items():
        st = d["cost"]["stages"]
        for tk in rec["threat_models"]:
            mine = {k.split("|", 1)[1]: v for k, v in st.items() if k.startswith(f"{tk}|")}
            passes = sum(v["real_passes"] for v in mine.values())
            secs = sum(v["process_seconds"] for v in mine.values())
            top = max(mine.items(), key=lambda kv: kv[1]["process_seconds"], default=None)
            lines.append(_row([name, tk, f"{passes / d['n']:.0f}", f"{secs:.0f}",
                               f"{top[0]} ({top[1]['process_seconds']:.0f} s)" if top else "-"]))  # fmt: skip
    return "\n".join(lines)
