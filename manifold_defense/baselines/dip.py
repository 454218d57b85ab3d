"""Deep Image Prior recovery for compressed sensing (CS-DIP), with CS-DIP's learned regularization.

Papers: Ulyanov, Vedaldi, Lempitsky 2018, "Deep Image Prior"; Van Veen, Jalal, Soltanolkotabi, Price,
Vishwanath, Dimakis 2018, "Compressed Sensing with Deep Image Prior and Learned Regularization" (code:
davevanveen/compsensing_dip).

Purpose: a baseline for compressed sensing with generative priors that needs no training data. An UNTRAINED
DCGAN-style generator ``G_w`` with a fixed random latent ``z`` is fitted to the measurements by optimizing its
WEIGHTS ``w``:

    min_w  ||operator(G_w(z)) - y||^2  +  tv_weight * TV(G_w(z))
           +  lr_weight * (m(w) - mu)^T Sigma^{-1} (m(w) - mu)

where ``TV`` is the anisotropic l1 total variation and ``m(w)`` is the vector of per-layer mean weights (one
entry per parameter tensor), whose Gaussian ``N(mu, Sigma)`` is fitted on DIP fits of a few training images
(:func:`fit_learned_regularizer`; this is the penalty of CS-DIP's ``cs_dip.py``). The output
``x_hat = G_w(z)`` is in [0, 1] (sigmoid output; CS-DIP used tanh on [-1, 1] images). Optimizer: RMSprop,
lr 1e-3, momentum 0.9, 1000 iterations for MNIST; the reconstruction is the iterate with the lowest total loss
among the last ``exit_window`` iterations, and with several restarts the restart with the lowest measurement
loss wins (both as in CS-DIP).

Batching: all images (and restarts) are fitted at once as independent networks, by ``torch.func.vmap`` over
``functional_call`` with stacked weights. The summed loss gives every network exactly its own gradient, and
RMSprop is element-wise, so each image's result depends only on its own measurements and seed, never on the
rest of the batch. Networks run in fixed-size chunks (``chunk_size``, the last chunk padded) so that every
network sees the same kernels and shapes: results are then bitwise independent of the batch composition.
``batched=False`` runs the plain per-image reference path (an ``nn.Module`` and ``torch.optim.RMSprop`` per
image); it agrees with the batched path up to floating-point rounding, which RMSprop's per-element
normalisation amplifies over long runs (DIP is chaotic in that sense; compare the two statistically).

Measurement operator: any differentiable callable mapping images ``(N, C, H, W)`` to measurements
``(N, *meas)`` that acts on each sample separately (a Gaussian matrix, a mask, a blur, a classifier in eval
mode...).

The network side (:class:`DIPGenerator`, :func:`init_dip_parameters`, each network's seeded initial state) and
the learned regularizer's Gaussian (:class:`LayerGaussianPrior`) are in
:mod:`manifold_defense.baselines.dip_network`; the public names are re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.covariance import LedoitWolf
from torch import Tensor
from torch.func import functional_call, vmap

from manifold_defense.baselines.dip_network import (
    DIPGenerator,
    LayerGaussianPrior,
    _image_shape,
    _initial_state,
    init_dip_parameters,
)

__all__ = [
    "DIPConfig",
    "DIPGenerator",
    "DIPResult",
    "LayerGaussianPrior",
    "dip_recover",
    "fit_learned_regularizer",
    "init_dip_parameters",
]

Operator = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class DIPConfig:
    """Settings of CS-DIP recovery (defaults: CS-DIP's MNIST setting).

    Attributes:
        latent_dim: size of the fixed random input ``z`` (CS-DIP MNIST: 128).
        ngf: base number of generator filters (CS-DIP: 64; use 8 in tests).
        num_iter: optimizer steps (CS-DIP MNIST: 1000).
        lr, momentum, rmsprop_alpha, eps: RMSprop settings (lr 1e-3, momentum 0.9, PyTorch's alpha and eps).
        weight_decay: RMSprop weight decay (CS-DIP: 0).
        tv_weight: weight of the anisotropic l1 TV of the image. CS-DIP uses 1e-2 on [-1, 1] images with
            ``A = randn(m, n) / sqrt(m)`` and the SUM of squared measurement errors; on [0, 1] images the same
            balance is 5e-3 (the default). With an unscaled N(0, 1) matrix the measurement loss is ``m`` times
            larger, so scale ``tv_weight`` by ``m`` to keep the same balance. 0 disables it.
        lr_weight: weight of the learned-regularization (Mahalanobis) penalty; needs a ``prior``.
            CS-DIP MNIST: 0.
        num_restarts: independent random initializations per image (CS-DIP MNIST: 1); the restart with the
            best measurement loss wins.
        exit_window: return the lowest-total-loss iterate among the last ``exit_window`` iterations
            (CS-DIP: 51); 1 returns the last iterate. Ignored when ``output_ema > 0``.
        output_ema: ``0`` (CS-DIP) or the weight ``w`` in ``[0, 1)`` of an exponential moving average of the
            network output, ``avg <- w * avg + (1 - w) * G_w(z)`` from the first iterate on, returned instead of
            the best-loss iterate (the ``exp_weight = 0.99`` smoothing of Ulyanov et al.'s DIP code). It
            averages out the iterate-to-iterate wandering in the null space of an under-determined operator.
        restart_aggregate: ``"best"`` (CS-DIP): the restart with the lowest measurement loss;
            ``"mean"``: the pixel-wise mean of all restarts' reconstructions (an ensemble of independently
            initialised networks; it reduces the null-space error at small ``m``, where every restart fits
            ``y`` equally well and the best-loss choice is arbitrary).
        seed: default per-image seed (every image gets the same initial network unless ``seeds`` is given).
    """

    latent_dim: int = 128
    ngf: int = 64
    num_iter: int = 1000
    lr: float = 1e-3
    momentum: float = 0.9
    rmsprop_alpha: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.0
    tv_weight: float = 5e-3
    lr_weight: float = 0.0
    num_restarts: int = 1
    exit_window: int = 51
    output_ema: float = 0.0
    restart_aggregate: str = "best"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("latent_dim", "ngf", "num_iter", "num_restarts", "exit_window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"expected DIPConfig.{name} a positive int, got {value!r}")
        for name in ("lr", "eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"expected DIPConfig.{name} > 0, got {value!r}")
        for name in ("momentum", "weight_decay", "tv_weight", "lr_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ValueError(f"expected DIPConfig.{name} >= 0 and finite, got {value!r}")
        if not isinstance(self.rmsprop_alpha, (int, float)) or not 0 <= self.rmsprop_alpha < 1:
            raise ValueError(f"expected DIPConfig.rmsprop_alpha in [0, 1), got {self.rmsprop_alpha!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"expected DIPConfig.seed a non-negative int, got {self.seed!r}")
        if not isinstance(self.output_ema, (int, float)) or not 0 <= self.output_ema < 1:
            raise ValueError(f"expected DIPConfig.output_ema in [0, 1), got {self.output_ema!r}")
        if self.restart_aggregate not in ("best", "mean"):
            raise ValueError(
                f"expected DIPConfig.restart_aggregate 'best' or 'mean', got {self.restart_aggregate!r}"
            )


@dataclass(frozen=True)
class DIPResult:
    """Output of :func:`dip_recover`.

    Attributes:
        x_hat: reconstructions (B, C, H, W) in [0, 1].
        loss: measurement loss ``||operator(x_hat) - y||^2`` (sum over measurement entries), shape (B,).
        total_loss: loss including TV and learned regularization at the returned iterate, shape (B,).
    """

    x_hat: Tensor
    loss: Tensor
    total_loss: Tensor


# ----------------------------------------------------------------------------------------------------------
# Core


def _tv(x: Tensor) -> Tensor:
    """Anisotropic l1 total variation per sample: (N, C, H, W) -> (N,)."""
    dh = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).sum(1)
    dw = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).sum(1)
    return dh + dw


def _apply_operators(operators: Sequence[Operator], groups: Sequence[slice], x: Tensor) -> Tensor:
    if len(operators) == 1:
        return operators[0](x)
    return torch.cat([op(x[g]) for op, g in zip(operators, groups, strict=True)], dim=0)


def _check_operator_output(out: object, expected: tuple[int, ...]) -> Tensor:
    if not isinstance(out, Tensor):
        raise TypeError(f"expected the operator to return a torch.Tensor, got {type(out).__name__}")
    if tuple(out.shape) != expected:
        raise ValueError(
            f"expected operator output with per-image shape {expected[1:]} (like y[b]) for {expected[0]} "
            f"images, got shape {tuple(out.shape)}"
        )
    return out


@dataclass
class _RunOutput:
    x_hat: Tensor  # (N, C, H, W)
    meas_loss: Tensor  # (N,)
    total_loss: Tensor  # (N,)
    layer_means: Tensor  # (N, L) at the returned iterate (or at the best-MSE iterate if truth is given)


def _run_batched(
    y: Tensor,
    operators: Sequence[Operator],
    seeds: Sequence[int],
    restart_ids: Sequence[int],
    image_shape: tuple[int, int, int],
    config: DIPConfig,
    prior: LayerGaussianPrior | None,
    device: torch.device,
    truth: Tensor | None = None,
) -> _RunOutput:
    """Fit ``len(seeds)`` independent networks at once.

    Network k fits ``y[k]`` from the initial state of (``seeds[k]``, ``restart_ids[k]``).

    ``operators`` has one entry (applied to all networks) or one per network.
    """
    num = len(seeds)
    template = DIPGenerator(config.latent_dim, image_shape, config.ngf)
    names = [k for k, _ in template.named_parameters()]
    states = [
        _initial_state(template, config.latent_dim, s, r) for s, r in zip(seeds, restart_ids, strict=True)
    ]
    params = {
        k: torch.stack([st[0][k] for st in states])
        .to(device=device, dtype=torch.float32)
        .requires_grad_(True)
        for k in names
    }
    z = torch.stack([st[1] for st in states]).to(device=device, dtype=torch.float32)
    template.to(device)
    groups = [slice(k, k + 1) for k in range(num)]

    def single(p: dict[str, Tensor], zi: Tensor) -> Tensor:
        return functional_call(template, p, (zi.unsqueeze(0),)).squeeze(0)

    forward = vmap(single)
    opt = torch.optim.RMSprop(
        list(params.values()),
        lr=config.lr,
        alpha=config.rmsprop_alpha,
        eps=config.eps,
        weight_decay=config.weight_decay,
        momentum=config.momentum,
    )
    best_total = torch.full((num,), math.inf, device=device)
    best_x = torch.zeros((num, *image_shape), device=device)
    best_meas = torch.zeros(num, device=device)
    best_means = torch.zeros((num, len(names)), device=device)
    best_mse = torch.full((num,), math.inf, device=device)
    start_window = config.num_iter - config.exit_window
    ema_x = torch.zeros((num, *image_shape), device=device)
    for it in range(config.num_iter):
        opt.zero_grad(set_to_none=True)
        x = forward(params, z)
        pred = _check_operator_output(_apply_operators(operators, groups, x), tuple(y.shape))
        meas = (pred - y).pow(2).flatten(1).sum(1)
        total = meas
        if config.tv_weight > 0:
            total = total + config.tv_weight * _tv(x)
        means = torch.stack([params[k].flatten(1).mean(1) for k in names], dim=1)
        if prior is not None and config.lr_weight > 0:
            total = total + config.lr_weight * prior.penalty(means)
        with torch.no_grad():
            if config.output_ema > 0:
                ema_x = x.detach() if it == 0 else config.output_ema * ema_x + (1 - config.output_ema) * x
            if truth is not None:
                mse = (x - truth).pow(2).flatten(1).mean(1)
                better = mse < best_mse
                best_mse = torch.where(better, mse, best_mse)
                best_means = torch.where(better[:, None], means, best_means)
            if it >= start_window:
                better = total < best_total
                best_total = torch.where(better, total, best_total)
                best_meas = torch.where(better, meas, best_meas)
                best_x = torch.where(better[:, None, None, None], x, best_x)
                if truth is None:
                    best_means = torch.where(better[:, None], means, best_means)
        if not torch.all(torch.isfinite(total)):
            raise FloatingPointError(f"DIP loss became non-finite at iteration {it}; lower DIPConfig.lr")
        # autograd.grad (not backward): only the DIP weights get gradients, never the operator's parameters.
        grads = torch.autograd.grad(total.sum(), list(params.values()))
        for param, grad in zip(params.values(), grads, strict=True):
            param.grad = grad
        opt.step()
    if config.output_ema > 0:
        with torch.no_grad():
            pred = _apply_operators(operators, groups, ema_x)
            means = torch.stack([params[k].flatten(1).mean(1) for k in names], dim=1)
            best_meas, best_total = _losses(pred, y, ema_x, means, config, prior)
            best_x = ema_x
            if truth is None:
                best_means = means
    return _RunOutput(best_x.detach(), best_meas.detach(), best_total.detach(), best_means.detach())


def _losses(
    pred: Tensor, y: Tensor, x: Tensor, means: Tensor, config: DIPConfig, prior: LayerGaussianPrior | None
) -> tuple[Tensor, Tensor]:
    """Measurement loss and total loss (TV, learned regularization) per network: (N,), (N,)."""
    meas = (pred - y).pow(2).flatten(1).sum(1)
    total = meas
    if config.tv_weight > 0:
        total = total + config.tv_weight * _tv(x)
    if prior is not None and config.lr_weight > 0:
        total = total + config.lr_weight * prior.penalty(means)
    return meas, total


def _run_reference(
    y: Tensor,
    operators: Sequence[Operator],
    seeds: Sequence[int],
    restart_ids: Sequence[int],
    image_shape: tuple[int, int, int],
    config: DIPConfig,
    prior: LayerGaussianPrior | None,
    device: torch.device,
) -> _RunOutput:
    """Per-network reference path: one ``nn.Module`` and one ``torch.optim.RMSprop`` per network."""
    outs: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
    for k, (seed, restart) in enumerate(zip(seeds, restart_ids, strict=True)):
        net = DIPGenerator(config.latent_dim, image_shape, config.ngf)
        params, z0 = _initial_state(net, config.latent_dim, seed, restart)
        net.load_state_dict(params)
        net.to(device=device, dtype=torch.float32)
        z = z0.to(device=device, dtype=torch.float32).unsqueeze(0)
        op = operators[0] if len(operators) == 1 else operators[k]
        yk = y[k : k + 1]
        opt = torch.optim.RMSprop(
            net.parameters(),
            lr=config.lr,
            alpha=config.rmsprop_alpha,
            eps=config.eps,
            weight_decay=config.weight_decay,
            momentum=config.momentum,
        )
        best: tuple[float, Tensor, Tensor, Tensor] = (math.inf, z, z, z)
        ema_x = torch.zeros((1, *image_shape), device=device)
        for it in range(config.num_iter):
            opt.zero_grad(set_to_none=True)
            x = net(z)
            if config.output_ema > 0:
                with torch.no_grad():
                    w = config.output_ema
                    ema_x = x.detach() if it == 0 else w * ema_x + (1 - w) * x.detach()
            pred = _check_operator_output(op(x), tuple(yk.shape))
            meas = (pred - yk).pow(2).sum()
            total = meas + config.tv_weight * _tv(x).sum() if config.tv_weight > 0 else meas
            means = torch.stack([p.mean() for p in net.parameters()]).unsqueeze(0)
            if prior is not None and config.lr_weight > 0:
                total = total + config.lr_weight * prior.penalty(means).sum()
            total_value = float(total.detach())
            if not math.isfinite(total_value):
                raise FloatingPointError(f"DIP loss became non-finite at iteration {it}; lower DIPConfig.lr")
            if it >= config.num_iter - config.exit_window and total_value < best[0]:
                best = (total_value, x.detach()[0], meas.detach(), means.detach()[0])
            weights = list(net.parameters())
            for param, grad in zip(weights, torch.autograd.grad(total, weights), strict=True):
                param.grad = grad
            opt.step()
        if config.output_ema > 0:
            with torch.no_grad():
                means = torch.stack([p.mean() for p in net.parameters()]).unsqueeze(0)
                meas_e, total_e = _losses(op(ema_x), yk, ema_x, means, config, prior)
            best = (float(total_e[0]), ema_x[0], meas_e[0], means[0])
        outs.append((best[1], best[2], torch.tensor(best[0], device=device), best[3]))
    return _RunOutput(
        torch.stack([o[0] for o in outs]),
        torch.stack([o[1] for o in outs]).float(),
        torch.stack([o[2] for o in outs]).float(),
        torch.stack([o[3] for o in outs]),
    )


def _check_y(y: object) -> Tensor:
    if not isinstance(y, Tensor):
        raise TypeError(f"expected y as a torch.Tensor of shape (B, ...), got {type(y).__name__}")
    if y.ndim < 2 or y.shape[0] < 1:
        raise ValueError(
            f"expected y of shape (B, m) or (B, *measurement_shape) with B >= 1, got {tuple(y.shape)}"
        )
    if not y.is_floating_point():
        raise TypeError(f"expected floating-point y, got {y.dtype}")
    if not torch.all(torch.isfinite(y)):
        raise ValueError("expected finite y, got NaN or inf entries")
    return y


def _check_seeds(seeds: Sequence[int] | None, batch: int, default: int) -> list[int]:
    if seeds is None:
        return [default] * batch
    out = list(seeds)
    if len(out) != batch or not all(
        isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 0 for s in out
    ):
        raise ValueError(f"expected seeds as {batch} non-negative ints (one per image), got {seeds!r}")
    return [int(s) for s in out]


def dip_recover(
    y: Tensor,
    operator: Operator,
    image_shape: Sequence[int],
    config: DIPConfig = DIPConfig(),
    *,
    device: torch.device | str | None = None,
    prior: LayerGaussianPrior | None = None,
    seeds: Sequence[int] | None = None,
    batched: bool = True,
    chunk_size: int | None = 16,
) -> DIPResult:
    """Recover images from measurements ``y`` with a Deep Image Prior (CS-DIP).

    Args:
        y: measurements (B, m) (or (B, *measurement_shape)), float; not modified.
        operator: differentiable callable, images (N, C, H, W) in [0, 1] -> measurements (N, m), acting
            on each sample separately; it must live on ``device``.
        image_shape: ``(C, H, W)`` or ``(H, W)`` of the images to recover (H, W >= 4).
        config: :class:`DIPConfig`.
        device: where the networks live; default ``y.device``.
        prior: learned regularizer from :func:`fit_learned_regularizer`; required when
            ``config.lr_weight > 0``.
        seeds: one seed per image (default ``config.seed`` for all); image b's result depends only on
            ``y[b]``, its seed and ``config``.
        batched: ``True`` fits all images as one vmapped batch; ``False`` runs the per-image reference loop.
        chunk_size: networks (images x restarts) fitted together; the batch is split into chunks of exactly
            this many (the last padded with copies), which bounds memory and keeps every image's result
            bitwise independent of the rest of the batch for a given ``chunk_size`` and device. ``None``: one
            unpadded chunk (no wasted work, but the rounding of the grouped convolutions then depends on the
            number of networks, and RMSprop's per-element normalisation can amplify such rounding
            differences into visibly different reconstructions, notably on GPUs). On an H100 with the MNIST
            defaults, a chunk of 16 networks takes about 20 ms per iteration and one of 64 about 42 ms
            (64 images x 1000 iterations: 26 s); use 64 or more on a GPU for whole test sets.

    Returns:
        :class:`DIPResult` with ``x_hat`` (B, C, H, W) in [0, 1] on ``device`` and per-image losses.

    Raises:
        TypeError/ValueError: bad ``y`` (not a tensor, non-finite, wrong rank), bad ``image_shape``, an
            operator whose output does not match ``y``'s shape, ``lr_weight > 0`` without a prior or a
            prior for another architecture.
    """
    y = _check_y(y)
    if not callable(operator):
        raise TypeError(f"expected a callable operator, got {type(operator).__name__}")
    result, _ = _recover(y, [operator], image_shape, config, device, prior, seeds, batched, chunk_size, None)
    return result


def _recover(
    y: Tensor,
    operators: Sequence[Operator],
    image_shape: Sequence[int],
    config: DIPConfig,
    device: torch.device | str | None,
    prior: LayerGaussianPrior | None,
    seeds: Sequence[int] | None,
    batched: bool,
    chunk_size: int | None,
    truth: Tensor | None,
) -> tuple[DIPResult, Tensor]:
    """Shared body of :func:`dip_recover` and :func:`fit_learned_regularizer` (+ layer means (B, L))."""
    if not isinstance(config, DIPConfig):
        raise TypeError(f"expected config a DIPConfig, got {type(config).__name__}")
    shape = _image_shape(image_shape)
    dev = torch.device(device) if device is not None else y.device
    batch = y.shape[0]
    seed_list = _check_seeds(seeds, batch, config.seed)
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"expected chunk_size a positive int or None, got {chunk_size!r}")
    if config.lr_weight > 0:
        if prior is None:
            raise ValueError("expected a LayerGaussianPrior when DIPConfig.lr_weight > 0, got prior=None")
        names = tuple(k for k, _ in DIPGenerator(config.latent_dim, shape, config.ngf).named_parameters())
        if prior.names != names:
            raise ValueError(f"expected a prior for layers {names}, got one for {prior.names}")

    # Networks: image-major, restarts inside.
    y_dev = y.detach().to(device=dev, dtype=torch.float32)
    restarts = config.num_restarts
    net_image = [b for b in range(batch) for _ in range(restarts)]
    net_seed = [seed_list[b] for b in net_image]
    net_restart = [r for _ in range(batch) for r in range(restarts)]
    y_net = y_dev.repeat_interleave(restarts, dim=0)
    truth_net = (
        None if truth is None else truth.to(device=dev, dtype=torch.float32).repeat_interleave(restarts, 0)
    )
    ops_net = list(operators) if len(operators) == 1 else [operators[b] for b in net_image]
    num_nets = len(net_image)
    parts: list[_RunOutput] = []
    if not batched:
        parts.append(_run_reference(y_net, ops_net, net_seed, net_restart, shape, config, prior, dev))
    else:
        # Fixed-shape chunks: every chunk holds exactly `step` networks (the last one padded with copies of
        # its final network), so each network is computed by the same kernels on the same shapes whatever the
        # batch, and its result is bitwise independent of the other images.
        step = num_nets if chunk_size is None else chunk_size
        for lo in range(0, num_nets, step):
            rows = list(range(lo, min(lo + step, num_nets)))
            real = len(rows)
            rows += [rows[-1]] * (step - real)
            ops = ops_net if len(ops_net) == 1 else [ops_net[r] for r in rows]
            t = None if truth_net is None else truth_net[rows]
            seeds_c = [net_seed[r] for r in rows]
            restarts_c = [net_restart[r] for r in rows]
            with torch.backends.cudnn.flags(
                enabled=torch.backends.cudnn.enabled,
                benchmark=False,
                deterministic=True,
                allow_tf32=torch.backends.cudnn.allow_tf32,
            ):
                run = _run_batched(y_net[rows], ops, seeds_c, restarts_c, shape, config, prior, dev, t)
            parts.append(
                _RunOutput(
                    run.x_hat[:real], run.meas_loss[:real], run.total_loss[:real], run.layer_means[:real]
                )
            )
    out = _RunOutput(
        torch.cat([p.x_hat for p in parts]),
        torch.cat([p.meas_loss for p in parts]),
        torch.cat([p.total_loss for p in parts]),
        torch.cat([p.layer_means for p in parts]),
    )
    if config.restart_aggregate == "mean" and restarts > 1:
        x_mean = out.x_hat.reshape(batch, restarts, *shape).mean(dim=1)
        means_mean = out.layer_means.reshape(batch, restarts, -1).mean(dim=1)
        with torch.no_grad():
            if len(operators) == 1:
                pred = operators[0](x_mean)
            else:
                pred = torch.cat([operators[b](x_mean[b : b + 1]) for b in range(batch)])
            meas_m, total_m = _losses(pred, y_dev, x_mean, means_mean, config, prior)
        return DIPResult(x_mean, meas_m, total_m), means_mean
    meas = out.meas_loss.reshape(batch, restarts)
    pick = meas.argmin(dim=1)
    idx = torch.arange(batch, device=pick.device) * restarts + pick
    return DIPResult(out.x_hat[idx], out.meas_loss[idx], out.total_loss[idx]), out.layer_means[idx]


def fit_learned_regularizer(
    images: Tensor,
    operator_factory: Callable[[int], Operator],
    config: DIPConfig = DIPConfig(),
    *,
    device: torch.device | str | None = None,
    diagonal: bool = False,
    seeds: Sequence[int] | None = None,
) -> LayerGaussianPrior:
    """Fit CS-DIP's learned regularizer from DIP fits on a few TRAINING images.

    For each training image ``images[i]``, measurements ``y_i = operator_factory(i)(images[i:i+1])`` are
    fitted by DIP (learned regularization off); as in CS-DIP's ``cs_dip_stats.py``, the network weights kept
    are those at the iterate closest (MSE) to the known training image. The vector of per-layer mean weights
    of each fit is a sample; the prior is their Gaussian: sample mean and Ledoit-Wolf shrunk covariance
    (``diagonal=True``: variances only), plus a small ridge so that it is invertible. Use the same operator
    family and ``m`` as the recovery runs.

    Args:
        images: training images (N, C, H, W) in [0, 1], N >= 2 (never test images).
        operator_factory: ``i -> operator`` for image ``i`` (a fresh matrix per image, or the same one).
        config: DIP settings of the fits (``lr_weight`` is ignored).
        device: default ``images.device``.
        diagonal: fit a diagonal covariance.
        seeds: one seed per training image (default ``config.seed`` for all).

    Returns:
        :class:`LayerGaussianPrior` over the generator's parameter tensors.
    """
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[0] < 2:
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"expected training images as a tensor (N, C, H, W) with N >= 2, got {got}")
    if not torch.all(torch.isfinite(images)):
        raise ValueError("expected finite training images, got NaN or inf entries")
    if not callable(operator_factory):
        raise TypeError(
            f"expected a callable operator_factory (index -> operator), got {type(operator_factory)}"
        )
    dev = torch.device(device) if device is not None else images.device
    truth = images.detach().to(device=dev, dtype=torch.float32)
    operators = [operator_factory(i) for i in range(truth.shape[0])]
    with torch.no_grad():
        ys = [op(truth[i : i + 1]) for i, op in enumerate(operators)]
    if not all(isinstance(v, Tensor) and v.shape == ys[0].shape for v in ys):
        raise ValueError("expected every operator to return measurements of the same shape")
    y = _check_y(torch.cat(ys).detach())
    fit_config = DIPConfig(**{**config.__dict__, "lr_weight": 0.0})
    _, layer_means = _recover(
        y, operators, tuple(truth.shape[1:]), fit_config, dev, None, seeds, True, 16, truth
    )
    samples = layer_means.double().cpu().numpy()
    mean = samples.mean(axis=0)
    if diagonal:
        cov = np.diag(samples.var(axis=0))
    else:
        cov = LedoitWolf(assume_centered=False).fit(samples).covariance_
    scale = float(np.mean(np.diag(cov)))
    cov = cov + max(scale, 1e-12) * 1e-6 * np.eye(cov.shape[0])
    names = tuple(
        k for k, _ in DIPGenerator(config.latent_dim, tuple(truth.shape[1:]), config.ngf).named_parameters()
    )
    return LayerGaussianPrior(names, torch.from_numpy(mean), torch.from_numpy(cov))
