"""manifold_defense.inversion.diffusion_posterior: the DDPM as a deepinv denoiser (scaling, sigma -> timestep),
the library's operators as deepinv physics (exact prox), DiffPIR / DPS recovery and the CS benchmark's
``diffpir-ddpm`` (tiny untrained models: shapes, determinism, the maps; not quality). deepinv-free parts run
everywhere; the rest is skipped where deepinv is not installed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from manifold_defense.diffusion import DiffusionModel
from manifold_defense.inversion import GaussianMatrix, measure
from manifold_defense.inversion.diffusion_posterior import (
    DDPMDenoiser,
    DiffPIRConfig,
    DiffPIRSamples,
    diffpir_recover,
    diffpir_samples,
    dps_recover,
    select_diffpir_aggregate,
    to_deepinv,
)

SHAPE = (1, 8, 8)


class TinyEps(nn.Module):
    """A small noise network ``(B, 1, 8, 8), (B,) -> (B, 1, 8, 8)`` (untrained, seeded)."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(0.1 * torch.randn(self.conv.weight.shape, generator=gen))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        out: Tensor = self.conv(x) + (t.float() / 1000.0).view(-1, 1, 1, 1)
        return out


class Recorder(nn.Module):
    """Returns a fixed noise image and records what the denoiser fed it."""

    def __init__(self, noise: Tensor) -> None:
        super().__init__()
        self.noise = noise
        self.scale = nn.Parameter(torch.ones(()))
        self.seen: list[tuple[Tensor, Tensor]] = []

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        self.seen.append((x.detach().clone(), t.detach().clone()))
        return self.noise * self.scale


def _tiny() -> DiffusionModel:
    return DiffusionModel(network=TinyEps(), image_shape=SHAPE).eval()


def _images(n: int, seed: int = 1) -> Tensor:
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ the denoiser (no deepinv)


def test_timestep_inverts_the_noise_levels() -> None:
    D = DDPMDenoiser(_tiny())
    levels = D.noise_levels
    ts = torch.tensor([0, 1, 5, 100, 500, 998, 999])
    assert torch.equal(D.timestep(levels[ts]), ts)
    # sqrt(1 - abar) / (2 sqrt(abar)), increasing; nearest in between; beyond the last: the last timestep.
    abar = _tiny().alpha_bar.double()
    assert torch.allclose(levels, ((1 - abar) / abar).sqrt() / 2) and bool((levels.diff() > 0).all())
    mid = (levels[10] * 0.9 + levels[11] * 0.1).reshape(1)
    assert D.timestep(mid).item() == 10 and D.timestep(torch.tensor([1e6])).item() == 999
    assert D.timestep(torch.tensor([0.0])).item() == 0


def test_denoiser_scaling_returns_x0_given_the_true_noise() -> None:
    # x = x0 + sigma n on the [0, 1] scale; the network sees x_t = sqrt(abar)(2x - 1) (abar = 1 / (1 + 4 sigma^2)),
    # whose noise is exactly n; a network answering n makes D(x, sigma) = x - sigma n = x0.
    x0 = _images(3)
    n = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.05, 0.3, 2.0])
    rec = Recorder(n)
    D = DDPMDenoiser(DiffusionModel(network=rec, image_shape=SHAPE))
    x = x0 + sigma.view(-1, 1, 1, 1) * n
    before = x.clone()
    out = D(x, sigma)
    assert torch.allclose(out, x0, atol=1e-5) and torch.equal(x, before)
    x_t, t = rec.seen[-1]
    abar = 1 / (1 + 4 * sigma**2)
    assert torch.allclose(x_t, abar.sqrt().view(-1, 1, 1, 1) * (2 * x - 1), atol=1e-6)
    assert torch.equal(t, D.timestep(sigma))
    # the variance-preserving form: signal coefficient sqrt(abar) on 2 x0 - 1, noise sqrt(1 - abar) on n
    expected = abar.sqrt().view(-1, 1, 1, 1) * (2 * x0 - 1) + (1 - abar).sqrt().view(-1, 1, 1, 1) * n
    assert torch.allclose(x_t, expected, atol=1e-5)


def test_denoiser_scalar_sigma_float64_and_gradient() -> None:
    D = DDPMDenoiser(_tiny())
    x = _images(2).double().requires_grad_(True)
    out = D(x, 0.1)
    assert out.dtype == torch.float64 and out.shape == (2, *SHAPE)
    out.sum().backward()  # DPS differentiates through the denoiser
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    same = D(x.detach().float(), torch.tensor([0.1, 0.1]))
    assert torch.allclose(same, out.detach().float(), atol=1e-5)


def test_denoiser_rejects_bad_input() -> None:
    D = DDPMDenoiser(_tiny())
    with pytest.raises(ValueError, match=r"expected x of shape \(B, \*\(1, 8, 8\)\), got \(2, 1, 4, 4\)"):
        D(torch.rand(2, 1, 4, 4), 0.1)
    with pytest.raises(ValueError, match=r"one value per image \(2,\), got shape \(3,\)"):
        D(_images(2), torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="finite noise levels sigma >= 0"):
        D(_images(2), -0.1)
    with pytest.raises(TypeError, match="DiffusionModel, got Linear"):
        DDPMDenoiser(nn.Linear(2, 2))  # type: ignore[arg-type]


