"""Measurement operators that are not one linear map: non-linear, 1-bit and mixtures of operators.

- :class:`Nonlinear`: any differentiable callable (e.g. a classifier's logits) with an MSE, cross-entropy or
    custom loss (non-linear measurements; the talk's "non-linear CS").
- :class:`SignMeasurements`: 1-bit compressed sensing, ``y = sign(A x)``, scored by a logistic surrogate.
- :class:`Mixture`: a weighted sum of the losses of several operators (the talk's "mixture of losses"); y is a
    tuple.

They share the interface of :class:`~manifold_defense.inversion.operators.MeasurementOperator` (``forward``,
``observe``, ``loss``, ``check_input``, ``check_measurements``) and work with
:func:`~manifold_defense.inversion.operators.measure` and :func:`~manifold_defense.inversion.invert`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .operators import (
    MeasurementOperator,
    Shape3,
    _check_measurement_shape,
    _check_tensor_measurements,
    _mse,
)

__all__ = ["Mixture", "Nonlinear", "SignMeasurements"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Nonlinear(MeasurementOperator):
    """Any differentiable callable ``fn`` as the measurement map, e.g. a classifier's logits (non-linear CS).

    Args:
        fn: callable ``(B, C, H, W) -> (B, ...)``; registered as a sub-module when it is an ``nn.Module``.
        loss: ``"mse"`` (mean squared error over the outputs), ``"cross_entropy"`` (``fn`` gives logits ``(B,
            K)``; ``y`` is integer labels ``(B,)`` or class probabilities ``(B, K)``), or a callable
            ``(ax, y) -> (B,)``.
        input_shape: accepted image shape ``(C, H, W)`` or ``None`` (any).
        measurement_shape: per-sample output shape of ``fn``; inferred on the first call when ``None``.

    ``observe`` returns the outputs themselves, or the arg-max labels for ``loss="cross_entropy"``.
    """

    def __init__(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor],
        loss: Literal["mse", "cross_entropy"] | LossFn = "mse",
        *,
        input_shape: Shape3 | None = None,
        measurement_shape: tuple[int, ...] | None = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"expected a callable fn, got {type(fn).__name__}")
        if not (loss in ("mse", "cross_entropy") or (callable(loss) and not isinstance(loss, str))):
            raise ValueError(f"expected loss 'mse', 'cross_entropy' or a callable, got {loss!r}")
        super().__init__(input_shape, None if measurement_shape is None else tuple(measurement_shape))
        self.fn = fn
        self.loss_kind = loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fn(x)
        if not isinstance(out, torch.Tensor) or out.ndim < 1 or out.shape[0] != x.shape[0]:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"Nonlinear: expected fn to return a tensor (B={x.shape[0]}, ...), got {got}")
        if self.measurement_shape is None:
            self.measurement_shape = _check_measurement_shape(tuple(out.shape[1:]), "Nonlinear")
        return out

    def observe(self, ax: Any) -> Any:
        if self.loss_kind == "cross_entropy":
            return ax.argmax(dim=1)
        return ax

    def loss(self, ax: Any, y: Any) -> torch.Tensor:
        if self.loss_kind == "mse":
            return _mse(ax, y)
        if self.loss_kind == "cross_entropy":
            return F.cross_entropy(ax, y, reduction="none")
        return self.loss_kind(ax, y)

    def check_measurements(self, y: Any, batch_size: int | None = None) -> None:
        if self.loss_kind != "cross_entropy" or (isinstance(y, torch.Tensor) and y.is_floating_point()):
            _check_tensor_measurements(self, y, batch_size, self.measurement_shape)
            return
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"Nonlinear: expected labels y as a torch.Tensor, got {type(y).__name__}")
        if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8) or y.ndim != 1:
            raise ValueError(
                f"Nonlinear: expected integer labels y of shape (B,), got {y.dtype} {tuple(y.shape)}"
            )
        if batch_size is not None and y.shape[0] != batch_size:
            raise ValueError(f"Nonlinear: expected labels with batch size {batch_size}, got {tuple(y.shape)}")
        if (
            self.measurement_shape is not None
            and y.numel()
            and (int(y.min()) < 0 or int(y.max()) >= self.num_measurements)
        ):
            raise ValueError(
                f"Nonlinear: expected labels in [0, {self.num_measurements}), "
                f"got range [{int(y.min())}, {int(y.max())}]"
            )


class SignMeasurements(MeasurementOperator):
    """1-bit compressed sensing: ``y = sign(base(x)) in {-1, +1}`` (sign(0) = +1).

    ``forward`` returns the real-valued ``base(x)``; the loss is the logistic surrogate
    ``mean(softplus(-y * base(x) / temperature))`` over the measurement entries (smooth, zero-one consistent).
    The scale of ``x`` is not identifiable from signs; the generator's range fixes it.

    Args:
        base: the underlying (typically :class:`GaussianMatrix`) operator.
        temperature: positive scale of the margin in the surrogate loss.
    """

    def __init__(self, base: MeasurementOperator, temperature: float = 1.0) -> None:
        if not isinstance(base, MeasurementOperator) or isinstance(base, Mixture):
            raise TypeError(f"expected a single MeasurementOperator as base, got {type(base).__name__}")
        if not (isinstance(temperature, (int, float)) and temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"expected a positive temperature, got {temperature!r}")
        super().__init__(base.input_shape, base.measurement_shape)
        self.base = base
        self.temperature = float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x)

    def observe(self, ax: Any) -> Any:
        return torch.where(ax >= 0, torch.ones_like(ax), -torch.ones_like(ax))

    def loss(self, ax: Any, y: Any) -> torch.Tensor:
        return F.softplus(-y * ax / self.temperature).flatten(1).mean(dim=1)

    def check_measurements(self, y: Any, batch_size: int | None = None) -> None:
        _check_tensor_measurements(self, y, batch_size, self.measurement_shape)
        if not bool((y.abs() == 1).all()):
            raise ValueError("SignMeasurements: expected measurements y in {-1, +1}, got other values")


class Mixture(MeasurementOperator):
    """A weighted sum of operators' losses: ``loss = sum_i w_i * loss_i(A_i x, y_i)``; ``y`` is a tuple
    ``(y_1, ...)``.

    Args:
        components: a non-empty sequence of ``(operator, weight)`` with finite weights ``>= 0`` (not all
            zero); all operators must accept the same image shape.
    """

    def __init__(self, components: Sequence[tuple[MeasurementOperator, float]]) -> None:
        if not isinstance(components, Sequence) or len(components) == 0:
            raise ValueError(f"expected a non-empty sequence of (operator, weight) pairs, got {components!r}")
        ops: list[MeasurementOperator] = []
        weights: list[float] = []
        for item in components:
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise ValueError(f"expected (operator, weight) pairs, got {item!r}")
            op, weight = item
            if not isinstance(op, MeasurementOperator):
                raise TypeError(f"expected a MeasurementOperator in Mixture, got {type(op).__name__}")
            if (
                isinstance(weight, bool)
                or not isinstance(weight, (int, float))
                or not (weight >= 0)
                or not math.isfinite(weight)
            ):
                raise ValueError(f"expected a finite weight >= 0, got {weight!r}")
            ops.append(op)
            weights.append(float(weight))
        if sum(weights) == 0:
            raise ValueError("expected at least one positive weight in Mixture, got all zeros")
        shapes = {op.input_shape for op in ops if op.input_shape is not None}
        if len(shapes) > 1:
            raise ValueError(f"expected Mixture components with one input shape, got {sorted(shapes)}")
        super().__init__(shapes.pop() if shapes else None, None)
        self.operators = nn.ModuleList(ops)
        self.weights = tuple(weights)

    @property
    def components(self) -> list[MeasurementOperator]:
        """The component operators, in order."""
        return [op for op in self.operators if isinstance(op, MeasurementOperator)]

    @property
    def num_measurements(self) -> int:
        return sum(op.num_measurements for op in self.components)

    def forward(self, x: torch.Tensor) -> tuple[Any, ...]:
        return tuple(op(x) for op in self.components)

    def observe(self, ax: Any) -> Any:
        return tuple(op.observe(a) for op, a in zip(self.components, ax, strict=True))

    def loss(self, ax: Any, y: Any) -> torch.Tensor:
        total: torch.Tensor | None = None
        for op, weight, a, target in zip(self.components, self.weights, ax, y, strict=True):
            term = weight * op.loss(a, target)
            total = term if total is None else total + term
        return total  # type: ignore[return-value]

    def check_measurements(self, y: Any, batch_size: int | None = None) -> None:
        if not isinstance(y, (tuple, list)) or len(y) != len(self.operators):
            got = (
                f"{type(y).__name__} of length {len(y)}" if isinstance(y, (tuple, list)) else type(y).__name__
            )
            raise TypeError(
                f"Mixture: expected y as a tuple of {len(self.operators)} measurements, got {got}"
            )
        for op, target in zip(self.components, y, strict=True):
            op.check_measurements(target, batch_size)
