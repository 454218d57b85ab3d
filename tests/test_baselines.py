"""Tests for the compressed-sensing baselines: orthonormal bases, Lasso and alpha selection, CS-DIP."""

from __future__ import annotations

import inspect
import itertools
import math
import pathlib
from collections.abc import Callable

import numpy as np
import pytest
import pywt
import scipy.fft
import torch
from sklearn.exceptions import ConvergenceWarning

from manifold_defense.baselines import (
    BASES,
    DIPConfig,
    DIPGenerator,
    LayerGaussianPrior,
    analysis,
    continuation_path,
    dip_recover,
    fit_learned_regularizer,
    lasso_recover,
    make_basis,
    select_alpha,
    synthesis,
    synthesis_matrix,
)

# ----------------------------------------------------------------------------------------------------------
# Bases


@pytest.mark.parametrize("basis", BASES)
@pytest.mark.parametrize("shape", [(28, 28), (1, 28, 28), (2, 8, 12)])
def test_basis_is_orthonormal_and_round_trips(basis: str, shape: tuple[int, ...]) -> None:
    psi = synthesis_matrix(basis, shape)
    n = int(np.prod(shape))
    assert psi.shape == (n, n)
    np.testing.assert_allclose(psi.T @ psi, np.eye(n), atol=1e-10)
    rng = np.random.default_rng(0)
    x = rng.random((3, *shape))
    w = analysis(x, basis)
    np.testing.assert_allclose(synthesis(w, basis), x, atol=1e-10)
    # The dense matrix agrees with the fast transforms in both directions.
    np.testing.assert_allclose(psi @ w.reshape(3, n).T, x.reshape(3, n).T, atol=1e-10)
    np.testing.assert_allclose(psi.T @ x.reshape(3, n).T, w.reshape(3, n).T, atol=1e-10)


def test_bases_are_the_named_transforms() -> None:
    x = np.random.default_rng(1).random((28, 28))
    np.testing.assert_allclose(analysis(x, "dct"), scipy.fft.dctn(x, norm="ortho"), atol=1e-12)
    coeffs = pywt.wavedec2(x, "db4", mode="periodization", level=2)
    np.testing.assert_allclose(analysis(x, "wavelet"), pywt.coeffs_to_array(coeffs)[0], atol=1e-12)
    np.testing.assert_array_equal(analysis(x, "pixel"), x)
    assert make_basis("wavelet", (28, 28)).level == 2
    assert make_basis("wavelet", (16, 16)).level == 4


def test_basis_bad_input() -> None:
    with pytest.raises(
        ValueError, match=r"expected basis to be one of \('pixel', 'dct', 'wavelet'\), got 'fft'"
    ):
        synthesis_matrix("fft", (8, 8))
    with pytest.raises(ValueError, match="expected even image height and width"):
        make_basis("wavelet", (7, 7))
    with pytest.raises(ValueError, match=r"expected wavelet level an int in \[1, 2\]"):
        make_basis("wavelet", (28, 28), level=3)
    with pytest.raises(ValueError, match="expected an orthogonal wavelet"):
        make_basis("wavelet", (8, 8), wavelet="bior2.2")
    with pytest.raises(ValueError, match=r"expected image_shape \(H, W\) or \(C, H, W\)"):
        make_basis("dct", (1, 1, 8, 8))


# ----------------------------------------------------------------------------------------------------------
# Lasso


