"""The compressed-sensing benchmark of ``python -m eval cs``: protocol, recovery methods and the ratio.

Paper reproduced: Bora, Jalal, Price, Dimakis 2017, "Compressed Sensing using Generative Models" (CSGM), MNIST
protocol (AshishBora/csgm): ``y = A x + 0.1 * N(0, I)`` with an UNSCALED Gaussian ``A`` (``N(0, 1)`` entries),
images in [0, 1], ``m`` in {10, 25, 50, 100, 200, 300, 400, 500, 750}, 300 test images, per-pixel MSE. Methods:

- ``csgm-vae`` / ``csgm-gan``: :func:`manifold_defense.inversion.invert` on the zoo's ``mnist-vae`` /
  ``mnist-gan``. The VAE uses CSGM's schedule exactly (Adam lr 0.01, 1000 steps, 10 restarts stacked along the
  batch, z-prior 0.1 = "VAE+Reg"). CSGM's loss is the MEAN squared measurement error; with an unscaled ``A`` it
  is about ``n`` times the per-pixel error, which is the scale on which the z-prior weight 0.1 was tuned. The
  GAN (a conv generator, about 12x slower per step than the VAE on a CPU) uses a schedule chosen on VALIDATION
  images (MNIST val 50-65, m in {25, 50, 200}): Adam lr 0.03, 500 steps, 20 restarts pruned to the best one
  (by measurement loss) after 50 steps, z-prior 0.1. On those images it was better than CSGM's schedule at
  every m tried (m = 50: MSE 0.0140 vs 0.0163 on val 58-65) for about 1/7 of the generator passes
  (1450 vs 10000 per image).
- ``csgm-ambient-gan``: the same GAN schedule on the zoo's ``mnist-ambient-gan`` (AmbientGAN: the same architecture
  learned from block-pixels p = 0.9 measurements only), to measure a prior learned without clean images.
- ``lasso-pixel`` / ``lasso-dct`` / ``lasso-wavelet``: :func:`manifold_defense.baselines.lasso_recover`, alpha
  chosen per basis and per ``m`` by :func:`~manifold_defense.baselines.select_alpha` on VALIDATION images
  (MNIST's val split) measured with the same ``A``; the chosen alphas are recorded.
- ``dip``: CS-DIP (Van Veen et al. 2018; :func:`manifold_defense.baselines.dip_recover`): RMSprop lr 1e-3,
  momentum 0.9, CS-DIP's TV term and best-loss iterate, with settings chosen on VALIDATION images (MNIST val
  50-61, m in {10, 25, 50, 100, 200}): ngf 8 (not CS-DIP's 64), 300 iterations, 4 restarts AVERAGED
  pixel-wise (``restart_aggregate="mean"``). Why: with ngf 32-64 the network is expressive enough to fit the
  near-noiseless measurements with images far from the truth (ngf 64, lr 2e-4, m = 100: measurement losses
  2-19 against a noise energy m * 0.01 = 1, yet per-image MSE up to 0.19) and, at lr 1e-3, sometimes fails to
  fit at all (measurement loss 10^3, MSE 0.12); ngf 8-16 is a stronger prior and 20-50x cheaper. At m <= 25 a single fit's
  null-space error is arbitrary (MSE 0.084-0.098 over 4 seeds at m = 10, level with the best Lasso); the mean of
  4 fits is 0.079. CS-DIP's TV weight is set for ``A = randn/sqrt(m)`` and the summed squared error; with CSGM's
  unscaled ``A`` the data term is ``m`` times larger, so the TV weight is ``5e-3 * m``
  (``DIPConfig.tv_weight`` docstring). ``dip_n`` runs DIP on the first ``dip_n`` test images only (CPU budget;
  recorded in the results).
- ``sparse-gen``: Dhar, Grover & Ermon 2018: ``x = G(z) + v`` with an l1 penalty on ``v`` (pixel or DCT
  coefficients), via ``InversionConfig(deviation=..., deviation_weight=...)``. Implementation choice: the joint
  optimisation starts from the ``csgm-<generator>`` solution ``z`` (reused when that method also runs) with
  ``v = 0`` and runs ``sparse_steps`` (300) alternating steps: FISTA on ``v`` (step ``1/L``, ``L = 2||A||^2/m``
  by power iteration; pixel deviations keep ``G(z) + v`` in [0, 1]) and Adam on ``z`` (lr 0.01, 1 restart, the
  generator's z-prior). With ``G(z)`` fixed the ``v`` part is a Lasso around ``G(z)`` solved to its optimum, so at
  large ``m`` (weight 0.002, Lasso's alpha 0.001 on this loss scale) sparse-gen matches pixel Lasso (val images
  0-5, m = 500: MSE 2.3e-5 vs 2.4e-5; m = 750: 1.1e-5 vs 1.2e-5), and at small ``m`` a large weight keeps
  ``v`` ~ 0 (m = 50: 0.012 vs the CSGM start's 0.015). Weights 0.002, 0.01, 0.1, 1 (full and quick); the generator
  (``sparse_generators``), the basis and the weight are chosen per ``m`` on validation images, and so is the
  candidate ``"off"`` (``v = 0``: the CSGM start itself), so that at small ``m`` sparse-gen is the better
  CSGM prior and at large ``m`` a small-weight deviation (a Lasso-like correction around ``G(z)``); the output is
  clipped to [0, 1] (as the Lasso's).

Seeds: ``A`` for ``m`` is ``GaussianMatrix(m, seed=seed + m)``, shared by every method (and by the validation
images); test noise ``torch.Generator().manual_seed(seed + 10_000 + m)``, validation noise ``seed + 20_000 + m``;
latent restarts / DIP networks of test image ``i`` use seed ``seed + i`` and of validation image ``i``
``seed + 100_000 + i``.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from manifold_defense.baselines import DEFAULT_ALPHAS, DIPConfig, dip_recover, lasso_recover, select_alpha
from manifold_defense.inversion import GaussianMatrix, InversionConfig, LinearOperator, invert, measure
from manifold_defense.inversion.diffusion_posterior import DiffPIRConfig
from manifold_defense.inversion.operators import MeasurementOperator

__all__ = [
    "EXTRA_METHODS",
    "GENERATORS",
    "IMAGE_SHAPE",
    "METHODS",
    "CSProtocol",
    "MethodOutput",
    "check_methods",
    "full_protocol",
    "measurements_to_reach",
    "per_image_mse",
    "quick_protocol",
    "recover_csgm",
    "recover_dip",
    "recover_lasso",
    "recover_sparse_gen",
    "select_sparse_gen",
]

log = logging.getLogger(__name__)

IMAGE_SHAPE: tuple[int, int, int] = (1, 28, 28)
#: Method names, in the order of the results.
METHODS: tuple[str, ...] = (
    "csgm-vae",
    "csgm-gan",
    "csgm-ambient-gan",
    "lasso-pixel",
    "lasso-dct",
    "lasso-wavelet",
    "dip",
    "sparse-gen",
)
#: Methods run only when named (``--methods``): ``diffpir-ddpm`` (DiffPIR with ``mnist-ddpm``) needs the optional
#: deepinv extra (:mod:`manifold_defense.inversion.diffusion_posterior`).
EXTRA_METHODS: tuple[str, ...] = ("diffpir-ddpm",)
#: Zoo generator behind each CSGM method.
GENERATORS: dict[str, str] = {
    "csgm-vae": "mnist-vae",
    "csgm-gan": "mnist-gan",
    "csgm-ambient-gan": "mnist-ambient-gan",
}

CSGM_M_GRID: tuple[int, ...] = (10, 25, 50, 100, 200, 300, 400, 500, 750)


@dataclass(frozen=True)
class CSProtocol:
    """Every setting of the benchmark (defaults: the full protocol; :func:`quick_protocol` for the CPU check).

    Attributes:
        quick: whether this is the reduced quick protocol (reported in the outputs).
        n_images: test images (the first ``n_images`` of MNIST's test split).
        n_val: validation images (MNIST's val split) for the Lasso alpha and sparse-gen selection.
        m_grid: numbers of Gaussian measurements, strictly increasing, each ``>= 1``.
        noise_std: std of the additive measurement noise (CSGM: 0.1).
        seed: base seed (see the module docstring for every derived seed).
        csgm_lr, csgm_steps, csgm_restarts: CSGM's Adam schedule (0.01, 1000, 10), used for ``csgm-vae``.
        gan_lr, gan_steps, gan_restarts, gan_prune_after: the validation-chosen schedule of ``csgm-gan``
            (0.03, 500, 20, 50: the restarts are pruned to the best one after ``gan_prune_after`` steps;
            ``None`` keeps all restarts).
        z_prior_vae, z_prior_gan: z-prior weights (CSGM "VAE+Reg": 0.1).
        batch: images per :func:`invert` call (rows = ``batch * restarts``).
        lasso_alphas: candidate alphas for :func:`select_alpha`.
        lasso_max_iter: coordinate-descent iterations per fit.
        dip_ngf, dip_iters, dip_lr, dip_restarts: DIP settings (validation-chosen 8, 300, 1e-3, 4; CS-DIP:
            64, 1000, 1e-3, 1).
        dip_aggregate: ``"mean"`` (average the restarts, chosen on validation) or ``"best"`` (CS-DIP).
        dip_tv_weight: TV weight on CS-DIP's normalized scale; multiplied by ``m`` for the unscaled ``A``.
        dip_chunk: networks fitted together (``min(dip_chunk, images * restarts)`` is used).
        dip_n: ``None`` (all test images) or DIP's test images, the first ``dip_n`` (CPU budget).
        sparse_generator: zoo generator of sparse-gen in the reconstruction grids.
        sparse_generators: generators tried by sparse-gen's validation selection (CS benchmark).
        sparse_bases: deviation bases tried on validation (``"pixel"``, ``"dct"``).
        sparse_weights: deviation l1 weights tried on validation.
        sparse_steps: joint (z, v) steps after the CSGM start.
        grid_images: test images shown in the reconstruction grids.
        grid_m: ``m`` of ``grid_cs.png`` (``None``: the grid value closest to 100 in log scale).
        grid_1bit_m: Gaussian measurements of the 1-bit CS grid.
        grid_sparse_weight: deviation weight (DCT basis) of sparse-gen in the pixel-domain grids (inpainting,
            super-resolution), whose per-entry loss is about ``n`` times smaller than Gaussian CS's.
        grid_dip_tv_weight: DIP's TV weight for the pixel-domain grids (CS-DIP's normalized scale).
        diffpir: ``diffpir-ddpm``'s settings (its aggregate is chosen per ``m`` on validation images).
    """

    quick: bool = False
    n_images: int = 300
    n_val: int = 50
    m_grid: tuple[int, ...] = CSGM_M_GRID
    noise_std: float = 0.1
    seed: int = 0
    csgm_lr: float = 0.01
    csgm_steps: int = 1000
    csgm_restarts: int = 10
    gan_lr: float = 0.03
    gan_steps: int = 500
    gan_restarts: int = 20
    gan_prune_after: int | None = 50
    z_prior_vae: float = 0.1
    z_prior_gan: float = 0.1
    batch: int = 100
    lasso_alphas: tuple[float, ...] = DEFAULT_ALPHAS
    lasso_max_iter: int = 1000
    dip_ngf: int = 8
    dip_iters: int = 300
    dip_lr: float = 1e-3
    dip_restarts: int = 4
    dip_aggregate: str = "mean"
    dip_tv_weight: float = 5e-3
    dip_chunk: int = 40
    dip_n: int | None = None
    sparse_generator: str = "mnist-gan"
    sparse_generators: tuple[str, ...] = ("mnist-vae", "mnist-gan")
    sparse_bases: tuple[str, ...] = ("pixel", "dct")
    sparse_weights: tuple[float, ...] = (0.002, 0.01, 0.1, 1.0)
    sparse_steps: int = 300
    grid_images: int = 6
    grid_m: int | None = None
    grid_1bit_m: int = 300
    grid_sparse_weight: float = 1e-3
    grid_dip_tv_weight: float = 5e-3
    diffpir: DiffPIRConfig = dataclasses.field(default_factory=DiffPIRConfig)

    def __post_init__(self) -> None:
        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CSProtocol.{name}: expected an int >= 1, got {value!r}")

        for name in (
            "n_images", "n_val", "csgm_steps", "csgm_restarts", "gan_steps", "gan_restarts", "batch", "lasso_max_iter", "dip_ngf",
            "dip_iters", "dip_restarts", "dip_chunk", "sparse_steps", "grid_images", "grid_1bit_m",
        ):  # fmt: skip
            positive_int(name)
        check_m_grid(self.m_grid)
        for name in ("noise_std", "z_prior_vae", "z_prior_gan", "dip_tv_weight", "grid_dip_tv_weight"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"CSProtocol.{name}: expected a finite float >= 0, got {value!r}")
        for name in ("csgm_lr", "gan_lr", "dip_lr", "grid_sparse_weight"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"CSProtocol.{name}: expected a finite float > 0, got {value!r}")
        for name in ("lasso_alphas", "sparse_weights"):
            values = getattr(self, name)
            if not values or not all(isinstance(a, (int, float)) and 0 < a < math.inf for a in values):
                raise ValueError(
                    f"CSProtocol.{name}: expected a non-empty tuple of floats > 0, got {values!r}"
                )
        if not self.sparse_bases or not set(self.sparse_bases) <= {"pixel", "dct"}:
            raise ValueError(
                f"CSProtocol.sparse_bases: expected a subset of ('pixel', 'dct'), got {self.sparse_bases!r}"
            )
        if self.gan_prune_after is not None and not (
            isinstance(self.gan_prune_after, int) and 0 <= self.gan_prune_after < self.gan_steps
        ):
            raise ValueError(
                f"CSProtocol.gan_prune_after: expected None or an int in [0, gan_steps={self.gan_steps}), "
                f"got {self.gan_prune_after!r}"
            )
        if self.dip_n is not None and (
            isinstance(self.dip_n, bool) or not isinstance(self.dip_n, int) or self.dip_n < 1
        ):
            raise ValueError(f"CSProtocol.dip_n: expected None or an int >= 1, got {self.dip_n!r}")
        if self.dip_aggregate not in ("mean", "best"):
            raise ValueError(
                f"CSProtocol.dip_aggregate: expected 'mean' or 'best', got {self.dip_aggregate!r}"
            )
        if not self.sparse_generators or not set(self.sparse_generators) <= set(GENERATORS.values()):
            raise ValueError(
                f"CSProtocol.sparse_generators: expected a non-empty subset of {sorted(GENERATORS.values())}, "
                f"got {self.sparse_generators!r}"
            )
        if self.sparse_generator not in GENERATORS.values():
            raise ValueError(
                f"CSProtocol.sparse_generator: expected one of {sorted(GENERATORS.values())}, "
                f"got {self.sparse_generator!r}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**62:
            raise ValueError(f"CSProtocol.seed: expected an int in [0, 2**62), got {self.seed!r}")

    def replace(self, **changes: Any) -> CSProtocol:
        """A validated copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    def csgm_config(self, method: str) -> InversionConfig:
        """The :class:`InversionConfig` of ``"csgm-vae"`` (CSGM's schedule) or ``"csgm-gan"`` (the ``gan_*``
        schedule)."""
        if GENERATORS[method] == "mnist-vae":
            return InversionConfig.csgm(
                lr=self.csgm_lr,
                steps=self.csgm_steps,
                restarts=self.csgm_restarts,
                z_prior_weight=self.z_prior_vae,
            )
        prune = self.gan_prune_after if self.gan_restarts > 1 else None
        return InversionConfig.csgm(
            lr=self.gan_lr, steps=self.gan_steps, restarts=self.gan_restarts, z_prior_weight=self.z_prior_gan,
            prune_after=prune, prune_keep=1,
        )  # fmt: skip

    @property
    def dip_images(self) -> int:
        """Number of test images DIP runs on."""
        return self.n_images if self.dip_n is None else min(self.dip_n, self.n_images)

    def to_json(self) -> dict[str, Any]:
        """All settings as JSON-ready values."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def full_protocol(**overrides: Any) -> CSProtocol:
    """CSGM's MNIST protocol with CS-DIP's DIP settings (see :class:`CSProtocol` defaults)."""
    return CSProtocol(**overrides)


#: What the quick protocol reduces, applied by :func:`quick_protocol`.
QUICK_CHANGES: dict[str, Any] = {
    "quick": True,
    "n_images": 10,
    "n_val": 10,
    "m_grid": (50, 200),
    "csgm_steps": 300,
    "csgm_restarts": 3,
    "gan_steps": 300,
    "gan_restarts": 10,
    "gan_prune_after": 30,
    "batch": 10,
    "lasso_alphas": (1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0),
    "sparse_bases": ("pixel",),
    "sparse_weights": (0.002, 0.01, 0.1, 1.0),
    "grid_images": 4,
    "grid_1bit_m": 200,
}


def quick_protocol(**overrides: Any) -> CSProtocol:
    """The reduced CPU check (:data:`QUICK_CHANGES`), then ``overrides``."""
    return CSProtocol(**{**QUICK_CHANGES, **overrides})


def quick_reductions() -> dict[str, dict[str, Any]]:
    """``{setting: {"full": value, "quick": value}}`` for every setting the quick protocol changes."""
    full = full_protocol().to_json()
    quick = quick_protocol().to_json()
    return {k: {"full": full[k], "quick": quick[k]} for k in QUICK_CHANGES if k != "quick"}


def check_m_grid(m_grid: Sequence[int]) -> tuple[int, ...]:
    """Validate a grid of measurement counts: non-empty, ints >= 1, strictly increasing."""
    values = tuple(m_grid)
    if not values:
        raise ValueError("expected at least one number of measurements m, got none")
    for m in values:
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"expected every m to be an int >= 1, got {m!r}")
    if any(b <= a for a, b in itertools.pairwise(values)):
        raise ValueError(f"expected strictly increasing, distinct m values, got {list(values)}")
    return values


def check_methods(methods: Sequence[str]) -> tuple[str, ...]:
    """Validate a subset of :data:`METHODS` + :data:`EXTRA_METHODS` (returned in that order)."""
    known = METHODS + EXTRA_METHODS
    unknown = [name for name in methods if name not in known]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}: expected names from {list(known)}")
    if not methods:
        raise ValueError(f"expected at least one method from {list(known)}, got none")
    return tuple(name for name in known if name in methods)


# ------------------------------------------------------------------------------------------ the ratio


def measurements_to_reach(m_grid: Sequence[float], errors: Sequence[float], target: float) -> float | None:
    """Smallest ``m`` at which the error curve reaches ``target``, linearly interpolated in ``log m``.

    The curve is read left to right: at the first grid point ``j`` with ``errors[j] <= target`` the crossing is
    placed between ``m[j-1]`` and ``m[j]`` where the straight line (error against ``log m``) meets ``target``.
    Returns ``m[0]`` when the first point already reaches it (an upper bound), ``None`` when no point does.

    Args:
        m_grid: increasing positive measurement counts.
        errors: error at each ``m`` (same length); non-finite entries never count as reaching the target.
        target: the error to reach.
    """
    ms = [float(v) for v in m_grid]
    es = [float(v) for v in errors]
    if len(ms) != len(es) or not ms:
        raise ValueError(f"expected equally long, non-empty m and error lists, got {len(ms)} and {len(es)}")
    if any(v <= 0 for v in ms) or any(b <= a for a, b in itertools.pairwise(ms)):
        raise ValueError(f"expected strictly increasing positive m, got {ms}")
    for j, e in enumerate(es):
        if math.isfinite(e) and e <= target:
            if j == 0:
                return ms[0]
            e0 = es[j - 1]
            if not math.isfinite(e0) or e0 <= e:
                return ms[j]
            t = (e0 - target) / (e0 - e)
            return math.exp(math.log(ms[j - 1]) + t * (math.log(ms[j]) - math.log(ms[j - 1])))
    return None


# ------------------------------------------------------------------------------------------ methods


@dataclass(frozen=True)
class MethodOutput:
    """Reconstructions ``(B, C, H, W)`` on CPU in [0, 1], wall seconds of the test-time recovery, and what was
    chosen on validation images (``{}`` when nothing)."""

    x_hat: torch.Tensor
    seconds: float
    selection: dict[str, Any]
    z: torch.Tensor | None = None


def per_image_mse(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-pixel MSE of each image ``(B,)`` (CSGM's error metric)."""
    return (x_hat.detach().cpu().double() - x.detach().cpu().double()).pow(2).flatten(1).mean(1)


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _take(y: Any, rows: slice) -> Any:
    return y[rows]


def recover_csgm(
    generator: nn.Module,
    y: torch.Tensor,
    operator: MeasurementOperator,
    config: InversionConfig,
    seeds: Sequence[int],
    batch: int,
    z_init: torch.Tensor | None = None,
) -> MethodOutput:
    """CSGM (or any :func:`invert` config) over ``y`` in chunks of ``batch`` images; timed."""
    start = time.perf_counter()
    xs, zs = [], []
    for rows in _chunks(y.shape[0], batch):
        inv = invert(
            generator,
            _take(y, rows),
            operator,
            config,
            seeds=list(seeds[rows]),
            z_init=None if z_init is None else z_init[rows],
        )
        xs.append(inv.x_hat.detach().clamp(0, 1).cpu())
        zs.append(inv.z.detach())
    return MethodOutput(torch.cat(xs), time.perf_counter() - start, {}, torch.cat(zs))


def recover_lasso(
    A: np.ndarray,
    y: torch.Tensor,
    basis: str,
    y_val: torch.Tensor,
    x_val: torch.Tensor,
    protocol: CSProtocol,
    n_jobs: int = 1,
) -> MethodOutput:
    """Lasso in ``basis`` with alpha chosen by :func:`select_alpha` on the validation pair ``(y_val, x_val)``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sel = select_alpha(
            A,
            y_val.detach().cpu().double().flatten(1).numpy(),
            x_val.detach().cpu().double().numpy(),
            IMAGE_SHAPE,
            basis,
            protocol.lasso_alphas,
            max_iter=protocol.lasso_max_iter,
            n_jobs=n_jobs,
        )
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x_hat = lasso_recover(
            A,
            y.detach().cpu().double().flatten(1).numpy(),
            IMAGE_SHAPE,
            basis,
            sel.alpha,
            max_iter=protocol.lasso_max_iter,
            n_jobs=n_jobs,
        )
    seconds = time.perf_counter() - start
    selection = {
        "alpha": sel.alpha,
        "val_mse_per_alpha": dict(
            zip([str(a) for a in sel.alphas], [round(v, 6) for v in sel.mse_per_alpha], strict=True)
        ),
        "at_grid_edge": any("edge of the grid" in str(w.message) for w in caught),
    }
    return MethodOutput(torch.from_numpy(x_hat).float(), seconds, selection)


def recover_dip(
    y: torch.Tensor,
    operator: Callable[[torch.Tensor], torch.Tensor],
    protocol: CSProtocol,
    tv_weight: float,
    seeds: Sequence[int],
    device: torch.device,
) -> MethodOutput:
    """CS-DIP with the protocol's settings and the given (already scaled) TV weight."""
    config = DIPConfig(
        ngf=protocol.dip_ngf,
        num_iter=protocol.dip_iters,
        lr=protocol.dip_lr,
        num_restarts=protocol.dip_restarts,
        restart_aggregate=protocol.dip_aggregate,
        tv_weight=tv_weight,
        seed=protocol.seed,
    )
    start = time.perf_counter()
    result = dip_recover(
        y.to(device),
        operator,
        IMAGE_SHAPE,
        config,
        device=device,
        seeds=list(seeds),
        chunk_size=min(protocol.dip_chunk, y.shape[0] * protocol.dip_restarts),
    )
    return MethodOutput(result.x_hat.detach().clamp(0, 1).cpu(), time.perf_counter() - start, {})


def _sparse_config(
    protocol: CSProtocol, generator: str, basis: str, weight: float, z_prior_weight: float | None = None
) -> InversionConfig:
    """Sparse-gen's joint (z, v) schedule: Adam lr 0.01 (CSGM's) on ``z``, FISTA on ``v``, ``sparse_steps``,
    1 restart; pixel deviations keep ``G(z) + v`` in [0, 1] (the images' range) inside the proximal step."""
    prior = protocol.z_prior_gan if generator == "mnist-gan" else protocol.z_prior_vae
    return InversionConfig.csgm(
        lr=protocol.csgm_lr,
        steps=protocol.sparse_steps,
        restarts=1,
        z_prior_weight=prior if z_prior_weight is None else z_prior_weight,
        deviation=basis,
        deviation_weight=weight,
        deviation_range=(0.0, 1.0) if basis == "pixel" else None,
    )


#: The selection candidate "no deviation": sparse-gen returns its CSGM start.
OFF = "off"


def select_sparse_gen(
    generators: dict[str, nn.Module],
    y_val: torch.Tensor,
    x_val: torch.Tensor,
    operator: MeasurementOperator,
    base_val: dict[str, MethodOutput],
    protocol: CSProtocol,
    seeds: Sequence[int],
) -> dict[str, Any]:
    """Choose sparse-gen's (generator, basis, weight) on validation images.

    Args:
        generators: zoo name -> generator, for every name in ``protocol.sparse_generators``.
        y_val, x_val: validation measurements and images.
        operator: the measurement operator of ``y_val``.
        base_val: zoo name -> the CSGM start on the validation images (its ``z`` is the joint start).
        protocol: ``sparse_bases`` x ``sparse_weights`` are tried, plus ``"off"`` (the CSGM start itself).
        seeds: per validation image seeds.

    Returns:
        ``{"generator", "basis", "weight", "val_mse": {"gen:basis:weight": mse}, "csgm_start_val_mse"}``;
        ``basis`` is ``"off"`` (``weight`` None) when no deviation did better than the start.
    """
    scores: dict[str, float] = {}
    starts: dict[str, float] = {}
    best: tuple[float, str, str, float | None] | None = None
    for gen in protocol.sparse_generators:
        start_mse = float(per_image_mse(base_val[gen].x_hat, x_val).mean())
        starts[gen] = round(start_mse, 6)
        scores[f"{gen}:{OFF}"] = round(start_mse, 6)
        if best is None or start_mse < best[0]:
            best = (start_mse, gen, OFF, None)
        for basis in protocol.sparse_bases:
            for weight in protocol.sparse_weights:
                out = recover_csgm(
                    generators[gen], y_val, operator, _sparse_config(protocol, gen, basis, weight), seeds,
                    protocol.batch, z_init=base_val[gen].z,
                )  # fmt: skip
                mse = float(per_image_mse(out.x_hat, x_val).mean())
                scores[f"{gen}:{basis}:{weight:g}"] = round(mse, 6)
                if mse < best[0]:
                    best = (mse, gen, basis, weight)
    assert best is not None  # internal invariant: the grids are non-empty (validated)
    return {
        "generator": best[1],
        "basis": best[2],
        "weight": best[3],
        "val_mse": scores,
        "csgm_start_val_mse": starts,
    }


def recover_sparse_gen(
    generator: nn.Module,
    y: torch.Tensor,
    operator: MeasurementOperator,
    base: MethodOutput,
    basis: str,
    weight: float | None,
    protocol: CSProtocol,
    seeds: Sequence[int],
    z_prior_weight: float | None = None,
    generator_name: str = "mnist-gan",
) -> MethodOutput:
    """Sparse-gen from the CSGM start ``base``; its seconds include ``base.seconds``. ``basis="off"`` returns the
    start. ``z_prior_weight`` overrides the generator's (the grids' pixel-domain operators use a rescaled one)."""
    if basis == OFF or weight is None:
        return MethodOutput(base.x_hat, base.seconds, {"basis": OFF, "weight": None}, base.z)
    config = _sparse_config(protocol, generator_name, basis, weight, z_prior_weight)
    out = recover_csgm(generator, y, operator, config, seeds, protocol.batch, z_init=base.z)
    return MethodOutput(out.x_hat, out.seconds + base.seconds, {"basis": basis, "weight": weight}, out.z)


def gaussian_operator(m: int, protocol: CSProtocol, device: torch.device) -> GaussianMatrix:
    """The seeded CSGM-scaled Gaussian matrix for ``m`` (seed ``protocol.seed + m``)."""
    return GaussianMatrix(m, IMAGE_SHAPE, scaling="csgm", seed=protocol.seed + m).to(device)


def noisy_measurements(
    operator: MeasurementOperator, x: torch.Tensor, noise_std: float, seed: int
) -> torch.Tensor:
    """``measure(operator, x, noise_std)`` with a CPU generator seeded ``seed``."""
    y = measure(operator, x, noise_std=noise_std, generator=torch.Generator().manual_seed(seed))
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"expected tensor measurements, got {type(y).__name__}")
    return y.detach()


def operator_matrix(operator: LinearOperator) -> np.ndarray:
    """Dense float64 numpy matrix ``(m, n)`` of a linear operator (for the Lasso)."""
    return operator.matrix(torch.float64).cpu().numpy()
