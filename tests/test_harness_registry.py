"""The harness as a small typed registry (issue 33): typed stage keys, a stage added from this module (run, resumed
after a kill, reported), nested settings with one default each, one function per red flag, the convergence rerun
of every figure, the typed call of the demo, and the size limits of the harness's code; on the tiny stand-in
models of :mod:`tests.test_eval_robustness`."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from attacks import Norm, OverpoweredConfig, PGDConfig, ThreatModel, project_onto_threat
from eval.cli import build_parser
from eval.harness import (
    ATTACKS,
    RobustnessReport,
    RobustnessSettings,
    Stage,
    StageEnv,
    StageKey,
    flags,
    register_stage,
    registered_stages,
    run_robustness,
    undefended_defense,
    unregister_stage,
)
from eval.harness.runner import strongest_stage
from eval.harness.settings import CONFIGS
from eval.run_folder import run_folder_session
from manifold_defense.integrity import load_checked
from tests.test_eval_robustness import TINY_INVERSION, _strip_times, tiny_defenses, tiny_settings, tiny_setup

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- a stage of our own
@dataclass(frozen=True)
class NoiseConfig:
    """The toy attack's own settings: ``tries`` uniform draws in the threat ball per point, the last one kept."""

    tries: int = 1
    steps: int = 1  # (a convergence rerun doubles it)


KILL: dict[str, int] = {"after_chunks": 0, "done": 0}


class UniformNoise(Stage):
    """A random point of the threat ball, judged by the real defense; plain models only."""

    name = "toy-noise"
    doc = "a uniform random point of the threat ball (plain models only)"

    def config(self, env: StageEnv) -> NoiseConfig:
        return NoiseConfig(tries=2)

    def skip_reason(self, env: StageEnv) -> str | None:
        return None if env.defense.preprocess is None else "toy: plain models only"

    def chunk_fn(self, env: StageEnv, config: NoiseConfig) -> Any:
        def fn(chunk: Tensor) -> dict[str, Tensor]:
            if KILL["after_chunks"] and KILL["done"] == KILL["after_chunks"]:
                raise KeyboardInterrupt("killed after a chunk")
            xb = env.x[chunk]
            for _ in range(config.tries):
                x_adv = project_onto_threat((xb + 2 * torch.rand_like(xb) - 1).clamp(0, 1), xb, env.threat)
            KILL["done"] += 1
            return env.judge(chunk, x_adv)

        return fn


@pytest.fixture()
def toy() -> Iterator[type[Stage]]:
    register_stage(UniformNoise, after="pgd")
    KILL.update(after_chunks=0, done=0)
    try:
        yield UniformNoise
    finally:
        unregister_stage("toy-noise")


def _toy_run(out: Path, **kw: Any) -> dict[str, Any]:
    setup = tiny_setup()
    settings = tiny_settings(attacks=("clean", "pgd", "toy-noise"), threats=("linf-0.3",), batch_size=4,
                             curve_eps_linf=(), curve_eps_l2=())  # fmt: skip
    return run_robustness(settings, tiny_defenses(setup), setup["x"], setup["y"], out, generator=setup["generator"],
                          latent_config=TINY_INVERSION, progress=False, **kw)  # fmt: skip


