"""Measurement operators ``A``: images ``(B, C, H, W)`` in, measurements ``(B, ...)`` out.

Purpose: the inversion core (:func:`manifold_defense.inversion.invert`) recovers ``x ~ G(z)`` from ``y = A(x)
+ noise``; the operator fixes what ``A`` is and how a reconstruction is scored against ``y``.

- :class:`Identity`: projection / denoising (Defense-GAN, Samangouei et al. 2018).
- :class:`Mask`: inpainting (random pixels or a missing block).
- :class:`BlurDownsample`: super-resolution (blur, then subsample by 2 or 4).
- :class:`GaussianMatrix`: compressed sensing (CSGM, Bora et al. 2017: N(0, 1) entries; compsensing_dip: N(0,
    1/m)).
- :mod:`.nonlinear` holds the rest: :class:`Nonlinear` (any differentiable callable), :class:`SignMeasurements`
    (1-bit compressed sensing) and :class:`Mixture` (a weighted sum of several operators' losses).

Every operator has ``forward(x)`` (the differentiable prediction ``A(x)`` the loss compares with ``y``),
``observe(ax)`` (turns a prediction into a measurement, e.g. ``sign`` for 1-bit; identity for most),
``loss(ax, y) -> (B,)`` (per-sample loss, default: mean squared error over the measurement entries),
``check_input(x)`` / ``check_measurements(y)`` (shape validation with "expected X, got Y" errors),
``check_parameters()`` (its own parameters and buffers are finite), ``input_shape`` and ``num_measurements``. Linear operators (:class:`LinearOperator`) add ``adjoint(y)`` and
``matrix()`` (the dense ``(m, n)`` matrix acting on ``x.flatten(1)``).

:func:`measure` draws seeded measurements ``y = observe(A(x) + noise_std * noise)``.
"""

from __future__ import annotations

import math
from typing import Any, Literal, TypeAlias

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Measurements: TypeAlias = "torch.Tensor | tuple[Measurements, ...]"
"""A batch of measurements: a tensor ``(B, ...)``, or for :class:`Mixture` a tuple with one entry per
component."""

Shape3 = tuple[int, int, int]

__all__ = [
    "BlurDownsample",
    "GaussianMatrix",
    "Identity",
    "LinearOperator",
    "Mask",
    "MeasurementOperator",
    "Measurements",
    "measure",
]


def _check_shape3(input_shape: Any, name: str = "input_shape") -> Shape3:
    if (
        not isinstance(input_shape, (tuple, list))
        or len(input_shape) != 3
        or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in input_shape)
    ):
        raise ValueError(f"expected {name} as a tuple of 3 positive ints (C, H, W), got {input_shape!r}")
    return (int(input_shape[0]), int(input_shape[1]), int(input_shape[2]))


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected {name} as a positive int, got {value!r}")
    return value


def _check_measurement_shape(shape: Any, name: str = "MeasurementOperator") -> tuple[int, ...] | None:
    """``None`` or a tuple of positive ints (at least one measurement per sample); ``name`` prefixes errors."""
    if shape is None:
        return None
    if not isinstance(shape, (tuple, list)) or any(
        isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in shape
    ):
        raise ValueError(f"{name}: expected measurement_shape as a tuple of non-negative ints, got {shape!r}")
    if math.prod(shape) == 0:
        raise ValueError(
            f"{name}: expected an operator with at least one measurement per sample, got measurement shape "
            f"{tuple(shape)} (no measurement constrains the image: any reconstruction would fit)"
        )
    return tuple(int(s) for s in shape)


def _first_rows(bad: torch.Tensor, limit: int = 5) -> str:
    """The first ``limit`` indices where the bool vector ``bad`` is true, as text (for error messages)."""
    rows = torch.nonzero(bad.reshape(-1)).reshape(-1)[:limit].tolist()
    more = int(bad.sum()) - len(rows)
    return ", ".join(str(r) for r in rows) + (f" and {more} more" if more > 0 else "")


