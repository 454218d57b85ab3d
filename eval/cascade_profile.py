"""``manifold-defense cascade-profile``: where a harness cascade spends its time, and proof that a cheaper one
finds the same worst case on the same points.

Issue 35 (part 3) asks to profile the robustness cascade per stage, cut what does not change a verdict (budgets
by stage, Square through a verified surrogate, early exits on points already broken) and prove, on the same
points, that the worst case does not rise: the fast projection's full cascade at n = 100 over three threats in
at most one process-hour on this CPU, with the same worst case within one point. This module is the measuring
and proving tool; the cheaper ("lean") cascade itself is a preset of the harness.

:func:`profile` reads a ``results.json`` of the harness (schema in :mod:`eval.robustness_report`) and gives one
:class:`ProfileRow` per stage that ran, in the order ``cost.stages`` stores them (run order): the points it
attacked, the points it newly broke, its process-seconds and real passes, its share of the defense's total and
its process-seconds per broken point. Stages that ran on zero points are kept (they cost 0); skipped stages cost
nothing and are left out. Stages not tied to a threat (``clean``, ``projection``, the ``curve|...`` points) have
``threat`` ``None``; ``clean``'s ``broken`` is the points misclassified without attack.

:func:`compare` reads two runs of the same protocol (same ``n``, ``data`` and threats) and, per defense and
threat, sets the points robust in the worst case of each run side by side. How to read it: a point robust under
the lean cascade but broken under the full one (``rose``) is a point the lean cascade missed, so the lean worst
case is too high by that many points; a point broken only by the lean cascade (``found_more``) is one the full
cascade missed, harmless for an upper bound. The lean cascade keeps the verdict on a threat when ``rose`` holds
at most ``tolerance_points`` points; its cost is the total process-seconds of each run, their ratio and whether
the lean total fits the issue's budget (:data:`BUDGET_SECONDS`). Runs of schema v1 (no ``robust_points`` nor
``cost``) and runs written from a stopped run (``incomplete``) are refused with a ``ValueError``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eval.cli import command_line, console_spelling
from eval.harness.record import ladder_rungs
from eval.leaderboard_rows import converged_verdict, load_checked_json
from manifold_defense.integrity import atomic_write_text, checked_json

__all__ = [
    "BUDGET_SECONDS",
    "RENDERERS",
    "SCHEMA",
    "Comparison",
    "DefenseCost",
    "ProfileRow",
    "ThreatComparison",
    "VerdictCost",
    "add_parsers",
    "compare",
    "load_results",
    "main",
    "markdown_compare",
    "markdown_profile",
    "markdown_verdict_cost",
    "profile",
    "verdict_cost",
]  # fmt: skip

SCHEMA = "manifold-defense cascade-profile v1"
"""The schema of the ``--json`` record."""
BUDGET_SECONDS = 3600.0
"""Issue 35's budget for a defense's whole cascade: one process-hour."""
V2 = "manifold-defense robustness v2"
V1 = "manifold-defense robustness v1"


@dataclass(frozen=True)
class ProfileRow:
    """One stage of one defense's cascade: ``points`` attacked (``None`` where the record has no count),
    ``broken`` (points newly broken; ``None`` for a stage that breaks nothing by definition), ``process_seconds``
    and ``real_passes`` (from ``cost.stages``), ``share`` of the defense's total process-seconds (``None`` when
    that total is 0) and ``seconds_per_broken`` (``None`` when the stage broke no point)."""

    defense: str
    threat: str | None
    stage: str
    status: str
    points: int | None
    broken: int | None
    process_seconds: float
    real_passes: int
    share: float | None
    seconds_per_broken: float | None


@dataclass(frozen=True)
class VerdictCost:
    """What one defense's cascade under one threat had to spend to reach its verdict, in the order it ran.

    ``broken`` is the points its stages broke in all; ``verdict_stage`` the first stage that broke a point and
    after which at most ``tolerance_points`` of them were still unbroken, ``seconds_to_verdict`` the
    process-seconds through it;
    ``last_break_stage`` the last stage that broke a point, ``seconds_to_last_break`` the seconds through it (what
    an oracle that stopped the cascade at its last break would have spent); ``seconds_total`` the threat's whole
    cascade (the convergence rerun included). Stage fields are ``None`` when no stage broke a point."""

    defense: str
    threat: str
    n: int | None
    worst_case: float
    broken: int
    tolerance_points: int
    verdict_stage: str | None
    seconds_to_verdict: float
    last_break_stage: str | None
    seconds_to_last_break: float
    seconds_total: float

    @property
    def after_last_break(self) -> float:
        """The seconds the cascade spent after its last break: attacks on points it could not break."""
        return self.seconds_total - self.seconds_to_last_break


@dataclass(frozen=True)
class ThreatComparison:
    """One defense under one threat in both runs: worst cases, robust point indices (0-based), ``rose`` (robust
    under lean, broken under full: missed by the lean cascade), ``found_more`` (broken only under lean),
    ``within_tolerance`` and each run's convergence verdict (``"yes"``, ``"no"`` or ``"unchecked"``)."""

    defense: str
    threat: str
    worst_full: float
    worst_lean: float
    robust_full: frozenset[int]
    robust_lean: frozenset[int]
    rose: frozenset[int]
    found_more: frozenset[int]
    within_tolerance: bool
    converged_full: str
    converged_lean: str


