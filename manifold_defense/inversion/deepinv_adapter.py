"""deepinv's measurement models as operators of the inversion core (optional: ``pip install manifold-defense[deepinv]``).

`deepinv <https://deepinv.github.io>`_ ships many imaging operators (``CompressedSensing``, ``Inpainting``,
``Blur``, ``Downsampling``, ``SinglePixelCamera``, MRI, tomography...), each a ``deepinv.physics.Physics`` with a
noise-free map ``physics.A(x)`` and, for a ``LinearPhysics``, its transpose ``physics.A_adjoint(y)``.
:func:`from_deepinv` wraps one so that :func:`~manifold_defense.inversion.invert` (CSGM, the projection defense's
core), :func:`~manifold_defense.inversion.measure` and the sparse-deviation recovery use it like the operators of
:mod:`manifold_defense.inversion.operators`:

    >>> import deepinv as dinv                                                   # doctest: +SKIP
    >>> physics = dinv.physics.CompressedSensing(m=100, img_size=(1, 28, 28))   # doctest: +SKIP
    >>> A = from_deepinv(physics, (1, 28, 28))                                  # doctest: +SKIP
    >>> y = physics(x)               # deepinv's own noise model, or measure(A, x, 0.1)  # doctest: +SKIP
    >>> inv = invert(G, y, operator=A, config=InversionConfig(steps=500, restarts=10))  # doctest: +SKIP

What the wrapper uses: ``physics.A`` as ``forward`` (the prediction the loss compares with ``y``: no noise, no
sensor model; so a physics whose ``sensor_model`` is not the identity is scored against its pre-sensor values)
and, for a ``LinearPhysics``, ``physics.A_adjoint`` as ``adjoint``. Both run on whole batches, on the device of the
physics' buffers: the physics is a sub-module, so ``operator.to(device)`` moves it. Images are cast to the
physics' floating dtype (deepinv's operators hold float32 matrices) and the result back to the images' dtype.
Refused with a clear error: an object that is not a ``Physics`` (``TypeError``), and at construction a physics
whose ``A`` does not return one real floating tensor ``(B, ...)`` per image batch (complex MRI measurements,
``TensorList`` of stacked physics: ``TypeError`` / ``ValueError`` naming what came back).

deepinv is imported only when this module is used; the defense never needs it.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .operators import LinearOperator, MeasurementOperator, Shape3, _check_shape3, _module_device

__all__ = ["DeepinvLinearOperator", "DeepinvOperator", "from_deepinv"]


def _deepinv_physics() -> tuple[type, type]:
    """``(Physics, LinearPhysics)`` from deepinv, or ``ImportError`` saying how to install it."""
    try:
        from deepinv.physics import LinearPhysics, Physics
    except ImportError as err:
        raise ImportError(
            "from_deepinv needs deepinv: pip install 'manifold-defense[deepinv]' (or pip install deepinv)"
        ) from err
    return Physics, LinearPhysics


def _floating_dtype(module: torch.nn.Module) -> torch.dtype | None:
    for tensor in (*module.buffers(), *module.parameters()):
        if tensor.is_floating_point():
            return tensor.dtype
    return None


class _PhysicsMixin:
    """What both wrappers share: the probe of ``physics.A`` at construction and the dtype-preserving call."""

    physics: Any  # a deepinv.physics.Physics (an nn.Module: registered as a sub-module)

    @classmethod
    def _checked(cls, physics: Any, input_shape: Shape3, *, linear: bool) -> tuple[Shape3, tuple[int, ...]]:
        """``(input_shape, measurement_shape)`` after checking that ``physics`` is a deepinv ``Physics`` (a
        ``LinearPhysics`` when ``linear``) and probing its ``A``."""
        physics_cls, linear_cls = _deepinv_physics()
        wanted = linear_cls if linear else physics_cls
        if not isinstance(physics, wanted):
            raise TypeError(f"expected a deepinv.physics.{wanted.__name__}, got {type(physics).__name__}")
        shape = _check_shape3(input_shape)
        return shape, cls._probe(physics, shape)

    @staticmethod
    def _probe(physics: Any, input_shape: Shape3) -> tuple[int, ...]:
        """Run ``physics.A`` on two zero images; the per-sample measurement shape, or a clear error."""
        device = _module_device(physics)
        dtype = _floating_dtype(physics) or torch.float32
        with torch.no_grad():
            out = physics.A(torch.zeros(2, *input_shape, device=device, dtype=dtype))
        name = type(physics).__name__
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"from_deepinv: expected {name}.A to return one torch.Tensor per batch, got {type(out).__name__} "
                "(a stacked physics: wrap each of its physics separately, or combine them with Mixture)"
            )
        if out.is_complex() or not out.is_floating_point():
            raise ValueError(
                f"from_deepinv: expected real floating measurements from {name}.A, got dtype {out.dtype} "
                "(complex measurements: wrap the physics to return torch.view_as_real of them)"
            )
        if out.ndim < 2 or out.shape[0] != 2 or math.prod(out.shape[1:]) == 0:
            raise ValueError(
                f"from_deepinv: expected {name}.A to map images (2, *{input_shape}) to measurements (2, ...), "
                f"got shape {tuple(out.shape)}"
            )
        return tuple(int(s) for s in out.shape[1:])

    def _call(self, fn: Any, t: torch.Tensor) -> torch.Tensor:
        dtype = _floating_dtype(self.physics)
        result: torch.Tensor = fn(t if dtype is None or t.dtype == dtype else t.to(dtype))
        return result if result.dtype == t.dtype else result.to(t.dtype)


class DeepinvOperator(_PhysicsMixin, MeasurementOperator):
    """A deepinv ``Physics`` (any, non-linear included) as a :class:`MeasurementOperator`: ``forward = physics.A``.

    Build it with :func:`from_deepinv`, which picks :class:`DeepinvLinearOperator` for a ``LinearPhysics``.

    Args:
        physics: the ``deepinv.physics.Physics`` (kept as the sub-module ``physics``; not copied).
        input_shape: image shape ``(C, H, W)`` the physics acts on.
    """

    def __init__(self, physics: Any, input_shape: Shape3) -> None:
        super().__init__(*self._checked(physics, input_shape, linear=False))
        self.physics = physics

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``physics.A(x)``: images ``(B, C, H, W)`` to noise-free measurements ``(B, *measurement_shape)``."""
        return self._call(self.physics.A, x)


