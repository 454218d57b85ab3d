"""The AutoAttack stages of the harness (``apgd-t``, ``fab``, ``square``'s plain-model budget) and the torchattacks
APGDT / FAB adapters, on a tiny 10-class nearest-prototype classifier whose logits are scaled by 1e4: its softmax
saturates, so the cross-entropy gradient is exactly zero (APGD-CE breaks nothing) while the targeted DLR loss and
FAB, which read logit differences, break nearly every point: gradient masking in miniature, the reason the cascade
needs them (a Linf-trained classifier at l2)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from attacks import Norm, ThreatModel, TorchattacksAttack, per_sample_norm
from eval.cli import build_parser
from eval.harness import (
    ATTACKS,
    APGDTConfig,
    FABConfig,
    RobustnessSettings,
    SquareConfig,
    purifier_defense,
    run_robustness,
    undefended_defense,
)
from eval.harness.runner import strongest_stage
from tests.test_eval_robustness import NoisyInput, tiny_settings, tiny_setup

C, D, N = 10, 64, 20
L2_1 = ThreatModel(Norm.L2, 1.0)


class Prototypes(nn.Module):
    """Nearest-prototype linear classifier on 8x8 images: ``logits_k = scale (2 mu_k . x - ||mu_k||^2)``."""

    def __init__(self, mu: Tensor, scale: float) -> None:
        super().__init__()
        self.lin = nn.Linear(mu.shape[1], mu.shape[0])
        with torch.no_grad():
            self.lin.weight.copy_(2 * scale * mu)
            self.lin.bias.copy_(-scale * mu.pow(2).sum(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x.reshape(x.shape[0], -1))


class Clamp(nn.Module):
    """A deterministic purifier that changes nothing in [0, 1] (its BPDA gradient is exact)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.clamp(0, 1)


def saturated() -> tuple[nn.Module, Tensor, Tensor]:
    """The saturated 10-class classifier and N points it classifies right (deterministic)."""
    g = torch.Generator().manual_seed(3)
    mu = torch.rand(C, D, generator=g) * 0.6 + 0.2
    y = torch.arange(N) % C
    x = (mu[y] + 0.15 * torch.randn(N, D, generator=g)).clamp(0, 1).reshape(N, 1, 8, 8)
    model = Prototypes(mu, 1e4).eval()
    assert bool((model(x).argmax(1) == y).all())
    return model, x, y


# ------------------------------------------------------------------------------------------------- adapters
def test_apgdt_and_fab_break_what_masked_cross_entropy_cannot() -> None:
    model, x, y = saturated()
    apgd = TorchattacksAttack("APGD", L2_1, steps=10)(model, x, y)
    apgdt = TorchattacksAttack("APGDT", L2_1, steps=10)(model, x, y)  # n_classes from the model's output
    fab = TorchattacksAttack("FAB", L2_1, steps=10, multi_targeted=True)(model, x, y)
    assert int(apgd.success.sum()) == 0  # the CE gradient is exactly zero
    assert int(apgdt.success.sum()) >= 18 and int(fab.success.sum()) >= 18
    for res in (apgdt, fab):
        assert float(per_sample_norm(res.x_adv - x, Norm.L2).max()) <= 1.0 + 1e-4
        assert bool((model(res.x_adv).argmax(1) != y).eq(res.success).all())
    again = TorchattacksAttack("APGDT", L2_1, steps=10)(model, x, y)
    assert torch.equal(again.x_adv, apgdt.x_adv)  # seeded (the adapter's seed is APGDT's own)
    assert not x.requires_grad and x.grad is None


def test_apgdt_and_fab_refuse_too_few_classes() -> None:
    model, x, y = saturated()
    with pytest.raises(ValueError, match=r"expected torchattacks\.APGDT on a model of at least 4 classes, got "
                       r"n_classes 3"):  # fmt: skip
        TorchattacksAttack("APGDT", L2_1, n_classes=3)(model, x, y)
    three = tiny_setup()
    with pytest.raises(ValueError, match=r"at least 4 classes, got n_classes 3"):
        TorchattacksAttack("APGDT", L2_1)(three["classifier"], three["x"], three["y"])
    with pytest.raises(
        ValueError, match=r"torchattacks\.FAB on a model of at least 2 classes, got n_classes 1"
    ):
        TorchattacksAttack("FAB", L2_1, n_classes=1)(model, x, y)