@dataclass(frozen=True)
class DefenseCost:
    """A defense's process-seconds in each run without the accuracy-vs-eps curves (the cascade, its clean pass and
    projection statistics), ``ratio`` lean / full (``None`` when full is 0) and whether the lean figure is at most
    :data:`BUDGET_SECONDS`."""

    defense: str
    full_seconds: float
    lean_seconds: float
    ratio: float | None
    lean_within_budget: bool


@dataclass(frozen=True)
class Comparison:
    """:func:`compare`'s verdict: the protocol (``n``, ``data``, ``threats``), the rows per defense and threat,
    the costs per defense, the defenses only one run holds, and ``within_tolerance`` (every row within)."""

    n: int
    data: str
    threats: tuple[str, ...]
    tolerance_points: int
    rows: tuple[ThreatComparison, ...]
    costs: tuple[DefenseCost, ...]
    only_full: tuple[str, ...]
    only_lean: tuple[str, ...]

    @property
    def within_tolerance(self) -> bool:
        """Whether the lean cascade missed at most ``tolerance_points`` points on every defense and threat."""
        return all(r.within_tolerance for r in self.rows)


def _check(rec: Any, where: str, points: bool) -> Mapping[str, Any]:
    """``rec`` if it is a v2 robustness results record whose defenses carry ``cost`` (and ``robust_points``
    when ``points``); ``ValueError`` naming what is missing otherwise."""
    if not isinstance(rec, Mapping):
        raise TypeError(f"{where}: expected a robustness results record (a JSON object), got {type(rec).__name__}")
    schema = rec.get("schema")
    if schema == V1:
        raise ValueError(f"{where}: a {V1!r} record has no per-stage 'cost' nor 'robust_points': expected {V2!r}; "
                         "rerun it with the current harness")  # fmt: skip
    if schema != V2:
        raise ValueError(f"{where}: expected a robustness results record of schema {V2!r}, got schema {schema!r}")
    if not isinstance(rec.get("threat_models"), list):
        raise ValueError(f"{where}: expected 'threat_models' as a list, got {rec.get('threat_models')!r}")
    defenses = rec.get("defenses")
    if not isinstance(defenses, Mapping) or not defenses:
        raise ValueError(f"{where}: expected at least one defense under 'defenses', got {defenses!r}")
    need = ("attacks", "worst_case", "cost", *(("robust_points",) if points else ()))
    for name, d in defenses.items():
        missing = [k for k in need if not isinstance(d, Mapping) or k not in d]
        if missing:
            raise ValueError(f"{where}: defense {name!r} lacks {', '.join(missing)} (expected every field of {V2!r})")
        cost = d["cost"]
        if not isinstance(cost, Mapping) or not {"stages", "total"} <= set(cost):
            raise ValueError(f"{where}: defense {name!r}: expected cost with 'stages' and 'total', got {cost!r}")
    return rec


def load_results(path: str | Path) -> dict[str, Any]:
    """The harness ``results.json`` at ``path`` (its ``sha256`` verified when it carries one).

    Raises:
        OSError: the file cannot be read.
        ValueError: not JSON, altered, or not a v2 robustness results record with per-stage costs.
    """
    rec = load_checked_json(Path(path))
    _check(rec, str(path), points=False)
    return rec


