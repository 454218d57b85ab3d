"""torchattacks / foolbox adapters: same AttackResult and threat model, and a three-way PGD cross-check."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from test_attacks_fixtures import trained_classifier
from torch import Tensor, nn

from attacks import (
    FOOLBOX_ATTACKS,
    PGD,
    TORCHATTACKS_ATTACKS,
    Attack,
    AttackResult,
    FoolboxAttack,
    Norm,
    PGDConfig,
    ThreatModel,
    TorchattacksAttack,
    per_sample_norm,
)


@pytest.fixture(scope="module")
def clf() -> tuple[nn.Module, Tensor, Tensor]:
    return trained_classifier()


LINF = ThreatModel(Norm.LINF, 0.3)
L2 = ThreatModel(Norm.L2, 2.0)

CASES: list[tuple[type[Attack], str, ThreatModel, dict[str, Any]]] = [
    (TorchattacksAttack, "PGD", LINF, {"alpha": 0.03, "steps": 10}),
    (TorchattacksAttack, "PGDL2", L2, {"alpha": 0.3, "steps": 10}),
    (TorchattacksAttack, "EOTPGD", LINF, {"alpha": 0.03, "steps": 10, "eot_iter": 2}),
    (TorchattacksAttack, "APGD", LINF, {"steps": 10}),
    (TorchattacksAttack, "APGD", L2, {"steps": 10, "loss": "dlr"}),
    (TorchattacksAttack, "Square", LINF, {"n_queries": 300}),
    (TorchattacksAttack, "AutoAttack", LINF, {}),
    (FoolboxAttack, "LinfPGD", LINF, {"abs_stepsize": 0.03, "steps": 10}),
    (FoolboxAttack, "L2PGD", L2, {"abs_stepsize": 0.3, "steps": 10}),
    (
        FoolboxAttack,
        "L2CarliniWagnerAttack",
        L2,
        {"steps": 50, "binary_search_steps": 5, "stepsize": 0.05, "initial_const": 1.0},
    ),
    (FoolboxAttack, "BoundaryAttack", ThreatModel(Norm.L2, 5.0), {"steps": 30}),  # starts far: large eps
]


@pytest.mark.parametrize(
    ("cls", "name", "threat", "kwargs"), CASES, ids=[f"{c[1]}-{c[2].norm.value}" for c in CASES]
)
def test_adapter_returns_attack_result_in_threat_model(
    clf: tuple[nn.Module, Tensor, Tensor],
    cls: type[Any],
    name: str,
    threat: ThreatModel,
    kwargs: dict[str, Any],
) -> None:
    model, x, y = clf
    x, y = x[::15], y[::15]  # 20 samples
    x_before, y_before = x.clone(), y.clone()
    state = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # foolbox's own deprecation / convergence warnings
        result = cls(name, threat, **kwargs)(model, x, y)
    assert torch.equal(torch.get_rng_state(), state)  # the libraries ran on a forked RNG
    assert torch.equal(x, x_before) and torch.equal(y, y_before)
    assert isinstance(result, AttackResult)
    assert result.x_adv.shape == x.shape and result.success.shape == (20,) and result.logits.shape == (20, 3)
    assert float(result.x_adv.min()) >= 0 and float(result.x_adv.max()) <= 1
    assert float(per_sample_norm(result.x_adv - x, threat.norm).max()) <= threat.eps * (1 + 1e-5)
    with torch.no_grad():
        assert torch.equal(result.success, model(result.x_adv).argmax(1) != y)
    assert float(result.success.float().mean()) >= 0.5  # large budgets: every attack breaks most points
    assert not model.training


def test_adapters_are_seeded(clf: tuple[nn.Module, Tensor, Tensor]) -> None:
    model, x, y = clf
    x, y = x[:30], y[:30]
    threat = ThreatModel(Norm.LINF, 0.15)
    a = TorchattacksAttack("PGD", threat, seed=1, alpha=0.03, steps=2)(model, x, y)
    b = TorchattacksAttack("PGD", threat, seed=1, alpha=0.03, steps=2)(model, x, y)
    c = TorchattacksAttack("PGD", threat, seed=2, alpha=0.03, steps=2)(model, x, y)
    assert torch.equal(a.x_adv, b.x_adv) and not torch.equal(a.x_adv, c.x_adv)
    # APGD and Square reseed torch with their own seed argument: the adapter's seed reaches them too
    # (Square returns the clean input where it fails: a budget at which it breaks some points)
    for name, t, kw in (("APGD", threat, {"steps": 2}), ("Square", ThreatModel(Norm.LINF, 0.5), {"n_queries": 20})):
        s1, s1b, s2 = (TorchattacksAttack(name, t, seed=k, **kw)(model, x, y) for k in (1, 1, 2))
        assert torch.equal(s1.x_adv, s1b.x_adv) and not torch.equal(s1.x_adv, s2.x_adv), name
    f1 = FoolboxAttack("LinfPGD", threat, seed=1, abs_stepsize=0.03, steps=2)(model, x, y)
    f2 = FoolboxAttack("LinfPGD", threat, seed=1, abs_stepsize=0.03, steps=2)(model, x, y)
    assert torch.equal(f1.x_adv, f2.x_adv)


def test_adapters_accept_plain_callables(clf: tuple[nn.Module, Tensor, Tensor]) -> None:
    model, x, y = clf
    fn = lambda t: model(t)  # noqa: E731 - a model that is not an nn.Module
    for attack in (
        TorchattacksAttack("PGD", LINF, alpha=0.03, steps=20),
        FoolboxAttack("LinfPGD", LINF, abs_stepsize=0.03, steps=20),
    ):
        assert float(attack(fn, x[:20], y[:20]).success.float().mean()) > 0.5


def test_unknown_names_list_valid_ones() -> None:
    with pytest.raises(
        ValueError, match=r"expected a torchattacks attack name, one of \['APGD', .*\], got 'FGSM2'"
    ):
        TorchattacksAttack("FGSM2", LINF)
    with pytest.raises(
        ValueError, match=r"expected a foolbox attack name, one of \['BoundaryAttack', .*got 'PGD'"
    ):
        FoolboxAttack("PGD", LINF)
    assert set(TORCHATTACKS_ATTACKS) >= {"PGD", "APGD", "APGDT", "FAB", "EOTPGD", "Square", "AutoAttack"}
    assert set(FOOLBOX_ATTACKS) >= {"LinfPGD", "L2CarliniWagnerAttack", "BoundaryAttack"}


def test_norm_mismatch_and_reserved_kwargs() -> None:
    with pytest.raises(
        ValueError, match=r"expected a threat model with norm in \['linf'\] for torchattacks\.PGD, got 'l2'"
    ):
        TorchattacksAttack("PGD", L2)
    with pytest.raises(ValueError, match=r"norm in \['l2'\] for foolbox\.L2CarliniWagnerAttack, got 'linf'"):
        FoolboxAttack("L2CarliniWagnerAttack", LINF)
    with pytest.raises(ValueError, match=r"expected 'eps' to come from the threat model"):
        TorchattacksAttack("PGD", LINF, eps=0.1)


def test_cross_check_pgd_implementations(clf: tuple[nn.Module, Tensor, Tensor]) -> None:
    """Our PGD, torchattacks' PGD and foolbox's LinfPGD with the same settings agree within a few points."""
    model, x, y = clf
    threat = ThreatModel(Norm.LINF, 0.2)  # robust accuracy near the middle, where disagreements would show
    steps, step = 20, 0.05
    ours = PGD(threat, PGDConfig(steps=steps, step_size=step, random_start=True))(model, x, y)
    ta = TorchattacksAttack("PGD", threat, alpha=step, steps=steps, random_start=True)(model, x, y)
    fb = FoolboxAttack("LinfPGD", threat, abs_stepsize=step, steps=steps, random_start=True)(model, x, y)
    robust = {
        name: 1 - float(r.success.float().mean()) for name, r in (("ours", ours), ("ta", ta), ("fb", fb))
    }
    assert 0.1 < robust["ours"] < 0.7, robust
    assert abs(robust["ours"] - robust["ta"]) <= 0.04, robust
    assert abs(robust["ours"] - robust["fb"]) <= 0.04, robust
    assert abs(robust["ta"] - robust["fb"]) <= 0.04, robust
