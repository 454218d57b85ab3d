"""Outputs of the robustness harness: ``results.json``, the Markdown report and the PNG plots.

``results.json`` schema (``schema: "manifold-defense robustness v1"``)::

    {"threat_models": ["linf-0.3", "l2-2", "l2-4"], "n": 200, "settings": {...}, "quick": bool,
     "reduced_vs_full": {field: {"this_run": v, "full": v}}, "attack_definitions": {...},
     "flag_definitions": {...}, "world_size": W, ...,
     "defenses": {"<name>": {
         "n": points, "randomized": bool, "draws": k, "clean": accuracy,
         "attacks": {"<attack>": {"<threat>": {"status": "ran" | "skipped", "reason": ..., "accuracy": robust
                     accuracy after this attack of the cascade (cumulative worst case), "attacked": points,
                     "broken": newly broken points, "broken_alone": points this attack broke among those it
                     attacked, "seconds": ..., "settings": {...}}}},
         "worst_case": {"<threat>": final robust accuracy (worst case per point over the cascade)},
         "curves": {"linf" | "l2": {"attack": ..., "eps": [0, ...], "accuracy": [clean, ...]}},
         "audit": {"<threat>": {"norm", "eps", "max_perturbation", "nan_count", "value_range": [lo, hi]}},
         "gradients": {"<source>": {"points", "nan_or_inf", "zero_fraction", "norm_median"}},
         "checks": [{"flag", "status": "ok" | "flag" | "n/a", "where", "detail", "rule"}],
         "flags": [the checks whose status is "flag"],
         "examples": {"<threat>": {"indices": [...], "attacks": [...]}}}}}

The attacks and the per-threat results are nested ``attacks[attack][threat]`` and ``worst_case[threat]``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from eval.run_folder import write_record
from manifold_defense.integrity import atomic_write_text

__all__ = ["plot_curves", "plot_examples", "write_markdown", "write_outputs"]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{100 * value:.1f}%"
    return "-" if value is None else str(value)


def write_markdown(record: Mapping[str, Any]) -> str:
    """The report: setup, one table per threat model (defense x attack cascade), curves, checks and audit."""
    s = record["settings"]
    lines = [
        f"# Robustness evaluation{' (QUICK smoke run: reduced settings, not the reported figures)' if record.get('quick') else ''}",
        "",
        f"Command: `{record.get('command', '(Python API)')}`; device {record.get('device', '?')}; processes "
        f"{record.get('world_size', 1)}; n = {record['n']} ({record.get('data', 'given points')}); seed {s['seed']}; "
        f"stage time {record.get('seconds_stages')} s (this call {record.get('seconds_this_call')} s, "
        f"{record.get('resumed_stages', 0)} stages resumed from saved state).",
        "",
    ]
    reduced = record.get("reduced_vs_full") or {}
    if reduced:
        lines += [
            "Settings reduced vs the full protocol: "
            + "; ".join(f"{k} {v['this_run']} (full {v['full']})" for k, v in reduced.items())
            + ".",
            "",
        ]
    lines += [
        "Cells: robust accuracy after each attack of the cascade (each attack runs on the points still robust;",
        "the worst case per point is the last column). `skip`: not applicable (see below).",
        "",
    ]
    attacks = [a for a in record["attack_definitions"]]
    for tk in record["threat_models"]:
        lines += [
            f"## {tk}",
            "",
            "| defense | n | " + " | ".join(attacks) + " | **worst case** |",
            "|---|---|" + "---|" * len(attacks) + "---|",
        ]
        for name, d in record["defenses"].items():
            cells = []
            for a in attacks:
                e = d["attacks"].get(a, {}).get(tk, {})
                cells.append("skip" if e.get("status") == "skipped" else _fmt(e.get("accuracy")))
            lines.append(
                f"| {name} | {d['n']} | " + " | ".join(cells) + f" | **{_fmt(d['worst_case'][tk])}** |"
            )
        lines.append("")
    lines += _projection_lines(record) + _transfer_lines(record) + _latent_lines(record)
    lines += [
        "## Accuracy vs eps",
        "",
        "Independent runs of the curve attack (BPDA PGD through a preprocessing defense, "
        "else PGD) at each budget; eps 0 is clean accuracy. Plot: `accuracy_vs_eps.png`.",
        "",
    ]
    for name, d in record["defenses"].items():
        for norm, c in d["curves"].items():
            pts = ", ".join(f"{e:g}: {_fmt(a)}" for e, a in zip(c["eps"], c["accuracy"], strict=True))
            lines.append(f"- {name}, {norm} ({c['attack']}, {c['settings']['steps']} steps): {pts}")
    lines += ["", "## Red flags", ""]
    for flag, rule in record["flag_definitions"].items():
        lines.append(f"- **{flag}**: {rule}.")
    lines += ["", "| defense | flag | status | where | detail |", "|---|---|---|---|---|"]
    for name, d in record["defenses"].items():
        for c in d["checks"]:
            status = "**FLAG**" if c["status"] == "flag" else c["status"]
            lines.append(f"| {name} | {c['flag']} | {status} | {c['where']} | {c['detail']} |")
    lines += ["", "## Audit", ""]
    for name, d in record["defenses"].items():
        parts = []
        for tk, a in d["audit"].items():
            lo, hi = a["value_range"]
            rng = "no adversarial examples" if lo is None else f"range [{lo:.4g}, {hi:.4g}]"
            parts.append(
                f"{tk}: max {a['norm']} perturbation {a['max_perturbation']:.4g} (eps {a['eps']:g}), NaN {a['nan_count']}, {rng}"
            )
        lines.append(f"- audit {name}: " + "; ".join(parts))
    lines += _cost_lines(record)
    lines += ["", "## Attacks", ""]
    for a, doc in record["attack_definitions"].items():
        lines.append(f"- `{a}`: {doc}")
    skipped = sorted(
        {
            (a, e["reason"])
            for d in record["defenses"].values()
            for a, per in d["attacks"].items()
            for e in per.values()
            if e.get("status") == "skipped"
        }
    )
    if skipped:
        lines += ["", "Skipped: " + "; ".join(f"`{a}`: {r}" for a, r in skipped) + "."]
    lines += [
        "",
        "Grids (clean / adversarial / projected): "
        + ", ".join(
            f"`grid_{name}_{tk}.png`" for name in record["defenses"] for tk in record["threat_models"]
        )
        + ".",
        "",
    ]
    return "\n".join(lines)


def _projection_lines(record: Mapping[str, Any]) -> list[str]:
    rows = [(name, d["projection"]) for name, d in record["defenses"].items() if d.get("projection")]
    if not rows:
        return []
    lines = [
        "## Projection (defended clean)",
        "",
        "Deterministic projection of each clean point (the defense's preprocess at the run's seed): the classifier's",
        "accuracy on the projections, per-pixel MSE to the clean image, generator passes per image.",
        "",
        "| defense | accuracy on projections | MSE median | MSE mean | generator passes / image | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for name, p in rows:
        mse = p["mse_per_pixel"]
        lines.append(
            f"| {name} | {_fmt(p['accuracy_on_projections'])} | {mse['median']:.4g} | {mse['mean']:.4g} | "
            f"{p['generator_passes_per_image'] if p['generator_passes_per_image'] is not None else '-'} | {p['seconds']} |"
        )
    return [*lines, ""]


def _cost_lines(record: Mapping[str, Any]) -> list[str]:
    """Per defense and stage: points, real forward rows (real projections of a projection defense) and seconds."""
    lines: list[str] = []
    for name, d in record["defenses"].items():
        cost = d.get("cost")
        if not cost or not cost["stages"]:
            continue
        t = cost["total"]
        lines += [
            "",
            f"## Cost: {name}",
            "",
            "Real passes: rows through the defended model's forward or its preprocessing (for a projection "
            "defense, projections by the real schedule: attack steps through it, verdict draws, clean "
            "projections). Process seconds: summed over every chunk, resumed chunks included (under torchrun, "
            "over all processes).",
            "",
            "| stage | points | real passes | per point | process seconds |",
            "|---|---|---|---|---|",
        ]
        for stage, r in cost["stages"].items():
            per = (
                f"{r['real_passes'] / r['points']:.1f}"
                if r["real_passes"] is not None and r["points"]
                else "-"
            )
            secs = "-" if r["process_seconds"] is None else f"{r['process_seconds']:.1f}"
            lines.append(f"| {stage} | {_fmt(r['points'])} | {_fmt(r['real_passes'])} | {per} | {secs} |")
        note = "" if t["complete"] else " (some stages were saved before these counts existed)"
        lines.append(f"| **total**{note} | | **{t['real_passes']}** | | **{t['process_seconds']}** |")
    return lines


def _transfer_lines(record: Mapping[str, Any]) -> list[str]:
    rows = []
    for name, d in record["defenses"].items():
        for attack, per in d["attacks"].items():
            for tk, e in per.items():
                t = e.get("transfer")
                if t:
                    through = (e.get("settings") or {}).get("through") or (e.get("settings") or {}).get(
                        "queries_to"
                    )
                    if attack == "pgd":
                        through = "bare classifier"
                    elif attack == "surrogate-pgd":
                        through = ", ".join(e["settings"].get("surrogates", []))
                    elif attack == "unrolled-pgd":
                        through = "unrolled model (draws judged separately)"
                    rows.append(
                        f"| {name} | {tk} | {attack} | {through} | {t['attacked']} | {t['surrogate_broken']} | "
                        f"{t['transferred']} | {t['not_transferred']} | {t['broken_without_surrogate']} |"
                    )
                    for m, c in t.get("by_surrogate", {}).items():
                        rows.append(
                            f"| {name} | {tk} | {attack}: {m} alone | {m} | {c['attacked']} | "
                            f"{c['surrogate_broken']} | {c['transferred']} | {c['not_transferred']} | - |"
                        )
    if not rows:
        return []
    return [
        "## Surrogate transfer",
        "",
        "Stages whose inner loop ran on a stand-in of the defense (its surrogate, or the bare classifier for the",
        "naive `pgd`): of the points the stand-in misclassified, how many the real defense misclassifies too",
        "(every verdict is the real defense's). `surrogate broken = transferred + not transferred`; `broken by",
        "the defense = transferred + broken without surrogate success`. A large `not transferred` on a surrogate",
        "stage is the `surrogate-transfer-gap` flag: the surrogate does not stand in for the defense.",
        "",
        "| defense | threat | stage | inner model | attacked | surrogate broken | transferred | not transferred | broken without surrogate |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def _latent_lines(record: Mapping[str, Any]) -> list[str]:
    lines = []
    for name, d in record["defenses"].items():
        for tk in record["threat_models"]:
            on = d["attacks"].get("onmanifold", {}).get(tk, {})
            op = d["attacks"].get("overpowered", {}).get(tk, {})
            if "eligible" in on:
                lines.append(
                    f"- {name}, {tk}, on-manifold (classifier alone, pixel l2 <= {on['settings']['budget_l2']:g}): "
                    f"{on['successes']} of {on['eligible']} eligible points (G(z) labelled correctly) flipped; "
                    f"grid `onmanifold_{name}_{tk}.png`"
                )
            if "consistency_at_steps" in op:
                curve = ", ".join(f"{t}: {_fmt(v)}" for t, v in op["consistency_at_steps"].items())
                lines.append(
                    f"- {name}, {tk}, overpowered (classifier alone, pair l2 <= {op['settings']['budget_l2']:g}): "
                    f"share of attacked starts without a class-changing pair after t steps: {curve}"
                )
    if not lines:
        return []
    return ["## Latent attacks on the classifier alone", "", *lines, ""]


def plot_curves(record: Mapping[str, Any], path: Path) -> None:
    """Accuracy vs eps, one panel per norm, one line per defense."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norms = sorted({n for d in record["defenses"].values() for n in d["curves"]}, key=lambda v: v != "linf")
    fig, axes = plt.subplots(1, max(1, len(norms)), figsize=(5 * max(1, len(norms)), 3.8), squeeze=False)
    for ax, norm in zip(axes[0], norms, strict=False):
        for name, d in record["defenses"].items():
            c = d["curves"].get(norm)
            if c:
                ax.plot(c["eps"], c["accuracy"], marker="o", label=f"{name} ({c['attack']}, n={d['n']})")
        ax.set_xlabel(f"{norm} eps")
        ax.set_ylabel("robust accuracy")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if not norms:
        axes[0][0].text(0.1, 0.5, "no curves computed")
    fig.suptitle(("QUICK " if record.get("quick") else "") + "accuracy vs eps", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_examples(ex: Mapping[str, Any], y: list[int] | None, title: str, path: Path) -> None:
    """Rows clean / adversarial / projected (when the defense has a projection), one column per example."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = len(ex.get("attacks", []))
    rows = [("clean", ex.get("clean")), ("adversarial", ex.get("x_adv"))]
    if isinstance(ex.get("projected"), Tensor):
        rows.append(("projected", ex["projected"]))
    fig, axes = plt.subplots(
        len(rows), max(1, count), figsize=(1.6 * max(1, count) + 0.6, 1.8 * len(rows) + 0.6), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    for r, (_label, imgs) in enumerate(rows):
        for c in range(count):
            if not isinstance(imgs, Tensor):
                continue
            img = imgs[c]
            ax = axes[r][c]
            ax.imshow(
                img.reshape(img.shape[-2], img.shape[-1]).numpy()
                if img.shape[0] == 1
                else img.permute(1, 2, 0).numpy(),
                cmap="gray",
                vmin=0,
                vmax=1,
            )
            if r == 0:
                ax.set_title(f"y={y[c] if y else '?'}", fontsize=7)
            elif r == 1:
                ax.set_title(f"{ex['attacks'][c]}: {int(ex['pred'][c])}", fontsize=7)
            else:
                ax.set_title("projection", fontsize=7)
    if count == 0:
        axes[0][0].text(0.0, 0.5, "no point broken: nothing to show", fontsize=9)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(
    record: Mapping[str, Any], stages: Mapping[str, Any], out: Path, labels: list[int] | None = None
) -> None:
    """Write ``results.json`` (with its SHA-256: :func:`eval.run_folder.write_record`), ``report.md``,
    ``accuracy_vs_eps.png`` and ``grid_<defense>_<threat>.png``; the text files atomically."""
    out = Path(out)
    write_record(out / "results.json", _finite(record))
    atomic_write_text(out / "report.md", write_markdown(record))
    plot_curves(record, out / "accuracy_vs_eps.png")
    for name, d in record["defenses"].items():
        for tk in record["threat_models"]:
            ex = stages.get(f"{name}|{tk}|examples")
            if ex is None:
                continue
            ys = d["examples"].get(tk, {}).get("labels")
            plot_examples(
                ex,
                ys,
                f"{name}, {tk}: clean / adversarial (attack: prediction) / projected",
                out / f"grid_{name}_{tk}.png",
            )
            on = stages.get(f"{name}|{tk}|onmanifold")
            if on is not None and "pairs" in on:
                _plot_onmanifold(
                    on, d["attacks"]["onmanifold"][tk], out / f"onmanifold_{name}_{tk}.png", f"{name}, {tk}"
                )


def _plot_onmanifold(rec: Mapping[str, Any], entry: Mapping[str, Any], path: Path, where: str) -> None:
    """The on-manifold pairs ``G(z) | G(z')`` the classifier gets wrong, closest first."""
    from eval.defense_figures import plot_pairs

    pairs = rec["pairs"]
    pos = pairs["positions"].tolist()
    points = rec["indices"][pos].tolist() if len(pos) else []
    captions = [
        (f"G(z) #{i}", f"G(z'): pred {int(rec['pred_adv'][p])}, l2 {float(rec['pixel_distance'][p]):.2f}")
        for i, p in zip(points, pos, strict=True)
    ]
    title = (
        f"{where}: on-manifold pairs G(z) | G(z'), ||G(z') - G(z)||_2 <= {entry['settings']['budget_l2']:g} "
        f"(closest {len(pos)} of {entry.get('successes', '?')} flips)"
    )
    plot_pairs(path, pairs["x0"], pairs["x_adv"], captions, title)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