def _gaussian(m: int, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((m, n))


def test_lasso_recovers_exactly_sparse_vector_pixel() -> None:
    rng = np.random.default_rng(0)
    n, k, m = 100, 5, 40
    x = np.zeros((2, n))
    for b in range(2):
        x[b, rng.choice(n, k, replace=False)] = rng.uniform(0.5, 1.0, k)
    A = _gaussian(m, n)
    y = x @ A.T
    x_hat = lasso_recover(A, y, (10, 10), "pixel", alpha=1e-4, tol=1e-8, max_iter=20000)
    assert x_hat.shape == (2, 10, 10)
    np.testing.assert_allclose(x_hat.reshape(2, n), x, atol=2e-3)


def test_lasso_recovers_exactly_sparse_vector_dct() -> None:
    n, m = 64, 30
    w = np.zeros((1, 8, 8))
    w[0, 0, 0], w[0, 0, 1], w[0, 2, 1], w[0, 3, 3] = 5.0, 0.5, -0.4, 0.3  # 4-sparse, image stays in [0, 1]
    x = synthesis(w, "dct")
    assert x.min() > 0 and x.max() < 1
    A = _gaussian(m, n, seed=3)
    x_hat = lasso_recover(A, x.reshape(1, n) @ A.T, (8, 8), "dct", alpha=1e-4, tol=1e-8, max_iter=20000)
    np.testing.assert_allclose(x_hat, x, atol=2e-3)


def _smooth_image(size: int, phase: float) -> np.ndarray:
    u = np.linspace(0, 1, size)
    img = 0.5 + 0.25 * np.sin(2 * np.pi * (u[:, None] + phase)) * np.cos(np.pi * u[None, :])
    return img + 0.15 * np.exp(-((u[:, None] - 0.5) ** 2 + (u[None, :] - 0.4) ** 2) / 0.05)


def test_sparsifying_bases_beat_pixel_on_smooth_image_at_small_m() -> None:
    x = _smooth_image(16, 0.1)[None]
    A = _gaussian(60, 256, seed=5)
    y = x.reshape(1, -1) @ A.T
    mse = {b: float(np.mean((lasso_recover(A, y, (16, 16), b, alpha=1e-3) - x) ** 2)) for b in BASES}
    assert mse["dct"] < 0.25 * mse["pixel"], mse
    assert mse["wavelet"] < 0.5 * mse["pixel"], mse


def test_lasso_over_determined_and_batch_independent() -> None:
    rng = np.random.default_rng(2)
    x = rng.random((3, 6, 6))
    A = _gaussian(50, 36, seed=1)  # m > n is fine: an l1-regularized least-squares fit
    y = x.reshape(3, -1) @ A.T
    together = lasso_recover(A, y, (6, 6), "wavelet", alpha=1e-5, tol=1e-10, max_iter=10000, n_jobs=2)
    np.testing.assert_allclose(together, x, atol=1e-3)
    for b in range(3):
        alone = lasso_recover(A, y[b : b + 1], (6, 6), "wavelet", alpha=1e-5, tol=1e-10, max_iter=10000)
        np.testing.assert_allclose(alone[0], together[b], atol=1e-12)


def test_lasso_does_not_modify_inputs_and_clips() -> None:
    A = _gaussian(20, 16)
    y = np.full((1, 20), 50.0)
    A0, y0 = A.copy(), y.copy()
    out = lasso_recover(A, y, (4, 4), "dct", alpha=0.01)
    assert out.min() >= 0 and out.max() <= 1
    np.testing.assert_array_equal(A, A0)
    np.testing.assert_array_equal(y, y0)


def test_lasso_bad_input() -> None:
    A = _gaussian(10, 16)
    y = np.zeros((2, 10))
    with pytest.raises(ValueError, match=r"expected y of shape \(B, m\) = \(B, 10\)"):
        lasso_recover(A, np.zeros((2, 11)), (4, 4))
    with pytest.raises(ValueError, match=r"expected y of shape \(B, m\)"):
        lasso_recover(A, np.zeros(10), (4, 4))
    bad = y.copy()
    bad[1, 3] = np.nan
    with pytest.raises(ValueError, match="expected finite y"):
        lasso_recover(A, bad, (4, 4))
    with pytest.raises(ValueError, match=r"one of \('pixel', 'dct', 'wavelet'\), got 'haar'"):
        lasso_recover(A, y, (4, 4), basis="haar")
    with pytest.raises(ValueError, match=r"expected A with n = prod\(image_shape\) = 25 columns"):
        lasso_recover(A, y, (5, 5))
    with pytest.raises(ValueError, match=r"expected A of shape \(m, n\)"):
        lasso_recover(np.zeros(16), y, (4, 4))
    with pytest.raises(ValueError, match="expected alpha > 0"):
        lasso_recover(A, y, (4, 4), alpha=0.0)
    with pytest.raises(ValueError, match="expected max_iter a positive int"):
        lasso_recover(A, y, (4, 4), max_iter=0)


def test_continuation_path_contains_targets_and_decreases() -> None:
    path = continuation_path([0.03, 1e-3])
    assert 3.0 / 10**0.25 <= path[0] <= 3.0  # starts two decades above the largest target
    assert 0.03 in path and 1e-3 in path and path[-1] == 1e-3
    assert all(a > b for a, b in itertools.pairwise(path))


def test_select_alpha_picks_the_validation_minimum() -> None:
    rng = np.random.default_rng(4)
    x_val = np.stack([_smooth_image(8, p) for p in rng.random(4)])
    A = _gaussian(40, 64, seed=6)
    y_val = x_val.reshape(4, -1) @ A.T + 0.5 * rng.standard_normal((4, 40))
    alphas = (1e-4, 1e-2, 0.3, 100.0)
    A0, y0, x0 = A.copy(), y_val.copy(), x_val.copy()
    sel = select_alpha(A, y_val, x_val, (8, 8), "dct", alphas=alphas)
    assert sel.alphas == alphas and sel.basis == "dct" and sel.num_measurements == 40
    assert sel.alpha == alphas[int(np.argmin(sel.mse_per_alpha))]
    # A huge alpha zeroes every coefficient: the reconstruction is the clipped zero image.
    assert sel.mse_per_alpha[-1] == pytest.approx(float(np.mean(x_val**2)))
    assert sel.alpha != 100.0
    # Each reported error is what lasso_recover gives with that alpha (same continuation path).
    for a, mse in zip(alphas, sel.mse_per_alpha, strict=True):
        direct = float(np.mean((lasso_recover(A, y_val, (8, 8), "dct", alpha=a) - x_val) ** 2))
        assert direct == pytest.approx(mse, rel=0.05, abs=1e-5)
    np.testing.assert_array_equal(A, A0)
    np.testing.assert_array_equal(y_val, y0)
    np.testing.assert_array_equal(x_val, x0)


def test_select_alpha_only_sees_validation_data() -> None:
    params = list(inspect.signature(select_alpha).parameters)
    assert params[:6] == ["A", "y_val", "x_val", "image_shape", "basis", "alphas"]
    assert not any("test" in p for p in params)


def test_select_alpha_warns_at_grid_edge_and_validates() -> None:
    x_val = np.stack([_smooth_image(8, 0.3)])
    A = _gaussian(64, 64, seed=8)
    y_val = x_val.reshape(1, -1) @ A.T
    with pytest.warns(UserWarning, match="at the edge of the grid"):
        sel = select_alpha(A, y_val, x_val, (8, 8), "pixel", alphas=(1e-5, 10.0))
    assert sel.alpha == 1e-5
    with pytest.raises(ValueError, match=r"expected x_val of shape \(1, 8, 8\) or \(1, 64\)"):
        select_alpha(A, y_val, x_val[:, :4], (8, 8))
    with pytest.raises(ValueError, match="expected alphas as a non-empty sequence"):
        select_alpha(A, y_val, x_val, (8, 8), alphas=())


def test_lasso_reports_non_convergence_once() -> None:
    A = _gaussian(30, 64, seed=9)
    y = np.random.default_rng(0).standard_normal((3, 30))
    with pytest.warns(ConvergenceWarning, match=r"did not converge within max_iter=1 for \d+ of 3"):
        lasso_recover(A, y, (8, 8), "dct", alpha=1e-4, max_iter=1, tol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# Deep Image Prior

SHAPE = (1, 8, 8)
TINY = DIPConfig(latent_dim=16, ngf=4, num_iter=40, lr=1e-2, exit_window=1, tv_weight=0.0)


def _target(b: int = 1) -> torch.Tensor:
    u = torch.linspace(0, 1, 8)
    img = 0.2 + 0.6 * torch.exp(-((u[:, None] - 0.5) ** 2 + (u[None, :] - 0.5) ** 2) / 0.1)
    return torch.stack([img * (1 - 0.2 * k) for k in range(b)]).unsqueeze(1)


def _gaussian_operator(
    m: int = 20, seed: int = 0
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    A = torch.randn(m, 64, generator=torch.Generator().manual_seed(seed)) / math.sqrt(m)

    def op(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ A.T

    return A, op


def test_dip_generator_shapes_and_cs_dip_architecture() -> None:
    g = DIPGenerator(128, (1, 28, 28), ngf=64)
    assert sum(p.numel() for p in g.parameters()) == 2730432  # CS-DIP's DCGAN_MNIST with BatchNorm affine
    out = g(torch.randn(2, 128))
    assert out.shape == (2, 1, 28, 28) and out.min() >= 0 and out.max() <= 1
    for shape in [(3, 32, 32), (1, 8, 12), (2, 29, 29), (12, 12)]:
        c = shape[0] if len(shape) == 3 else 1
        assert DIPGenerator(8, shape, ngf=2)(torch.randn(1, 8)).shape == (1, c, *shape[-2:])


def test_dip_lowers_measurement_loss_and_fits_identity() -> None:
    x = _target()
    _, op = _gaussian_operator()
    y = op(x)
    start = dip_recover(y, op, SHAPE, DIPConfig(**{**TINY.__dict__, "num_iter": 1}))  # the initial network
    fitted = dip_recover(y, op, SHAPE, TINY)
    assert fitted.loss.item() < 0.2 * start.loss.item()

    identity_start = dip_recover(x, lambda t: t, SHAPE, DIPConfig(**{**TINY.__dict__, "num_iter": 1}))
    identity = dip_recover(x, lambda t: t, SHAPE, TINY)
    mse0 = (identity_start.x_hat - x).pow(2).mean().item()
    mse1 = (identity.x_hat - x).pow(2).mean().item()
    assert mse1 < 0.2 * mse0
    assert identity.x_hat.shape == (1, *SHAPE)
    assert identity.x_hat.min() >= 0 and identity.x_hat.max() <= 1
    assert torch.allclose(identity.loss, (identity.x_hat - x).pow(2).flatten(1).sum(1), rtol=1e-4)


def test_dip_batch_independence_and_reference_path() -> None:
    x = _target(3)
    _, op = _gaussian_operator()
    y = op(x)
    y0 = y.clone()
    rng_state = torch.random.get_rng_state()
    cfg = DIPConfig(**{**TINY.__dict__, "num_iter": 8, "num_restarts": 2, "exit_window": 3})
    together = dip_recover(y, op, SHAPE, cfg, seeds=[1, 2, 3])
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # no global RNG use
    assert torch.equal(y, y0)  # input untouched
    # Fixed-size chunks: bitwise the same result whatever the batch composition or order.
    permuted = dip_recover(y[[2, 0, 1]], op, SHAPE, cfg, seeds=[3, 1, 2])
    assert torch.equal(permuted.x_hat, together.x_hat[[2, 0, 1]])
    alone = dip_recover(y[1:2], op, SHAPE, cfg, seeds=[2])
    assert torch.equal(alone.x_hat[0], together.x_hat[1])
    assert torch.equal(alone.loss[0], together.loss[1])
    chunked = dip_recover(y, op, SHAPE, cfg, seeds=[1, 2, 3], chunk_size=4)  # other chunking: rounding only
    torch.testing.assert_close(chunked.x_hat, together.x_hat, atol=1e-5, rtol=0)
    unpadded = dip_recover(y, op, SHAPE, cfg, seeds=[1, 2, 3], chunk_size=None)
    torch.testing.assert_close(unpadded.x_hat, together.x_hat, atol=1e-5, rtol=0)
    reference = dip_recover(y, op, SHAPE, cfg, seeds=[1, 2, 3], batched=False)
    torch.testing.assert_close(reference.x_hat, together.x_hat, atol=1e-4, rtol=0)
    torch.testing.assert_close(reference.loss, together.loss, atol=1e-4, rtol=1e-4)
    other_seed = dip_recover(y[1:2], op, SHAPE, cfg, seeds=[7])
    assert (other_seed.x_hat[0] - together.x_hat[1]).abs().max() > 1e-3


def test_learned_regularizer_fit_save_load_and_use(tmp_path: pathlib.Path) -> None:
    images = _target(3)
    operators = [_gaussian_operator(seed=i)[1] for i in range(3)]
    cfg = DIPConfig(**{**TINY.__dict__, "num_iter": 10})
    prior = fit_learned_regularizer(images, lambda i: operators[i], cfg, seeds=[0, 1, 2])
    names = tuple(k for k, _ in DIPGenerator(16, SHAPE, 4).named_parameters())
    assert prior.names == names
    assert torch.all(torch.linalg.eigvalsh(prior.covariance) > 0)
    assert prior.penalty(prior.mean[None].float()).abs().item() < 1e-6
    assert prior.penalty(prior.mean[None].float() + 0.1).item() > 0

    path = tmp_path / "prior.safetensors"
    prior.save(path)
    loaded = LayerGaussianPrior.load(path)
    assert loaded.names == prior.names
    torch.testing.assert_close(loaded.covariance, prior.covariance)
    torch.testing.assert_close(loaded.mean, prior.mean)

    _, op = _gaussian_operator(seed=5)
    y = op(images[:1])
    with_reg = dip_recover(y, op, SHAPE, DIPConfig(**{**cfg.__dict__, "lr_weight": 1e-3}), prior=loaded)
    assert torch.isfinite(with_reg.total_loss).all() and with_reg.total_loss.item() >= with_reg.loss.item()
    with pytest.raises(ValueError, match=r"expected a LayerGaussianPrior when DIPConfig\.lr_weight > 0"):
        dip_recover(y, op, SHAPE, DIPConfig(**{**cfg.__dict__, "lr_weight": 1e-3}))
    with pytest.raises(ValueError, match="expected a prior for layers"):
        dip_recover(y, op, (1, 16, 16), DIPConfig(**{**cfg.__dict__, "lr_weight": 1e-3}), prior=loaded)
    diag = fit_learned_regularizer(images, lambda i: operators[i], cfg, diagonal=True)
    off_diag = diag.covariance - torch.diag(torch.diagonal(diag.covariance))
    assert off_diag.abs().max().item() == 0.0


def test_dip_leaves_operator_parameters_alone() -> None:
    layer = torch.nn.Linear(64, 12)
    before = {k: v.clone() for k, v in layer.state_dict().items()}

    def op(x: torch.Tensor) -> torch.Tensor:
        return layer(x.flatten(1))

    with torch.no_grad():
        y = op(_target())
    dip_recover(y, op, SHAPE, DIPConfig(**{**TINY.__dict__, "num_iter": 3}))
    assert all(p.grad is None for p in layer.parameters())
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())


def test_dip_restart_mean_and_output_ema() -> None:
    x = _target(2)
    _, op = _gaussian_operator(30)
    y = op(x)
    cfg = DIPConfig(**{**TINY.__dict__, "num_iter": 15, "num_restarts": 3})
    best = dip_recover(y, op, SHAPE, cfg, seeds=[1, 2])
    mean = dip_recover(y, op, SHAPE, DIPConfig(**{**cfg.__dict__, "restart_aggregate": "mean"}), seeds=[1, 2])
    assert not torch.allclose(best.x_hat, mean.x_hat)
    # The mean image is reported with its own measurement loss; with a single restart "mean" == "best".
    assert torch.allclose(mean.loss, (op(mean.x_hat) - y).pow(2).sum(1), rtol=1e-4, atol=1e-6)
    one = {**cfg.__dict__, "num_restarts": 1}
    assert torch.equal(
        dip_recover(y, op, SHAPE, DIPConfig(**one), seeds=[1, 2]).x_hat,
        dip_recover(y, op, SHAPE, DIPConfig(**{**one, "restart_aggregate": "mean"}), seeds=[1, 2]).x_hat,
    )
    # EMA output: the reported loss is that of the returned (averaged) image; w -> 0 gives the last iterate.
    ema = dip_recover(y, op, SHAPE, DIPConfig(**{**cfg.__dict__, "num_restarts": 1, "output_ema": 0.9}))
    assert torch.allclose(ema.loss, (op(ema.x_hat) - y).pow(2).sum(1), rtol=1e-4, atol=1e-6)
    assert float(ema.x_hat.min()) >= 0 and float(ema.x_hat.max()) <= 1
    ref = dip_recover(
        y, op, SHAPE, DIPConfig(**{**cfg.__dict__, "num_restarts": 1, "output_ema": 0.9}), batched=False
    )
    assert torch.allclose(ema.x_hat, ref.x_hat, atol=1e-3)


def test_dip_bad_input() -> None:
    _, op = _gaussian_operator()
    y = op(_target())
    bad = y.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="expected finite y"):
        dip_recover(bad, op, SHAPE, TINY)
    with pytest.raises(TypeError, match=r"expected y as a torch\.Tensor"):
        dip_recover(y.numpy(), op, SHAPE, TINY)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"expected y of shape \(B, m\)"):
        dip_recover(y[0], op, SHAPE, TINY)
    with pytest.raises(ValueError, match="expected image height and width >= 4"):
        dip_recover(y, op, (1, 2, 2), TINY)
    with pytest.raises(ValueError, match=r"expected operator output with per-image shape \(21,\)"):
        dip_recover(torch.zeros(1, 21), op, SHAPE, TINY)
    with pytest.raises(ValueError, match="expected seeds as 1 non-negative ints"):
        dip_recover(y, op, SHAPE, TINY, seeds=[1, 2])
    with pytest.raises(ValueError, match=r"expected DIPConfig.lr > 0"):
        DIPConfig(lr=-1.0)
    with pytest.raises(ValueError, match=r"expected DIPConfig\.num_iter a positive int"):
        DIPConfig(num_iter=0)
    with pytest.raises(ValueError, match=r"output_ema in \[0, 1\)"):
        DIPConfig(output_ema=1.0)
    with pytest.raises(ValueError, match="restart_aggregate 'best' or 'mean'"):
        DIPConfig(restart_aggregate="median")
    with pytest.raises(ValueError, match=r"expected training images as a tensor \(N, C, H, W\) with N >= 2"):
        fit_learned_regularizer(_target(1), lambda i: op, TINY)