def _stage_entry(attacks: Mapping[str, Any], stage: str, tk: str) -> Mapping[str, Any] | None:
    """The record entry of ``stage`` under ``tk``; the convergence ladder's rerun ``k`` (``convergence`` for the
    first, ``convergence-k``) is read from ``attacks.convergence[tk].ladder`` (its own points and newly broken)."""
    if stage != "convergence" and not stage.startswith("convergence-"):
        return attacks.get(stage, {}).get(tk)
    e = attacks.get("convergence", {}).get(tk)
    k = 1 if stage == "convergence" else int(stage.rpartition("-")[2])
    if e is None or e.get("status") != "ran":
        return e if k == 1 else None
    rungs = ladder_rungs(e)
    return {**rungs[k - 1], "status": "ran"} if k <= len(rungs) else None


def profile(results: Mapping[str, Any]) -> list[ProfileRow]:
    """One :class:`ProfileRow` per stage that ran, per defense, in the run order ``cost.stages`` stores.

    Raises:
        ValueError: not a v2 record, or a stage that ran has no cost entry (or a cost entry no stage).
    """
    rec = _check(results, "results", points=False)
    threats = list(rec["threat_models"])
    rows: list[ProfileRow] = []
    for name, d in rec["defenses"].items():
        attacks, stages = d["attacks"], d["cost"]["stages"]
        total = float(d["cost"]["total"]["process_seconds"])
        ran = {f"{tk}|{a}" for a, per in attacks.items() if a != "clean"
               for tk, e in per.items() if e.get("status") == "ran"}  # fmt: skip
        ran |= {f"{tk}|convergence-{k}" for tk, e in attacks.get("convergence", {}).items()
                for k in range(2, len(ladder_rungs(e)) + 1)}  # fmt: skip
        if ran - set(stages):
            raise ValueError(f"defense {name!r}: stages {sorted(ran - set(stages))} ran but have no cost entry")
        for key, c in stages.items():
            tk, _, stage = key.partition("|")
            threat: str | None
            points: int | None
            broken: int | None
            if tk in threats:
                entry = _stage_entry(attacks, stage, tk)
                if key not in ran or entry is None:
                    raise ValueError(f"defense {name!r}: cost entry {key!r} has no stage that ran under attacks")
                threat = tk
                status, points, broken = str(entry["status"]), int(entry["attacked"]), int(entry["broken"])
            else:
                threat, stage, status, points = None, key, "ran", c.get("points")
                first = next(iter(attacks.get("clean", {}).values()), None) if key == "clean" else None
                broken = None if first is None else int(first["broken"])
            seconds = float(c["process_seconds"])
            rows.append(ProfileRow(
                defense=name, threat=threat, stage=stage, status=status, points=points, broken=broken,
                process_seconds=seconds, real_passes=round(c["real_passes"]),
                share=seconds / total if total > 0 else None,
                seconds_per_broken=seconds / broken if broken else None,
            ))  # fmt: skip
    return rows


def verdict_cost(results: Mapping[str, Any], *, tolerance_points: int = 1) -> list[VerdictCost]:
    """Per defense and threat, the cost of reaching the cascade's verdict (:class:`VerdictCost`), from the run's
    per-stage record in run order. How to read it: ``seconds_to_last_break`` is a lower bound on what this cascade,
    with these budgets and order, must spend to find every point it found; what it spent after
    (``after_last_break``) went into attacks on points it could not break, the price of the verdict's evidence.

    Raises:
        ValueError: not a v2 record with per-stage costs, or a negative ``tolerance_points``.
    """
    if isinstance(tolerance_points, bool) or not isinstance(tolerance_points, int) or tolerance_points < 0:
        raise ValueError(f"expected tolerance_points as an int >= 0, got {tolerance_points!r}")
    rows = profile(results)
    out = []
    for name, d in results["defenses"].items():
        for tk in results["threat_models"]:
            mine = [r for r in rows if r.defense == name and r.threat == tk]
            if not mine:
                continue
            broken = sum(r.broken or 0 for r in mine)
            total = sum(r.process_seconds for r in mine)
            done, spent = 0, 0.0
            verdict: tuple[str | None, float] = (None, 0.0)
            last: tuple[str | None, float] = (None, 0.0)
            for r in mine:
                done, spent = done + (r.broken or 0), spent + r.process_seconds
                if verdict[0] is None and broken - done <= tolerance_points and done > 0:
                    verdict = (r.stage, spent)
                if r.broken:
                    last = (r.stage, spent)
            out.append(VerdictCost(
                defense=name, threat=tk, n=d.get("n"), worst_case=float(d["worst_case"][tk]), broken=broken,
                tolerance_points=tolerance_points, verdict_stage=verdict[0], seconds_to_verdict=verdict[1],
                last_break_stage=last[0], seconds_to_last_break=last[1], seconds_total=total,
            ))  # fmt: skip
    return out


