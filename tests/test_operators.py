"""Measurement operators against explicit matrices, adjoint identities, seeding and input validation."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
import torch
import torch.nn.functional as F
from torch import nn

from manifold_defense.inversion import (
    BlurDownsample,
    GaussianMatrix,
    Identity,
    LinearOperator,
    Mask,
    Mixture,
    Nonlinear,
    SignMeasurements,
    dct2,
    dct_matrix,
    idct2,
    measure,
)

SHAPE = (2, 4, 4)


def _linear_ops() -> list[LinearOperator]:
    return [
        Identity(SHAPE),
        Mask.random(SHAPE, keep_fraction=0.5, seed=3),
        Mask.block(SHAPE, size=2, position=(1, 2)),
        BlurDownsample(SHAPE, factor=2),
        BlurDownsample(SHAPE, factor=4),
        BlurDownsample(SHAPE, factor=2, kind="gaussian"),
        BlurDownsample(SHAPE, factor=4, kind="gaussian", sigma=1.5),
        GaussianMatrix(7, SHAPE, scaling="csgm", seed=1),
        GaussianMatrix(40, SHAPE, scaling="normalized", seed=2),  # m > n is fine for a Gaussian matrix
    ]


@pytest.mark.parametrize("op", _linear_ops(), ids=lambda op: type(op).__name__)
def test_linear_operator_matches_its_matrix_and_adjoint(op: LinearOperator) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, *SHAPE, generator=gen, dtype=torch.float64)
    matrix = op.matrix()
    assert matrix.shape == (op.num_measurements, 32)
    ax = op(x)
    assert ax.shape == (3, *op.measurement_shape)  # type: ignore[misc]
    torch.testing.assert_close(ax.reshape(3, -1), x.reshape(3, -1) @ matrix.T)
    y = torch.randn(ax.shape, generator=gen, dtype=torch.float64)
    aty = op.adjoint(y)
    assert aty.shape == x.shape
    torch.testing.assert_close(aty.reshape(3, -1), y.reshape(3, -1) @ matrix)
    # <A x, y> == <x, A^T y>
    torch.testing.assert_close((ax * y).sum(), (x * aty).sum())


def test_average_blur_downsample_is_block_mean() -> None:
    op = BlurDownsample((1, 4, 4), factor=2)
    expected = torch.zeros(4, 16, dtype=torch.float64)
    for out_row in range(2):
        for out_col in range(2):
            for dr in range(2):
                for dc in range(2):
                    expected[out_row * 2 + out_col, (2 * out_row + dr) * 4 + 2 * out_col + dc] = 0.25
    torch.testing.assert_close(op.matrix(), expected)
    x = torch.rand(2, 1, 4, 4)
    torch.testing.assert_close(op(x), F.avg_pool2d(x, 2))


def test_gaussian_blur_kernel_is_normalised_and_downsamples() -> None:
    op = BlurDownsample((1, 8, 8), factor=4, kind="gaussian")
    assert op(torch.ones(1, 1, 8, 8)).shape == (1, 1, 2, 2)
    torch.testing.assert_close(op.kernel.sum(), torch.tensor(1.0))


def test_gaussian_matrix_scaling_seed_and_numpy() -> None:
    a = GaussianMatrix(300, (1, 10, 10), scaling="csgm", seed=5)
    b = GaussianMatrix(300, (1, 10, 10), scaling="csgm", seed=5)
    c = GaussianMatrix(300, (1, 10, 10), scaling="normalized", seed=5)
    torch.testing.assert_close(a.A, b.A)
    assert not torch.equal(a.A, GaussianMatrix(300, (1, 10, 10), seed=6).A)
    assert abs(float(a.A.std()) - 1.0) < 0.02
    assert abs(float(c.A.std()) - 1 / np.sqrt(300)) < 0.02 / np.sqrt(300)
    torch.testing.assert_close(c.A * np.sqrt(300), a.A, rtol=1e-5, atol=1e-5)
    dense = a.numpy()
    assert dense.dtype == np.float64 and dense.shape == (300, 100)
    x = torch.rand(2, 1, 10, 10, dtype=torch.float64)
    np.testing.assert_allclose(a(x).numpy(), x.reshape(2, -1).numpy() @ dense.T, rtol=1e-6)
    dense[0, 0] = 123.0  # a copy: the operator is untouched
    assert float(a.A[0, 0]) != 123.0


def test_mask_random_and_block_contents() -> None:
    mask = Mask.random((3, 5, 5), num_kept=7, seed=1)
    assert mask.num_measurements == 3 * 7
    assert int(mask.mask[0].sum()) == 7 and torch.equal(mask.mask[0], mask.mask[2])
    assert torch.equal(mask.mask, Mask.random((3, 5, 5), num_kept=7, seed=1).mask)
    assert not torch.equal(mask.mask, Mask.random((3, 5, 5), num_kept=7, seed=2).mask)
    assert Mask.random((1, 10, 10), keep_fraction=0.25).num_measurements == 25

    block = Mask.block((1, 6, 6), size=(2, 3), position=(1, 2))
    assert block.num_measurements == 36 - 6
    assert not bool(block.mask[0, 1:3, 2:5].any()) and int(block.mask.sum()) == 30
    x = torch.arange(36.0).reshape(1, 1, 6, 6)
    observed = block.adjoint(block(x))
    torch.testing.assert_close(observed, x * block.mask)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_kept": 17}, "num_kept <= H\\*W = 16"),
        ({"keep_fraction": 0.0}, "keep_fraction in \\(0, 1\\]"),
        ({"keep_fraction": 1.5}, "keep_fraction in \\(0, 1\\]"),
        ({}, "exactly one of keep_fraction and num_kept"),
        ({"keep_fraction": 0.5, "num_kept": 3}, "exactly one of"),
    ],
)
def test_mask_random_rejects_bad_counts(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Mask.random((1, 4, 4), **kwargs)  # type: ignore[arg-type]


def test_operator_constructors_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="block smaller than the image"):
        Mask.block((1, 4, 4), size=4)
    with pytest.raises(ValueError, match="block position"):
        Mask.block((1, 4, 4), size=2, position=(3, 0))
    with pytest.raises(ValueError, match="keeps at least one entry"):
        Mask(torch.zeros(4, 4, dtype=torch.bool), (1, 4, 4))
    with pytest.raises(TypeError, match="boolean mask"):
        Mask(torch.zeros(4, 4), (1, 4, 4))
    with pytest.raises(ValueError, match="divisible by factor 4"):
        BlurDownsample((1, 6, 6), factor=4)
    with pytest.raises(ValueError, match="kind 'average' or 'gaussian'"):
        BlurDownsample((1, 4, 4), kind="box")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scaling 'csgm' or 'normalized'"):
        GaussianMatrix(3, (1, 2, 2), scaling="unit")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_measurements as a positive int"):
        GaussianMatrix(0, (1, 2, 2))
    with pytest.raises(ValueError, match="tuple of 3 positive ints"):
        Identity((28, 28))  # type: ignore[arg-type]


def test_check_measurements_reports_expected_and_got() -> None:
    op = GaussianMatrix(5, (1, 2, 2))
    op.check_measurements(torch.zeros(3, 5), 3)
    with pytest.raises(ValueError, match=r"expected measurements y of shape \(B, \*\(5,\)\), got \(3, 4\)"):
        op.check_measurements(torch.zeros(3, 4), 3)
    with pytest.raises(ValueError, match="batch size 2"):
        op.check_measurements(torch.zeros(3, 5), 2)
    with pytest.raises(ValueError, match="finite measurements"):
        op.check_measurements(torch.tensor([[0.0, float("nan"), 0, 0, 0]]), 1)
    with pytest.raises(TypeError, match=r"as a torch\.Tensor"):
        op.check_measurements(np.zeros((3, 5)), 3)
    with pytest.raises(ValueError, match=r"images of shape \(B, \*\(1, 2, 2\)\), got \(3, 1, 3, 3\)"):
        op.check_input(torch.zeros(3, 1, 3, 3))


def test_nonlinear_infers_shape_and_validates_labels() -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    op = Nonlinear(net, loss="cross_entropy")
    with pytest.raises(ValueError, match="not known yet"):
        _ = op.num_measurements
    x = torch.rand(2, 1, 2, 2)
    logits = op(x)
    assert op.measurement_shape == (3,) and op.num_measurements == 3
    labels = op.observe(logits)
    torch.testing.assert_close(labels, logits.argmax(1))
    torch.testing.assert_close(op.loss(logits, labels), F.cross_entropy(logits, labels, reduction="none"))
    op.check_measurements(labels, 2)
    with pytest.raises(ValueError, match=r"labels in \[0, 3\)"):
        op.check_measurements(torch.tensor([0, 3]), 2)
    with pytest.raises(ValueError, match="integer labels y of shape \\(B,\\)"):
        op.check_measurements(torch.tensor([[0], [1]]), 2)
    mse = Nonlinear(lambda t: t.sum(dim=(1, 2, 3)).unsqueeze(1))
    torch.testing.assert_close(mse.loss(torch.ones(2, 1), torch.zeros(2, 1)), torch.ones(2))
    custom = Nonlinear(net, loss=lambda a, b: (a - b).abs().sum(1))
    torch.testing.assert_close(custom.loss(torch.ones(2, 3), torch.zeros(2, 3)), torch.full((2,), 3.0))
    with pytest.raises(TypeError, match="callable fn"):
        Nonlinear(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="loss 'mse', 'cross_entropy' or a callable"):
        Nonlinear(net, loss="hinge")  # type: ignore[arg-type]


def test_sign_measurements_and_logistic_loss() -> None:
    base = GaussianMatrix(6, (1, 2, 2), seed=4)
    op = SignMeasurements(base, temperature=2.0)
    x = torch.rand(3, 1, 2, 2)
    y = measure(op, x)
    assert isinstance(y, torch.Tensor)
    assert set(torch.unique(y).tolist()) <= {-1.0, 1.0}
    torch.testing.assert_close(y, torch.where(base(x) >= 0, 1.0, -1.0))
    ax = op(x)
    torch.testing.assert_close(op.loss(ax, y), F.softplus(-y * ax / 2.0).mean(1))
    with pytest.raises(ValueError, match=r"in \{-1, \+1\}"):
        op.check_measurements(torch.zeros(3, 6), 3)
    with pytest.raises(ValueError, match="positive temperature"):
        SignMeasurements(base, temperature=0.0)


def test_mixture_weights_losses_and_checks_tuples() -> None:
    ident = Identity((1, 2, 2))
    gauss = GaussianMatrix(3, (1, 2, 2))
    mix = Mixture([(ident, 0.5), (gauss, 2.0)])
    x, x2 = torch.rand(2, 1, 2, 2), torch.rand(2, 1, 2, 2)
    y = measure(mix, x)
    assert isinstance(y, tuple) and len(y) == 2
    ax = mix(x2)
    expected = 0.5 * ident.loss(ax[0], y[0]) + 2.0 * gauss.loss(ax[1], y[1])
    torch.testing.assert_close(mix.loss(ax, y), expected)
    assert mix.num_measurements == 4 + 3
    with pytest.raises(TypeError, match="tuple of 2 measurements, got tuple of length 1"):
        mix.check_measurements((y[0],), 2)
    with pytest.raises(ValueError, match="one input shape"):
        Mixture([(ident, 1.0), (Identity((1, 3, 3)), 1.0)])
    with pytest.raises(ValueError, match="finite weight >= 0"):
        Mixture([(ident, -1.0)])
    with pytest.raises(TypeError, match="MeasurementOperator in Mixture"):
        Mixture([(nn.Identity(), 1.0)])  # type: ignore[list-item]


def test_measure_is_seeded_and_leaves_x_untouched() -> None:
    op = GaussianMatrix(2000, (1, 2, 2), scaling="normalized")
    x = torch.rand(2, 1, 2, 2)
    x_copy = x.clone()
    y1 = measure(op, x, noise_std=0.1, generator=torch.Generator().manual_seed(7))
    y2 = measure(op, x, noise_std=0.1, generator=torch.Generator().manual_seed(7))
    y3 = measure(op, x, noise_std=0.1, generator=torch.Generator().manual_seed(8))
    assert isinstance(y1, torch.Tensor) and isinstance(y3, torch.Tensor)
    torch.testing.assert_close(y1, y2)
    assert not torch.equal(y1, y3)
    assert abs(float((y1 - op(x)).std()) - 0.1) < 0.01
    torch.testing.assert_close(measure(op, x), op(x))
    assert torch.equal(x, x_copy)
    with pytest.raises(ValueError, match="noise_std >= 0"):
        measure(op, x, noise_std=-1.0)


def test_dct_is_orthonormal_and_matches_scipy() -> None:
    d = dct_matrix(6, dtype=torch.float64)
    torch.testing.assert_close(d @ d.T, torch.eye(6, dtype=torch.float64))
    x = torch.rand(2, 1, 6, 5, dtype=torch.float64)
    expected = scipy.fft.dctn(x.numpy(), axes=(-2, -1), norm="ortho")
    np.testing.assert_allclose(dct2(x).numpy(), expected, atol=1e-12)
    torch.testing.assert_close(idct2(dct2(x)), x)
