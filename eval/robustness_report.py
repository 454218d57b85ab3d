"""Outputs of the robustness harness: ``results.json``, the Markdown report and the PNG plots.

``results.json`` schema (``schema: "manifold-defense robustness v2"``, ``version``: the manifold-defense version
that wrote it)::

    {"threat_models": ["linf-0.3", "l2-2", "l2-4"], "n": 200, "settings": {... nested attack configs:
     "pgd": {"steps": 40, ...}, "overpowered": {...}, "thresholds": {...}, "convergence": true ...}},
     "quick": bool, "reduced_vs_full": {"field" or "config.field": {"this_run": v, "full": v}},
     "attack_definitions": {...}, "flag_definitions": {...}, "world_size": W, ...,
     "defenses": {"<name>": {
         "n": points, "randomized": bool, "draws": k, "clean": accuracy,
         "attacks": {"<attack>": {"<threat>": {"status": "ran" | "skipped", "reason": ..., "accuracy": robust
                     accuracy after this attack of the cascade (cumulative worst case), "attacked": points,
                     "broken": newly broken points, "broken_alone": points this attack broke among those it
                     attacked, "seconds": ..., "settings": {...}}},
                     "convergence": {"<threat>": {... as above over the whole ladder, "rerun_of": stage,
                     "original_settings": {...}, "figure_before": accuracy before it, "ladder": [{"round": k,
                     "settings", "attacked", "broken", "accuracy", "seconds"} per rerun], "last_broken": n}}},
         "worst_case": {"<threat>": final robust accuracy (worst case per point over the cascade and the rerun)},
         "robust_points": {"<threat>": [indices of the points robust in the worst case (0-based, evaluation order)]},
         "majority_vote": null, or on a randomized defense run with the majority setting {"draws": k, "clean":
                     accuracy, "accuracy": {"<threat>": ...}}: a point counts when most draws classify it correctly
                     (an upper bound beside the worst case: later stages attack only worst-case survivors),
         "curves": {"linf" | "l2": {"attack": ..., "eps": [0, ...], "accuracy": [clean, ...]}},
         "audit": {"<threat>": {"norm", "eps", "max_perturbation", "nan_count", "value_range": [lo, hi]}},
         "gradients": {"<source>": {"points", "nan_or_inf", "zero_fraction", "norm_median"}},
         "checks": [{"flag", "status": "ok" | "flag" | "n/a", "where", "detail", "rule"}],
         "flags": [the checks whose status is "flag"],
         "examples": {"<threat>": {"indices": [...], "attacks": [...]}},
         "cost": {"stages": {"<stage>": {"points", "seconds", "process_seconds", "real_passes"}}, "total": {...}}}}}

A record written by ``--report-partial`` also has ``"incomplete"`` (the stage keys not run) and ``"not_started"`` (the
defenses not reached).

The attacks and the per-threat results are nested ``attacks[attack][threat]`` and ``worst_case[threat]``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from eval.harness.plots import plot_curves, plot_examples, plot_onmanifold
from eval.harness.record import ladder_rungs
from eval.run_folder import write_record
from manifold_defense.integrity import atomic_write_text

__all__ = ["write_markdown", "write_outputs"]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{100 * value:.1f}%"
    return "-" if value is None else str(value)


def write_markdown(record: Mapping[str, Any]) -> str:
    """The report: setup, one table per threat model (defense x attack cascade), the convergence reruns,
    projection, transfer and latent figures, curves, checks, audit, cost and the attack definitions."""
    lines = _setup_lines(record)
    attacks = list(record["attack_definitions"])
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
    lines += _convergence_lines(record) + _majority_lines(record)
    lines += (
        _projection_lines(record) + _transfer_lines(record) + _latent_lines(record) + _curve_lines(record)
    )
    lines += _flag_lines(record) + _audit_lines(record) + _cost_lines(record) + _attack_lines(record)
    return "\n".join(lines)


def _majority_lines(record: Mapping[str, Any]) -> list[str]:
    rows = [(name, d["majority_vote"]) for name, d in record["defenses"].items() if d.get("majority_vote")]
    if not rows:
        return []
    lines = [
        "## Majority vote beside the worst case",
        "",
        "A point counts when most of the fresh draws classify it correctly, on its clean image and on every stage's",
        "example; an upper bound beside the worst case (later stages attack only the worst case's survivors).",
        "",
        "| defense | draws | clean | " + " | ".join(record["threat_models"]) + " |",
        "|---|---|---|" + "---|" * len(record["threat_models"]),
    ]
    for name, m in rows:
        cells = " | ".join(_fmt(m["accuracy"].get(tk)) for tk in record["threat_models"])
        lines.append(f"| {name} | {m['draws']} | {_fmt(m['clean'])} | {cells} |")
    return [*lines, ""]


def _setup_lines(record: Mapping[str, Any]) -> list[str]:
    s = record["settings"]
    quick = " (QUICK smoke run: reduced settings, not the reported figures)" if record.get("quick") else ""
    lines = [
        f"# Robustness evaluation{quick}",
        "",
        f"Command: `{record.get('command', '(Python API)')}`; device {record.get('device', '?')}; processes "
        f"{record.get('world_size', 1)}; n = {record['n']} ({record.get('data', 'given points')}); seed {s['seed']}; "
        f"stage time {record.get('seconds_stages')} s (this call {record.get('seconds_this_call')} s, "
        f"{record.get('resumed_stages', 0)} stages resumed from saved state); manifold-defense "
        f"{record.get('version', '?')}.",
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
    if record.get("incomplete") or record.get("not_started"):
        lines += [
            f"**INCOMPLETE** (written from a stopped run with --report-partial): {len(record.get('incomplete', []))} "
            f"stages not run, defenses not started: {record.get('not_started') or 'none'}. Every figure below is an "
            "upper bound; the same command without --report-partial resumes the run.",
            "",
        ]
    if not s.get("convergence", True):
        lines += [
            "**Convergence check off** (quick protocol): no figure below was checked for convergence.",
            "",
        ]
    return [
        *lines,
        "Cells: robust accuracy after each attack of the cascade (each attack runs on the points still robust;",
        "the worst case per point is the last column). `skip`: not applicable (see below). `convergence`: the",
        "strongest white-box stage rerun with twice its steps on the survivors (its own section below).",
        "",
    ]


def _convergence_lines(record: Mapping[str, Any]) -> list[str]:
    """Per defense, threat and rerun of the ladder: the stage rerun, its settings before and after, and the change
    of the figure (``not-converged`` on the last rerun when it fired)."""
    rows = []
    for name, d in record["defenses"].items():
        tol = record["settings"]["thresholds"]["not_converged"] * d["n"] + 1e-9
        for tk, e in d["attacks"].get("convergence", {}).items():
            if e.get("status") != "ran":
                rows.append(f"| {name} | {tk} | - | - | - | - | - | {e.get('reason', 'skipped')} |")
                continue
            before, figure, rungs = e["original_settings"], e["figure_before"], ladder_rungs(e)
            for r in rungs:
                new = r["settings"]
                change = ", ".join(f"{k} {before[k]} -> {new[k]}" for k in ("steps", "eot_samples")
                                   if k in new and before.get(k) != new[k])  # fmt: skip
                fired = r is rungs[-1] and r["broken"] > tol
                rows.append(
                    f"| {name} | {tk} | {r['round']} | {e['rerun_of']} | {change} | {r['attacked']} | "
                    f"{r['broken']} | {_fmt(figure)} -> {_fmt(r['accuracy'])}{' **not-converged**' if fired else ''} |"
                )
                figure = r["accuracy"]
    if not rows:
        return []
    return [
        "## Convergence",
        "",
        "After the cascade, the strongest white-box stage of each threat (the gradient stage that broke the most",
        "points) ran again on the points still robust, with twice its steps (and twice its EOT samples on a",
        "randomized defense). What it broke counts in the worst case above; more than one percentage point of the",
        "figure raises `not-converged`: the attacks had not converged, and a stronger one may break more. A ladder",
        "(`convergence_rounds` K > 1) reruns while that happens, round k with 2^k times the steps, up to K rounds.",
        "",
        "| defense | threat | round | rerun of | settings | survivors attacked | newly broken | figure |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def _curve_lines(record: Mapping[str, Any]) -> list[str]:
    lines = [
        "## Accuracy vs eps",
        "",
        "Independent runs of the curve attack (BPDA PGD through a preprocessing defense, else PGD) at each budget; eps 0 is clean accuracy. Plot: `accuracy_vs_eps.png`.",
        "",
    ]
    for name, d in record["defenses"].items():
        for norm, c in d["curves"].items():
            pts = ", ".join(f"{e:g}: {_fmt(a)}" for e, a in zip(c["eps"], c["accuracy"], strict=True))
            lines.append(f"- {name}, {norm} ({c['attack']}, {c['settings']['steps']} steps): {pts}")
    return lines


def _flag_lines(record: Mapping[str, Any]) -> list[str]:
    lines = ["", "## Red flags", ""]
    for flag, rule in record["flag_definitions"].items():
        lines.append(f"- **{flag}**: {rule}.")
    lines += ["", "| defense | flag | status | where | detail |", "|---|---|---|---|---|"]
    for name, d in record["defenses"].items():
        for c in d["checks"]:
            status = "**FLAG**" if c["status"] == "flag" else c["status"]
            lines.append(f"| {name} | {c['flag']} | {status} | {c['where']} | {c['detail']} |")
    return lines


def _audit_lines(record: Mapping[str, Any]) -> list[str]:
    lines = ["", "## Audit", ""]
    for name, d in record["defenses"].items():
        parts = []
        for tk, a in d["audit"].items():
            lo, hi = a["value_range"]
            rng = "no adversarial examples" if lo is None else f"range [{lo:.4g}, {hi:.4g}]"
            parts.append(
                f"{tk}: max {a['norm']} perturbation {a['max_perturbation']:.4g} (eps {a['eps']:g}), NaN {a['nan_count']}, {rng}"
            )
        lines.append(f"- audit {name}: " + "; ".join(parts))
    return lines


def _attack_lines(record: Mapping[str, Any]) -> list[str]:
    lines = ["", "## Attacks", ""]
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
    grids = ", ".join(
        f"`grid_{name}_{tk}.png`" for name in record["defenses"] for tk in record["threat_models"]
    )
    return [*lines, "", f"Grids (clean / adversarial / projected): {grids}.", ""]


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
            per = f"{r['real_passes'] / r['points']:.1f}" if r["points"] else "-"
            secs = f"{r['process_seconds']:.1f}"
            lines.append(f"| {stage} | {_fmt(r['points'])} | {_fmt(r['real_passes'])} | {per} | {secs} |")
        lines.append(f"| **total** | | **{t['real_passes']}** | | **{t['process_seconds']}** |")
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
                plot_onmanifold(
                    on, d["attacks"]["onmanifold"][tk], out / f"onmanifold_{name}_{tk}.png", f"{name}, {tk}"
                )


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