def markdown_verdict_cost(costs: Sequence[VerdictCost]) -> str:
    """A markdown table of :func:`verdict_cost` (seconds as integers, shares of the threat's total as percent)."""
    tol = {c.tolerance_points for c in costs}
    within = f"within {tol.pop()} point(s)" if len(tol) == 1 else "within tolerance"
    head = ["defense", "threat", "worst case", "points broken", f"verdict {within} after", "process s to there",
            "last break at", "process s to there", "whole threat", "spent after the last break"]  # fmt: skip
    lines = [_row(head), _row(["---"] * len(head))]
    for c in costs:
        tot = c.seconds_total
        lines.append(_row([c.defense, c.threat, f"{c.worst_case:.2f}", c.broken, c.verdict_stage or "-",
                           f"{_s(c.seconds_to_verdict)} ({_share(c.seconds_to_verdict, tot)})", c.last_break_stage or "-",
                           f"{_s(c.seconds_to_last_break)} ({_share(c.seconds_to_last_break, tot)})", _s(tot),
                           f"{_s(c.after_last_break)} ({_share(c.after_last_break, tot)})"]))  # fmt: skip
    return "\n".join(lines)


def _robust(d: Mapping[str, Any], name: str, tk: str, where: str) -> frozenset[int]:
    """The indices robust under ``tk``, checked against ``n`` and the worst case."""
    n, got = int(d["n"]), d["robust_points"].get(tk)
    valid = isinstance(got, list) and all(isinstance(i, int) and 0 <= i < n for i in got)
    if not valid or len(set(got)) < len(got):
        raise ValueError(f"{where}: defense {name!r} at {tk}: expected robust_points as distinct indices in "
                         f"[0, {n}), got {got!r}")  # fmt: skip
    if round(len(got) / n, 4) != round(float(d["worst_case"][tk]), 4):
        raise ValueError(f"{where}: defense {name!r} at {tk}: {len(got)} robust points of {n} disagree with the "
                         f"worst case {d['worst_case'][tk]}")  # fmt: skip
    return frozenset(got)


def _cascade_seconds(d: Mapping[str, Any]) -> float:
    """A defense's process-seconds without its accuracy-vs-eps curves (``curve|...``: a figure, not the cascade;
    a run may leave them out with ``--no-curves``)."""
    return sum(float(c["process_seconds"]) for k, c in d["cost"]["stages"].items() if not k.startswith("curve|"))


def compare(full: Mapping[str, Any], lean: Mapping[str, Any], *, tolerance_points: int = 1) -> Comparison:
    """Compare a lean cascade's run with the full cascade's on the same points (see the module docstring).

    Args:
        full: the results record of the full cascade.
        lean: the results record of the lean cascade.
        tolerance_points: how many points the lean cascade may miss per defense and threat.

    Raises:
        ValueError: a record is not v2 or is partial, the runs differ in ``n``, ``data`` or ``threat_models``, or
            they have no defense in common.
    """
    if isinstance(tolerance_points, bool) or not isinstance(tolerance_points, int) or tolerance_points < 0:
        raise ValueError(f"expected tolerance_points as an int >= 0, got {tolerance_points!r}")
    runs = {"full": _check(full, "full run", points=True), "lean": _check(lean, "lean run", points=True)}
    for label, rec in runs.items():
        if rec.get("incomplete"):
            raise ValueError(f"{label} run: written from a stopped run (stages not run: "
                             f"{', '.join(rec['incomplete'])}): its worst case is only an upper bound")  # fmt: skip
    for field in ("n", "data", "threat_models"):
        if full.get(field) != lean.get(field):
            raise ValueError(f"the runs differ in {field!r}: full {full.get(field)!r}, lean {lean.get(field)!r}; "
                             "expected two runs of the same protocol on the same points")  # fmt: skip
    names = [name for name in full["defenses"] if name in lean["defenses"]]
    if not names:
        raise ValueError(f"the runs have no defense in common: full {sorted(full['defenses'])}, "
                         f"lean {sorted(lean['defenses'])}")  # fmt: skip
    rows, costs = [], []
    for name in names:
        df, dl = full["defenses"][name], lean["defenses"][name]
        if df["n"] != dl["n"]:
            raise ValueError(f"defense {name!r}: the runs differ in 'n': full {df['n']!r}, lean {dl['n']!r}")
        for tk in full["threat_models"]:
            rf, rl = _robust(df, name, tk, "full run"), _robust(dl, name, tk, "lean run")
            rose = rl - rf
            rows.append(ThreatComparison(
                defense=name, threat=tk, worst_full=float(df["worst_case"][tk]),
                worst_lean=float(dl["worst_case"][tk]), robust_full=rf, robust_lean=rl, rose=rose,
                found_more=rf - rl, within_tolerance=len(rose) <= tolerance_points,
                converged_full=converged_verdict(df, tk, 2)[0], converged_lean=converged_verdict(dl, tk, 2)[0],
            ))  # fmt: skip
        sf, sl = _cascade_seconds(df), _cascade_seconds(dl)
        costs.append(DefenseCost(name, sf, sl, sl / sf if sf > 0 else None, sl <= BUDGET_SECONDS))
    return Comparison(
        n=int(full["n"]), data=str(full.get("data")), threats=tuple(full["threat_models"]),
        tolerance_points=tolerance_points, rows=tuple(rows), costs=tuple(costs),
        only_full=tuple(n for n in full["defenses"] if n not in lean["defenses"]),
        only_lean=tuple(n for n in lean["defenses"] if n not in full["defenses"]),
    )  # fmt: skip