class DeepinvLinearOperator(_PhysicsMixin, LinearOperator):
    """A deepinv ``LinearPhysics`` as a :class:`LinearOperator`: ``forward = physics.A``, ``adjoint =
    physics.A_adjoint`` (its closed form where deepinv has one, else deepinv's autograd adjoint).

    Args:
        physics: the ``deepinv.physics.LinearPhysics`` (kept as the sub-module ``physics``; not copied).
        input_shape: image shape ``(C, H, W)`` the physics acts on.
    """

    def __init__(self, physics: Any, input_shape: Shape3) -> None:
        super().__init__(*self._checked(physics, input_shape, linear=True))
        self.physics = physics

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``physics.A(x)``: images ``(B, C, H, W)`` to noise-free measurements ``(B, *measurement_shape)``."""
        return self._call(self.physics.A, x)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``physics.A_adjoint(y)``: measurements ``(B, *measurement_shape)`` to images ``(B, C, H, W)``."""
        out = self._call(self.physics.A_adjoint, y)
        return out.reshape(y.shape[0], *self._shape)

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The dense ``(m, n)`` matrix, built column by column in the physics' own dtype (deepinv's operators
        refuse other dtypes), then cast to ``dtype``; on the physics' device."""
        n = math.prod(self._shape)
        own = _floating_dtype(self.physics) or dtype
        basis = torch.eye(n, dtype=own, device=_module_device(self)).reshape(n, *self._shape)
        self.check_parameters()
        with torch.no_grad():
            dense = self.physics.A(basis).reshape(n, -1).T.contiguous().to(dtype)
        if not bool(torch.isfinite(dense).all()):
            raise ValueError(f"{type(self).__name__}: expected a finite matrix, got NaN or inf entries")
        return dense


def from_deepinv(physics: Any, input_shape: Shape3) -> DeepinvOperator | DeepinvLinearOperator:
    """Wrap a deepinv ``Physics`` as a measurement operator of :func:`~manifold_defense.inversion.invert`.

    Args:
        physics: any ``deepinv.physics.Physics``; a ``LinearPhysics`` gives a :class:`DeepinvLinearOperator`
            (with ``adjoint`` and ``matrix``), any other a :class:`DeepinvOperator`.
        input_shape: image shape ``(C, H, W)`` the physics acts on (MNIST: ``(1, 28, 28)``).

    Returns:
        the operator, on the physics' device; ``num_measurements`` is known (one probe call of ``physics.A``).

    Raises:
        ImportError: deepinv is not installed (``pip install 'manifold-defense[deepinv]'``).
        TypeError: ``physics`` is not a deepinv ``Physics``, or its ``A`` returns something other than a tensor.
        ValueError: a bad ``input_shape``, or ``A`` returns complex or non-floating measurements or a shape
            without a batch of measurements.
    """
    physics_cls, linear_cls = _deepinv_physics()
    if isinstance(physics, linear_cls):
        return DeepinvLinearOperator(physics, input_shape)
    if isinstance(physics, physics_cls):
        return DeepinvOperator(physics, input_shape)
    raise TypeError(f"expected a deepinv.physics.Physics, got {type(physics).__name__}")
