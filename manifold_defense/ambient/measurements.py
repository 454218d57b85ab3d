"""AmbientGAN's random measurement models (see :mod:`manifold_defense.ambient`): images in, measurements out."""


from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MEASUREMENTS",
    "METHODS",
    "BlockPatch",
    "BlockPixels",
    "ConvolveNoise",
    "GaussianProjection",
    "KeepPatch",
    "RandomMeasurement",
    "build_measurement",
]

Method = Literal["ambient", "ignore", "unmeasure"]
"""A training method's name: ``"ambient"`` (AmbientGAN), ``"ignore"`` or ``"unmeasure"`` (the paper's baselines)."""
METHODS: tuple[str, ...] = ("ambient", "ignore", "unmeasure")
"""The training methods: AmbientGAN and the paper's two baselines."""
InpaintMethod = Literal["biharmonic", "normalized-convolution"]
"""How the ``unmeasure`` baseline fills the pixels a pixel-dropping measurement removed: biharmonic inpainting or a
normalized convolution (``RandomMeasurement.unmeasure``'s ``inpaint``)."""


def _check_images(x: Any, what: str = "images") -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 4:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{what}: expected a float tensor (B, C, H, W), got {got}")
    return x


def _check_finite_images(x: torch.Tensor, what: str = "images") -> None:
    if x.numel() and not bool(torch.isfinite(x).all()):  # name the images (first five)
        bad = torch.nonzero(~torch.isfinite(x).flatten(1).all(dim=1)).flatten().tolist()
        shown = ", ".join(str(i) for i in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ValueError(f"{what}: expected finite values to measure, got NaN or inf in images {shown}")


def _check_generator(generator: Any) -> torch.Generator | None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"expected generator to be a torch.Generator or None, got {type(generator).__name__}")
    return generator