def _nonfinite_rows(t: torch.Tensor) -> torch.Tensor:
    """Bool ``(B,)``: rows of ``t`` (batch first) holding NaN or inf (``t.ndim >= 1``)."""
    return ~torch.isfinite(t.detach()).reshape(t.shape[0], -1).all(dim=1)


def _mse(ax: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (ax - y).pow(2).flatten(1).mean(dim=1)


class MeasurementOperator(nn.Module):
    """Base class: a differentiable map from images ``(B, C, H, W)`` to measurements.

    Subclasses implement :meth:`forward` and set ``input_shape`` (``(C, H, W)``, or ``None`` when any image
    shape is accepted) and ``measurement_shape`` (per-sample shape of ``y``, or ``None`` while unknown).
    """

    linear: bool = False

    def __init__(self, input_shape: Shape3 | None, measurement_shape: tuple[int, ...] | None) -> None:
        super().__init__()
        self.input_shape: Shape3 | None = None if input_shape is None else _check_shape3(input_shape)
        self.measurement_shape: tuple[int, ...] | None = _check_measurement_shape(
            measurement_shape, type(self).__name__
        )

    @property
    def num_measurements(self) -> int:
        """Number of scalar measurements per sample, ``m``."""
        if self.measurement_shape is None:
            raise ValueError(
                f"{type(self).__name__}: the measurement shape is not known yet; pass measurement_shape "
                "or call the operator once"
            )
        return math.prod(self.measurement_shape)

    @property
    def _shape(self) -> Shape3:
        if self.input_shape is None:
            raise ValueError(f"{type(self).__name__}: expected a known input_shape, got None")
        return self.input_shape

    def forward(self, x: torch.Tensor) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def observe(self, ax: Any) -> Any:
        """Turn a noisy prediction ``A(x) + noise`` into a measurement ``y`` (identity here)."""
        return ax

    def loss(self, ax: Any, y: Any) -> torch.Tensor:
        """Per-sample loss ``(B,)`` between the prediction ``ax = A(x)`` and measurements ``y``: mean squared
        error."""
        return _mse(ax, y)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` is a floating tensor ``(B, *input_shape)``."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected images as a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 4 or not x.is_floating_point():
            raise ValueError(
                f"expected floating images (B, C, H, W), got dtype {x.dtype} shape {tuple(x.shape)}"
            )
        if self.input_shape is not None and tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"{type(self).__name__}: expected images of shape (B, *{self.input_shape}), "
                f"got {tuple(x.shape)}"
            )

    def check_measurements(self, y: Any, batch_size: int | None = None) -> None:
        """Raise ``TypeError``/``ValueError`` unless ``y`` is a finite floating tensor ``(B,
        *measurement_shape)``."""
        _check_tensor_measurements(self, y, batch_size, self.measurement_shape)

    def check_parameters(self) -> None:
        """Raise ``ValueError`` unless every floating parameter and buffer of the operator (sub-modules included,
        e.g. a :class:`Nonlinear`'s network) is finite: a NaN in ``A`` would make every measurement NaN.

        One device reduction over all of them; :func:`measure` and :func:`~manifold_defense.inversion.invert`
        call it once per call.
        """
        named = [
            (kind, name, t)
            for kind, items in (("parameter", self.named_parameters()), ("buffer", self.named_buffers()))
            for name, t in items
            if t.is_floating_point() or t.is_complex()
        ]
        if not named:
            return
        flags = torch.stack([torch.isfinite(t.detach()).all().to(named[0][2].device) for _, _, t in named])
        if bool(flags.all()):
            return
        bad = [
            f"{kind} {name!r}" for (kind, name, _), ok in zip(named, flags.tolist(), strict=True) if not ok
        ]
        raise ValueError(
            f"{type(self).__name__}: expected the operator's parameters and buffers to be finite, got NaN or inf "
            f"in {', '.join(bad)}; its measurements would be NaN"
        )


def _check_tensor_measurements(
    op: MeasurementOperator, y: Any, batch_size: int | None, shape: tuple[int, ...] | None
) -> None:
    name = type(op).__name__
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name}: expected measurements y as a torch.Tensor, got {type(y).__name__}")
    if not y.is_floating_point():
        raise ValueError(f"{name}: expected floating measurements y, got dtype {y.dtype}")
    if y.ndim < 1:
        raise ValueError(f"{name}: expected measurements y with a batch dimension, got a scalar")
    if batch_size is not None and y.shape[0] != batch_size:
        raise ValueError(f"{name}: expected measurements with batch size {batch_size}, got {tuple(y.shape)}")
    if shape is not None and tuple(y.shape[1:]) != shape:
        raise ValueError(f"{name}: expected measurements y of shape (B, *{shape}), got {tuple(y.shape)}")
    if math.prod(y.shape[1:]) == 0:
        raise ValueError(
            f"{name}: expected at least one measurement per sample, got measurements y of shape {tuple(y.shape)}"
        )
    if not bool(torch.isfinite(y).all()):
        raise ValueError(
            f"{name}: expected finite measurements y, got NaN or inf entries in samples {_first_rows(_nonfinite_rows(y))}"
        )


class LinearOperator(MeasurementOperator):
    """A linear operator ``y = A x`` with an :meth:`adjoint` and a dense :meth:`matrix` (acting on
    ``x.flatten(1)``)."""

    linear = True

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """``A^T y``: measurements ``(B, *measurement_shape)`` to images ``(B, C, H, W)``."""
        raise NotImplementedError

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The dense matrix ``(m, n)`` with ``A(x).flatten(1) == x.flatten(1) @ matrix().T``, built column by
        column.

        Costs ``n = C*H*W`` forward calls batched into one; fine for MNIST-sized images. On the operator's
        device.
        """
        n = math.prod(self._shape)
        device = _module_device(self)
        basis = torch.eye(n, dtype=dtype, device=device).reshape(n, *self._shape)
        self.check_parameters()
        with torch.no_grad():
            dense = self(basis).reshape(n, -1).T.contiguous()
        if not bool(torch.isfinite(dense).all()):
            raise ValueError(f"{type(self).__name__}: expected a finite matrix, got NaN or inf entries")
        return dense


def _module_device(module: nn.Module) -> torch.device:
    for tensor in (*module.buffers(), *module.parameters()):
        return tensor.device
    return torch.device("cpu")


class Identity(LinearOperator):
    """``A = I``: projection onto the generator's range (Defense-GAN) or denoising. ``y`` has the image's
    shape.

    Args:
        input_shape: image shape ``(C, H, W)``; MNIST ``(1, 28, 28)``.
    """

    def __init__(self, input_shape: Shape3) -> None:
        shape = _check_shape3(input_shape)
        super().__init__(shape, shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return y


class Mask(LinearOperator):
    """Inpainting: keep the entries where ``mask`` is true; ``y = x.flatten(1)[:, kept]`` of shape ``(B, m)``.

    The mask is shared by the whole batch. Build it with :meth:`random` (a random subset of pixels, seeded) or
    :meth:`block` (a missing rectangle), or pass a boolean ``mask`` of shape ``(H, W)`` (applied to every
    channel) or ``(C, H, W)``. The adjoint puts the kept entries back and zeros elsewhere (the observed
    image).
    """

    mask: torch.Tensor
    indices: torch.Tensor

    def __init__(self, mask: torch.Tensor, input_shape: Shape3) -> None:
        shape = _check_shape3(input_shape)
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise TypeError(f"expected a boolean mask tensor, got {got}")
        if tuple(mask.shape) == shape[1:]:
            mask = mask.unsqueeze(0).expand(shape)
        if tuple(mask.shape) != shape:
            raise ValueError(f"expected a mask of shape {shape[1:]} or {shape}, got {tuple(mask.shape)}")
        indices = torch.nonzero(mask.reshape(-1), as_tuple=False).reshape(-1)
        if indices.numel() == 0:
            raise ValueError("expected a mask that keeps at least one entry, got an all-false mask")
        super().__init__(shape, (int(indices.numel()),))
        self.register_buffer("mask", mask.clone().contiguous())
        self.register_buffer("indices", indices)

    @classmethod
    def random(
        cls,
        input_shape: Shape3,
        *,
        keep_fraction: float | None = None,
        num_kept: int | None = None,
        seed: int = 0,
    ) -> Mask:
        """Keep a uniformly random subset of pixels (all channels of a kept pixel are kept).

        Args:
            input_shape: ``(C, H, W)``.
            keep_fraction: fraction of the ``H*W`` pixels kept, in ``(0, 1]`` (exclusive with ``num_kept``).
            num_kept: number of pixels kept, ``1 <= num_kept <= H*W``.
            seed: seed of the CPU ``torch.Generator`` that draws the pixels.
        """
        c, h, w = _check_shape3(input_shape)
        pixels = h * w
        if (keep_fraction is None) == (num_kept is None):
            raise ValueError(
                f"expected exactly one of keep_fraction and num_kept, got {keep_fraction!r} and {num_kept!r}"
            )
        if keep_fraction is not None:
            if not (isinstance(keep_fraction, (int, float)) and 0.0 < keep_fraction <= 1.0):
                raise ValueError(f"expected keep_fraction in (0, 1], got {keep_fraction!r}")
            count = max(1, round(keep_fraction * pixels))
        else:
            count = _check_positive_int(num_kept, "num_kept")
            if count > pixels:
                raise ValueError(f"expected num_kept <= H*W = {pixels} pixels, got {count}")
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(pixels, generator=generator)[:count]
        mask = torch.zeros(pixels, dtype=torch.bool)
        mask[chosen] = True
        return cls(mask.reshape(h, w), (c, h, w))

    @classmethod
    def block(
        cls,
        input_shape: Shape3,
        size: int | tuple[int, int],
        position: tuple[int, int] | None = None,
    ) -> Mask:
        """Remove a ``size`` block (rows, cols) whose top-left corner is ``position`` (default: centred)."""
        c, h, w = _check_shape3(input_shape)
        bh, bw = (size, size) if isinstance(size, int) else size
        _check_positive_int(bh, "block height")
        _check_positive_int(bw, "block width")
        if bh > h or bw > w or (bh == h and bw == w):
            raise ValueError(f"expected a block smaller than the image {(h, w)}, got size {(bh, bw)}")
        top, left = ((h - bh) // 2, (w - bw) // 2) if position is None else position
        if not (0 <= top <= h - bh and 0 <= left <= w - bw):
            raise ValueError(
                f"expected a block position with 0 <= top <= {h - bh} and 0 <= left <= {w - bw}, "
                f"got {(top, left)}"
            )
        mask = torch.ones(h, w, dtype=torch.bool)
        mask[top : top + bh, left : left + bw] = False
        return cls(mask, (c, h, w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).index_select(1, self.indices)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        flat = y.new_zeros(y.shape[0], math.prod(self._shape))
        return flat.index_copy(1, self.indices, y).reshape(y.shape[0], *self._shape)


class BlurDownsample(LinearOperator):
    """Super-resolution: per-channel blur then subsampling by ``factor``; ``y`` is ``(B, C, H/f, W/f)``.

    ``kind="average"``: average pooling over ``f x f`` blocks (box blur + stride). ``kind="gaussian"``: a
    Gaussian kernel of size ``2f+1`` with std ``sigma`` (default ``f/2``), zero padding ``f``, stride ``f``.

    Args:
        input_shape: ``(C, H, W)`` with ``H`` and ``W`` divisible by ``factor``.
        factor: downsampling factor (2 or 4 in the usual benchmarks; any positive int works).
        kind: ``"average"`` or ``"gaussian"``.
        sigma: Gaussian std in pixels (``kind="gaussian"`` only).
    """

    kernel: torch.Tensor

    def __init__(
        self,
        input_shape: Shape3,
        factor: int = 2,
        kind: Literal["average", "gaussian"] = "average",
        sigma: float | None = None,
    ) -> None:
        c, h, w = _check_shape3(input_shape)
        factor = _check_positive_int(factor, "factor")
        if h % factor or w % factor:
            raise ValueError(f"expected H and W divisible by factor {factor}, got {(h, w)}")
        if kind == "average":
            kernel = torch.full((factor, factor), 1.0 / factor**2, dtype=torch.float64)
            padding = 0
        elif kind == "gaussian":
            sigma = factor / 2.0 if sigma is None else sigma
            if not (isinstance(sigma, (int, float)) and sigma > 0 and math.isfinite(sigma)):
                raise ValueError(f"expected a positive sigma, got {sigma!r}")
            offsets = torch.arange(-factor, factor + 1, dtype=torch.float64)
            g = torch.exp(-(offsets**2) / (2.0 * sigma**2))
            g = g / g.sum()
            kernel = torch.outer(g, g)
            padding = factor
        else:
            raise ValueError(f"expected kind 'average' or 'gaussian', got {kind!r}")
        super().__init__((c, h, w), (c, h // factor, w // factor))
        self.factor = factor
        self.kind = kind
        self.padding = padding
        self.register_buffer("kernel", kernel.to(torch.float32).expand(c, 1, *kernel.shape).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.kernel.to(dtype=x.dtype)
        return F.conv2d(x, weight, stride=self.factor, padding=self.padding, groups=x.shape[1])

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        weight = self.kernel.to(dtype=y.dtype)
        k = weight.shape[-1]
        h = self._shape[1]
        output_padding = h - ((y.shape[-2] - 1) * self.factor - 2 * self.padding + k)
        return F.conv_transpose2d(
            y,
            weight,
            stride=self.factor,
            padding=self.padding,
            output_padding=output_padding,
            groups=y.shape[1],
        )


class GaussianMatrix(LinearOperator):
    """Compressed sensing with an i.i.d. Gaussian matrix ``A (m, n)``, ``n = C*H*W``; ``y = A x.flatten(1)``,
    ``(B, m)``.

    Args:
        num_measurements: ``m >= 1`` (``m > n`` is allowed).
        input_shape: ``(C, H, W)``.
        scaling: ``"csgm"``: N(0, 1) entries, unscaled (AshishBora/csgm); ``"normalized"``: N(0, 1/m) entries
            (davevanveen/compsensing_dip, ``randn / sqrt(m)``).
        seed: seed of the CPU ``torch.Generator`` that draws ``A`` (float64, stored as float32 unless
            ``dtype``).
        dtype: dtype of the stored matrix.

    ``A`` is the buffer ``A`` (a tensor; cast to the input's dtype in ``forward``); :meth:`numpy` returns a
    float64 copy for scikit-learn baselines (Lasso).
    """

    A: torch.Tensor

    def __init__(
        self,
        num_measurements: int,
        input_shape: Shape3,
        *,
        scaling: Literal["csgm", "normalized"] = "csgm",
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = _check_shape3(input_shape)
        m = _check_positive_int(num_measurements, "num_measurements")
        if scaling not in ("csgm", "normalized"):
            raise ValueError(f"expected scaling 'csgm' or 'normalized', got {scaling!r}")
        n = math.prod(shape)
        generator = torch.Generator().manual_seed(seed)
        matrix = torch.randn(m, n, generator=generator, dtype=torch.float64)
        if scaling == "normalized":
            matrix = matrix / math.sqrt(m)
        super().__init__(shape, (m,))
        self.scaling = scaling
        self.register_buffer("A", matrix.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.A.to(dtype=x.dtype).T

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return (y @ self.A.to(dtype=y.dtype)).reshape(y.shape[0], *self._shape)

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        self.check_parameters()
        return self.A.to(dtype=dtype).clone()

    def numpy(self) -> np.ndarray:
        """The matrix as a float64 numpy array ``(m, n)`` (a copy); ``ValueError`` if ``A`` holds NaN or inf."""
        self.check_parameters()
        return self.A.detach().to("cpu", torch.float64).numpy().copy()


def measure(
    operator: MeasurementOperator,
    x: torch.Tensor,
    noise_std: float = 0.0,
    generator: torch.Generator | None = None,
) -> Measurements:
    """Measurements ``y = observe(A(x) + noise_std * N(0, I))``; ``x`` is not modified.

    Args:
        operator: the measurement operator ``A``.
        x: images ``(B, C, H, W)`` on the operator's device.
        noise_std: standard deviation of additive Gaussian noise on every entry of ``A(x)`` (CSGM: 0.1).
        generator: ``torch.Generator`` for the noise (drawn on its device, then moved to ``x``'s); ``None``
            uses a fresh CPU generator seeded with 0, so ``measure`` never touches the global RNG.

    Returns:
        a tensor ``(B, ...)``, or a tuple for :class:`Mixture`.

    Raises:
        ValueError: ``x`` holds NaN or inf (naming the images), the operator's parameters or buffers do
            (:meth:`MeasurementOperator.check_parameters`), or its forward returns NaN or inf on these finite
            images; shape errors of :meth:`MeasurementOperator.check_input`.
    """
    if not isinstance(operator, MeasurementOperator):
        raise TypeError(f"expected a MeasurementOperator, got {type(operator).__name__}")
    operator.check_input(x)
    if not (isinstance(noise_std, (int, float)) and noise_std >= 0 and math.isfinite(noise_std)):
        raise ValueError(f"expected a finite noise_std >= 0, got {noise_std!r}")
    if x.shape[0] and not bool(torch.isfinite(x).all()):
        raise ValueError(
            f"measure: expected finite images x, got NaN or inf in images {_first_rows(_nonfinite_rows(x))}"
        )
    operator.check_parameters()
    if generator is None:
        generator = torch.Generator().manual_seed(0)

    def add_noise(ax: Any) -> Any:
        if isinstance(ax, tuple):
            return tuple(add_noise(a) for a in ax)
        if noise_std == 0:
            return ax
        noise = torch.randn(ax.shape, generator=generator, device=generator.device, dtype=ax.dtype)
        return ax + noise_std * noise.to(ax.device)

    ax = operator(x)
    check_forward_finite(operator, ax, "on finite images x")
    return operator.observe(add_noise(ax))


def check_forward_finite(operator: MeasurementOperator, ax: Any, when: str) -> None:
    """Raise ``ValueError`` naming the operator unless every tensor of its forward output ``ax`` is finite.

    ``when`` says on what input (e.g. ``"on finite images x"``); the caller has checked that input is finite, so
    a NaN here is the operator's (its forward, or a callable it wraps).
    """
    leaves: list[Any] = []
    stack = [ax]
    while stack:
        item = stack.pop()
        if isinstance(item, (tuple, list)):
            stack.extend(item)
        else:
            leaves.append(item)
    for leaf in leaves:
        if (
            isinstance(leaf, torch.Tensor)
            and leaf.ndim >= 1
            and leaf.shape[0]
            and not bool(torch.isfinite(leaf).all())
        ):
            raise ValueError(
                f"{type(operator).__name__}: expected the operator to return finite values {when}, got NaN or inf "
                f"in samples {_first_rows(_nonfinite_rows(leaf))}; the operator (its forward or the callable it "
                "wraps) is not finite there"
            )
