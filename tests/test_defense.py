"""The projection defense: gradient modes, batch independence, randomness, compatibility with attack libraries."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import manifold_defense
from attacks import PGD, Norm, ThreatModel
from manifold_defense import LatentProjector, ProjectedClassifier
from manifold_defense.inversion import InversionConfig


class TinyGenerator(nn.Module):
    def __init__(self, k: int = 3, side: int = 5) -> None:
        super().__init__()
        self.latent_dim = k
        self.side = side
        g = torch.Generator().manual_seed(0)
        self.w1 = nn.Parameter(torch.randn(k, 16, generator=g))
        self.w2 = nn.Parameter(torch.randn(16, side * side, generator=g) * 0.5)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(z @ self.w1)
        return torch.sigmoid(h @ self.w2).view(-1, 1, self.side, self.side)


class TinyClassifier(nn.Module):
    def __init__(self, side: int = 5) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.lin = nn.Linear(side * side, 3)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(3, side * side, generator=g))
            self.lin.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.flatten(1))


FAST = InversionConfig(optimizer="adam", lr=0.05, steps=60, restarts=3)


def _images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 5, 5, generator=torch.Generator().manual_seed(seed))


def test_exported_from_package() -> None:
    assert manifold_defense.LatentProjector is LatentProjector
    assert manifold_defense.ProjectedClassifier is ProjectedClassifier


def test_default_config_is_defense_gan() -> None:
    proj = LatentProjector(TinyGenerator())
    assert proj.config == InversionConfig.defense_gan()
    assert proj.config.steps == 200 and proj.config.restarts == 10 and proj.config.optimizer == "sgd"


def test_projects_points_of_the_range_onto_themselves() -> None:
    gen = TinyGenerator().eval()
    with torch.no_grad():
        x = gen(torch.randn(4, 3, generator=torch.Generator().manual_seed(5)) * 0.5)
    proj = LatentProjector(gen, InversionConfig(optimizer="adam", lr=0.05, steps=400, restarts=5))
    torch.testing.assert_close(proj(x), x, atol=2e-3, rtol=0)


def test_bpda_gradient_is_identity_and_value_is_projection() -> None:
    proj = LatentProjector(TinyGenerator(), FAST, gradient="bpda")
    x = _images().requires_grad_(True)
    w = torch.randn_like(x)
    out = proj(x)
    (out * w).sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, w)
    torch.testing.assert_close(out.detach(), proj.project(x.detach()))


def test_surrogate_gradient_is_used() -> None:
    proj = LatentProjector(TinyGenerator(), FAST, gradient=lambda t: 3.0 * t)
    x = _images().requires_grad_(True)
    proj(x).sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, torch.full_like(x, 3.0))


def test_unrolled_gradient_matches_finite_differences() -> None:
    gen = TinyGenerator().double()
    cfg = InversionConfig(optimizer="sgd", lr=2.0, momentum=0.5, steps=6, restarts=2)
    proj = LatentProjector(gen, cfg, gradient="unrolled")
    x = _images(2).double().clamp(0.05, 0.95).requires_grad_(True)
    w = torch.randn(2, 1, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    (proj(x) * w).sum().backward()
    assert x.grad is not None
    eps = 1e-6
    for idx in [(0, 0, 1, 2), (1, 0, 4, 0), (0, 0, 3, 3)]:
        xp, xm = x.detach().clone(), x.detach().clone()
        xp[idx] += eps
        xm[idx] -= eps
        with torch.no_grad():
            fd = ((proj(xp) - proj(xm)) * w).sum() / (2 * eps)
        assert abs(float(fd) - float(x.grad[idx])) < 1e-5 * max(1.0, abs(float(fd)))
    # and it is not the identity: the projection's Jacobian is what BPDA approximates
    assert not torch.allclose(x.grad, w)


def test_batch_independence_and_input_untouched() -> None:
    proj = LatentProjector(TinyGenerator(), FAST)
    x = _images(5)
    before = x.clone()
    together = proj(x)
    alone = torch.cat([proj(x[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    assert torch.equal(x, before)


def test_randomized_restarts_are_fresh_and_reproducible() -> None:
    gen = TinyGenerator()
    cfg = InversionConfig(optimizer="adam", lr=0.05, steps=5, restarts=1)
    fixed = LatentProjector(gen, cfg, seed=7)
    x = _images(3)
    assert torch.equal(fixed(x), fixed(x))
    rand = LatentProjector(gen, cfg, seed=7, randomize=True)
    first, second = rand(x), rand(x)
    assert not torch.allclose(first, second)
    rand.reseed(7)
    torch.testing.assert_close(rand(x), first)


def test_projected_classifier_is_attackable_by_our_pgd_and_torchattacks() -> None:
    import torchattacks

    model = ProjectedClassifier(TinyClassifier(), LatentProjector(TinyGenerator(), FAST)).eval()
    x = _images(6)
    with torch.no_grad():
        y = model(x).argmax(1)
    ours = PGD(ThreatModel(Norm.LINF, 0.3))(model, x, y)
    assert ours.x_adv.shape == x.shape and ours.success.shape == (6,)
    assert float((ours.x_adv - x).abs().max()) <= 0.3 + 1e-6
    theirs = torchattacks.PGD(model, eps=0.3, alpha=0.05, steps=5)(x, y)
    assert theirs.shape == x.shape and float((theirs - x).abs().max()) <= 0.3 + 1e-6


def test_bad_input() -> None:
    gen = TinyGenerator()
    with pytest.raises(ValueError, match=r"unknown gradient mode 'straight'.*'bpda', 'unrolled'"):
        LatentProjector(gen, gradient="straight")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="int latent_dim"):
        LatentProjector(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="InversionConfig"):
        LatentProjector(gen, config={"steps": 3})  # type: ignore[arg-type]
    proj = LatentProjector(gen, FAST)
    with pytest.raises(ValueError, match=r"expected values in \[0, 1\]"):
        proj(_images() * 2.0)
    with pytest.raises(ValueError, match=r"expected float images \(B, C, H, W\)"):
        proj(torch.rand(5, 5))
    with pytest.raises(ValueError, match=r"seed as an int >= 0"):
        proj.reseed(-1)
    with pytest.raises(TypeError, match=r"nn\.Modules"):
        ProjectedClassifier(lambda t: t, proj)  # type: ignore[arg-type]