def test_samples_aggregate() -> None:
    samples = torch.stack([torch.zeros(2, *SHAPE), torch.ones(2, *SHAPE)], dim=1)  # (2, K=2, ...)
    res = DiffPIRSamples(samples, torch.tensor([[0.5, 0.1], [0.2, 0.9]]))
    assert torch.equal(res.aggregate("mean"), torch.full((2, *SHAPE), 0.5))
    best = res.aggregate("best")
    assert torch.equal(best[0], torch.ones(SHAPE)) and torch.equal(best[1], torch.zeros(SHAPE))
    with pytest.raises(ValueError, match="expected aggregate one of"):
        res.aggregate("median")


def test_config_validation() -> None:
    with pytest.raises(ValueError, match=r"DiffPIRConfig\.zeta: expected a float in"):
        DiffPIRConfig(zeta=1.5)
    with pytest.raises(ValueError, match=r"DiffPIRConfig\.samples: expected an int >= 1"):
        DiffPIRConfig(samples=0)
    with pytest.raises(ValueError, match=r"DiffPIRConfig\.aggregate"):
        DiffPIRConfig(aggregate="median")
    assert DiffPIRConfig().replace(samples=2).samples == 2


# ------------------------------------------------------------------------------ with deepinv

try:
    import deepinv as dinv
except ImportError:  # the optional extra: pip install 'manifold-defense[deepinv]'
    dinv = None

needs_deepinv = pytest.mark.skipif(dinv is None, reason="deepinv not installed (the optional deepinv extra)")


def test_missing_deepinv_is_an_import_error_saying_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "deepinv", None)
    A, _, y = _problem()
    with pytest.raises(ImportError, match=r"pip install 'manifold-defense\[deepinv\]'"):
        diffpir_recover(_tiny(), y, A, 0.1)
    with pytest.raises(ImportError, match="deepinv"):
        to_deepinv(A, 0.1)


def _problem(m: int = 30, n: int = 3) -> tuple[GaussianMatrix, Tensor, Tensor]:
    A = GaussianMatrix(m, SHAPE, seed=3)
    x = _images(n)
    y = measure(A, x, 0.1, generator=torch.Generator().manual_seed(4))
    assert isinstance(y, Tensor)
    return A, x, y


@needs_deepinv
def test_to_deepinv_forward_adjoint_and_exact_prox() -> None:
    A, x, y = _problem()
    physics = to_deepinv(A, 0.1)
    assert isinstance(physics, dinv.physics.LinearPhysics)
    assert torch.allclose(physics.A(x), A(x)) and torch.allclose(physics.A_adjoint(y), A.adjoint(y))
    assert float(physics.noise_model.sigma) == pytest.approx(0.1)
    M = A.matrix()
    z = _images(3, seed=7)
    for gamma in (0.01, 3.0, torch.tensor([0.5, 5.0, 1e4])):
        u = physics.prox_l2(z, y, gamma)
        g = torch.as_tensor(gamma, dtype=torch.float64).reshape(-1)
        for i in range(3):
            gi = g[i if g.numel() > 1 else 0]
            lhs = torch.eye(64, dtype=torch.float64) + gi * M.T @ M
            ref = torch.linalg.solve(lhs, z[i].reshape(-1).double() + gi * M.T @ y[i].double())
            assert torch.allclose(u[i].reshape(-1).double(), ref, atol=1e-4), (gamma, i)
    # a huge weight is the projection onto {A u = y} (m < n): the prediction matches y
    u = physics.prox_l2(z, y, 1e15)
    assert torch.allclose(A(u), y, atol=1e-3)
    with pytest.raises(TypeError, match="LinearOperator, got Linear"):
        to_deepinv(nn.Linear(2, 2), 0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="noise_std as a finite float >= 0"):
        to_deepinv(A, -1.0)


@needs_deepinv
def test_diffpir_timesteps_are_diffpirs_own() -> None:
    # Every denoiser call of deepinv's DiffPIR lands on the timestep DiffPIR itself associates with its noise level.
    A, _, y = _problem(n=2)
    rec = Recorder(torch.zeros(1, *SHAPE))
    model = DiffusionModel(network=rec, image_shape=SHAPE)
    diffpir_recover(model, y, A, 0.1, DiffPIRConfig(steps=12, samples=1))
    solver = dinv.sampling.DiffPIR(model=None, data_fidelity=None, max_iter=12)
    expected = [int(solver.find_nearest(solver.reduced_alpha_cumprod, solver.sigmas[s])) for s in solver.seq]
    assert [int(t[0]) for _, t in rec.seen] == expected
    assert expected[0] == 999 and expected[-1] == 0