# --------------------------------------------------------------------------------------------------- stages
BUDGETS = {"apgd_t.steps": 3, "apgd_t.plain_steps": 6, "apgd_t.eot_samples": 3, "fab.steps": 3,
           "fab.plain_steps": 6, "square.queries": 10, "square.plain_queries": 30}  # fmt: skip
AA = ("clean", "apgd", "apgd-t", "fab", "square")


def _settings(**fields: Any) -> RobustnessSettings:
    return tiny_settings(
        BUDGETS, n=N, threats=("l2-1",), attacks=AA, curve_eps_linf=(), curve_eps_l2=(), **fields
    )


@pytest.fixture(scope="module")
def record(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One harness run: the saturated classifier alone, behind a deterministic purifier, and with input noise."""
    model, x, y = saturated()
    defenses = [
        undefended_defense(model),
        purifier_defense("purified", model, Clamp(), randomized=False),
        undefended_defense(NoisyInput(model, std=0.02), name="noisy"),
    ]
    out = tmp_path_factory.mktemp("aa")
    return run_robustness(_settings(), defenses, x, y, out, progress=False)


def test_the_targeted_stages_break_the_masked_classifier_at_autoattack_budgets(
    record: dict[str, Any],
) -> None:
    d = record["defenses"]["undefended"]
    e = {a: d["attacks"][a]["l2-1"] for a in (*AA[1:], "convergence")}
    assert e["apgd"]["accuracy"] == 1.0  # CE: nothing
    assert e["apgd-t"]["status"] == "ran" and e["apgd-t"]["broken"] >= 18
    assert d["worst_case"]["l2-1"] <= e["apgd-t"]["accuracy"] <= 0.1
    # a plain model: AutoAttack's budgets (plain_steps, plain_queries), no EOT on a deterministic model
    s = e["apgd-t"]["settings"]
    assert (s["steps"], s["eot_iter"], s["through"], s["loss"]) == (6, 1, "model", "targeted dlr")
    assert s["budget"].startswith("plain model")
    assert (
        e["fab"]["status"] == "ran"
        and e["fab"]["attacked"] == e["apgd-t"]["attacked"] - e["apgd-t"]["broken"]
    )
    assert (e["fab"]["settings"]["steps"], e["fab"]["settings"]["multi_targeted"]) == (6, True)
    assert e["square"]["settings"]["n_queries"] == 30
    # the strongest white-box stage is apgd-t: the convergence rerun doubles its steps
    assert e["convergence"]["rerun_of"] == "apgd-t" and e["convergence"]["settings"]["steps"] == 12
    assert e["convergence"]["original_settings"]["steps"] == 6
    audit = [c for c in d["checks"] if c["flag"] == "audit-failed"]
    assert audit and all(c["status"] == "ok" for c in audit)


def test_through_preprocessing_the_stages_take_the_smaller_budget(record: dict[str, Any]) -> None:
    d = record["defenses"]["purified"]
    e = {a: d["attacks"][a]["l2-1"] for a in AA[1:]}
    assert e["apgd"]["accuracy"] == 1.0 and e["apgd-t"]["broken"] >= 15  # 3 steps per target class
    assert (e["apgd-t"]["settings"]["steps"], e["apgd-t"]["settings"]["through"]) == (3, "BPDA model")
    assert e["apgd-t"]["settings"]["budget"].startswith("preprocessing")
    assert e["fab"]["status"] == "ran" and e["fab"]["settings"]["steps"] == 3
    assert e["square"]["settings"]["n_queries"] == 10


def test_fab_skips_a_randomized_defense_and_apgd_t_runs_eot(record: dict[str, Any]) -> None:
    d = record["defenses"]["noisy"]
    assert d["randomized"]
    fab = d["attacks"]["fab"]["l2-1"]
    assert fab["status"] == "skipped" and fab["reason"].startswith("randomized defense: FAB linearizes")
    apgdt = d["attacks"]["apgd-t"]["l2-1"]
    assert apgdt["status"] == "ran" and (apgdt["settings"]["eot_iter"], apgdt["settings"]["steps"]) == (3, 6)
    assert apgdt["broken"] >= 10
    assert "fab" in record["attack_definitions"] and "targeted DLR" in record["attack_definitions"]["apgd-t"]


def test_apgd_t_skips_a_model_of_three_classes(tmp_path: Path) -> None:
    setup = tiny_setup()
    settings = tiny_settings(BUDGETS, threats=("l2-1",), attacks=("clean", "apgd-t", "fab"), curve_eps_linf=(),
                             curve_eps_l2=())  # fmt: skip
    rec = run_robustness(settings, [undefended_defense(setup["classifier"])], setup["x"], setup["y"], tmp_path,
                         progress=False)  # fmt: skip
    d = rec["defenses"]["undefended"]
    assert d["attacks"]["apgd-t"]["l2-1"] == {
        "status": "skipped",
        "reason": "3 classes: the targeted DLR loss reads the 3rd and 4th largest logits (4 classes or more)",
    }
    assert d["attacks"]["fab"]["l2-1"]["status"] == "ran"  # FAB targets the 2 other classes


def test_the_convergence_candidates_include_the_targeted_stages() -> None:
    model, _, _ = saturated()
    recs = {"apgd": {"status": "ran", "robust": torch.tensor([1, 1, 1, 1]).bool()},
            "apgd-t": {"status": "ran", "robust": torch.tensor([0, 1, 1, 1]).bool()},
            "fab": {"status": "ran", "robust": torch.tensor([0, 0, 1, 1]).bool()},
            "square": {"status": "ran", "robust": torch.tensor([0, 0, 0, 0]).bool()}}  # fmt: skip
    env = type("Env", (), {"defense": undefended_defense(model)})()
    assert strongest_stage(("apgd", "apgd-t", "fab", "square"), recs.get, env) == "fab"  # square: black box
    assert strongest_stage(("apgd", "apgd-t"), recs.get, env) == "apgd-t"


# ------------------------------------------------------------------------------------------------- settings
def test_order_defaults_and_bad_configs() -> None:
    assert ATTACKS.index("apgd") < ATTACKS.index("apgd-t") < ATTACKS.index("fab") < ATTACKS.index("square")
    s = RobustnessSettings()
    assert (s.apgd_t.plain_steps, s.apgd_t.steps, s.fab.plain_steps, s.fab.steps) == (100, 10, 100, 10)
    assert (s.square.plain_queries, s.square.queries) == (5000, 500)
    q = RobustnessSettings.quick_preset()
    for key in ("apgd_t.steps", "apgd_t.plain_steps", "fab.steps", "fab.plain_steps", "square.plain_queries"):
        assert key in q.reductions(), key  # the quick preset lists its reduced budgets
    assert q.apgd_t.plain_steps < s.apgd_t.plain_steps and q.square.plain_queries < s.square.plain_queries
    with pytest.raises(ValueError, match=r"expected apgd_t\.steps to be an int >= 1, got 0"):
        APGDTConfig(steps=0)
    with pytest.raises(ValueError, match=r"expected fab\.plain_steps to be an int >= 1, got 1\.5"):
        FABConfig(plain_steps=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"expected square\.plain_queries to be an int >= 1, got True"):
        SquareConfig(plain_queries=True)
    with pytest.raises(ValueError, match=r"^fab: expected fab\.restarts to be an int >= 1, got -1"):
        s.updated({"fab.restarts": -1})
    with pytest.raises(
        ValueError, match=r"unknown setting 'fab\.alpha': fab has \['plain_steps', 'restarts', 'steps'\]"
    ):
        s.updated({"fab.alpha": 0.1})
    with pytest.raises(
        TypeError, match=r"expected apgd_t \(the settings of apgd-t\) as APGDTConfig, got dict"
    ):
        RobustnessSettings(apgd_t={"steps": 3})  # type: ignore[arg-type]


def test_the_command_line_sets_both_budgets() -> None:
    from eval.robustness import settings_from_args

    args = ["robustness", "--apgd-t-steps", "7", "--fab-steps", "9", "--square-queries", "40", "--eot", "5"]
    s = settings_from_args(build_parser().parse_args(args))
    assert (s.apgd_t.steps, s.apgd_t.plain_steps, s.apgd_t.eot_samples) == (7, 7, 5)
    assert (s.fab.steps, s.fab.plain_steps, s.square.queries, s.square.plain_queries) == (9, 9, 40, 40)
    with pytest.raises(ValueError, match=r"expected fab\.steps to be an int >= 1, got 0"):
        settings_from_args(build_parser().parse_args(["robustness", "--fab-steps", "0"]))
    helps = {a.dest: a.help or "" for a in _robustness_parser()._actions}
    assert (
        "plain model: full 100, quick 5" in helps["apgd_t_steps"]
        and "full 10, quick 1" in helps["apgd_t_steps"]
    )
    assert "plain model: full 5000" in helps["square_queries"]


def _robustness_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["robustness"]
