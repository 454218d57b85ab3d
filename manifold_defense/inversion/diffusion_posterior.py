"""Compressed sensing with the library's diffusion prior: deepinv's DiffPIR driven by ``mnist-ddpm`` (optional extra).

Paper: Zhu, Zhang, Liang, Cao, Wen, Timofte, Van Gool, "Denoising Diffusion Models for Plug-and-Play Image
Restoration" (DiffPIR, CVPRW 2023), as implemented by `deepinv <https://deepinv.github.io>`_
(``deepinv.sampling.DiffPIR``): for decreasing noise levels, denoise the current iterate with the diffusion model
(its clean-image prediction), pull the prediction towards the measurements by the proximal map of the data term
``||A x - y||^2`` (weight ``rho_t = lambda sigma_n^2 / sigma_t^2``), and re-noise it DDIM-style with a share
``zeta`` of fresh noise. One network pass per step and no backward pass: about 100 UNet passes per image where DPS
(Chung et al. 2023) needs about 1000 passes each with a backward pass through the UNet (measured in
``docs/compressed-sensing.md``: DiffPIR is the one a CPU can run on the benchmark).

Three pieces, usable on their own:

- :class:`DDPMDenoiser`: the Gaussian denoiser ``D(x, sigma)`` deepinv's samplers expect (images in [0, 1],
  ``x = x0 + sigma * n``, ``sigma`` on the [0, 1] scale) from a :class:`~manifold_defense.diffusion.DiffusionModel`,
  whose network predicts the noise of ``x_t = sqrt(abar_t) (2 x0 - 1) + sqrt(1 - abar_t) eps`` on the [-1, 1]
  scale. ``x`` is such an ``x_t`` divided by ``2 sqrt(abar)`` and shifted: with ``abar = 1 / (1 + 4 sigma^2)``,
  ``x_t = sqrt(abar) (2 x - 1)`` has exactly the variance-preserving form, the network is evaluated at the
  timestep ``t`` whose noise level ``sqrt(1 - abar_t) / (2 sqrt(abar_t))`` is nearest to ``sigma`` (exact for
  DiffPIR, whose schedule is the same linear-beta one), and the Tweedie estimate is ``x0 = x - sigma * eps``.
- :func:`to_deepinv`: the other direction of :func:`~manifold_defense.inversion.deepinv_adapter.from_deepinv`: any
  :class:`~manifold_defense.inversion.operators.LinearOperator` of this library as a ``deepinv.physics.LinearPhysics``
  (``A``, ``A_adjoint`` are the operator's; ``prox_l2`` is exact, from a thin SVD of the dense matrix, instead of
  deepinv's iterative solver, which does not converge at DiffPIR's early steps where the data weight is ~1e5).
- :func:`diffpir_samples` / :func:`diffpir_recover` (with :class:`DiffPIRConfig` and
  :func:`select_diffpir_aggregate`): the CS method ``diffpir-ddpm`` of ``manifold-defense cs``: ``samples``
  posterior samples per image, combined by their mean or by the best measurement fit (chosen on validation
  images). :func:`dps_recover` runs deepinv's DPS with the same denoiser (for the cost comparison).

Randomness: DiffPIR draws its noise from torch's global generator for the whole batch at once, so a result depends
on the images that share its batch; :func:`diffpir_recover` runs fixed chunks of ``batch`` images, each under its own
seed inside ``torch.random.fork_rng`` (the caller's global RNG state is untouched), so a call is deterministic for
given ``(y, seeds, batch)``.

deepinv is imported only when :func:`to_deepinv` or :func:`diffpir_recover` runs; :class:`DDPMDenoiser` needs
only torch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from manifold_defense.diffusion import DiffusionModel

from .operators import LinearOperator

__all__ = [
    "AGGREGATES",
    "DDPMDenoiser",
    "DiffPIRConfig",
    "DiffPIRSamples",
    "diffpir_recover",
    "diffpir_samples",
    "dps_recover",
    "select_diffpir_aggregate",
    "to_deepinv",
]


def _deepinv() -> Any:
    """The ``deepinv`` module, or ``ImportError`` saying how to install it."""
    try:
        import deepinv
    except ImportError as err:
        raise ImportError(
            "diffpir-ddpm needs deepinv: pip install 'manifold-defense[deepinv]' (or pip install deepinv)"
        ) from err
    return deepinv


class DDPMDenoiser(nn.Module):
    """A :class:`DiffusionModel` as a Gaussian denoiser ``D(x, sigma)`` on [0, 1] images (deepinv's convention).

    Args:
        model: the diffusion prior (kept as the sub-module ``model``, not copied; put it in eval mode).

    Shapes: ``forward(x, sigma)``: ``x`` ``(B, *model.image_shape)``, ``sigma`` a float, a 0-d tensor or ``(B,)``
    (``(B, 1, 1, 1)`` too) -> the clean-image estimate ``(B, *model.image_shape)``, not clipped (a sampler clips).
    Differentiable in ``x`` (DPS differentiates through it).

    Example:
        >>> D = DDPMDenoiser(zoo.load("mnist-ddpm"))               # doctest: +SKIP
        >>> x0 = D(x + 0.2 * torch.randn_like(x), 0.2)             # doctest: +SKIP
    """

    def __init__(self, model: DiffusionModel) -> None:
        super().__init__()
        if not isinstance(model, DiffusionModel):
            raise TypeError(
                f"expected a manifold_defense.diffusion.DiffusionModel, got {type(model).__name__}"
            )
        self.model = model

    @property
    def noise_levels(self) -> Tensor:
        """``(T,)`` noise std on the [0, 1] scale at each timestep: ``sqrt(1 - abar_t) / (2 sqrt(abar_t))``."""
        abar = self.model.alpha_bar.double()
        return ((1.0 - abar) / abar).sqrt() / 2.0

    def timestep(self, sigma: Tensor) -> Tensor:
        """Integer timesteps ``(B,)`` whose noise level is nearest to each ``sigma`` ``(B,)`` (>= 0, [0, 1] scale)."""
        levels = self.noise_levels.to(sigma.device)
        return (levels[None, :] - sigma.double().reshape(-1, 1)).abs().argmin(dim=1)

    def _sigma(self, sigma: float | Tensor, x: Tensor) -> Tensor:
        s = torch.as_tensor(sigma, device=x.device)
        if not s.is_floating_point() and s.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"expected sigma as a real number or tensor, got dtype {s.dtype}")
        b = x.shape[0]
        if s.numel() == 1:
            s = s.reshape(1).expand(b)
        elif s.numel() == b and (s.ndim == 1 or s.shape == (b, 1, 1, 1)):
            s = s.reshape(b)
        else:
            raise ValueError(
                f"expected sigma as a scalar or one value per image ({b},), got shape {tuple(s.shape)}"
            )
        s = s.to(x.dtype)
        if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
            raise ValueError(f"expected finite noise levels sigma >= 0, got {s.tolist()}")
        return s

    def forward(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """The clean-image estimate of ``x = x0 + sigma * N(0, I)`` (see the module docstring); ``x`` not modified."""
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"expected x as a floating torch.Tensor, got {type(x).__name__}")
        if x.ndim != 4 or tuple(x.shape[1:]) != tuple(self.model.image_shape):
            raise ValueError(
                f"expected x of shape (B, *{tuple(self.model.image_shape)}), got {tuple(x.shape)}"
            )
        s = self._sigma(sigma, x)
        abar = (1.0 / (1.0 + 4.0 * s.double() ** 2)).to(x.dtype).view(-1, 1, 1, 1)
        x_t = abar.sqrt() * (2.0 * x - 1.0)
        dtype = next(self.model.parameters()).dtype  # the network's: deepinv's DPS runs in float64 by default
        eps = self.model.eps(x_t.to(dtype), self.timestep(s)).to(x.dtype)
        return x - s.view(-1, 1, 1, 1) * eps


# ---------------------------------------------------------------------------------------------- the physics


def to_deepinv(operator: LinearOperator, noise_std: float = 0.0) -> Any:
    """A :class:`LinearOperator` of this library as a ``deepinv.physics.LinearPhysics`` (deepinv's solvers on it).

    Args:
        operator: any linear operator with a dense :meth:`~LinearOperator.matrix` (``(m, n)``; built once, on the
            operator's device).
        noise_std: std of the measurement noise, set as the physics' ``GaussianNoise`` (DiffPIR reads it).

    Returns:
        the physics: ``A`` and ``A_adjoint`` call ``operator`` (batched, on its device); ``prox_l2(z, y, gamma)``
        (``argmin_u gamma/2 ||A u - y||^2 + 1/2 ||u - z||^2``) is exact, through the thin SVD ``A = U S V^T``:
        ``u = z - V (gamma S^2 / (1 + gamma S^2)) V^T z + V (gamma S / (1 + gamma S^2)) U^T y`` (float64; ``gamma``
        up to 1e12, a scalar or one per image).

    Raises:
        ImportError: deepinv is missing. TypeError: not a ``LinearOperator``. ValueError: a bad ``noise_std``.
    """
    dinv = _deepinv()
    if not isinstance(operator, LinearOperator):
        raise TypeError(f"expected a manifold_defense LinearOperator, got {type(operator).__name__}")
    if not (isinstance(noise_std, (int, float)) and math.isfinite(noise_std) and noise_std >= 0):
        raise ValueError(f"expected noise_std as a finite float >= 0, got {noise_std!r}")
    if operator.input_shape is None:
        raise ValueError(f"expected an operator with a known input shape, got {type(operator).__name__}")
    matrix = operator.matrix(torch.float64)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    keep = s > s.max() * 1e-12
    shape = tuple(operator.input_shape)

    base: Any = dinv.physics.LinearPhysics

    class OperatorPhysics(base):
        """``operator`` as a deepinv ``LinearPhysics`` with an exact ``prox_l2``."""

        def __init__(self) -> None:
            super().__init__(noise_model=dinv.physics.GaussianNoise(sigma=float(noise_std)))
            self.operator = operator
            self.register_buffer("_u", u[:, keep].contiguous())
            self.register_buffer("_s", s[keep].contiguous())
            self.register_buffer("_v", vh[keep].T.contiguous())

        def A(self, x: Tensor, **kwargs: Any) -> Tensor:  # deepinv's name
            return self.operator(x)

        def A_adjoint(self, y: Tensor, **kwargs: Any) -> Tensor:
            return self.operator.adjoint(y)

        def prox_l2(self, z: Tensor, y: Tensor, gamma: float | Tensor, **kwargs: Any) -> Tensor:
            b = z.shape[0]
            g = torch.as_tensor(gamma, dtype=torch.float64, device=z.device).reshape(-1, 1).clamp(max=1e12)
            if g.shape[0] not in (1, b):
                raise ValueError(
                    f"expected gamma as a scalar or one per image ({b},), got {g.shape[0]} values"
                )
            s2 = self._s**2
            zf = z.reshape(b, -1).double()
            out = zf - ((zf @ self._v) * (g * s2 / (1 + g * s2))) @ self._v.T
            out = out + ((y.reshape(b, -1).double() @ self._u) * (g * self._s / (1 + g * s2))) @ self._v.T
            return out.to(z.dtype).reshape(b, *shape)

    return OperatorPhysics().to(matrix.device)


# ---------------------------------------------------------------------------------------------- DiffPIR

AGGREGATES = ("mean", "best")
"""How :class:`DiffPIRSamples` combines an image's samples: their pixel-wise mean, or the best-fitting one."""


@dataclass(frozen=True)
class DiffPIRConfig:
    """Settings of :func:`diffpir_recover` (deepinv's ``DiffPIR`` arguments, the samples per image and how they are
    combined), defaults chosen on validation images (``docs/compressed-sensing.md``).

    Attributes:
        steps: DiffPIR's ``max_iter``: network passes per sample (timesteps quadratically spaced in 0..999).
        lambda_: the data weight ``lambda`` (``rho_t = lambda sigma_n^2 / sigma_t^2``; smaller is a stronger pull
            towards the measurements; DiffPIR's paper: 3-25 for deblurring and super-resolution). On Gaussian CS
            with CSGM's noise it hardly matters: 0.1, 1, 7 and 50 gave validation MSE within 3% at m = 50.
        zeta: share of fresh noise in each re-noising step, in [0, 1] (deepinv's default 0.1; 1.0 here: at m = 200
            validation MSE 0.0006 against 0.0024 at 0.5 and 0.021 at 0.1; at m = 50, 0.054 against 0.071 at 0.7
            and 0.083 at 0.3; the first 8 validation images, one sample each).
        samples: posterior samples per image (rows of the same DiffPIR batch, each its own noise). Four on the
            same 8 validation images: mean 0.038 / best fit 0.046 / one sample 0.054 at m = 50; 0.012 / 0.0065 /
            0.013 at m = 100; 0.0004 / 0.0005 / 0.0006 at m = 200 (hence the per-m choice of the aggregate).
        aggregate: how the samples make one reconstruction: ``"mean"`` (their pixel-wise mean, the posterior-mean
            estimate) or ``"best"`` (the sample whose measurements ``A x`` are closest to ``y``).
        aggregates: candidates for ``aggregate`` tried on validation images by :func:`select_diffpir_aggregate`
            (both are computed from the same samples: the choice costs nothing extra).
    """

    steps: int = 100
    lambda_: float = 1.0
    zeta: float = 1.0
    samples: int = 4
    aggregate: str = "mean"
    aggregates: tuple[str, ...] = AGGREGATES

    def __post_init__(self) -> None:
        for name, low in (("steps", 2), ("samples", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"DiffPIRConfig.{name}: expected an int >= {low}, got {value!r}")
        lam = self.lambda_
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 < lam < math.inf:
            raise ValueError(f"DiffPIRConfig.lambda_: expected a finite float > 0, got {lam!r}")
        if isinstance(self.zeta, bool) or not isinstance(self.zeta, (int, float)) or not 0 <= self.zeta <= 1:
            raise ValueError(f"DiffPIRConfig.zeta: expected a float in [0, 1], got {self.zeta!r}")
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"DiffPIRConfig.aggregate: expected one of {AGGREGATES}, got {self.aggregate!r}")
        if not isinstance(self.aggregates, tuple) or not set(self.aggregates) <= set(AGGREGATES):
            raise ValueError(
                f"DiffPIRConfig.aggregates: expected a tuple of {AGGREGATES}, got {self.aggregates!r}"
            )

    def replace(self, **changes: Any) -> DiffPIRConfig:
        """A validated copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class DiffPIRSamples:
    """Posterior samples of :func:`diffpir_samples`.

    Attributes:
        samples: ``(B, K, C, H, W)`` in [0, 1].
        residuals: ``(B, K)`` mean squared measurement error ``mean((A x - y)^2)`` of each sample.
    """

    samples: Tensor
    residuals: Tensor

    def aggregate(self, how: str) -> Tensor:
        """One reconstruction per image ``(B, C, H, W)``: the samples' ``"mean"`` or the ``"best"``-fitting one."""
        if how == "mean":
            return self.samples.mean(dim=1)
        if how == "best":
            idx = self.residuals.argmin(dim=1)
            return self.samples[torch.arange(self.samples.shape[0], device=idx.device), idx]
        raise ValueError(f"expected aggregate one of {AGGREGATES}, got {how!r}")


def _check_call(
    model: object, y: object, operator: object, noise_std: object, batch: object, seeds: Sequence[int] | None
) -> tuple[DiffusionModel, Tensor, list[int]]:
    if not isinstance(model, DiffusionModel):
        raise TypeError(f"expected a manifold_defense.diffusion.DiffusionModel, got {type(model).__name__}")
    if not isinstance(operator, LinearOperator):
        raise TypeError(f"expected a manifold_defense LinearOperator, got {type(operator).__name__}")
    if not (isinstance(noise_std, (int, float)) and math.isfinite(noise_std) and noise_std > 0):
        raise ValueError(
            f"expected noise_std as a finite float > 0 (the data weight needs it), got {noise_std!r}"
        )
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"expected batch as an int >= 1, got {batch!r}")
    if not isinstance(y, Tensor) or not y.is_floating_point():
        raise TypeError(f"expected y as a floating torch.Tensor (B, m), got {type(y).__name__}")
    m = operator.measurement_shape
    if y.ndim < 2 or y.shape[0] < 1 or (m is not None and tuple(y.shape[1:]) != tuple(m)):
        raise ValueError(f"expected measurements y of shape (B, *{m}), got {tuple(y.shape)}")
    if not bool(torch.isfinite(y).all()):
        raise ValueError("expected finite measurements y, got NaN or inf entries")
    if operator.input_shape is not None and tuple(operator.input_shape) != tuple(model.image_shape):
        raise ValueError(
            f"expected an operator on the model's images {tuple(model.image_shape)}, got input shape "
            f"{tuple(operator.input_shape)}"
        )
    n = y.shape[0]
    seed_list = list(range(n)) if seeds is None else [int(s) for s in seeds]
    if len(seed_list) != n or any(s < 0 for s in seed_list):
        raise ValueError(f"expected {n} non-negative seeds (one per image), got {seeds!r}")
    return model, y, seed_list


def diffpir_samples(
    model: nn.Module,
    y: Tensor,
    operator: LinearOperator,
    noise_std: float,
    config: DiffPIRConfig = DiffPIRConfig(),
    *,
    seeds: Sequence[int] | None = None,
    batch: int = 25,
    physics: Any = None,
) -> DiffPIRSamples:
    """``config.samples`` DiffPIR posterior samples per image of linear measurements ``y = A x + noise``.

    Args:
        model: the :class:`~manifold_defense.diffusion.DiffusionModel` on the images' shape
            (``zoo.load("mnist-ddpm")``); eval mode is set for the call and restored.
        y: measurements ``(B, m)`` on the operator's device; not modified.
        operator: the measurement operator (a :class:`LinearOperator`; a deepinv physics through
            :func:`~manifold_defense.inversion.deepinv_adapter.from_deepinv`).
        noise_std: std of the measurement noise (> 0; DiffPIR's data weight is proportional to its square).
        config: :class:`DiffPIRConfig`.
        seeds: one int per image; each chunk of ``batch`` images (``batch * samples`` DiffPIR rows) runs under
            the seed of its first image (default: 0, 1, 2, ... by position).
        batch: images per DiffPIR call.
        physics: the :func:`to_deepinv` physics of ``operator`` (built when ``None``; pass it to reuse its SVD).

    Returns:
        :class:`DiffPIRSamples` on ``y``'s device (DiffPIR's last clean estimates, clipped to [0, 1]).
    """
    dinv = _deepinv()
    if not isinstance(config, DiffPIRConfig):
        raise TypeError(f"expected config as a DiffPIRConfig, got {type(config).__name__}")
    model, y, seed_list = _check_call(model, y, operator, noise_std, batch, seeds)
    physics = to_deepinv(operator, float(noise_std)) if physics is None else physics
    device, k, n = y.device, config.samples, y.shape[0]
    solver = dinv.sampling.DiffPIR(
        model=DDPMDenoiser(model), data_fidelity=dinv.optim.data_fidelity.L2(), sigma=float(noise_std),
        max_iter=config.steps, zeta=config.zeta, lambda_=config.lambda_, device=device,
    )  # fmt: skip
    was_training = model.training
    model.eval()
    outs, residuals = [], []
    try:
        for lo in range(0, n, batch):
            rows = y[lo : lo + batch].repeat_interleave(k, dim=0)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed_list[lo])
                x_init = torch.full((rows.shape[0], *model.image_shape), 0.5, device=device, dtype=rows.dtype)
                x = solver(rows, physics, x_init=x_init).detach().clamp(0.0, 1.0)
            with torch.no_grad():
                residuals.append((operator(x) - rows).pow(2).flatten(1).mean(1).view(-1, k))
            outs.append(x.view(-1, k, *model.image_shape))
    finally:
        model.train(was_training)
    return DiffPIRSamples(torch.cat(outs), torch.cat(residuals))


def diffpir_recover(
    model: nn.Module,
    y: Tensor,
    operator: LinearOperator,
    noise_std: float,
    config: DiffPIRConfig = DiffPIRConfig(),
    *,
    seeds: Sequence[int] | None = None,
    batch: int = 25,
    physics: Any = None,
) -> Tensor:
    """Reconstructions ``(B, *model.image_shape)`` in [0, 1]: :func:`diffpir_samples` combined by
    ``config.aggregate`` (same arguments)."""
    out = diffpir_samples(model, y, operator, noise_std, config, seeds=seeds, batch=batch, physics=physics)
    return out.aggregate(config.aggregate)


def select_diffpir_aggregate(
    model: nn.Module,
    y_val: Tensor,
    x_val: Tensor,
    operator: LinearOperator,
    noise_std: float,
    config: DiffPIRConfig,
    *,
    seeds: Sequence[int] | None = None,
    batch: int = 25,
) -> tuple[DiffPIRConfig, dict[str, float]]:
    """Choose ``aggregate`` among ``config.aggregates`` by per-pixel MSE on validation pairs ``(y_val, x_val)``
    (one set of samples scores every candidate).

    Returns:
        ``(config with the chosen aggregate, {aggregate: validation MSE})``; with at most one candidate no
        samples are drawn: ``(config with it, {})``.
    """
    if len(config.aggregates) <= 1:
        return (config.replace(aggregate=config.aggregates[0]) if config.aggregates else config), {}
    if not isinstance(x_val, Tensor) or x_val.shape[0] != getattr(y_val, "shape", (None,))[0]:
        raise ValueError("expected validation images x_val with one image per measurement row of y_val")
    out = diffpir_samples(model, y_val, operator, noise_std, config, seeds=seeds, batch=batch)
    truth = x_val.detach().double().cpu()
    scores = {
        how: float((out.aggregate(how).double().cpu() - truth).pow(2).mean()) for how in config.aggregates
    }
    return config.replace(aggregate=min(config.aggregates, key=lambda how: scores[how])), scores


def dps_recover(
    model: nn.Module,
    y: Tensor,
    operator: LinearOperator,
    noise_std: float,
    *,
    steps: int = 1000,
    weight: float = 1.0,
    seeds: Sequence[int] | None = None,
    batch: int = 25,
) -> Tensor:
    """deepinv's DPS (Chung et al. 2023: DDPM ancestral steps guided by the gradient of ``||A D(x_t) - y||``
    through the denoiser) with :class:`DDPMDenoiser`; one sample per image, ``(B, *model.image_shape)`` in [0, 1].

    Each step is one network pass and one backward pass through it: the cost DiffPIR avoids. Arguments as
    :func:`diffpir_samples`; ``steps`` and ``weight`` are DPS's ``num_steps`` and guidance weight.
    """
    dinv = _deepinv()
    model, y, seed_list = _check_call(model, y, operator, noise_std, batch, seeds)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"expected steps as an int >= 2, got {steps!r}")
    physics = to_deepinv(operator, float(noise_std))
    device = y.device
    was_training = model.training
    model.eval()
    outs = []
    try:
        for lo in range(0, y.shape[0], batch):
            rows = y[lo : lo + batch]
            gen = torch.Generator(device=device).manual_seed(seed_list[lo])
            solver = dinv.sampling.DPS(
                DDPMDenoiser(model), num_steps=steps, weight=weight, device=device, dtype=torch.float32, rng=gen,
            )  # fmt: skip
            x = solver(rows, physics, x_init=(rows.shape[0], *model.image_shape))
            outs.append(x.detach().clamp(0.0, 1.0))
    finally:
        model.train(was_training)
    return torch.cat(outs)