def test_a_stage_added_from_a_test_module_runs_resumes_and_reports(toy: type[Stage], tmp_path: Path) -> None:
    assert registered_stages()[:3] == ("pgd", "toy-noise", "bpda-pgd") and "toy-noise" not in ATTACKS
    full = _toy_run(tmp_path / "full")
    entry = full["defenses"]["undefended"]["attacks"]["toy-noise"]["linf-0.3"]
    assert entry["status"] == "ran" and entry["settings"] == {"tries": 2, "steps": 1}
    assert entry["attacked"] == round(
        full["defenses"]["undefended"]["attacks"]["pgd"]["linf-0.3"]["accuracy"] * 12
    )
    skipped = full["defenses"]["projection-tiny"]["attacks"]["toy-noise"]["linf-0.3"]
    assert skipped == {"status": "skipped", "reason": "toy: plain models only"}
    assert full["attack_definitions"]["toy-noise"] == UniformNoise.doc
    assert "| clean | pgd | toy-noise | convergence |" in (tmp_path / "full" / "report.md").read_text()
    report = RobustnessReport.from_record(full)
    assert report["undefended"].stage("toy-noise", "linf-0.3").ran
    # alone on every clean point (three chunks of 4), killed after its first chunk, then run again
    KILL.update(after_chunks=1, done=0)
    with pytest.raises(KeyboardInterrupt):
        _toy_run_many(tmp_path / "b")
    saved = load_checked(tmp_path / "b" / "state.pt")
    assert list(saved["partial"][StageKey("undefended", "linf-0.3", "toy-noise").text]) == [0]
    KILL.update(after_chunks=0, done=0)
    resumed = _toy_run_many(tmp_path / "b")
    assert resumed["resumed_stages"] > 0 and KILL["done"] >= 1
    assert _strip_times(resumed["defenses"]) == _strip_times(_toy_run_many(tmp_path / "c")["defenses"])


def _toy_run_many(out: Path) -> dict[str, Any]:
    """The toy stage on every clean point (each attack alone), chunks of 4: three chunks."""
    setup = tiny_setup()
    settings = tiny_settings(attacks=("clean", "toy-noise"), threats=("linf-0.3",), batch_size=4, cascade=False,
                             curve_eps_linf=(), curve_eps_l2=())  # fmt: skip
    return run_robustness(settings, [undefended_defense(setup["classifier"])], setup["x"], setup["y"], out,
                          progress=False)  # fmt: skip


def test_registry_refuses_clearly(toy: type[Stage]) -> None:
    with pytest.raises(ValueError, match="a stage named 'toy-noise' is registered already"):
        register_stage(UniformNoise)

    class Reserved(Stage):
        name = "convergence"

    with pytest.raises(ValueError, match=r"not one of .*'convergence'"):
        register_stage(Reserved)

    class Fine(Stage):
        name = "fine"

    with pytest.raises(ValueError, match="expected after= to name a registered stage"):
        register_stage(Fine, after="nowhere")
    with pytest.raises(TypeError, match="expected a Stage subclass"):
        register_stage(dict)  # type: ignore[type-var]
    with pytest.raises(KeyError, match="no stage 'fine' is registered"):
        unregister_stage("fine")
    with pytest.raises(ValueError, match=r"unknown attack \['fine'\]"):
        tiny_settings(attacks=("clean", "fine"))


def test_stage_keys_are_typed_and_written_not_parsed() -> None:
    assert StageKey("proj", "linf-0.3", "pgd").text == "proj|linf-0.3|pgd"
    assert (
        StageKey("proj", None, "clean").text == "proj|clean"
        and StageKey("proj", None, "clean").label == "clean"
    )
    assert StageKey("proj", "l2-1", "curve").label == "curve|l2-1"
    assert StageKey("proj", "l2-1", "pgd") == StageKey("proj", "l2-1", "pgd")  # frozen, hashable
    with pytest.raises(
        ValueError, match=r"expected the stage key's defense as a non-empty name without '\|'"
    ):
        StageKey("a|b", None, "clean")
    with pytest.raises(ValueError, match="attack"):
        StageKey("a", "l2-1", "")