@needs_deepinv
def test_diffpir_samples_shapes_determinism_and_rng() -> None:
    A, _, y = _problem()
    model = _tiny()
    y_before = y.clone()
    state = torch.random.get_rng_state()
    cfg = DiffPIRConfig(steps=5, samples=2)
    a = diffpir_samples(model, y, A, 0.1, cfg, seeds=[10, 11, 12], batch=2)
    assert a.samples.shape == (3, 2, *SHAPE) and a.residuals.shape == (3, 2)
    assert float(a.samples.min()) >= 0 and float(a.samples.max()) <= 1
    assert torch.equal(torch.random.get_rng_state(), state) and torch.equal(y, y_before)
    b = diffpir_samples(model, y, A, 0.1, cfg, seeds=[10, 11, 12], batch=2)
    assert torch.equal(a.samples, b.samples)
    c = diffpir_samples(model, y, A, 0.1, cfg, seeds=[20, 11, 13], batch=2)
    assert not torch.equal(a.samples[:2], c.samples[:2])
    assert not torch.equal(a.samples[:, 0], a.samples[:, 1])  # the samples of an image differ
    res = (A(a.samples.reshape(-1, *SHAPE)) - y.repeat_interleave(2, 0)).pow(2).mean(1).view(3, 2)
    assert torch.allclose(a.residuals, res)
    x_hat = diffpir_recover(model, y, A, 0.1, cfg.replace(aggregate="best"), seeds=[10, 11, 12], batch=2)
    assert torch.equal(x_hat, a.aggregate("best"))
    assert not model.training


@needs_deepinv
def test_diffpir_rejects_bad_input() -> None:
    A, _, y = _problem()
    model = _tiny()
    with pytest.raises(ValueError, match="noise_std as a finite float > 0"):
        diffpir_recover(model, y, A, 0.0)
    with pytest.raises(ValueError, match=r"measurements y of shape \(B, \*\(30,\)\), got \(3, 29\)"):
        diffpir_recover(model, y[:, :29], A, 0.1)
    with pytest.raises(ValueError, match="3 non-negative seeds"):
        diffpir_recover(model, y, A, 0.1, seeds=[1, 2])
    with pytest.raises(ValueError, match=r"operator on the model's images \(1, 8, 8\)"):
        diffpir_recover(model, torch.zeros(1, 5), GaussianMatrix(5, (1, 4, 4)), 0.1)
    with pytest.raises(TypeError, match="DiffusionModel, got Linear"):
        diffpir_recover(nn.Linear(2, 2), y, A, 0.1)


@needs_deepinv
def test_select_aggregate_picks_the_validation_minimum() -> None:
    A, x, y = _problem()
    cfg, scores = select_diffpir_aggregate(
        _tiny(), y, x, A, 0.1, DiffPIRConfig(steps=4, samples=3), seeds=[0, 1, 2]
    )
    assert set(scores) == {"mean", "best"} and cfg.aggregate == min(scores, key=lambda k: scores[k])
    one, none = select_diffpir_aggregate(_tiny(), y, x, A, 0.1, DiffPIRConfig(aggregates=("best",)))
    assert one.aggregate == "best" and none == {}


@needs_deepinv
def test_dps_recover_shapes_and_determinism() -> None:
    A, _, y = _problem(n=2)
    a = dps_recover(_tiny(), y, A, 0.1, steps=3, seeds=[5, 6])
    b = dps_recover(_tiny(), y, A, 0.1, steps=3, seeds=[5, 6])
    assert a.shape == (2, *SHAPE) and torch.equal(a, b)
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    with pytest.raises(ValueError, match="steps as an int >= 2"):
        dps_recover(_tiny(), y, A, 0.1, steps=1)


@needs_deepinv
def test_cs_benchmark_runs_diffpir_ddpm_only_when_named(tmp_path: Path) -> None:
    import eval.cs as cs
    from eval.cs_core import METHODS, check_methods, quick_protocol
    from eval.run_folder import read_record

    assert "diffpir-ddpm" not in METHODS and check_methods(["diffpir-ddpm", "lasso-dct"]) == (
        "lasso-dct",
        "diffpir-ddpm",
    )
    protocol = quick_protocol(
        n_images=2,
        n_val=2,
        m_grid=(50,),
        batch=2,
        lasso_alphas=(0.1,),
        lasso_max_iter=50,
        diffpir=DiffPIRConfig(steps=3, samples=2),
    )
    results = cs.run_benchmark(
        protocol, tmp_path, ["lasso-dct", "diffpir-ddpm"], "cpu", grids=False, progress=False
    )
    assert list(results["methods"]) == ["lasso-dct", "diffpir-ddpm"]
    row = results["methods"]["diffpir-ddpm"]
    assert 0 < row["mse"][0] < 1 and row["seconds_per_image"][0] > 0
    chosen = results["protocol"]["selected"]["diffpir"]["50"]
    assert chosen["aggregate"] in ("mean", "best") and set(chosen["val_mse"]) == {"mean", "best"}
    assert results["protocol"]["diffpir"]["samples"] == 2
    assert read_record(tmp_path / "results.json")["methods"]["diffpir-ddpm"] == row