def _check_number(value: Any, name: str, lo: float, hi: float, *, hi_open: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < lo or (value >= hi if hi_open else value > hi):
        interval = f"[{lo}, {hi})" if hi_open else f"[{lo}, {hi}]"
        raise ValueError(f"expected {name} in {interval}, got {value!r}")
    return float(value)


def _check_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected {name} to be a positive int, got {value!r}")
    return value


def _draw(
    kind: Callable[..., torch.Tensor], shape: tuple[int, ...], x: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """``kind(shape)`` (``torch.rand`` / ``torch.randn``) drawn on the generator's device (the input's for the global
    RNG) in the input's dtype, moved to the input's device."""
    dev = generator.device if generator is not None else x.device
    return kind(shape, generator=generator, device=dev, dtype=x.dtype).to(x.device)


class RandomMeasurement(nn.Module):
    """A random measurement model ``y = f_theta(x)`` with ``theta`` drawn per sample (AmbientGAN, Bora et al. 2018).

    Subclasses define :meth:`sample_theta` and :meth:`apply_theta` (differentiable in ``x``); ``forward(x, generator)`` is
    ``apply_theta(x, sample_theta(x, generator))``. :meth:`as_image` and :meth:`unmeasure` serve the ignore and unmeasure
    baselines; :meth:`spec` is the JSON description stored in records.
    """

    #: CLI name of the model.
    name: str = ""
    #: Whether measurements are images of the input's shape (the convolutional critic applies).
    image_like: bool = True

    def sample_theta(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One ``theta`` per sample of ``x`` ``(B, C, H, W)``."""
        raise NotImplementedError  # pragma: no cover

    def apply_theta(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """``f_theta(x)``."""
        raise NotImplementedError  # pragma: no cover

    def check_input(self, x: Any) -> torch.Tensor:
        return _check_images(x)

    def measure(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, theta)`` for images ``x`` ``(B, C, H, W)``; ``theta`` fresh per sample and call. ``ValueError``
        naming the images if ``x`` holds NaN or inf (a dropped NaN pixel still measures NaN: ``NaN * 0``)."""
        x = self.check_input(x)
        _check_finite_images(x)
        theta = self.sample_theta(x, _check_generator(generator))
        return self.apply_theta(x, theta), theta

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``y``: :meth:`measure` without its finiteness check (the GAN trainer's per-step call; its loss check
        stops on NaN)."""
        x = self.check_input(x)
        return self.apply_theta(x, self.sample_theta(x, _check_generator(generator)))

    def as_image(self, y: torch.Tensor) -> torch.Tensor:
        """The measurement read as a clean image (the "ignore" baseline): clipped to [0, 1]."""
        return y.clamp(0.0, 1.0)

    def unmeasure(self, y: torch.Tensor, theta: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """A restored image in [0, 1] (the "unmeasure" baseline)."""
        raise NotImplementedError  # pragma: no cover

    def spec(self) -> dict[str, Any]:
        """The model's name and settings, as records store them."""
        raise NotImplementedError  # pragma: no cover

    def tag(self) -> str:
        """A file-name tag, e.g. ``block-pixels-p0.9`` (name and settings)."""
        return "-".join([self.name, *(f"{k}{v}" for k, v in self.spec().items() if k != "name")])


def _inpaint(zero_filled: torch.Tensor, kept: torch.Tensor, method: InpaintMethod) -> torch.Tensor:
    """Fill the pixels where ``kept`` is 0 from the kept ones; ``(B, C, H, W)`` in, [0, 1] out, on the input's device.

    ``"biharmonic"``: scikit-image ``inpaint_biharmonic`` per image and channel (exact on kept pixels; about 20 ms
    per 28x28 image on one CPU core). ``"normalized-convolution"``: Gaussian-weighted averages of the kept pixels,
    ``blur(y m) / blur(m)``, at widths 1, 2, 4 and 8 pixels, each hole taking the finest width that reaches a
    kept pixel, pixels beyond all widths left 0 (vectorized, separable; a cheap alternative, blurrier than
    biharmonic).
    """
    if method == "biharmonic":
        from skimage.restoration import inpaint_biharmonic

        img = zero_filled.detach().to("cpu", torch.float64).numpy()
        miss = (kept.detach().to("cpu") == 0).expand_as(zero_filled).numpy()
        out = np.empty_like(img)
        for i in range(img.shape[0]):
            for c in range(img.shape[1]):
                out[i, c] = inpaint_biharmonic(img[i, c], miss[i, c]) if miss[i, c].any() else img[i, c]
        return torch.from_numpy(out).to(zero_filled.device, zero_filled.dtype).clamp(0.0, 1.0)
    if method == "normalized-convolution":
        m = kept.expand_as(zero_filled).to(zero_filled.dtype)
        filled = zero_filled * m
        done = m.clone()
        for width in (1.0, 2.0, 4.0, 8.0):
            num = _separable_blur(zero_filled * m, width)
            den = _separable_blur(m, width)
            new = (done == 0) & (den > 1e-6)
            filled = torch.where(new, num / den.clamp_min(1e-12), filled)
            done = torch.where(new, torch.ones_like(done), done)
        return filled.clamp(0.0, 1.0)
    raise ValueError(f"expected inpainting method 'biharmonic' or 'normalized-convolution', got {method!r}")


def _gaussian_1d(size: int, std: float) -> torch.Tensor:
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(offsets**2) / (2.0 * std**2))
    return g / g.sum()


def _gaussian_kernel(size: int, std: float, like: torch.Tensor) -> torch.Tensor:
    g = _gaussian_1d(size, std)
    return torch.outer(g, g).to(like.device, like.dtype)


def _separable_blur(x: torch.Tensor, std: float) -> torch.Tensor:
    """A Gaussian blur of std ``std`` pixels (radius ``3 std``, zero padding), rows then columns, per channel."""
    size = int(2 * math.ceil(3 * std) + 1)
    g = _gaussian_1d(size, std).to(x.device, x.dtype)
    c, pad = x.shape[1], size // 2
    x = F.conv2d(x, g.view(1, 1, 1, size).expand(c, 1, 1, size).contiguous(), padding=(0, pad), groups=c)
    return F.conv2d(x, g.view(1, 1, size, 1).expand(c, 1, size, 1).contiguous(), padding=(pad, 0), groups=c)


class _MaskMeasurement(RandomMeasurement):
    """Shared by the masking models: ``theta`` is the kept-pixel mask, ``y = scale * theta * x``."""

    scale: float = 1.0

    def apply_theta(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return x * theta * self.scale

    def as_image(self, y: torch.Tensor) -> torch.Tensor:
        return (y / self.scale).clamp(0.0, 1.0)

    def unmeasure(
        self, y: torch.Tensor, theta: torch.Tensor, inpaint: InpaintMethod = "biharmonic", **kwargs: Any
    ) -> torch.Tensor:
        """Inpaint the dropped pixels (``inpaint``: ``"biharmonic"`` or ``"normalized-convolution"``)."""
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)} for {type(self).__name__}.unmeasure")
        return _inpaint(self.as_image(y), theta, inpaint)


class BlockPixels(_MaskMeasurement):
    """Block-pixels: each pixel (and channel) dropped independently with probability ``p``; kept pixels scaled by
    ``1 / (1 - p)`` (AmbientGAN's code), so ``E[y] = x``.

    Measurements are ``(B, C, H, W)`` with values in ``[0, 1 / (1 - p)]`` (up to 10 at p = 0.9, 20 at 0.95): the
    discriminator sees these rescaled values for real and generated measurements alike. ``theta`` is the kept mask
    ``(B, C, H, W)`` of 0/1.

    Args:
        p: drop probability in [0, 1).
    """

    name = "block-pixels"

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = _check_number(p, "p", 0.0, 1.0, hi_open=True)
        self.scale = 1.0 / (1.0 - self.p)

    def sample_theta(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return (_draw(torch.rand, tuple(x.shape), x, generator) >= self.p).to(x.dtype)

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "p": self.p}


class _Patch(_MaskMeasurement):
    keep_inside: bool = False

    def __init__(self, size: int = 14) -> None:
        super().__init__()
        self.size = _check_int(size, "size")

    def check_input(self, x: Any) -> torch.Tensor:
        x = _check_images(x)
        if self.size > min(x.shape[-2:]):
            raise ValueError(f"expected images at least {self.size}x{self.size} for the patch, got {tuple(x.shape)}")
        return x

    def sample_theta(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        b, _, h, w = x.shape
        u = _draw(torch.rand, (b, 2), x, generator).double()
        top = (u[:, 0] * (h - self.size + 1)).floor().clamp(max=h - self.size).long()
        left = (u[:, 1] * (w - self.size + 1)).floor().clamp(max=w - self.size).long()
        rows = torch.arange(h, device=x.device)
        cols = torch.arange(w, device=x.device)
        in_r = (rows >= top[:, None]) & (rows < top[:, None] + self.size)
        in_c = (cols >= left[:, None]) & (cols < left[:, None] + self.size)
        inside = in_r[:, :, None] & in_c[:, None, :]
        kept = inside if self.keep_inside else ~inside
        return kept[:, None].to(x.dtype)

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size}


class BlockPatch(_Patch):
    """Block-patch: a ``size x size`` patch (14 on MNIST) at a uniformly random position is zeroed.

    Measurements ``(B, C, H, W)`` in [0, 1]; ``theta`` is the kept mask ``(B, 1, H, W)``.
    """

    name = "block-patch"


class KeepPatch(_Patch):
    """Keep-patch: only a ``size x size`` patch (14 on MNIST) at a uniformly random position is kept, the rest zeroed.

    Measurements ``(B, C, H, W)`` in [0, 1]; ``theta`` is the kept mask ``(B, 1, H, W)``.
    """

    name = "keep-patch"
    keep_inside = True


class ConvolveNoise(RandomMeasurement):
    """Convolve+noise: a Gaussian blur (``kernel_size`` 5, std ``blur_std`` 1 pixel, zero padding, per channel) then
    additive i.i.d. noise ``N(0, sigma^2)``; ``theta`` is the noise ``(B, C, H, W)``.

    Measurements ``(B, C, H, W)``, not clipped (noise takes them outside [0, 1]).

    Args:
        sigma: noise std, >= 0.
        kernel_size: odd blur size.
        blur_std: blur std in pixels.
    """

    name = "convolve-noise"
    kernel: torch.Tensor

    def __init__(self, sigma: float, kernel_size: int = 5, blur_std: float = 1.0) -> None:
        super().__init__()
        self.sigma = _check_number(sigma, "sigma", 0.0, math.inf, hi_open=True)
        self.kernel_size = _check_int(kernel_size, "kernel_size")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"expected an odd kernel_size, got {kernel_size}")
        self.blur_std = _check_number(blur_std, "blur_std", 1e-6, math.inf, hi_open=True)
        self.register_buffer("kernel", _gaussian_kernel(self.kernel_size, self.blur_std, torch.zeros(())).float())

    def blur(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        weight = self.kernel.to(x.device, x.dtype).expand(c, 1, *self.kernel.shape).contiguous()
        return F.conv2d(x, weight, padding=self.kernel_size // 2, groups=c)

    def sample_theta(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return _draw(torch.randn, tuple(x.shape), x, generator) * self.sigma

    def apply_theta(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return self.blur(x) + theta

    def unmeasure(
        self, y: torch.Tensor, theta: torch.Tensor, balance: float | None = None, **kwargs: Any
    ) -> torch.Tensor:
        """Wiener deconvolution (scikit-image ``restoration.wiener``, Laplacian regularization) of each image.

        ``balance`` (regularization weight) defaults to ``max(2.5 sigma^2, 1e-3)``: on 200 MNIST training images
        it is near the MSE-optimal balance at sigma 0.1 (0.025) and 0.2 (0.1), an oracle choice that favours
        the baseline. ``theta`` (the noise) is not
        used: the baseline does not know it.
        """
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)} for ConvolveNoise.unmeasure")
        from skimage.restoration import wiener

        bal = max(2.5 * self.sigma**2, 1e-3) if balance is None else _check_number(balance, "balance", 0, math.inf)
        psf = self.kernel.double().cpu().numpy()
        img = y.detach().to("cpu", torch.float64).numpy()
        out = np.empty_like(img)
        for i in range(img.shape[0]):
            for c in range(img.shape[1]):
                out[i, c] = wiener(img[i, c], psf, bal, clip=False)
        return torch.from_numpy(out).to(y.device, y.dtype).clamp(0.0, 1.0)

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "sigma": self.sigma, "kernel_size": self.kernel_size, "blur_std": self.blur_std}

    def tag(self) -> str:
        default = self.kernel_size == 5 and self.blur_std == 1.0
        return f"{self.name}-sigma{self.sigma}" + ("" if default else f"-k{self.kernel_size}-std{self.blur_std}")


class GaussianProjection(RandomMeasurement):
    """Gaussian projection (the paper's, not in their code): ``f_theta(x) = (theta, <theta, x>)``, ``theta ~ N(0, I_n)``
    fresh per sample, ``n = C H W``; with ``m`` projections per sample the measurement is ``(B, m, n + 1)``, row ``i``
    holding ``theta_i`` and ``<theta_i, x.flatten()>`` (the paper's choice is m = 1). ``theta`` is ``(B, m, n)``.

    The measurement is a vector, not an image: train with :class:`MeasurementDiscriminator`; the ignore baseline
    does not apply; unmeasure is the minimum-norm solution ``theta^+ <theta, x>`` clipped to [0, 1].
    """

    name = "gaussian-projection"
    image_like = False

    def __init__(self, m: int = 1) -> None:
        super().__init__()
        self.m = _check_int(m, "m")

    def sample_theta(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return _draw(torch.randn, (x.shape[0], self.m, x[0].numel()), x, generator)

    def apply_theta(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        proj = torch.einsum("bmn,bn->bm", theta, x.flatten(1))
        return torch.cat([theta, proj[:, :, None]], dim=2)

    def as_image(self, y: torch.Tensor) -> torch.Tensor:
        raise ValueError("the ignore baseline needs image measurements, got Gaussian projections (vectors)")

    def unmeasure(self, y: torch.Tensor, theta: torch.Tensor, image_shape: tuple[int, ...] = (1, 28, 28),
                  **kwargs: Any) -> torch.Tensor:  # fmt: skip
        """The minimum-norm image ``theta^T (theta theta^T)^-1 y`` of shape ``image_shape``, clipped to [0, 1]."""
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)} for GaussianProjection.unmeasure")
        a, proj = y[:, :, :-1].double(), y[:, :, -1:].double()
        if math.prod(image_shape) != a.shape[-1]:
            raise ValueError(f"expected image_shape with {a.shape[-1]} entries, got {image_shape}")
        x = a.transpose(1, 2) @ torch.linalg.solve(a @ a.transpose(1, 2), proj)
        return x.reshape(y.shape[0], *image_shape).to(y.dtype).clamp(0.0, 1.0)

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "m": self.m}


MEASUREMENTS: dict[str, type[RandomMeasurement]] = {
    cls.name: cls for cls in (BlockPixels, ConvolveNoise, BlockPatch, KeepPatch, GaussianProjection)
}
"""Measurement models by CLI name."""


def build_measurement(name: str, **settings: Any) -> RandomMeasurement:
    """The measurement model ``name`` (a key of :data:`MEASUREMENTS`) with its settings, e.g.
    ``build_measurement("block-pixels", p=0.9)``; ``build_measurement(**model.spec())`` rebuilds ``model``."""
    if name not in MEASUREMENTS:
        raise ValueError(f"unknown measurement {name!r}: expected one of {sorted(MEASUREMENTS)}")
    try:
        return MEASUREMENTS[name](**settings)
    except TypeError as err:
        raise TypeError(f"measurement {name!r}: {err}") from err