# ------------------------------------------------------------------------------------------------- settings
def test_settings_are_the_attacks_own_configs_with_one_default_each() -> None:
    s = RobustnessSettings()
    assert isinstance(s.pgd, PGDConfig) and isinstance(s.overpowered, OverpoweredConfig)
    assert (s.pgd.steps, s.bpda.eot_samples, s.overpowered.temperature, s.onmanifold.eps) == (
        40,
        4,
        10.0,
        4.0,
    )
    q = RobustnessSettings.quick_preset({"pgd.steps": 7}, n=3)
    assert (q.pgd.steps, q.n, q.quick, q.bpda.steps) == (7, 3, True, 5)
    assert (
        q.reductions()["pgd.steps"] == {"this_run": 7, "full": 40}
        and "overpowered.temperature" not in q.reductions()
    )
    assert s.to_json()["pgd"]["steps"] == 40 and json.dumps(s.to_json())
    # no flat copy of an attack's field: every field of the settings is a harness setting or a config
    names = {f.name for f in dataclasses.fields(RobustnessSettings)} - set(CONFIGS)
    assert not {n for n in names if n.startswith(("pgd_", "op_", "bpda_", "apgd_", "latent_steps", "final_"))}
    with pytest.raises(ValueError, match=r"unknown setting 'pgd\.stepz': pgd has \["):
        s.updated({"pgd.stepz": 3})
    with pytest.raises(ValueError, match=r"unknown setting 'pgd_steps'"):
        s.updated({"pgd_steps": 3})
    with pytest.raises(TypeError, match=r"expected pgd .* as PGDConfig, got dict"):
        RobustnessSettings(pgd={"steps": 3})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"expected onmanifold\.constraint 'pixel'"):
        s.updated({"onmanifold.constraint": "latent"})


def test_the_convergence_check_is_off_only_in_a_quick_protocol(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="can be turned off in a quick protocol only"):
        RobustnessSettings(convergence=False)
    with pytest.raises(
        ValueError, match="--no-convergence turns the convergence check off in a --quick run only"
    ):
        from eval.robustness import settings_from_args

        settings_from_args(build_parser().parse_args(["robustness", "--no-convergence"]))
    setup = tiny_setup()
    settings = tiny_settings(attacks=("clean", "pgd"), threats=("l2-1",), quick=True, convergence=False)
    record = run_robustness(settings, [undefended_defense(setup["classifier"])], setup["x"], setup["y"], tmp_path,
                            progress=False)  # fmt: skip
    rerun = record["defenses"]["undefended"]["attacks"]["convergence"]["l2-1"]
    assert rerun == {"status": "skipped", "reason": "turned off (quick protocol: convergence=False)"}
    check = next(c for c in record["defenses"]["undefended"]["checks"] if c["flag"] == "not-converged")
    assert check["status"] == "n/a" and "turned off" in check["detail"]
    assert "**Convergence check off** (quick protocol)" in (tmp_path / "report.md").read_text()


def test_help_texts_say_what_an_option_does() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    parsers: dict[str, argparse.ArgumentParser] = dict(sub.choices or {})
    helps: dict[str, dict[str, str]] = {}
    for command in ("robustness", "defense", "demo"):
        actions = parsers[command]._actions
        helps[command] = {a.option_strings[0]: a.help or "" for a in actions if a.option_strings}
        for text in helps[command].values():
            assert not re.search(r"\b(used to|existed|older|legacy|before the option)\b", text), text
    assert (
        helps["robustness"]["--op-temperature"]
        == "the overpowered attack's loss is on logits / T (default 10)"
    )
    assert helps["robustness"]["--pgd-steps"] == "steps of the naive pgd (full 40, quick 20)"
    assert "(default 10, the harness's" in helps["defense"]["--op-temperature"]


# ------------------------------------------------------------------------------------------------ red flags
def test_flag_unbounded_eps_not_zero() -> None:
    assert flags.unbounded_eps_not_zero("linf", [0.3, 1.0], [0.5, 0.1], 64, "pgd", 0.02)["status"] == "flag"
    assert flags.unbounded_eps_not_zero("linf", [0.3, 1.0], [0.5, 0.0], 64, "pgd", 0.02)["status"] == "ok"
    assert (
        flags.unbounded_eps_not_zero("l2", [1.0, 4.0], [0.5, 0.4], 64, "pgd", 0.02)["status"] == "n/a"
    )  # 4 < 8
    assert flags.unbounded_eps_not_zero("l2", [1.0, 8.0], [0.5, 0.4], 64, "pgd", 0.02)["status"] == "flag"