def _row(cells: Sequence[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _share(x: float, total: float) -> str:
    return _pct(x / total) if total > 0 else "-"


def _points(points: frozenset[int]) -> str:
    return ", ".join(map(str, sorted(points))) if points else "-"


def markdown_profile(rows: Sequence[ProfileRow]) -> str:
    """A markdown table of :func:`profile`'s rows and each defense's total (seconds as integers, seconds per
    broken point and shares as percent with one decimal)."""
    head = ["defense", "threat", "stage", "points", "broken", "process s", "share", "s / broken", "real passes"]
    lines = [_row(head), _row(["---"] * len(head))]
    for i, r in enumerate(rows):
        lines.append(_row([r.defense, r.threat or "-", r.stage, "-" if r.points is None else r.points,
                           "-" if r.broken is None else r.broken, _s(r.process_seconds), _pct(r.share),
                           "-" if r.seconds_per_broken is None else f"{r.seconds_per_broken:.1f}",
                           r.real_passes]))  # fmt: skip
        if i + 1 == len(rows) or rows[i + 1].defense != r.defense:
            mine = [x for x in rows if x.defense == r.defense]
            lines.append(_row([r.defense, "", "**total**", "", "", _s(sum(x.process_seconds for x in mine)), "",
                               "", sum(x.real_passes for x in mine)]))
    return "\n".join(lines)


def markdown_compare(comparison: Comparison) -> str:
    """Two markdown tables of a :class:`Comparison`: points per defense and threat (accuracies as percent with
    one decimal, indices 0-based), then the cost per defense (seconds as integers)."""
    c = comparison
    head = ["defense", "threat", "worst case full", "worst case lean", "missed by lean (rose)", "broken only by lean",
            f"within {c.tolerance_points} point(s)", "converged full / lean"]  # fmt: skip
    lines = [_row(head), _row(["---"] * len(head))]
    for r in c.rows:
        lines.append(_row([r.defense, r.threat, _pct(r.worst_full), _pct(r.worst_lean), _points(r.rose),
                           _points(r.found_more), "yes" if r.within_tolerance else "**no**",
                           f"{r.converged_full} / {r.converged_lean}"]))  # fmt: skip
    head = ["defense", "process s full", "process s lean", "lean / full", f"lean within {BUDGET_SECONDS:.0f} s"]
    lines += ["", _row(head), _row(["---"] * len(head))]
    for k in c.costs:
        ratio = "-" if k.ratio is None else f"{k.ratio:.2f}"
        lines.append(_row([k.defense, _s(k.full_seconds), _s(k.lean_seconds), ratio,
                           "yes" if k.lean_within_budget else "**no**"]))  # fmt: skip
    left = [f"{label} only: {', '.join(names)}" for label, names in (("full", c.only_full), ("lean", c.only_lean))
            if names]  # fmt: skip
    return "\n".join(lines + (["", *left] if left else []))


def markdown_side_by_side(full: Sequence[ProfileRow], lean: Sequence[ProfileRow]) -> str:
    """One markdown table of two runs' profiles, stage by stage (rows keyed by defense, threat and stage, in the
    full run's order, then stages only the lean run has): points attacked, newly broken, process seconds and real
    passes of each; ``-`` where a run has no such stage."""
    def key(r: ProfileRow) -> tuple[str, str | None, str]:
        return (r.defense, r.threat, r.stage)

    a, b = {key(r): r for r in full}, {key(r): r for r in lean}
    keys = list(a) + [k for k in b if k not in a]
    head = ["defense", "threat", "stage", "points full / lean", "broken full / lean", "process s full / lean",
            "real passes full / lean"]  # fmt: skip
    lines = [_row(head), _row(["---"] * len(head))]

    def pair(k: tuple[str, str | None, str], get: Any) -> str:
        return " / ".join("-" if r is None or get(r) is None else str(get(r)) for r in (a.get(k), b.get(k)))

    for k in keys:
        lines.append(_row([k[0], k[1] or "-", k[2], pair(k, lambda r: r.points), pair(k, lambda r: r.broken),
                           pair(k, lambda r: _s(r.process_seconds)), pair(k, lambda r: r.real_passes)]))  # fmt: skip
    return "\n".join(lines)


ROOT = Path(__file__).resolve().parent.parent


def _committed_profile(path: str, threat: str) -> str:
    return markdown_profile([r for r in profile(load_results(ROOT / path)) if r.threat == threat])


#: The committed full and lean runs of the fast projection at Linf 0.3 (first 100 test images).
LEAN_FAST_LINF = ("docs/figures/leaderboard/fast-classifier_linf-0.3_n100.json",
                  "docs/figures/leaderboard/lean/fast-classifier_linf-0.3_n100.json")  # fmt: skip
LEAN_FAST_LINF_COMMANDS = (
    "manifold-defense robustness --out DIR/fast-classifier --defenses projection-fast --n 100 --threads 1 "
    "--no-progress --threats linf-0.3",
    "manifold-defense robustness --out DIR/fast-classifier-lean --defenses projection-fast --n 100 --threads 1 "
    "--no-progress --threats linf-0.3 --lean --no-curves",
)


#: The committed full and lean runs of DiffPure with fixed noise at Linf 0.3 (first 100 test images; the 8000-step
#: prior at t* 200, the comparison of two cascades on the same points).
LEAN_DPF_LINF = ("docs/figures/history/ddpm8000/diffpure-fixed-classifier_linf-0.3_n100.json",
                 "docs/figures/history/ddpm8000/lean_diffpure-fixed-classifier_linf-0.3_n100.json")  # fmt: skip
_DPF = ("manifold-defense robustness --out DIR/dpf-linf --defenses diffpure-fixed --diffpure-t-star 200 --final-eot 20 "
        "--majority --no-curves --n 100 --threads 1 --no-progress --threats linf-0.3")  # fmt: skip
LEAN_DPF_LINF_COMMANDS = (_DPF, _DPF.replace("DIR/dpf-linf", "DIR/dpf-linf-lean") + " --lean")


def _committed_comparison(paths: tuple[str, str], commands: tuple[str, str]) -> str:
    """The comparison of a committed full run with a committed lean run, then their profiles side by side (the
    curves left out); what to run while either file is absent."""
    if not all((ROOT / p).is_file() for p in paths):
        return ("Not measured yet: `" + "`, then `".join(commands) + "`; copy their `results.json` to "
                + " and ".join(f"`{p}`" for p in paths) + ".")  # fmt: skip
    full, lean = (load_results(ROOT / p) for p in paths)
    rows = [r for r in profile(full) if not r.stage.startswith("curve|")]
    return (markdown_compare(compare(full, lean)) + "\n\n" + markdown_side_by_side(rows, profile(lean)) + "\n\n"
            + f"Full: `{console_spelling(str(full.get('command')))}`; lean: "
            + f"`{console_spelling(str(lean.get('command')))}`.")  # fmt: skip


#: The committed runs of today's cascade whose verdict cost ``docs/leaderboard.md`` tabulates.
VERDICT_COST_RUNS = ("docs/figures/leaderboard/fast-classifier_linf-0.3_n100.json",
                     "docs/figures/diffpure_cascade_results.json",
                     "docs/figures/diffpure_fixed_cascade_results.json",
                     "docs/figures/leaderboard/undefended_mnist-pgd-at_n100.json")  # fmt: skip


def _committed_verdict_cost(paths: Sequence[str]) -> str:
    """:func:`markdown_verdict_cost` over the committed runs ``paths`` (an absent file is named, not tabulated)."""
    costs, absent = [], []
    for path in paths:
        if (ROOT / path).is_file():
            costs += verdict_cost(load_results(ROOT / path))
        else:
            absent.append(path)
    note = "" if not absent else "\n\nNot measured yet: " + ", ".join(f"`{p}`" for p in absent) + "."
    return markdown_verdict_cost(costs) + "\n\nRuns: " + ", ".join(f"`{p}`" for p in paths if p not in absent) + "." + note


#: Generated tables of ``docs/leaderboard.md`` (:mod:`eval.docs_tables`): the profile of a committed run, the
#: lean-versus-full comparison and the verdict cost of committed runs.
RENDERERS = {
    "cascade-profile-diffpure-fixed": lambda: _committed_profile(
        "docs/figures/history/ddpm8000/diffpure_fixed_cascade_results.json", "l2-2"
    ),
    "cascade-lean-fast-linf": lambda: _committed_comparison(LEAN_FAST_LINF, LEAN_FAST_LINF_COMMANDS),
    "cascade-lean-dpf-linf": lambda: _committed_comparison(LEAN_DPF_LINF, LEAN_DPF_LINF_COMMANDS),
    "cascade-verdict-cost": lambda: _committed_verdict_cost(VERDICT_COST_RUNS),
}


def add_parsers(sub: Any) -> None:
    """Register the ``cascade-profile`` command."""
    p = sub.add_parser("cascade-profile", help="profile a harness run per stage; compare a lean cascade's run",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("results", type=Path, metavar="RESULTS_JSON", help="a harness results.json (the full cascade)")
    p.add_argument("--compare", type=Path, metavar="LEAN_RESULTS_JSON", default=None,
                   help="the results.json of a lean cascade on the same points, to compare with RESULTS_JSON")  # fmt: skip
    p.add_argument("--json", type=Path, metavar="OUT.json", default=None, dest="json_out",
                   help="also write the profile (and comparison) as a JSON record with its SHA-256")  # fmt: skip
    p.add_argument("--tolerance-points", type=int, default=1, help="points the lean cascade may miss (default 1)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Handler of ``manifold-defense cascade-profile``: prints the markdown; writes ``--json`` when given."""
    full = load_results(args.results)
    rows = profile(full)
    print(f"## Cascade profile: {args.results}\n\n{markdown_profile(rows)}")
    costs = verdict_cost(full, tolerance_points=args.tolerance_points)
    print(f"\n## What the verdict cost\n\n{markdown_verdict_cost(costs)}")
    lean_rows, cmp = None, None
    if args.compare is not None:
        lean = load_results(args.compare)
        lean_rows = profile(lean)
        cmp = compare(full, lean, tolerance_points=args.tolerance_points)
        print(f"\n## Cascade profile: {args.compare}\n\n{markdown_profile(lean_rows)}")
        verdict = ("within {} point(s) of the full cascade's on every defense and threat" if cmp.within_tolerance
                   else "NOT within {} point(s) of the full cascade's where the table says no")  # fmt: skip
        print(f"\n## Lean against full\n\n{markdown_compare(cmp)}\n\nThe lean cascade's worst case is "
              + verdict.format(cmp.tolerance_points) + ".")
    if args.json_out is not None:
        record = {
            "schema": SCHEMA, "command": command_line(args), "results": str(args.results),
            "lean_results": None if args.compare is None else str(args.compare),
            "profile": [dataclasses.asdict(r) for r in rows],
            "verdict_cost": [dataclasses.asdict(c) | {"after_last_break": c.after_last_break} for c in costs],
            "lean_profile": None if lean_rows is None else [dataclasses.asdict(r) for r in lean_rows],
            "comparison": None if cmp is None else dataclasses.asdict(cmp)
            | {"within_tolerance": cmp.within_tolerance, "budget_seconds": BUDGET_SECONDS},
        }  # fmt: skip
        body = json.loads(json.dumps(record, default=sorted))  # index sets as sorted lists
        atomic_write_text(args.json_out, json.dumps(checked_json(body), indent=1) + "\n")
        print(f"\nwrote {args.json_out}")
    return 0
