"""manifold_defense.inversion.deepinv_adapter: a deepinv Physics as a measurement operator of invert (skipped where
deepinv is not installed, except the missing-deepinv error itself)."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch
from torch import nn

from manifold_defense.inversion import GaussianMatrix, InversionConfig, Nonlinear, invert, measure
from manifold_defense.inversion.deepinv_adapter import DeepinvLinearOperator, DeepinvOperator, from_deepinv

SHAPE = (1, 8, 8)


class TinyGenerator(nn.Module):
    """z (B, 4) -> images (B, 1, 8, 8) in [0, 1]."""

    latent_dim = 4

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 64), nn.Sigmoid())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).view(-1, *SHAPE)


try:
    import deepinv as dinv
except ImportError:  # the optional extra: pip install 'manifold-defense[deepinv]'
    dinv = None

needs_deepinv = pytest.mark.skipif(dinv is None, reason="deepinv not installed (the optional deepinv extra)")


def test_missing_deepinv_is_an_import_error_saying_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "deepinv", None)
    monkeypatch.setitem(sys.modules, "deepinv.physics", None)
    with pytest.raises(ImportError, match=r"pip install 'manifold-defense\[deepinv\]'"):
        from_deepinv(object(), SHAPE)


def _cs(m: int = 20, seed: int = 0) -> Any:
    return dinv.physics.CompressedSensing(m=m, img_size=SHAPE, rng=torch.Generator().manual_seed(seed))


@needs_deepinv
def test_linear_physics_gives_forward_and_adjoint_batched() -> None:
    physics = _cs()
    op = from_deepinv(physics, SHAPE)
    assert isinstance(op, DeepinvLinearOperator) and op.linear
    assert op.num_measurements == 20 and op.measurement_shape == (20,) and op.input_shape == SHAPE
    x = torch.rand(5, *SHAPE, generator=torch.Generator().manual_seed(1))
    x_before = x.clone()
    y = op(x)
    assert y.shape == (5, 20)
    torch.testing.assert_close(y, physics.A(x))
    r = torch.randn(5, 20, generator=torch.Generator().manual_seed(2))
    back = op.adjoint(r)
    assert back.shape == (5, *SHAPE)
    torch.testing.assert_close(back, physics.A_adjoint(r))
    # <A x, r> == <x, A^T r> per sample, and the dense matrix reproduces A
    torch.testing.assert_close((y * r).sum(1), (x * back).flatten(1).sum(1), rtol=1e-4, atol=1e-4)
    dense = op.matrix()
    assert dense.shape == (20, 64) and dense.dtype == torch.float64
    torch.testing.assert_close(x.double().flatten(1) @ dense.T, y.double(), rtol=1e-5, atol=1e-5)
    assert torch.equal(x, x_before)  # the caller's tensor is untouched


@needs_deepinv
def test_float64_images_keep_their_dtype() -> None:
    op = from_deepinv(_cs(), SHAPE)
    assert isinstance(op, DeepinvLinearOperator)
    x = torch.rand(2, *SHAPE, dtype=torch.float64)
    assert op(x).dtype == torch.float64
    assert op.adjoint(op(x)).dtype == torch.float64


@needs_deepinv
def test_invert_with_a_deepinv_operator_matches_the_callable_route() -> None:
    """CSGM through the adapter gives the same result as the undocumented ``Nonlinear(physics.A)`` route, and
    recovers an image in the generator's range from noise-free measurements."""
    torch.manual_seed(0)
    G = TinyGenerator().eval()
    x = G(torch.randn(3, 4, generator=torch.Generator().manual_seed(3))).detach()
    physics = _cs(m=30)
    op = from_deepinv(physics, SHAPE)
    y = measure(op, x)  # noise-free
    config = InversionConfig(steps=150, restarts=3, lr=0.05, optimizer="adam", seed=0)
    adapter = invert(G, y, operator=op, config=config)
    callable_route = invert(G, y, operator=Nonlinear(physics.A, input_shape=SHAPE), config=config)
    torch.testing.assert_close(adapter.x_hat, callable_route.x_hat)
    mse = (adapter.x_hat - x).pow(2).flatten(1).mean(1)
    assert bool((mse < 1e-3).all()), mse


@needs_deepinv
def test_measure_adds_this_librarys_noise_to_physics_A() -> None:
    op = from_deepinv(_cs(), SHAPE)
    x = torch.rand(4, *SHAPE)
    y = measure(op, x, noise_std=0.1, generator=torch.Generator().manual_seed(0))
    noise = y - op(x)
    assert 0.05 < float(noise.std()) < 0.15


@needs_deepinv
def test_nonlinear_physics_gives_a_plain_operator() -> None:
    physics = dinv.physics.Physics(A=lambda x, **kw: x.flatten(1).pow(2)[:, :10])
    op = from_deepinv(physics, SHAPE)
    assert isinstance(op, DeepinvOperator) and not op.linear
    x = torch.rand(2, *SHAPE)
    torch.testing.assert_close(op(x), x.flatten(1).pow(2)[:, :10])
    assert op.num_measurements == 10


@needs_deepinv
def test_same_results_as_this_librarys_gaussian_matrix() -> None:
    """A deepinv LinearPhysics built on GaussianMatrix's own matrix measures exactly what GaussianMatrix does."""
    ours = GaussianMatrix(12, SHAPE, scaling="normalized", seed=4)
    physics = dinv.physics.LinearPhysics(
        A=lambda x, **kw: x.flatten(1) @ ours.A.T, A_adjoint=lambda y, **kw: (y @ ours.A).view(-1, *SHAPE)
    )
    op = from_deepinv(physics, SHAPE)
    assert isinstance(op, DeepinvLinearOperator)
    x = torch.rand(3, *SHAPE)
    torch.testing.assert_close(op(x), ours(x))
    torch.testing.assert_close(op.adjoint(ours(x)), ours.adjoint(ours(x)))


@needs_deepinv
@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: nn.Linear(2, 2), TypeError, r"expected a deepinv.physics.Physics, got Linear"),
        (
            lambda: dinv.physics.Physics(A=lambda x, **kw: torch.complex(x, x).flatten(1)),
            ValueError,
            r"expected real floating measurements from Physics.A, got dtype torch.complex64",
        ),
        (
            lambda: dinv.physics.Physics(A=lambda x, **kw: x.flatten(1).sum()),
            ValueError,
            r"expected Physics.A to map images \(2, \*\(1, 8, 8\)\) to measurements \(2, ...\), got shape \(\)",
        ),
        (
            lambda: _cs().stack(_cs(m=5, seed=1)),
            TypeError,
            r"expected StackedLinearPhysics.A to return one torch.Tensor per batch, got TensorList",
        ),
    ],
)
def test_refusals(make: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        from_deepinv(make(), SHAPE)  # type: ignore[operator]


@needs_deepinv
def test_bad_input_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="input_shape"):
        from_deepinv(_cs(), (8, 8))  # type: ignore[arg-type]


@needs_deepinv
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_the_device() -> None:
    op = from_deepinv(_cs(), SHAPE).to("cuda")
    assert isinstance(op, DeepinvLinearOperator)
    x = torch.rand(4, *SHAPE, device="cuda")
    y = op(x)
    assert y.device.type == "cuda" and op.adjoint(y).device.type == "cuda"
    torch.testing.assert_close(y.cpu(), from_deepinv(_cs(), SHAPE)(x.cpu()), rtol=1e-4, atol=1e-4)
