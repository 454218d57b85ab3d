"""eval/cascade_profile.py (``manifold-defense cascade-profile``): the per-stage profile of a harness run, the
comparison of a lean cascade with the full one on the same points, their markdown and the command's errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from eval.cascade_profile import compare, load_results, markdown_compare, markdown_profile, profile
from eval.cli import run
from manifold_defense.integrity import checked_json, verify_json

ROOT = Path(__file__).resolve().parents[1]
THREATS = ["linf-0.3", "l2-2"]
N = 10


def _ran(attacked: int, broken: int, accuracy: float, seconds: float) -> dict[str, Any]:
    return {"status": "ran", "accuracy": accuracy, "attacked": attacked, "broken": broken, "seconds": seconds}


def _cost(points: int, seconds: float, passes: int) -> dict[str, Any]:
    return {"points": points, "seconds": seconds, "process_seconds": seconds, "real_passes": passes}


def _defense(robust: dict[str, list[int]], l2_square_seconds: float = 10.0, flag_l2: bool = False) -> dict[str, Any]:
    """n 10: clean (1 s), linf pgd breaks 6 (4 s) and square ran on 0 points; l2 pgd breaks 2 (5 s), square
    breaks 1 (``l2_square_seconds``), the convergence rerun ran at l2 (0 s) and was skipped at linf."""
    skipped = {"status": "skipped", "reason": "no preprocessing"}
    conv = _ran(7, 0, 0.7, 0.0) | {"rerun_of": "pgd", "figure_before": 0.7}
    stages = {"clean": _cost(N, 1.0, N), "linf-0.3|pgd": _cost(N, 4.0, 100), "linf-0.3|square": _cost(0, 0.0, 0),
              "l2-2|pgd": _cost(N, 5.0, 200), "l2-2|square": _cost(8, l2_square_seconds, 800),
              "l2-2|convergence": _cost(7, 0.0, 0)}  # fmt: skip
    total = sum(s["process_seconds"] for s in stages.values())
    return {
        "n": N,
        "worst_case": {tk: len(p) / N for tk, p in robust.items()},
        "robust_points": robust,
        "attacks": {
            "clean": {tk: _ran(N, 0, 1.0, 0.0) for tk in THREATS},
            "pgd": {"linf-0.3": _ran(N, 6, 0.4, 4.0), "l2-2": _ran(N, 2, 0.8, 5.0)},
            "bpda-pgd": {tk: skipped for tk in THREATS},
            "square": {"linf-0.3": _ran(0, 0, 0.4, 0.0), "l2-2": _ran(8, 1, 0.7, l2_square_seconds)},
            "convergence": {"linf-0.3": skipped, "l2-2": conv},
        },
        "flags": [{"flag": "not-converged", "where": "l2-2"}] if flag_l2 else [],
        "cost": {"stages": stages, "total": {"process_seconds": total, "real_passes": 1110}},
    }


def _record(**defenses: dict[str, Any]) -> dict[str, Any]:
    return {"schema": "manifold-defense robustness v2", "n": N, "data": "MNIST test split, first 10 images",
            "threat_models": THREATS, "defenses": defenses}  # fmt: skip


FULL_POINTS = {"linf-0.3": [0, 1, 2, 3], "l2-2": [0, 1, 2, 3, 4, 5, 6]}
LEAN_POINTS = {"linf-0.3": [0, 1, 2, 3], "l2-2": [0, 1, 2, 3, 4, 5, 8, 9]}


def test_profile_rows_in_stored_order_with_exact_shares() -> None:
    rows = profile(_record(proj=_defense(FULL_POINTS)))
    got = [(r.threat, r.stage, r.points, r.broken, r.process_seconds, r.real_passes) for r in rows]
    assert got == [(None, "clean", 10, 0, 1.0, 10), ("linf-0.3", "pgd", 10, 6, 4.0, 100),
                   ("linf-0.3", "square", 0, 0, 0.0, 0), ("l2-2", "pgd", 10, 2, 5.0, 200),
                   ("l2-2", "square", 8, 1, 10.0, 800), ("l2-2", "convergence", 7, 0, 0.0, 0)]  # fmt: skip
    assert [r.share for r in rows] == [0.05, 0.2, 0.0, 0.25, 0.5, 0.0]
    assert [r.seconds_per_broken for r in rows] == [None, 4.0 / 6, None, 2.5, 10.0, None]
    assert {r.status for r in rows} == {"ran"} and {r.defense for r in rows} == {"proj"}
    text = markdown_profile(rows)
    lines = text.splitlines()
    assert lines[0] == ("| defense | threat | stage | points | broken | process s | share | s / broken "
                        "| real passes |")  # fmt: skip
    assert lines[1] == "| " + " | ".join(["---"] * 9) + " |"
    assert "| proj | l2-2 | square | 8 | 1 | 10 | 50.0% | 10.0 | 800 |" in lines
    assert "| proj | linf-0.3 | pgd | 10 | 6 | 4 | 20.0% | 0.7 | 100 |" in lines
    assert lines[-1] == "| proj |  | **total** |  |  | 20 |  |  | 1110 |"


def test_profile_reads_each_rerun_of_a_convergence_ladder() -> None:
    rec = _record(proj=_defense(FULL_POINTS))
    d = rec["defenses"]["proj"]
    d["attacks"]["convergence"]["l2-2"] |= {"broken": 3, "accuracy": 0.5, "ladder": [
        {"round": 1, "attacked": 7, "broken": 2, "accuracy": 0.5}, {"round": 2, "attacked": 5, "broken": 1,
                                                                   "accuracy": 0.4}]}  # fmt: skip
    d["cost"]["stages"]["l2-2|convergence-2"] = _cost(5, 3.0, 20)
    d["cost"]["total"]["process_seconds"] += 3.0
    rows = profile(rec)
    assert [(r.stage, r.points, r.broken) for r in rows[-2:]] == [("convergence", 7, 2), ("convergence-2", 5, 1)]
    d["cost"]["stages"]["l2-2|convergence-3"] = _cost(4, 3.0, 20)  # a rerun the ladder does not hold
    with pytest.raises(ValueError, match=r"cost entry 'l2-2\|convergence-3' has no stage that ran"):
        profile(rec)


def test_profile_refuses_a_stage_that_ran_without_cost_and_v1_records() -> None:
    rec = _record(proj=_defense(FULL_POINTS))
    del rec["defenses"]["proj"]["cost"]["stages"]["l2-2|square"]
    with pytest.raises(ValueError, match=r"stages \['l2-2\|square'\] ran but have no cost entry"):
        profile(rec)
    v1 = _record(proj=_defense(FULL_POINTS)) | {"schema": "manifold-defense robustness v1"}
    with pytest.raises(ValueError, match=r"has no per-stage 'cost' nor 'robust_points'"):
        profile(v1)
    with pytest.raises(ValueError, match=r"expected a robustness results record of schema .*got schema 'other'"):
        profile(v1 | {"schema": "other"})


def test_compare_sets_tolerance_costs_and_convergence() -> None:
    full = _record(proj=_defense(FULL_POINTS, flag_l2=True), only_here=_defense(FULL_POINTS))
    lean = _record(proj=_defense(LEAN_POINTS, l2_square_seconds=2.0))
    c = compare(full, lean)
    assert [(r.defense, r.threat) for r in c.rows] == [("proj", "linf-0.3"), ("proj", "l2-2")]
    linf, l2 = c.rows
    assert linf.rose == frozenset() and linf.found_more == frozenset() and linf.within_tolerance
    assert l2.rose == {8, 9} and l2.found_more == {6} and not l2.within_tolerance
    assert (l2.worst_full, l2.worst_lean) == (0.7, 0.8)
    assert (linf.converged_full, l2.converged_full, l2.converged_lean) == ("unchecked", "no", "yes")
    assert not c.within_tolerance and c.only_full == ("only_here",) and c.only_lean == ()
    (cost,) = c.costs
    assert (cost.full_seconds, cost.lean_seconds, cost.ratio, cost.lean_within_budget) == (20.0, 12.0, 0.6, True)
    assert compare(full, lean, tolerance_points=2).within_tolerance
    text = markdown_compare(c)
    assert "| proj | l2-2 | 70.0% | 80.0% | 8, 9 | 6 | **no** | no / yes |" in text
    assert "| proj | 20 | 12 | 0.60 | yes |" in text and text.endswith("full only: only_here")


def test_compare_costs_leave_the_curves_out() -> None:
    full = _record(proj=_defense(FULL_POINTS))
    full["defenses"]["proj"]["cost"]["stages"]["curve|linf|0.1"] = _cost(10, 500.0, 1000)
    lean = _record(proj=_defense(FULL_POINTS, l2_square_seconds=2.0))  # run with --no-curves
    (cost,) = compare(full, lean).costs
    assert (cost.full_seconds, cost.lean_seconds, cost.ratio) == (20.0, 12.0, 0.6)


def test_compare_over_budget() -> None:
    full = _record(proj=_defense(FULL_POINTS, l2_square_seconds=4000.0))
    (cost,) = compare(full, full).costs
    assert cost.full_seconds == 4010.0 and cost.ratio == 1.0 and not cost.lean_within_budget


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"n": 20}, r"differ in 'n': full 10, lean 20"),
        ({"data": "MNIST test split, first 10 images, seed 1"}, r"differ in 'data'"),
        ({"threat_models": ["linf-0.3"]}, r"differ in 'threat_models'"),
        ({"defenses": {"other": _defense(FULL_POINTS)}}, r"no defense in common: full \['proj'\], lean \['other'\]"),
        ({"incomplete": ["proj|l2-2|square"]}, r"lean run: written from a stopped run"),
        ({"schema": "manifold-defense robustness v1"}, r"lean run: a 'manifold-defense robustness v1' record"),
    ],
)
def test_compare_refuses_another_protocol(change: dict[str, Any], message: str) -> None:
    full = _record(proj=_defense(FULL_POINTS))
    with pytest.raises(ValueError, match=message):
        compare(full, full | change)


def test_compare_refuses_bad_robust_points() -> None:
    full = _record(proj=_defense(FULL_POINTS))
    lean = copy.deepcopy(full)
    del lean["defenses"]["proj"]["robust_points"]
    with pytest.raises(ValueError, match=r"lean run: defense 'proj' lacks robust_points"):
        compare(full, lean)
    lean = copy.deepcopy(full)
    lean["defenses"]["proj"]["robust_points"]["l2-2"] = [0, 1]
    with pytest.raises(ValueError, match=r"2 robust points of 10 disagree with the worst case 0.7"):
        compare(full, lean)
    lean["defenses"]["proj"]["robust_points"]["l2-2"] = [0, 1, 2, 3, 4, 5, 10]
    with pytest.raises(ValueError, match=r"expected robust_points as distinct indices in \[0, 10\)"):
        compare(full, lean)
    with pytest.raises(ValueError, match=r"tolerance_points as an int >= 0, got -1"):
        compare(full, full, tolerance_points=-1)


def test_profile_of_the_committed_diffpure_fixed_run() -> None:
    rec = load_results(ROOT / "docs/figures/history/ddpm8000/diffpure_fixed_cascade_results.json")
    rows = {(r.threat, r.stage): r for r in profile(rec)}
    square = rows[("l2-2", "square")]
    assert (square.process_seconds, square.broken, square.points, square.real_passes) == (1667.6, 0, 40, 20240)
    assert square.share == pytest.approx(1667.6 / 3534.2) and square.seconds_per_broken is None
    assert (rows[("linf-0.3", "pgd")].broken, rows[("l2-2", "bpda-pgd")].real_passes) == (57, 3453)
    assert rows[(None, "projection")].broken is None and rows[("linf-0.3", "apgd")].points == 0
    assert ("linf-0.3", "bpda-eot-pgd") not in rows  # skipped: costs nothing
    assert len(rows) == 22 and sum(r.share or 0 for r in rows.values()) == pytest.approx(1.0)
    undefended = profile(load_results(ROOT / "docs/figures/leaderboard/undefended_mnist-pgd-at_n100.json"))
    curves = [r.stage for r in undefended if r.stage.startswith("curve|")]
    assert len(curves) == 11 and all(r.broken is None for r in undefended if r.stage in curves)
    assert sum(r.share or 0 for r in undefended) == pytest.approx(1.0, abs=1e-3)


def _write(path: Path, rec: Any) -> Path:
    path.write_text(json.dumps(rec))
    return path


def test_command_prints_writes_a_checked_record_and_reports_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    full = _write(tmp_path / "full.json", checked_json(_record(proj=_defense(FULL_POINTS))))
    lean = _write(tmp_path / "lean.json", _record(proj=_defense(LEAN_POINTS)))
    out = tmp_path / "profile.json"
    argv = ["cascade-profile", str(full), "--compare", str(lean), "--json", str(out), "--tolerance-points", "2"]
    assert run(argv) == 0
    printed = capsys.readouterr().out
    assert "| proj | l2-2 | square | 8 | 1 | 10 | 50.0% | 10.0 | 800 |" in printed
    assert "worst case is within 2 point(s)" in printed
    rec = verify_json(json.loads(out.read_text()), out)
    assert rec["schema"] == "manifold-defense cascade-profile v1" and rec["comparison"]["within_tolerance"]
    assert rec["comparison"]["rows"][1]["rose"] == [8, 9] and len(rec["lean_profile"]) == 6

    v1 = _write(tmp_path / "v1.json", _record(proj=_defense(FULL_POINTS)) | {"schema": "manifold-defense robustness v1"})
    altered = _write(tmp_path / "altered.json", checked_json(_record(proj=_defense(FULL_POINTS))) | {"n": 11})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for path, message in [(tmp_path / "missing.json", "No such file"), (v1, "no per-stage 'cost' nor 'robust_points'"),
                          (altered, "does not match the SHA-256"), (bad, "unparseable text")]:  # fmt: skip
        assert run(["cascade-profile", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("python -m eval cascade-profile: error: ") and message in err and err.count("\n") == 1


def test_side_by_side_pairs_the_stages_of_both_runs() -> None:
    from eval.cascade_profile import markdown_side_by_side

    full = profile(_record(proj=_defense(FULL_POINTS)))
    lean_rec = _record(proj=_defense(LEAN_POINTS, l2_square_seconds=2.0))
    del lean_rec["defenses"]["proj"]["cost"]["stages"]["l2-2|convergence"]
    lean_rec["defenses"]["proj"]["attacks"]["convergence"]["l2-2"] = {"status": "skipped", "reason": "r"}
    text = markdown_side_by_side(full, profile(lean_rec))
    assert "| proj | l2-2 | square | 8 / 8 | 1 / 1 | 10 / 2 | 800 / 800 |" in text
    assert "| proj | l2-2 | convergence | 7 / - | 0 / - | 0 / - | 0 / - |" in text
    assert "| proj | - | clean | 10 / 10 | 0 / 0 | 1 / 1 | 10 / 10 |" in text


def test_verdict_cost_finds_the_verdict_and_the_last_break_in_run_order() -> None:
    from eval.cascade_profile import markdown_verdict_cost, verdict_cost

    # linf: pgd breaks all 6 (4 s), square 0 s; l2: pgd breaks 2 (5 s), square 1 (10 s), convergence 0 (0 s)
    costs = verdict_cost(_record(proj=_defense(FULL_POINTS)))
    linf, l2 = costs
    assert (linf.threat, linf.broken, linf.verdict_stage, linf.seconds_to_verdict) == ("linf-0.3", 6, "pgd", 4.0)
    assert (linf.last_break_stage, linf.seconds_to_last_break, linf.seconds_total) == ("pgd", 4.0, 4.0)
    # within one point of the 3 l2 breaks after pgd (2 of 3); the last break is square's, after 15 of 15 s
    assert (l2.broken, l2.verdict_stage, l2.seconds_to_verdict) == (3, "pgd", 5.0)
    assert (l2.last_break_stage, l2.seconds_to_last_break, l2.after_last_break) == ("square", 15.0, 0.0)
    strict = verdict_cost(_record(proj=_defense(FULL_POINTS)), tolerance_points=0)[1]
    assert (strict.verdict_stage, strict.seconds_to_verdict) == ("square", 15.0)
    # a slower square after the last break would count as spent after it: here square is the last break itself
    slow = verdict_cost(_record(proj=_defense(FULL_POINTS, l2_square_seconds=30.0)))[1]
    assert slow.seconds_total == 35.0 and slow.after_last_break == 0.0
    lines = markdown_verdict_cost(costs).splitlines()
    assert "| proj | l2-2 | 0.70 | 3 | pgd | 5 (33.3%) | square | 15 (100.0%) | 15 | 0 (0.0%) |" in lines
    with pytest.raises(ValueError, match="tolerance_points"):
        verdict_cost(_record(proj=_defense(FULL_POINTS)), tolerance_points=-1)


def test_verdict_cost_when_nothing_breaks() -> None:
    from eval.cascade_profile import verdict_cost

    d = _defense(FULL_POINTS)
    for per in d["attacks"].values():
        for e in per.values():
            if e.get("status") == "ran":
                e["broken"] = 0
    c = verdict_cost(_record(proj=d))[0]
    assert (c.broken, c.verdict_stage, c.last_break_stage, c.seconds_to_last_break) == (0, None, None, 0.0)
    assert c.after_last_break == c.seconds_total == 4.0
