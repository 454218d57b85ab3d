"""The overpowered (OP) pair attack: valid pairs lie within eps on G's range and get two labels."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_attacks_fixtures import LATENT_DIM, tiny_generator, trained_classifier
from torch import Tensor, nn

from attacks import OverpoweredAttack, OverpoweredConfig, pair_divergence, per_sample_norm


@pytest.fixture(scope="module")
def setup() -> tuple[nn.Module, nn.Module, Tensor]:
    model, _, _ = trained_classifier()
    z = torch.randn(32, LATENT_DIM, generator=torch.Generator().manual_seed(4))
    return model, tiny_generator(), z


def test_pairs_are_on_range_within_eps_and_disagree(setup: tuple[nn.Module, nn.Module, Tensor]) -> None:
    model, generator, z = setup
    z_before = z.clone()
    eps = 0.1
    result = OverpoweredAttack(OverpoweredConfig(eps=eps, steps=100, step_size=0.05))(model, generator, z)
    assert torch.equal(z, z_before)
    with torch.no_grad():
        assert torch.equal(generator(torch.cat([result.z1, result.z2])), torch.cat([result.x1, result.x2]))
        assert torch.equal(result.pred1, model(result.x1).argmax(1))
        assert torch.equal(result.pred2, model(result.x2).argmax(1))
    assert torch.allclose(result.distance, per_sample_norm(result.x1 - result.x2, "l2"))
    assert torch.equal(result.disagree, result.pred1 != result.pred2)
    assert torch.equal(result.success, result.disagree & (result.distance <= eps))
    assert torch.equal(result.robust, ~result.success)
    assert float(result.success.float().mean()) > 0.5
    assert float(result.distance[result.success].max()) <= eps
    assert bool((result.pred1[result.success] != result.pred2[result.success]).all())


def test_eps_zero_finds_nothing(setup: tuple[nn.Module, nn.Module, Tensor]) -> None:
    """A deterministic classifier gives one label to one image: no pair at distance 0 can disagree."""
    model, generator, z = setup
    result = OverpoweredAttack(OverpoweredConfig(eps=0.0, steps=20))(model, generator, z)
    assert bool(result.robust.all()) and not bool(result.success.any())


def test_larger_eps_finds_more(setup: tuple[nn.Module, nn.Module, Tensor]) -> None:
    model, generator, z = setup
    rates = [
        float(
            OverpoweredAttack(OverpoweredConfig(eps=eps, steps=60, step_size=0.05))(model, generator, z)
            .success.float()
            .mean()
        )
        for eps in (0.005, 0.2)
    ]
    assert rates[0] < rates[1]


class _Scaled(nn.Module):
    """The same labels as ``model`` with logits multiplied by ``scale``: a nearly one-hot softmax."""

    def __init__(self, model: nn.Module, scale: float) -> None:
        super().__init__()
        self.model, self.scale = model, scale

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x) * self.scale


def test_temperature_divides_the_logits_of_the_loss(setup: tuple[nn.Module, nn.Module, Tensor]) -> None:
    """With logits scaled by 1000 (same labels, nearly one-hot softmax), temperature 1000 gives exactly the
    attack on the unscaled classifier, and the loss at temperature 1 takes a different path."""
    model, generator, z = setup
    saturated = _Scaled(model, 1000.0).eval()
    config = OverpoweredConfig(eps=0.1, steps=100, step_size=0.05)
    plain = OverpoweredAttack(config)(model, generator, z)
    tempered = OverpoweredAttack(dataclasses.replace(config, temperature=1000.0))(saturated, generator, z)
    untempered = OverpoweredAttack(config)(saturated, generator, z)
    assert float(plain.success.float().mean()) > 0.5
    assert torch.equal(tempered.success, plain.success)
    torch.testing.assert_close(tempered.z2, plain.z2, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(untempered.z2, plain.z2)


def test_seeded_start_and_explicit_z2(setup: tuple[nn.Module, nn.Module, Tensor]) -> None:
    model, generator, z = setup
    state = torch.get_rng_state()
    a = OverpoweredAttack(OverpoweredConfig(eps=0.1, steps=0, seed=1))(model, generator, z)
    assert torch.equal(torch.get_rng_state(), state)
    b = OverpoweredAttack(OverpoweredConfig(eps=0.1, steps=0, seed=1))(model, generator, z)
    c = OverpoweredAttack(OverpoweredConfig(eps=0.1, steps=0, seed=2))(model, generator, z)
    assert torch.equal(a.z2, b.z2) and not torch.equal(a.z2, c.z2)
    assert torch.equal(a.z1, z)  # steps=0: the start pair itself
    z2 = z + 0.01
    d = OverpoweredAttack(OverpoweredConfig(eps=0.1, steps=0))(model, generator, z, z2)
    assert torch.equal(d.z2, z2)


def test_batch_independent(setup: tuple[nn.Module, nn.Module, Tensor]) -> None:
    model, generator, z = setup
    z2 = z + 0.1 * torch.randn(z.shape, generator=torch.Generator().manual_seed(0))
    attack = OverpoweredAttack(OverpoweredConfig(eps=0.1, steps=30, step_size=0.05))
    full = attack(model, generator, z, z2)
    part = attack(model, generator, z[:6], z2[:6])
    assert torch.allclose(full.z1[:6], part.z1, atol=1e-5) and torch.allclose(full.z2[:6], part.z2, atol=1e-5)


def test_pair_divergence() -> None:
    same = torch.tensor([[5.0, 0.0, 0.0]])
    other = torch.tensor([[0.0, 5.0, 0.0]])
    assert float(pair_divergence(same, other)) > float(pair_divergence(same, same)) + 5
    assert torch.allclose(pair_divergence(same, other), pair_divergence(other, same))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"eps": -0.5}, r"expected eps to be finite and >= 0, got -0.5"),
        ({"eps": 1.0, "init_noise": 0.0}, r"expected init_noise > 0, got 0.0"),
        ({"eps": 1.0, "steps": 1.5}, r"expected steps to be an int >= 0, got 1.5"),
        ({"eps": 1.0, "multiplier_bounds": (1.0, 0.1)}, r"expected multiplier_bounds \(low, high\)"),
        ({"eps": 1.0, "temperature": 0.0}, r"expected temperature > 0, got 0.0"),
    ],
)
def test_config_validation(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        OverpoweredConfig(**kwargs)  # type: ignore[arg-type]


def test_bad_inputs(setup: tuple[nn.Module, nn.Module, Tensor]) -> None:
    model, generator, z = setup
    attack = OverpoweredAttack(OverpoweredConfig(eps=0.1, steps=1))
    with pytest.raises(ValueError, match=r"expected z2 like z1 \(32, 4\) on cpu, got \(5, 4\) on cpu"):
        attack(model, generator, z, z[:5])
    with pytest.raises(
        ValueError, match=r"expected z1 of shape \(B, 4\) \(generator\.latent_dim\), got \(32, 2\)"
    ):
        attack(model, generator, z[:, :2])
    with pytest.raises(
        ValueError, match=r"expected classifier to return float logits of shape \(64, num_classes\)"
    ):
        attack(lambda x: x.sum(), generator, z)


def test_found_step_gives_the_success_of_every_shorter_run(
    setup: tuple[nn.Module, nn.Module, Tensor],
) -> None:
    """One long run's ``found_step`` is the success of each shorter run from the same starts (pairs are frozen when
    found and do not interact), which is what ``consistency_at_steps`` reports as an accuracy-vs-steps curve."""
    from manifold_defense.evaluation import consistency_at_steps

    model, generator, z = setup
    config = OverpoweredConfig(eps=0.1, steps=60, step_size=0.05)
    long = OverpoweredAttack(config)(model, generator, z)
    assert long.found_step.dtype == torch.int64 and tuple(long.found_step.shape) == (z.shape[0],)
    assert torch.equal(long.found_step >= 0, long.success)
    assert int(long.found_step.max()) <= 60 and len(set(long.found_step[long.success].tolist())) > 2
    curve = consistency_at_steps(long.found_step, 60)
    assert list(curve) == [10, 30, 60]
    for t in (5, 10, 30):
        short = OverpoweredAttack(dataclasses.replace(config, steps=t))(model, generator, z)
        assert torch.equal(short.success, (long.found_step >= 0) & (long.found_step <= t))
        if t in curve:
            assert curve[t] == round(1 - float(short.success.float().mean()), 4)
    assert curve[60] == round(float(long.robust.float().mean()), 4)
    with pytest.raises(ValueError, match="integer found_step"):
        consistency_at_steps(torch.zeros(3), 10)
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        consistency_at_steps([1, 2], 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steps as an int"):
        consistency_at_steps(long.found_step, -1)
