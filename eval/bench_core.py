"""Reusable measurements of the projection's cost: timed projections, a per-image loop, FLOP counts, the achieved
FLOP rate of the inner step versus a measured matrix-multiply peak, and cost growth.

Purpose: the performance benchmark of the latent-optimization core (``python -m eval bench``, issue 5), which
compares Defense-GAN's projection schedule (Samangouei, Kabkab, Chellappa, ICLR 2018: SGD momentum 0.7, lr 10,
L = 200 steps, R = 10 restarts) with a fast schedule (encoder warm start, Adam, restart pruning).

Every function takes its models and tensors as arguments and runs on their device (CPU or CUDA); on CUDA the
device is synchronized before every clock read. Timings are wall-clock seconds from ``time.perf_counter``.

FLOPs are counted by :class:`torch.utils.flop_counter.FlopCounterMode` (matrix multiplies and convolutions, a
multiply-add = 2 FLOPs; element-wise work is not counted), never by hand.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from manifold_defense.inversion import InversionConfig, invert
from manifold_defense.modes import frozen

__all__ = [
    "MEMORY_FORMATS",
    "FlopRate",
    "Projection",
    "count_encoder_flops",
    "count_step_flops",
    "flop_rate_sweep",
    "growth_table",
    "images_per_call",
    "matmul_peak",
    "plot_growth",
    "project",
    "project_loop",
    "restart_starts",
    "sync",
]

#: Memory formats tried for the generator's weights in :func:`flop_rate_sweep`.
MEMORY_FORMATS: tuple[str, ...] = ("contiguous", "channels_last")


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work on ``device`` (no-op on CPU), so a following clock read is honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_int(name: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"expected {name} to be an int >= {low}, got {value!r}")
    return value


def _check_images(x: Any) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"expected images as a torch.Tensor (N, C, H, W), got {type(x).__name__}")
    if x.dim() != 4 or x.shape[0] < 1 or not x.is_floating_point():
        raise ValueError(f"expected float images (N >= 1, C, H, W), got {x.dtype} {tuple(x.shape)}")
    return x


def _device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def images_per_call(config: InversionConfig, rows: int) -> int:
    """Images per :func:`invert` call so that one call optimizes about ``rows`` (image, restart) rows.

    Both schedules of the benchmark are run with the same number of rows per generator call, so neither is
    favoured by a batch size that suits the machine better.
    """
    _check_int("rows", rows)
    return max(1, rows // config.restarts)


# ------------------------------------------------------------------------------------------- projections


@dataclass(frozen=True)
class Projection:
    """Result of :func:`project` / :func:`project_loop` (tensors on CPU).

    Attributes:
        x_hat: ``(N, C, H, W)`` projections ``G(z*)``.
        mse: ``(N,)`` per-pixel MSE of ``G(z*)`` versus the image.
        generator_evals: ``(N,)`` generator forward passes (each with its backward w.r.t. ``z``, except the
            last) per image, counting every restart (:attr:`Inversion.generator_evals`).
        encoder_passes: encoder forward passes per image (1 with ``config.init == "encoder"``, else 0).
        seconds: wall time of the whole projection (encoder included).
        images_per_call: images per :func:`invert` call.
    """

    x_hat: Tensor
    mse: Tensor
    generator_evals: Tensor
    encoder_passes: int
    seconds: float
    images_per_call: int

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / self.mse.shape[0]


def project(
    generator: nn.Module,
    x: Tensor,
    config: InversionConfig,
    *,
    encoder: nn.Module | None = None,
    images_per_call: int = 64,
) -> Projection:
    """Project ``x`` onto the generator's range with ``config``, ``images_per_call`` images per :func:`invert`
    call (all restarts of a call batched), timed.

    Args:
        generator: ``(B, k) -> (B, C, H, W)`` in [0, 1], int ``latent_dim``.
        x: ``(N, C, H, W)`` images in [0, 1] on the generator's device.
        config: the projection schedule (Identity operator, per-pixel MSE).
        encoder: needed when ``config.init == "encoder"``.
        images_per_call: images per call, >= 1.
    """
    _check_images(x)
    _check_int("images_per_call", images_per_call)
    enc = encoder if config.init == "encoder" else None
    parts: list[tuple[Tensor, Tensor]] = []
    sync(x.device)
    start = time.perf_counter()
    for i in range(0, x.shape[0], images_per_call):
        inv = invert(generator, x[i : i + images_per_call], config=config, encoder=enc)
        parts.append((inv.x_hat.detach(), inv.generator_evals))
    sync(x.device)
    seconds = time.perf_counter() - start
    x_hat = torch.cat([p[0] for p in parts]).cpu()
    return Projection(
        x_hat=x_hat,
        mse=(x_hat - x.detach().cpu()).pow(2).flatten(1).mean(1),
        generator_evals=torch.cat([p[1] for p in parts]).cpu(),
        encoder_passes=1 if enc is not None else 0,
        seconds=seconds,
        images_per_call=images_per_call,
    )


def restart_starts(
    generator: nn.Module, x: Tensor, config: InversionConfig, encoder: nn.Module | None = None
) -> Tensor:
    """The starting latents ``(N, R, k)`` :func:`invert` uses for ``x`` with ``config`` and default seeds.

    Restart noise ``N(0, init_std^2)`` (``1/sqrt(k)`` when ``init_std`` is ``None``) from a CPU generator seeded
    with ``config.seed``; with ``init == "encoder"`` restart 0 sits at ``encoder(x)`` and the others at
    ``encoder(x) + noise``. Used to run the same restarts one at a time (:func:`project_loop`).
    """
    _check_images(x)
    k = int(generator.latent_dim)  # type: ignore[arg-type]
    restarts = config.restarts
    std = config.init_std if config.init_std is not None else 1.0 / math.sqrt(k)
    noise = torch.randn(restarts, k, generator=torch.Generator().manual_seed(config.seed))
    noise = noise.to(device=x.device, dtype=x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
    if config.init != "encoder":
        return std * noise
    if encoder is None:
        raise ValueError("expected an encoder with config.init='encoder', got None")
    with torch.no_grad(), frozen(encoder):
        center = encoder(x)
    noise = torch.cat([torch.zeros_like(noise[:, :1]), noise[:, 1:]], dim=1)
    return center.unsqueeze(1) + std * noise


def project_loop(
    generator: nn.Module,
    x: Tensor,
    config: InversionConfig,
    *,
    encoder: nn.Module | None = None,
    batch_restarts: bool = False,
) -> Projection:
    """The one-image-at-a-time design (as CS-DIP runs it): each image, and (unless ``batch_restarts``) each of
    its restarts, optimized by its own :func:`invert` call; the best restart is kept.

    Same starting latents and schedule as :func:`project` (``config`` must not prune restarts: a lone restart
    cannot be compared with the others mid-run), so the results match the batched ones up to float rounding.

    Args:
        generator, x, config, encoder: as :func:`project`.
        batch_restarts: ``True``: one call per image with its ``R`` restarts batched; ``False``: one call per
            (image, restart) pair, ``B = 1`` rows per generator call.
    """
    _check_images(x)
    if config.prune_after is not None:
        raise ValueError(
            f"expected a config without restart pruning for the per-image loop, got prune_after={config.prune_after}"
        )
    device = x.device
    sync(device)
    start = time.perf_counter()
    starts = restart_starts(generator, x, config, encoder)
    single = config.replace(restarts=1)
    best_x, evals = [], []
    for i in range(x.shape[0]):
        xi = x[i : i + 1]
        if batch_restarts:
            inv = invert(generator, xi, config=config, z_init=starts[i : i + 1])
            best_x.append(inv.x_hat.detach())
            evals.append(int(inv.generator_evals[0]))
            continue
        losses, images, count = [], [], 0
        for r in range(config.restarts):
            inv = invert(generator, xi, config=single, z_init=starts[i : i + 1, r])
            losses.append(float(inv.loss[0]))
            images.append(inv.x_hat.detach())
            count += int(inv.generator_evals[0])
        best_x.append(images[min(range(len(losses)), key=losses.__getitem__)])
        evals.append(count)
    sync(device)
    seconds = time.perf_counter() - start
    x_hat = torch.cat(best_x).cpu()
    return Projection(
        x_hat=x_hat,
        mse=(x_hat - x.detach().cpu()).pow(2).flatten(1).mean(1),
        generator_evals=torch.tensor(evals, dtype=torch.long),
        encoder_passes=1 if config.init == "encoder" else 0,
        seconds=seconds,
        images_per_call=1,
    )


# ---------------------------------------------------------------------------------------------- FLOPs


def _inner_step(generator: nn.Module, z: Tensor, x: Tensor) -> Tensor:
    """One optimizer step's work of the projection: ``G(z)``, per-pixel MSE summed over rows, gradient w.r.t.
    ``z`` (parameters frozen, so no weight gradients)."""
    z = z.detach().requires_grad_(True)
    loss = (generator(z) - x).pow(2).flatten(1).mean(1).sum()
    (grad,) = torch.autograd.grad(loss, z)
    return grad


def count_step_flops(generator: nn.Module, image_shape: Sequence[int], batch: int = 4) -> float:
    """FLOPs per row of one inner step (generator forward + backward w.r.t. ``z``), counted by
    ``FlopCounterMode`` on a ``batch``-row step (the count is linear in the rows).

    ``FlopCounterMode`` does not support ``torch.autograd.grad``, so the count uses ``loss.backward()`` on a leaf
    ``z`` with the generator's parameters frozen: the same operators as :func:`_inner_step`.
    """
    _check_int("batch", batch)
    device = _device_of(generator)
    k = int(generator.latent_dim)  # type: ignore[arg-type]
    z = torch.randn(batch, k, device=device).requires_grad_(True)
    x = torch.rand(batch, *image_shape, device=device)
    with frozen(generator), FlopCounterMode(display=False) as counter:
        (generator(z) - x).pow(2).flatten(1).mean(1).sum().backward()
    return counter.get_total_flops() / batch


def count_encoder_flops(encoder: nn.Module, image_shape: Sequence[int]) -> float:
    """FLOPs of one encoder forward pass per image (``FlopCounterMode``)."""
    device = _device_of(encoder)
    x = torch.rand(2, *image_shape, device=device)
    with frozen(encoder), torch.no_grad(), FlopCounterMode(display=False) as counter:
        encoder(x)
    return counter.get_total_flops() / 2


def matmul_peak(device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    """Measured float32 matrix-multiply rate [FLOP/s]: best of ``repeats`` ``torch.mm`` of two ``size x size``
    matrices (``2 size^3`` FLOPs each) with the current thread count, after one warm-up."""
    _check_int("size", size)
    _check_int("repeats", repeats)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device)
    b = torch.randn(size, size, generator=gen).to(device)
    torch.mm(a, b)
    best = math.inf
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


@dataclass(frozen=True)
class FlopRate:
    """Result of :func:`flop_rate_sweep`.

    Attributes:
        flops_per_row: FLOPs of one inner step per row (``FlopCounterMode``).
        peak_flops: measured matmul peak [FLOP/s] (the best of the measurements before and after the sweep, over
            the matrix sizes tried).
        best: the fastest setting, ``{"batch", "memory_format", "flops_per_second", "fraction_of_peak"}``.
        table: one such dict per (batch, memory format) tried.
    """

    flops_per_row: float
    peak_flops: float
    best: dict[str, Any]
    table: list[dict[str, Any]]

    @property
    def fraction_of_peak(self) -> float:
        return float(self.best["fraction_of_peak"])


def _time_step(generator: nn.Module, z: Tensor, x: Tensor, repeats: int) -> float:
    _inner_step(generator, z, x)  # warm-up (allocations, algorithm choice)
    best = math.inf
    for _ in range(repeats):
        sync(z.device)
        start = time.perf_counter()
        _inner_step(generator, z, x)
        sync(z.device)
        best = min(best, time.perf_counter() - start)
    return best


def flop_rate_sweep(
    generator: nn.Module,
    image_shape: Sequence[int],
    batches: Sequence[int] = (16, 32, 64, 128, 256),
    memory_formats: Sequence[str] = MEMORY_FORMATS,
    *,
    repeats: int = 5,
    peak_sizes: Sequence[int] = (1024, 2048),
    on_point: Callable[[], None] | None = None,
) -> FlopRate:
    """Achieved FLOP rate of the batched inner step versus the matmul peak, over batch sizes and memory formats.

    The step is timed best-of-``repeats`` (the machine may be shared: the best time is the least disturbed);
    the peak is measured at each of ``peak_sizes`` before and after the sweep and the largest rate is used, so the fraction is not inflated by
    a slow peak measurement. The caller's generator is not modified (a copy is converted to channels-last).

    Args:
        generator: ``(B, k) -> (B, C, H, W)``, int ``latent_dim``.
        image_shape: ``(C, H, W)`` of its images.
        batches: rows per step to try, each >= 1.
        memory_formats: subset of :data:`MEMORY_FORMATS`.
        repeats: timed steps per setting.
        peak_sizes: matrix sizes of the peak measurement (the fastest counts).
        on_point: called after each setting (progress).
    """
    if not batches or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in batches):
        raise ValueError(f"expected batches as a non-empty sequence of ints >= 1, got {batches!r}")
    unknown = [m for m in memory_formats if m not in MEMORY_FORMATS]
    if unknown or not memory_formats:
        raise ValueError(f"expected memory_formats from {list(MEMORY_FORMATS)}, got {list(memory_formats)}")
    _check_int("repeats", repeats)
    device = _device_of(generator)
    flops = count_step_flops(generator, image_shape)
    if not peak_sizes:
        raise ValueError("expected at least one peak matrix size, got none")

    def measure_peak() -> float:
        return max(matmul_peak(device, size) for size in peak_sizes)

    peak = measure_peak()
    k = int(generator.latent_dim)  # type: ignore[arg-type]
    table: list[dict[str, Any]] = []
    gen = torch.Generator().manual_seed(0)
    for fmt in memory_formats:
        model = generator
        if fmt == "channels_last":
            model = copy.deepcopy(generator).to(memory_format=torch.channels_last)
        with frozen(model):
            for batch in batches:
                z = torch.randn(batch, k, generator=gen).to(device)
                x = torch.rand(batch, *image_shape, generator=gen).to(device)
                if fmt == "channels_last" and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                seconds = _time_step(model, z, x, repeats)
                table.append(
                    {
                        "batch": batch,
                        "memory_format": fmt,
                        "seconds_per_step": seconds,
                        "flops_per_second": flops * batch / seconds,
                    }
                )
                if on_point is not None:
                    on_point()
    peak = max(peak, measure_peak())
    for row in table:
        row["fraction_of_peak"] = row["flops_per_second"] / peak
    best = max(table, key=lambda row: row["flops_per_second"])
    return FlopRate(flops_per_row=flops, peak_flops=peak, best=dict(best), table=table)


# --------------------------------------------------------------------------------------------- growth


def growth_table(
    generator: nn.Module,
    x: Tensor,
    config: InversionConfig,
    *,
    encoder: nn.Module | None = None,
    batches: Sequence[int] = (1, 4, 16, 64),
    restarts: Sequence[int] = (1, 2, 5, 10),
    steps: Sequence[int] = (10, 25, 50, 100),
    on_point: Callable[[], None] | None = None,
) -> list[dict[str, Any]]:
    """Seconds per image as one of images-per-call, restarts or steps varies and the others stay at
    ``config`` (images per call: ``len(x)`` for the restart and step sweeps).

    Returns rows ``{"vary", "batch", "restarts", "steps", "seconds_per_image", "generator_evals_per_image"}``.
    """
    _check_images(x)
    n = x.shape[0]
    rows: list[dict[str, Any]] = []
    points: list[tuple[str, int, InversionConfig]] = [("batch", b, config) for b in batches]
    points += [("restarts", r, config.replace(restarts=r)) for r in restarts]
    points += [("steps", s, config.replace(steps=s)) for s in steps]
    for vary, value, cfg in points:
        per_call = value if vary == "batch" else n
        res = project(generator, x, cfg, encoder=encoder, images_per_call=per_call)
        rows.append(
            {
                "vary": vary,
                "batch": per_call,
                "restarts": cfg.restarts,
                "steps": cfg.steps,
                "seconds_per_image": res.seconds_per_image,
                "generator_evals_per_image": float(res.generator_evals.float().mean()),
            }
        )
        if on_point is not None:
            on_point()
    return rows


def plot_growth(path: Any, rows: Sequence[dict[str, Any]], title: str) -> None:
    """Save a PNG with one panel per varied quantity (batch, restarts, steps): seconds per image, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    kinds = ("batch", "restarts", "steps")
    labels = {"batch": "images per invert call", "restarts": "restarts R", "steps": "steps L"}
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        pts = [r for r in rows if r["vary"] == kind]
        xs = [r[kind] for r in pts]
        ys = [r["seconds_per_image"] for r in pts]
        if pts:
            ax.plot(xs, ys, "o-")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks(xs, [str(v) for v in xs])
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(labels[kind])
        ax.set_ylabel("seconds per image")
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