def test_flag_non_monotone_in_eps() -> None:
    assert flags.non_monotone_in_eps("l2", [0, 1, 2], [1.0, 0.5, 0.6], 20, 0.02, "fine")["status"] == "flag"
    ok = flags.non_monotone_in_eps("l2", [0, 1, 2], [1.0, 0.5, 0.55], 20, 0.02, "fine")  # one point of 20
    assert ok["status"] == "ok" and ok["detail"] == "fine"


def test_flag_black_box_stronger() -> None:
    assert flags.black_box_stronger("l2-1", None, 100, 0.02)["status"] == "n/a"
    assert flags.black_box_stronger("l2-1", {"status": "skipped"}, 100, 0.02)["status"] == "n/a"
    assert flags.black_box_stronger("l2-1", {"status": "ran", "broken": 3}, 100, 0.02)["status"] == "flag"
    assert flags.black_box_stronger("l2-1", {"status": "ran", "broken": 2}, 100, 0.02)["status"] == "ok"


def test_flag_bpda_unrolled_gap() -> None:
    idx = torch.tensor([0, 1, 2, 3])
    bpda = {
        "status": "ran",
        "indices": torch.tensor([0, 1, 2, 3, 4]),
        "robust": torch.tensor([1, 1, 1, 1, 0]).bool(),
    }
    compare = flags.bpda_unrolled_compare(
        idx, torch.tensor([0, 0, 1, 1]).bool(), [("bpda-pgd", bpda), ("x", None)]
    )
    assert compare == {
        "points": 4,
        "bpda_attacks": ["bpda-pgd"],
        "bpda_accuracy": 1.0,
        "unrolled_accuracy": 0.5,
    }
    assert flags.bpda_unrolled_gap("l2-1", compare, 0.1)["status"] == "flag"  # 2 points apart > max(1, 0.4)
    assert flags.bpda_unrolled_gap("l2-1", {**compare, "unrolled_accuracy": 0.75}, 0.1)["status"] == "ok"
    assert flags.bpda_unrolled_gap("l2-1", None, 0.1)["status"] == "n/a"
    assert flags.bpda_unrolled_compare(idx, torch.ones(4).bool(), [("bpda-pgd", None)]) is None


def test_flag_zero_or_nan_gradients() -> None:
    g = {"points": 4, "nan_or_inf": 0, "zero_fraction": 0.0, "norm_median": 1.0}
    assert flags.zero_or_nan_gradients("pgd", g, 0.1)["status"] == "ok"
    assert flags.zero_or_nan_gradients("pgd", {**g, "zero_fraction": 0.5}, 0.1)["status"] == "flag"
    assert flags.zero_or_nan_gradients("pgd", {**g, "nan_or_inf": 1}, 0.1)["status"] == "flag"


def test_flag_randomized_defense() -> None:
    fired = flags.randomized_defense(True, 3, 7)
    assert fired["status"] == "flag" and "worst case over 3 draws; 7 verdicts" in fired["detail"]
    assert flags.randomized_defense(False, 3, 0)["status"] == "ok"


def test_flag_surrogate_transfer_gap() -> None:
    counts = {"surrogate_broken": 10, "transferred": 4, "not_transferred": 6}
    assert flags.surrogate_transfer_gap("bpda-pgd", "l2-1", counts, 0.5)["status"] == "flag"
    assert (
        flags.surrogate_transfer_gap("bpda-pgd", "l2-1", {**counts, "transferred": 5}, 0.5)["status"] == "ok"
    )
    assert flags.surrogate_transfer_gap("x", "l2-1", {"surrogate_broken": 1, "transferred": 0,
                                                      "not_transferred": 1}, 0.5)["status"] == "ok"  # fmt: skip


def test_flag_real_bpda_eot_broke() -> None:
    assert flags.real_bpda_eot_broke("l2-1", 3, 100, 0.02, "fast")["status"] == "flag"
    assert flags.real_bpda_eot_broke("l2-1", 2, 100, 0.02, "fast")["status"] == "ok"
    assert flags.real_bpda_eot_broke("l2-1", 9, 100, 0.02, None)["status"] == "n/a"


