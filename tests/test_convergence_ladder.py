"""The convergence ladder (``convergence_rounds``, issue 35): while the convergence rerun newly breaks more than one
point of the figure, the same stage runs again with twice the steps on what is left, so that a figure the single
rerun left as an upper bound can be checked further; a finished run resumed with more rounds extends its ladder.
On the tiny linear stand-in of :mod:`tests.test_eval_robustness`: at l2 1 one PGD step leaves points that 2, 4 and
8 steps break one by one, and 16 steps break none."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from eval.harness import (
    RobustnessSettings,
    StageKey,
    flags,
    register_stage,
    run_robustness,
    undefended_defense,
)
from eval.harness.registry import Stage, convergence_key, ladder_keys
from eval.harness.state import StateMismatchError, fingerprint
from tests.test_eval_robustness import _strip_times, tiny_settings, tiny_setup

SETUP = tiny_setup()


def _settings(**fields: Any) -> RobustnessSettings:
    return tiny_settings({"pgd.steps": 1}, attacks=("clean", "pgd"), threats=("l2-1",), curve_eps_l2=(),
                         curve_eps_linf=(), **fields)  # fmt: skip


def _run(out: Path, **fields: Any) -> dict[str, Any]:
    defense = undefended_defense(SETUP["classifier"])
    return run_robustness(_settings(**fields), [defense], SETUP["x"], SETUP["y"], out, progress=False)


def _not_converged(record: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in record["defenses"]["undefended"]["checks"] if c["flag"] == "not-converged")


def test_the_ladder_doubles_the_steps_until_a_rerun_breaks_nothing(tmp_path: Path) -> None:
    record = _run(tmp_path, convergence_rounds=6)
    d = record["defenses"]["undefended"]
    entry = d["attacks"]["convergence"]["l2-1"]
    ladder = entry["ladder"]
    # 1 PGD step leaves 6 of 12; reruns of 2, 4, 8 steps break one point each, 16 steps none: the ladder stops there
    assert d["attacks"]["pgd"]["l2-1"]["accuracy"] == 0.5
    assert [r["settings"]["steps"] for r in ladder] == [2, 4, 8, 16]
    assert [r["broken"] for r in ladder] == [1, 1, 1, 0]
    assert [r["attacked"] for r in ladder] == [6, 5, 4, 3]  # each rerun attacks what the earlier ones left
    assert entry["figure_before"] == 0.5 and entry["accuracy"] == ladder[-1]["accuracy"] == 0.25
    assert entry["broken"] == 3 and entry["last_broken"] == 0 and entry["attacked"] == 6
    assert d["worst_case"]["l2-1"] == 0.25
    check = _not_converged(record)
    assert check["status"] == "ok" and "ladder reran pgd 4 times" in check["detail"]
    assert "l2-1|convergence-4" in d["cost"]["stages"] and "l2-1|convergence-5" not in d["cost"]["stages"]
    report = (tmp_path / "report.md").read_text()
    assert "| undefended | l2-1 | 1 | pgd | steps 1 -> 2 | 6 | 1 | 50.0% -> 41.7% |" in report
    assert "| undefended | l2-1 | 4 | pgd | steps 1 -> 16 | 3 | 0 | 25.0% -> 25.0% |" in report
    assert "**not-converged**" not in report.split("## Convergence")[1].split("##")[0]


def test_a_ladder_cut_short_is_flagged_on_its_last_rerun(tmp_path: Path) -> None:
    record = _run(tmp_path, convergence_rounds=2)
    entry = record["defenses"]["undefended"]["attacks"]["convergence"]["l2-1"]
    assert [r["broken"] for r in entry["ladder"]] == [1, 1] and entry["accuracy"] == 0.3333
    check = _not_converged(record)
    assert check["status"] == "flag" and "the last rerun newly broke 1 of 12" in check["detail"]
    assert "not-converged" in {f["flag"] for f in record["defenses"]["undefended"]["flags"]}
    assert "| 2 | pgd | steps 1 -> 4 | 5 | 1 | 41.7% -> 33.3% **not-converged** |" in (tmp_path / "report.md").read_text()


def test_the_single_rerun_is_a_ladder_of_one(tmp_path: Path) -> None:
    record = _run(tmp_path)
    entry = record["defenses"]["undefended"]["attacks"]["convergence"]["l2-1"]
    assert len(entry["ladder"]) == 1 and entry["broken"] == entry["last_broken"] == 1
    assert _not_converged(record)["status"] == "flag"
    assert "rerun with twice its steps" in _not_converged(record)["detail"]


def test_a_finished_run_resumed_with_more_rounds_extends_its_ladder(tmp_path: Path) -> None:
    short = _run(tmp_path / "run")
    assert len(short["defenses"]["undefended"]["attacks"]["convergence"]["l2-1"]["ladder"]) == 1
    extended = _run(tmp_path / "run", convergence_rounds=6)
    assert extended["resumed_stages"] > 0
    fresh = _run(tmp_path / "fresh", convergence_rounds=6)
    assert _strip_times(extended) == _strip_times(fresh)
    # a later resume with the default reads the ladder back: what ran counts
    again = _run(tmp_path / "run")
    entry = again["defenses"]["undefended"]["attacks"]["convergence"]["l2-1"]
    assert len(entry["ladder"]) == 4 and again["defenses"]["undefended"]["worst_case"]["l2-1"] == 0.25
    # every other setting still binds the run
    with pytest.raises(StateMismatchError, match=r"pgd\.steps: saved 1, now 2"):
        run_robustness(tiny_settings({"pgd.steps": 2}, attacks=("clean", "pgd"), threats=("l2-1",), curve_eps_l2=(),
                                     curve_eps_linf=()), [undefended_defense(SETUP["classifier"])], SETUP["x"],
                       SETUP["y"], tmp_path / "run", progress=False)  # fmt: skip


def test_the_ladder_setting_is_checked_and_left_out_of_the_fingerprint() -> None:
    with pytest.raises(ValueError, match="expected convergence_rounds to be an int >= 1, got 0"):
        RobustnessSettings(convergence_rounds=0)
    with pytest.raises(ValueError, match=r"got 2\.0"):
        RobustnessSettings(convergence_rounds=2.0)  # type: ignore[arg-type]
    defense = undefended_defense(SETUP["classifier"])
    one, three = (fingerprint(_settings(convergence_rounds=k), [defense], SETUP["x"], SETUP["y"], None)
                  for k in (1, 3))  # fmt: skip
    assert one == three and "convergence_rounds" not in json.dumps(one)
    assert _settings(convergence_rounds=3).to_json()["convergence_rounds"] == 3
    assert "convergence_rounds" not in _settings(convergence_rounds=3).reductions()  # stronger, not reduced


def test_ladder_keys_and_reserved_stage_names() -> None:
    assert convergence_key("d", "l2-1", 1) == StageKey("d", "l2-1", "convergence")
    assert convergence_key("d", "l2-1", 3).text == "d|l2-1|convergence-3"
    with pytest.raises(ValueError, match="round as an int >= 1, got 0"):
        convergence_key("d", "l2-1", 0)
    stages: dict[str, Any] = {"d|l2-1|convergence": {}, "d|l2-1|convergence-2": {}, "d|l2-1|convergence-4": {}}
    assert [k.attack for k in ladder_keys(stages, "d", "l2-1")] == ["convergence", "convergence-2"]
    assert ladder_keys(stages, "d", "linf-0.3") == []

    class Rung(Stage):
        name = "convergence-2"

    with pytest.raises(ValueError, match="nor 'convergence-K'"):
        register_stage(Rung)


def test_the_flag_reads_the_last_rerun_of_a_ladder() -> None:
    rung: dict[str, Any] = {"round": 1, "settings": {"steps": 2}, "attacked": 50, "broken": 9, "accuracy": 0.41}
    entry: dict[str, Any] = {"status": "ran", "rerun_of": "apgd", "attacked": 50, "figure_before": 0.5, "accuracy": 0.4,
             "broken": 10, "ladder": [rung, {**rung, "round": 2, "attacked": 41, "broken": 1, "accuracy": 0.4}]}  # fmt: skip
    assert flags.not_converged("l2-2", entry, 100, 0.01)["status"] == "ok"  # 10 newly broken, 1 by the last rerun
    entry["ladder"][-1]["broken"] = 2  # the last rerun broke two of a hundred: more than one point
    assert flags.not_converged("l2-2", entry, 100, 0.01)["status"] == "flag"


def test_the_leaderboard_reads_a_ladder_as_an_attack_strength_curve(tmp_path: Path) -> None:
    from eval.leaderboard_rows import converged_verdict, ladder_of

    d = _run(tmp_path, convergence_rounds=6)["defenses"]["undefended"]
    curve = ladder_of(d, "l2-1")
    assert curve is not None and curve["rerun_of"] == "pgd" and curve["figure_before"] == 0.5
    assert [(g["factor"], g["attacked"], g["broken"]) for g in curve["rungs"]] == [(2, 6, 1), (4, 5, 1), (8, 4, 1),
                                                                                   (16, 3, 0)]  # fmt: skip
    verdict, detail = converged_verdict(d, "l2-1", 2)
    assert verdict == "yes" and "ladder of 4" in detail and "x16: 0" in detail
    # a results file written before the ladder existed: its single rerun
    old = {"attacks": {"convergence": {"l2-2": {"status": "ran", "rerun_of": "apgd", "figure_before": 0.3,
                                                "attacked": 30, "broken": 2, "accuracy": 0.28}}}}  # fmt: skip
    assert ladder_of(old, "l2-2") == {"rerun_of": "apgd", "figure_before": 0.3,
                                      "rungs": [{"factor": 2, "attacked": 30, "broken": 2, "accuracy": 0.28}]}  # fmt: skip
    assert ladder_of(old, "linf-0.3") is None


def test_the_report_reads_a_record_written_before_the_ladder() -> None:
    from eval.robustness_report import _convergence_lines

    entry = {"status": "ran", "rerun_of": "apgd", "figure_before": 0.3, "attacked": 30, "broken": 2,
             "accuracy": 0.28, "settings": {"steps": 20}, "original_settings": {"steps": 10}}  # fmt: skip
    record = {"settings": {"thresholds": {"not_converged": 0.01}},
              "defenses": {"p": {"n": 100, "attacks": {"convergence": {"l2-2": entry}}}}}  # fmt: skip
    assert "| p | l2-2 | 1 | apgd | steps 10 -> 20 | 30 | 2 | 30.0% -> 28.0% **not-converged** |" in _convergence_lines(
        record
    )
