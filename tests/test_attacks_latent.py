"""Latent-space (on-manifold) attacks: x_adv = G(z_adv) exactly, constraints respected, attacks succeed."""

from __future__ import annotations

import pytest
import torch
from test_attacks_fixtures import LATENT_DIM, TinyGenerator, tiny_generator, trained_classifier
from torch import Tensor, nn

from attacks import LatentAttack, LatentAttackConfig, LatentConstraint, per_sample_norm, update_multiplier


@pytest.fixture(scope="module")
def setup() -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    """Classifier, generator, 40 latents and the classifier's labels of G(z) (so G(z) starts correct)."""
    model, _, _ = trained_classifier()
    generator = tiny_generator()
    z = torch.randn(40, LATENT_DIM, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y = model(generator(z)).argmax(1)
    return model, generator, z, y


@pytest.mark.parametrize(
    ("constraint", "eps"), [("latent", 0.5), ("latent", 1.5), ("pixel", 0.3), ("pixel", 1.0)]
)
def test_on_manifold_and_within_constraint(
    setup: tuple[nn.Module, nn.Module, Tensor, Tensor], constraint: str, eps: float
) -> None:
    model, generator, z, y = setup
    z_before, y_before = z.clone(), y.clone()
    result = LatentAttack(LatentAttackConfig(eps=eps, constraint=constraint, steps=30))(
        model, generator, z, y
    )
    assert torch.equal(z, z_before) and torch.equal(y, y_before)
    with torch.no_grad():
        assert torch.equal(generator(result.z_adv), result.x_adv)  # exactly on the generator's range
        x0 = generator(z)
        assert torch.equal(result.success, model(result.x_adv).argmax(1) != y)
    assert torch.allclose(result.latent_distance, per_sample_norm(result.z_adv - z, "l2"))
    assert torch.allclose(result.pixel_distance, per_sample_norm(result.x_adv - x0, "l2"))
    bound = result.latent_distance if constraint == "latent" else result.pixel_distance
    assert float(bound.max()) <= eps * (1 + 1e-5)
    assert float(result.success.float().mean()) > 0.3  # the attack does find on-manifold adversarial examples


@pytest.mark.parametrize("constraint", list(LatentConstraint))
def test_larger_budget_succeeds_more(
    setup: tuple[nn.Module, nn.Module, Tensor, Tensor], constraint: str
) -> None:
    model, generator, z, y = setup
    rates = []
    for eps in (0.1, 2.0):
        res = LatentAttack(LatentAttackConfig(eps=eps, constraint=constraint, steps=30))(
            model, generator, z, y
        )
        rates.append(float(res.success.float().mean()))
    assert rates[0] < rates[1]
    assert rates[1] > 0.9


def test_eps_zero_returns_z(setup: tuple[nn.Module, nn.Module, Tensor, Tensor]) -> None:
    model, generator, z, y = setup
    for constraint in LatentConstraint:
        res = LatentAttack(LatentAttackConfig(eps=0.0, constraint=constraint, steps=5))(
            model, generator, z, y
        )
        assert torch.equal(res.z_adv, z)
        assert not bool(res.success.any())


def test_already_misclassified_keeps_z(setup: tuple[nn.Module, nn.Module, Tensor, Tensor]) -> None:
    model, generator, z, y = setup
    wrong = (y + 1) % 3
    res = LatentAttack(LatentAttackConfig(eps=1.0, steps=5))(model, generator, z, wrong)
    assert bool(res.success.all())
    # z itself is fooled and feasible; only strictly higher-loss fooled iterates may replace it
    assert float(res.latent_distance.max()) <= 1.0 * (1 + 1e-5)


def test_batch_independent(setup: tuple[nn.Module, nn.Module, Tensor, Tensor]) -> None:
    model, generator, z, y = setup
    for constraint in LatentConstraint:
        attack = LatentAttack(LatentAttackConfig(eps=0.5, constraint=constraint, steps=10))
        full = attack(model, generator, z, y)
        part = attack(model, generator, z[:5], y[:5])
        assert torch.allclose(full.z_adv[:5], part.z_adv, atol=1e-5)


def test_no_parameter_gradients_accumulate() -> None:
    model, _, _ = trained_classifier()
    generator = TinyGenerator().eval()  # parameters require grad here
    z = torch.randn(4, LATENT_DIM)
    with torch.no_grad():
        y = model(generator(z)).argmax(1)
    LatentAttack(LatentAttackConfig(eps=1.0, constraint="pixel", steps=3))(model, generator, z, y)
    assert all(p.grad is None for p in generator.parameters())


def test_update_multiplier() -> None:
    lam = torch.tensor([1.0, 1.0, 1e-3, 1e4])
    out = update_multiplier(lam, torch.tensor([0.5, -0.5, -1.0, 1.0]), factor=2.0)
    assert torch.allclose(out, torch.tensor([2.0, 0.5, 1e-3, 1e4]))
    assert torch.equal(lam, torch.tensor([1.0, 1.0, 1e-3, 1e4]))


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"eps": -1.0}, r"expected eps to be finite and >= 0, got -1.0"),
        (
            {"eps": 1.0, "constraint": "linf"},
            r"expected constraint to be one of \['latent', 'pixel'\], got 'linf'",
        ),
        ({"eps": 1.0, "steps": -2}, r"expected steps to be an int >= 0, got -2"),
        ({"eps": 1.0, "multiplier_factor": 1.0}, r"multiplier_factor > 1"),
        ({"eps": 1.0, "loss": "l1"}, r"expected loss to be one of"),
    ],
)
def test_config_validation(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LatentAttackConfig(**kwargs)  # type: ignore[arg-type]


def test_bad_inputs(setup: tuple[nn.Module, nn.Module, Tensor, Tensor]) -> None:
    model, generator, z, y = setup
    attack = LatentAttack(LatentAttackConfig(eps=1.0, steps=1))
    with pytest.raises(
        ValueError, match=r"expected z of shape \(B, 4\) \(generator.latent_dim\), got \(40, 3\)"
    ):
        attack(model, generator, z[:, :3], y)
    with pytest.raises(
        ValueError, match=r"expected z of shape \(B, latent_dim\) with B >= 1, got shape \(40,\)"
    ):
        attack(model, generator, z[:, 0], y)
    with pytest.raises(TypeError, match=r"expected z to be a floating-point tensor, got dtype torch\.int64"):
        attack(model, generator, z.long(), y)
    with pytest.raises(ValueError, match=r"expected y of shape \(40,\), got shape \(39,\)"):
        attack(model, generator, z, y[:-1])
    with pytest.raises(ValueError, match=r"expected the generator's images in \[0, 1\], got range"):
        attack(model, lambda t: generator(t) * 3 - 1, z, y)
    with pytest.raises(ValueError, match=r"expected the generator to return float images \(B=40, C, H, W\)"):
        attack(model, lambda t: generator(t).flatten(1), z, y)
    with pytest.raises(TypeError, match="expected config to be a LatentAttackConfig, got dict"):
        LatentAttack({"eps": 1.0})  # type: ignore[arg-type]


def test_warns_on_training_generator(setup: tuple[nn.Module, nn.Module, Tensor, Tensor]) -> None:
    model, _, z, y = setup
    generator = TinyGenerator().train()
    with pytest.warns(UserWarning, match="generator is in training mode"):
        LatentAttack(LatentAttackConfig(eps=1.0, steps=1))(model, generator, z, y)


def test_found_step_gives_the_success_of_every_shorter_attack(
    setup: tuple[nn.Module, nn.Module, Tensor, Tensor],
) -> None:
    """In pixel mode a t-step attack succeeds exactly where the long run's ``found_step <= t`` (one run gives the
    success-vs-steps curve of :func:`manifold_defense.evaluation.found_at_steps`)."""
    model, generator, z, y = setup
    long = LatentAttack(LatentAttackConfig(eps=0.6, constraint="pixel", steps=30))(model, generator, z, y)
    assert long.found_step.dtype == torch.int64
    assert torch.equal(long.success, long.found_step >= 0)  # success once found stays (best iterate kept)
    for t in (0, 3, 10):
        short = LatentAttack(LatentAttackConfig(eps=0.6, constraint="pixel", steps=t))(model, generator, z, y)
        assert torch.equal(short.success, (long.found_step >= 0) & (long.found_step <= t))
    assert int(((long.found_step > 3) & (long.found_step <= 30)).sum()) > 0  # the curve moves after step 3