def test_flag_audit_failed() -> None:
    threat = ThreatModel(Norm.LINF, 0.3)
    assert flags.audit_failed("linf-0.3", threat, 0.3, 0, 0.0, 1.0)["status"] == "ok"
    assert flags.audit_failed("linf-0.3", threat, 0.31, 0, 0.0, 1.0)["status"] == "flag"
    assert flags.audit_failed("linf-0.3", threat, 0.3, 1, 0.0, 1.0)["status"] == "flag"
    assert flags.audit_failed("linf-0.3", threat, 0.3, 0, -0.1, 1.0)["status"] == "flag"
    assert flags.audit_failed("linf-0.3", threat, 0.0, 0, math.inf, -math.inf)["status"] == "ok"


def test_flag_not_converged_is_one_percentage_point() -> None:
    entry = {
        "status": "ran",
        "broken": 2,
        "figure_before": 0.5,
        "accuracy": 0.49,
        "rerun_of": "apgd",
        "attacked": 100,
    }
    fired = flags.not_converged("l2-1", entry, 200, 0.01)
    assert fired["status"] == "ok" and "apgd rerun" in fired["detail"]  # 2 of 200: one point of the figure
    assert flags.not_converged("l2-1", {**entry, "broken": 3}, 200, 0.01)["status"] == "flag"
    assert flags.not_converged("l2-1", {"status": "skipped", "reason": "r"}, 200, 0.01)["status"] == "n/a"
    assert set(flags.FLAGS) >= {"not-converged", "audit-failed"}


# ---------------------------------------------------------------------------------------------- convergence
def test_the_convergence_rerun_lowers_the_figure_and_raises_its_flag(tmp_path: Path) -> None:
    """At l2 1, 12 PGD steps leave a point of the linear classifier on its boundary that 24 steps break: the rerun
    breaks it, the worst case includes it, and not-converged fires (1 of 12 points is more than one percentage
    point); the rerun's settings are twice the original's."""
    setup = tiny_setup()
    settings = tiny_settings(attacks=("clean", "pgd", "square"), threats=("l2-1",))
    record = run_robustness(settings, [undefended_defense(setup["classifier"])], setup["x"], setup["y"], tmp_path,
                            progress=False)  # fmt: skip
    d = record["defenses"]["undefended"]
    rerun = d["attacks"]["convergence"]["l2-1"]
    assert (
        rerun["rerun_of"] == "pgd"
        and rerun["settings"]["steps"] == 2 * rerun["original_settings"]["steps"] == 24
    )
    assert (
        rerun["broken"] >= 1
        and rerun["accuracy"] < rerun["figure_before"] == d["attacks"]["square"]["l2-1"]["accuracy"]
    )
    assert d["worst_case"]["l2-1"] == rerun["accuracy"]
    assert "not-converged" in {f["flag"] for f in d["flags"]}
    assert "## Convergence" in (tmp_path / "report.md").read_text()


def test_the_strongest_stage_is_a_white_box_one_on_the_defense() -> None:
    setup = tiny_setup()
    plain, proj = tiny_defenses(setup)
    recs = {"pgd": {"status": "ran", "robust": torch.tensor([0, 0, 1]).bool()},
            "bpda-pgd": {"status": "ran", "robust": torch.tensor([0, 1, 1]).bool()},
            "apgd": {"status": "ran", "robust": torch.tensor([1, 0, 1]).bool()},
            "square": {"status": "ran", "robust": torch.tensor([0, 0, 0]).bool()}}  # fmt: skip
    order = ("pgd", "bpda-pgd", "apgd", "square")

    def env(d: Any) -> Any:
        return type("Env", (), {"defense": d})()

    assert (
        strongest_stage(order, recs.get, env(plain)) == "pgd"
    )  # the plain model's own gradient; square is no candidate
    assert (
        strongest_stage(order, recs.get, env(proj)) == "apgd"
    )  # naive pgd transfers: no candidate; tie -> later
    assert strongest_stage(("square",), recs.get, env(plain)) is None


