"""PGD: threat-model properties, attack strength on a tiny trained model, restarts, schedules, hooks, EOT."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_attacks_fixtures import accuracy, trained_classifier
from torch import Tensor, nn

from attacks import (
    MADRY_MNIST,
    MADRY_MNIST_THREAT,
    PGD,
    Norm,
    PGDConfig,
    StepSchedule,
    ThreatModel,
    per_sample_norm,
)


@pytest.fixture(scope="module")
def clf() -> tuple[nn.Module, Tensor, Tensor]:
    return trained_classifier()


def robust_accuracy(attack: PGD, model: nn.Module, x: Tensor, y: Tensor) -> float:
    return 1.0 - float(attack(model, x, y).success.float().mean())


# ------------------------------------------------------------------------------------- threat model
@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 3),
    channels=st.integers(1, 2),
    side=st.integers(1, 5),
    norm=st.sampled_from(list(Norm)),
    eps=st.floats(0.0, 1.5),
    restarts=st.integers(1, 2),
    schedule=st.sampled_from(list(StepSchedule)),
)
def test_pgd_stays_in_threat_model_and_leaves_input(
    batch: int, channels: int, side: int, norm: Norm, eps: float, restarts: int, schedule: StepSchedule
) -> None:
    gen = torch.Generator().manual_seed(batch * 100 + side)
    d = channels * side * side
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, 4)).eval()
    x = torch.rand((batch, channels, side, side), generator=gen)
    y = torch.randint(0, 4, (batch,), generator=gen)
    x_before, y_before = x.clone(), y.clone()
    config = PGDConfig(steps=3, step_size=max(eps, 1e-3), restarts=restarts, schedule=schedule, loss="margin")
    result = PGD(ThreatModel(norm, eps), config)(model, x, y)
    assert torch.equal(x, x_before) and torch.equal(y, y_before)
    assert float(result.x_adv.min()) >= 0 and float(result.x_adv.max()) <= 1
    assert bool((per_sample_norm(result.x_adv - x, norm) <= eps * (1 + 1e-5) + 1e-7).all())


def test_pgd_run_itself_stays_in_threat_model(clf: tuple[nn.Module, Tensor, Tensor]) -> None:
    """Not only the base class's re-projection: the loop's own iterates respect the ball."""
    model, x, y = clf
    for threat in (ThreatModel(Norm.LINF, 0.1), ThreatModel(Norm.L2, 1.0)):
        x_run = PGD(threat, PGDConfig(steps=5)).run(model, x[:20].clone(), y[:20])
        assert float((per_sample_norm(x_run - x[:20], threat.norm)).max()) <= threat.eps * (1 + 1e-5)
        assert float(x_run.min()) >= 0 and float(x_run.max()) <= 1


def test_eps_zero_returns_input(clf: tuple[nn.Module, Tensor, Tensor]) -> None:
    model, x, y = clf
    result = PGD(ThreatModel(Norm.L2, 0.0), PGDConfig(steps=3))(model, x[:10], y[:10])
    assert torch.equal(result.x_adv, x[:10])
    assert not bool(result.success.any())


# ----------------------------------------------------------------------------------------- strength
@pytest.mark.parametrize(
    ("threat", "max_robust"),
    [
        (ThreatModel(Norm.LINF, 0.2), 0.5),
        (ThreatModel(Norm.LINF, 0.3), 0.02),
        (ThreatModel(Norm.L2, 1.5), 0.3),
    ],
)
def test_pgd_lowers_accuracy(
    clf: tuple[nn.Module, Tensor, Tensor], threat: ThreatModel, max_robust: float
) -> None:
    model, x, y = clf
    assert accuracy(model, x, y) > 0.95
    assert robust_accuracy(PGD(threat, PGDConfig(steps=20)), model, x, y) <= max_robust


@pytest.mark.parametrize("loss", ["ce", "margin", "dlr"])
def test_every_loss_attacks(clf: tuple[nn.Module, Tensor, Tensor], loss: str) -> None:
    model, x, y = clf
    assert (
        robust_accuracy(PGD(ThreatModel(Norm.LINF, 0.2), PGDConfig(steps=20, loss=loss)), model, x, y) < 0.6
    )


def test_restarts_never_hurt(clf: tuple[nn.Module, Tensor, Tensor]) -> None:
    model, x, y = clf
    threat = ThreatModel(Norm.LINF, 0.16)
    one = PGD(threat, PGDConfig(steps=5, restarts=1, seed=3))(model, x, y)
    three = PGD(threat, PGDConfig(steps=5, restarts=3, seed=3))(model, x, y)
    assert bool((three.success | ~one.success).all())  # every sample fooled by one run stays fooled
    assert int(three.success.sum()) > int(one.success.sum())


def test_keeps_best_iterate_not_last() -> None:
    """A tiny model whose loss, beyond the point reached in one step, falls: the loop keeps the best point."""

    class Bump(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            s = x.flatten(1).sum(1, keepdim=True)
            # class 1 logit peaks at s = 1.2 and the true class 0 has logit 0: success only near the peak
            return torch.cat([torch.zeros_like(s), 1 - 10 * (s - 1.2) ** 2], dim=1)

    x = torch.full((1, 1, 1, 2), 0.5)
    y = torch.tensor([0])
    attack = PGD(ThreatModel(Norm.LINF, 0.5), PGDConfig(steps=3, step_size=0.1, random_start=False))
    result = attack(Bump().eval(), x, y)
    assert bool(result.success.all())
    assert torch.allclose(result.x_adv.sum(), torch.tensor(1.2))


# -------------------------------------------------------------------------------------- determinism
def test_seeded_and_global_rng_untouched(clf: tuple[nn.Module, Tensor, Tensor]) -> None:
    model, x, y = clf
    config = PGDConfig(steps=2, seed=5)
    state = torch.get_rng_state()
    a = PGD(ThreatModel(Norm.L2, 1.0), config)(model, x, y)
    assert torch.equal(torch.get_rng_state(), state)
    b = PGD(ThreatModel(Norm.L2, 1.0), config)(model, x, y)
    c = PGD(ThreatModel(Norm.L2, 1.0), dataclasses.replace(config, seed=6))(model, x, y)
    assert torch.equal(a.x_adv, b.x_adv)
    assert not torch.equal(a.x_adv, c.x_adv)


@pytest.mark.parametrize("norm", list(Norm))
def test_batch_consistent(clf: tuple[nn.Module, Tensor, Tensor], norm: Norm) -> None:
    model, x, y = clf
    attack = PGD(ThreatModel(norm, 0.2 if norm is Norm.LINF else 1.2), PGDConfig(steps=5, restarts=2))
    full = attack(model, x[:30], y[:30])
    part = attack(model, x[:7], y[:7])
    assert torch.allclose(full.x_adv[:7], part.x_adv, atol=1e-5)
    assert torch.equal(full.success[:7], part.success)


def test_l2_random_start_is_inside_ball_and_spread() -> None:
    attack = PGD(ThreatModel(Norm.L2, 2.0))
    x = torch.zeros(500, 1, 2, 2)
    norms = per_sample_norm(attack.random_start(x, torch.Generator().manual_seed(0)), Norm.L2)
    assert float(norms.max()) <= 2.0
    # uniform in a 4-ball: P(||d|| <= r) = (r / eps)^4, so the median radius is 2 * 0.5 ** 0.25 ~ 1.68
    assert abs(float(norms.median()) - 2 * 0.5**0.25) < 0.1


# ---------------------------------------------------------------------------------------- schedules
def test_step_size_schedules() -> None:
    threat = ThreatModel(Norm.LINF, 0.3)
    constant = PGD(threat, PGDConfig(steps=10, step_size=0.1))
    assert [constant.step_size_at(t) for t in (0, 9)] == [0.1, 0.1]
    step = PGD(
        threat, PGDConfig(steps=10, step_size=0.1, schedule="step", decay_milestones=(0.5,), decay_factor=0.5)
    )
    assert [step.step_size_at(t) for t in (0, 4, 5, 9)] == [0.1, 0.1, 0.05, 0.05]
    cosine = PGD(threat, PGDConfig(steps=10, step_size=0.1, schedule="cosine"))
    assert cosine.step_size_at(0) == pytest.approx(0.1)
    assert cosine.step_size_at(5) == pytest.approx(0.05)
    assert cosine.step_size_at(9) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 0.9)))
    assert PGD(threat, PGDConfig(steps=40)).step_size_at(0) == pytest.approx(2.5 * 0.3 / 40)


def test_madry_preset() -> None:
    attack = PGD.madry_mnist(seed=2)
    assert attack.threat == MADRY_MNIST_THREAT == ThreatModel(Norm.LINF, 0.3)
    assert (attack.config.steps, attack.config.step_size, attack.config.random_start) == (40, 0.01, True)
    assert attack.config.seed == 2 and MADRY_MNIST.seed == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": -1}, r"expected steps to be an int >= 0, got -1"),
        ({"restarts": 0}, r"expected restarts to be an int >= 1, got 0"),
        ({"eot_samples": 0}, r"expected eot_samples to be an int >= 1, got 0"),
        ({"step_size": 0.0}, r"expected step_size > 0 or None, got 0.0"),
        (
            {"schedule": "linear"},
            r"expected schedule to be one of \['constant', 'step', 'cosine'\], got 'linear'",
        ),
        ({"loss": "hinge"}, r"expected loss to be one of"),
        ({"decay_factor": 2.0}, r"expected decay_factor in \(0, 1\], got 2.0"),
    ],
)
def test_config_validation(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PGDConfig(**kwargs)  # type: ignore[arg-type]


def test_config_type_is_checked() -> None:
    with pytest.raises(TypeError, match="expected config to be a PGDConfig, got dict"):
        PGD(ThreatModel(Norm.LINF, 0.1), {"steps": 3})  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------------- hooks
def test_loss_hook_is_used(clf: tuple[nn.Module, Tensor, Tensor]) -> None:
    class ZeroLoss(PGD):
        def loss_fn(self, logits: Tensor, y: Tensor) -> Tensor:
            return 0 * logits.sum(1)  # zero gradient: sign(0) = 0, the iterate never moves

    model, x, y = clf
    result = ZeroLoss(ThreatModel(Norm.LINF, 0.3), PGDConfig(steps=5, random_start=False))(model, x, y)
    assert torch.equal(result.x_adv, x)


def test_project_and_normalize_hooks_are_used(clf: tuple[nn.Module, Tensor, Tensor]) -> None:
    calls = {"project": 0, "normalize": 0}

    class Counting(PGD):
        def project(self, x_adv: Tensor, x: Tensor) -> Tensor:
            calls["project"] += 1
            return super().project(x_adv, x)

        def normalize_gradient(self, grad: Tensor) -> Tensor:
            calls["normalize"] += 1
            return super().normalize_gradient(grad)

    model, x, y = clf
    Counting(ThreatModel(Norm.LINF, 0.1), PGDConfig(steps=4))(model, x[:5], y[:5])
    assert calls == {"project": 5, "normalize": 4}  # random start + 4 steps; 4 gradient steps


def test_model_parameter_grads_untouched() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    x, y = torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 0])
    PGD(ThreatModel(Norm.LINF, 0.1), PGDConfig(steps=3))(model, x, y)
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------------------------------- EOT
class RandomMask(nn.Module):
    """Randomized linear model: logits = (x * m) @ W with a fresh Bernoulli(1/2) mask m per call.

    d logit / dx = m * W: one pass sees a random half of the gradient; the expectation is W / 2.
    """

    def __init__(self, d: int = 16, k: int = 3) -> None:
        super().__init__()
        self.weight = nn.Parameter(
            torch.randn(d, k, generator=torch.Generator().manual_seed(0)), requires_grad=False
        )
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        flat = x.flatten(1)
        mask = (torch.rand(flat.shape, device=flat.device) < 0.5).to(flat.dtype)
        return (flat * mask) @ self.weight


def test_eot_averages_gradients_over_passes() -> None:
    model = RandomMask()
    x, y = torch.rand(3, 1, 4, 4), torch.tensor([0, 1, 2])
    single = PGD(ThreatModel(Norm.LINF, 0.1), PGDConfig(eot_samples=1))
    eot = PGD(ThreatModel(Norm.LINF, 0.1), PGDConfig(eot_samples=5))
    torch.manual_seed(11)
    grads = [single.value_and_grad(model, x, y)[1] for _ in range(5)]
    torch.manual_seed(11)
    _, grad_eot, _ = eot.value_and_grad(model, x, y)
    assert torch.allclose(grad_eot, torch.stack(grads).mean(0), atol=1e-6)
    assert not torch.allclose(grads[0], grads[1])  # the model really is random


def test_eot_converges_to_expected_gradient() -> None:
    model = RandomMask()
    x, y = torch.rand(2, 1, 4, 4), torch.tensor([0, 1])
    # Reference: the gradient averaged over 800 passes; EOT over 100 passes must be much closer to it than
    # a single pass.
    torch.manual_seed(0)
    reference = PGD(ThreatModel(Norm.LINF, 0.1), PGDConfig(loss="ce", eot_samples=800)).value_and_grad(
        model, x, y
    )[1]
    err_one = (PGD(ThreatModel(Norm.LINF, 0.1)).value_and_grad(model, x, y)[1] - reference).norm()
    eot = PGD(ThreatModel(Norm.LINF, 0.1), PGDConfig(eot_samples=100))
    err_eot = (eot.value_and_grad(model, x, y)[1] - reference).norm()
    assert float(err_eot) < 0.3 * float(err_one)


def test_eot_attack_runs_end_to_end() -> None:
    model = RandomMask()
    x, y = torch.rand(6, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    result = PGD(ThreatModel(Norm.L2, 0.5), PGDConfig(steps=3, eot_samples=4))(model, x, y)
    assert float(per_sample_norm(result.x_adv - x, Norm.L2).max()) <= 0.5 * (1 + 1e-5)