def test_an_interrupted_convergence_rerun_resumes_to_the_same_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import eval.harness.state as state_module

    setup = tiny_setup()
    settings = tiny_settings(attacks=("clean", "pgd"), threats=("l2-0.5",), batch_size=2, cascade=False)

    def go(out: Path) -> dict[str, Any]:
        return run_robustness(settings, [undefended_defense(setup["classifier"])], setup["x"], setup["y"], out,
                              progress=False)  # fmt: skip

    full = go(tmp_path / "a")
    assert (
        full["defenses"]["undefended"]["attacks"]["convergence"]["l2-0.5"]["attacked"] >= 4
    )  # several chunks
    original, calls = state_module.chunk_seed, []

    def interrupting(seed: int, stage: str, first: int) -> int:
        calls.append(stage)
        if stage.endswith("|convergence") and calls.count(stage) == 2:
            raise KeyboardInterrupt(stage)
        return original(seed, stage, first)

    monkeypatch.setattr(state_module, "chunk_seed", interrupting)
    with pytest.raises(KeyboardInterrupt):
        go(tmp_path / "b")
    monkeypatch.setattr(state_module, "chunk_seed", original)
    saved = load_checked(tmp_path / "b" / "state.pt")
    assert list(saved["partial"]["undefended|l2-0.5|convergence"]) == [0]
    assert _strip_times(go(tmp_path / "b")["defenses"]) == _strip_times(full["defenses"])


# ------------------------------------------------------------------------------------------------ callers
def test_the_demo_calls_the_harness_with_a_typed_request(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import eval.harness.command as command
    from eval.demo import _robustness

    seen: list[Any] = []

    def capture(request: Any) -> dict[str, Any]:
        seen.append(request)
        raise KeyboardInterrupt

    monkeypatch.setattr(command, "run_evaluation", capture)
    args = build_parser().parse_args(["demo", "--n", "3", "--device", "cpu", "--no-progress"])
    with run_folder_session(), pytest.raises(KeyboardInterrupt):
        _robustness(tmp_path / "robustness", args)
    (request,) = seen
    assert isinstance(request, command.Evaluation) and request.defenses == command.QUICK_DEFENSES
    assert (
        request.settings == RobustnessSettings.quick_preset(n=3) and request.fresh and request.device == "cpu"
    )
    assert "Namespace(" not in (REPO / "eval" / "demo.py").read_text()


def test_a_results_record_of_another_version_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match=r"got one of 'manifold-defense robustness v1' written by manifold-defense "
                       r"\(a version that records none\)"):  # fmt: skip
        RobustnessReport.from_record({"schema": "manifold-defense robustness v1", "threat_models": [], "n": 1,
                                      "defenses": {}})  # fmt: skip


# ----------------------------------------------------------------------------------------------- code limits
HARNESS = [*sorted((REPO / "eval" / "harness").glob("*.py")), REPO / "eval" / "robustness.py",
           REPO / "eval" / "robustness_report.py"]  # fmt: skip


@pytest.mark.parametrize("path", HARNESS, ids=[p.name for p in HARNESS])
def test_harness_files_and_functions_stay_small(path: Path) -> None:
    """No file of the harness over 400 lines, no function over 80 (docstring included)."""
    text = path.read_text()
    assert len(text.splitlines()) <= 400, f"{path.name}: {len(text.splitlines())} lines"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            assert length <= 80, f"{path.name}:{node.name} has {length} lines"


def test_no_compatibility_shims_are_left() -> None:
    assert not (REPO / "eval" / "robustness_core.py").exists()
    for path in (REPO / "eval").rglob("*.py"):
        text = path.read_text()
        assert "LEGACY_SETTINGS" not in text and "legacy_owners" not in text, path
    figures = (REPO / "eval" / "defense_figures.py").read_text()
    assert '__all__ = ["plot_pairs"]' in figures
