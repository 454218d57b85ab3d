"""The latent-optimization core: ``invert(generator, y, operator, config) -> Inversion``.

Purpose: the one z-optimization loop of the project. It solves, for every sample ``i`` and restart ``r``,

    min_{z, v}  loss_A(A(G(z) + v), y_i) + z_prior_weight * ||z||^2 + deviation_weight * ||v||_1

(``v`` only with ``config.deviation``) and keeps the restart with the lowest final measurement loss. It serves
the projection defense (Defense-GAN, Samangouei et al. 2018: ``A = I``), compressed sensing with a generative
prior (CSGM, Bora et al. 2017), sparse deviations (Dhar, Grover & Ermon 2018), non-linear / 1-bit measurements
and the inner loop of robust manifold training.

Sparse deviations: each loop step is one ``config.optimizer`` step on ``z`` and one FISTA step (Beck & Teboulle
2009) on the deviation coefficients; the FISTA machinery (state, proximal step, Lipschitz estimate) and its
explanation are in :mod:`manifold_defense.inversion.deviation`. Input validation and the measurement-tree
helpers are in :mod:`manifold_defense.inversion.checks`.

Contract:
- the objective is summed over samples and restarts, every operation is per row, and sample ``i``'s restart
  noise comes from its own seed, so a sample's result does not depend on the batch it is computed in;
- the generator (and operator, encoder) run in eval mode with frozen parameters; modes and ``requires_grad``
  flags are restored afterwards; the caller's tensors are never modified;
- ``differentiable=True`` unrolls every optimizer step in the autograd graph (functional SGD/Adam with
  ``create_graph=True``), so ``x_hat`` is differentiable w.r.t. ``y`` (the white-box "unrolled" gradient of
  the defense); otherwise each step's graph is freed after its gradient (fast path) and the outputs are
  detached.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from manifold_defense.modes import frozen

from .checks import (
    _check_device,
    _check_generated,
    _check_generator,
    _check_range,
    _leaves,
    _probe_image_shape,
    _resolve_seeds,
    _take_rows,
    _tree_map,
    _working_dtype,
)
from .config import InversionConfig
from .deviation import _Deviation, _deviation_lipschitz, _deviation_step, _start_deviation
from .operators import Identity, MeasurementOperator, Measurements, check_forward_finite

__all__ = ["Inversion", "invert"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Inversion:
    """Result of :func:`invert` for a batch of ``B`` samples with ``R`` restarts.

    Attributes:
        z: best latents ``(B, k)``.
        x_hat: reconstructions ``(B, C, H, W)``: ``G(z)``, plus the deviation ``v`` when ``config.deviation``
            is set (then it may leave [0, 1] slightly; clamp if needed).
        loss: final measurement loss of the returned restart ``(B,)`` (no prior or l1 terms).
        restart_losses: final measurement loss of every restart ``(B, R)``; ``inf`` for restarts dropped by
            pruning, so ``loss == restart_losses.min(1).values``.
        best_restart: index of the returned restart ``(B,)`` (int64).
        steps_run: optimizer steps performed by the loop (``< config.steps`` when early stopping froze every
            sample).
        generator_evals: per-sample generator forward passes spent, counting every restart ``(B,)`` (int64);
            at most ``R * (steps + 1)``.
        deviation: the pixel-space deviation ``v`` ``(B, C, H, W)`` of the returned restart, or ``None``.
    """

    z: torch.Tensor
    x_hat: torch.Tensor
    loss: torch.Tensor
    restart_losses: torch.Tensor
    best_restart: torch.Tensor
    steps_run: int
    generator_evals: torch.Tensor
    deviation: torch.Tensor | None = None


# ------------------------------------------------------------------------------------- small helpers


def _project_ball(z: torch.Tensor, radius: float | None) -> torch.Tensor:
    """Project each row of ``z`` onto ``{||z||_2 <= radius}`` (no-op for ``None``)."""
    if radius is None:
        return z
    norm = z.norm(dim=1, keepdim=True).clamp_min(torch.finfo(z.dtype).tiny)
    return z * (radius / norm).clamp(max=1.0)


def _optimizer_update(
    params: list[torch.Tensor],
    grads: Sequence[torch.Tensor],
    state: list[list[torch.Tensor]],
    lr: float,
    step: int,
    config: InversionConfig,
) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """One functional SGD-momentum or Adam step (no in-place ops, so it can be unrolled by autograd).

    ``state[i]`` is ``[buf]`` (SGD) or ``[m, v]`` (Adam); ``step`` counts updates from 1 (Adam bias
    correction). Returns the new parameters and the new state.
    """
    new_params: list[torch.Tensor] = []
    new_state: list[list[torch.Tensor]] = []
    for p, g, s in zip(params, grads, state, strict=True):
        if config.optimizer == "sgd":
            buf = config.momentum * s[0] + g if config.momentum else g
            new_params.append(p - lr * buf)
            new_state.append([buf])
        else:
            beta1, beta2 = config.betas
            m = beta1 * s[0] + (1 - beta1) * g
            v = beta2 * s[1] + (1 - beta2) * g * g
            m_hat = m / (1 - beta1**step)
            v_hat = v / (1 - beta2**step)
            # ``tiny`` keeps the double-backward of sqrt finite where a coordinate's gradient is exactly 0.
            denom = (v_hat + torch.finfo(v_hat.dtype).tiny).sqrt() + config.adam_eps
            new_params.append(p - lr * m_hat / denom)
            new_state.append([m, v])
    return new_params, new_state


def _initial_state(params: list[torch.Tensor], config: InversionConfig) -> list[list[torch.Tensor]]:
    count = 1 if config.optimizer == "sgd" else 2
    return [[torch.zeros_like(p, requires_grad=False) for _ in range(count)] for p in params]


class _EarlyStop:
    """Per-sample early stopping: freeze a sample once its best restart loss stalls for ``patience`` steps."""

    def __init__(self, batch: int, config: InversionConfig, device: torch.device, dtype: torch.dtype) -> None:
        self.tol = config.early_stop_tol
        self.patience = config.early_stop_patience
        self.best = torch.full((batch,), math.inf, device=device, dtype=dtype)
        self.stall = torch.zeros(batch, dtype=torch.long, device=device)
        self.alive = torch.ones(batch, dtype=torch.bool, device=device)

    def newly_frozen_rows(self, loss: torch.Tensor, row_samples: torch.Tensor) -> torch.Tensor:
        """Bool mask over the active rows whose sample has converged at this step."""
        if self.tol is None:
            return torch.zeros_like(row_samples, dtype=torch.bool)
        current = torch.full_like(self.best, math.inf).scatter_reduce(0, row_samples, loss, "amin")
        improved = current < self.best - self.tol
        self.best = torch.where(improved, current, self.best)
        self.stall = torch.where(improved, torch.zeros_like(self.stall), self.stall + 1)
        newly = self.alive & (self.stall >= self.patience)
        self.alive = self.alive & ~newly
        return newly[row_samples]


def _exiting_rows(
    step: int,
    loss: torch.Tensor,
    row_samples: torch.Tensor,
    early: _EarlyStop,
    config: InversionConfig,
    restarts: int,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(frozen, pruned)`` bool masks over the active rows at ``step``, or ``None`` when no row can leave
    now.

    Frozen rows are finished (their latent and loss are kept); pruned rows are dropped and cannot be returned.
    """
    if step >= config.steps:
        return torch.ones_like(row_samples, dtype=torch.bool), torch.zeros_like(row_samples, dtype=torch.bool)
    prune_now = config.prune_after is not None and step == config.prune_after
    if config.early_stop_tol is None and not prune_now:
        return None
    frozen = early.newly_frozen_rows(loss, row_samples)
    pruned = (
        _pruned_rows(loss, restarts, config.prune_keep) & ~frozen if prune_now else torch.zeros_like(frozen)
    )
    return frozen, pruned


def _pruned_rows(loss: torch.Tensor, restarts: int, keep: int) -> torch.Tensor:
    """Bool mask over active rows outside each sample's ``keep`` best (rows are grouped by sample, ``R``
    each)."""
    per_sample = torch.nan_to_num(loss, nan=math.inf).reshape(-1, restarts)
    order = per_sample.argsort(dim=1, stable=True)
    rank = order.argsort(dim=1, stable=True)
    return (rank >= keep).reshape(-1)


def _initial_latents(
    generator: nn.Module,
    y: Measurements,
    operator: MeasurementOperator,
    config: InversionConfig,
    encoder: nn.Module | None,
    z_init: torch.Tensor | None,
    seeds: list[int],
    shape: tuple[int, int, int],
    device: torch.device,
    dtype: torch.dtype,
    differentiable: bool,
) -> torch.Tensor:
    """Starting latents ``(B, R, k)``: per-sample seeded restart noise, around ``z_init``/``encoder(y)`` if
    given."""
    batch, restarts, k = shape
    if z_init is None and config.init == "encoder":
        if encoder is None:
            raise ValueError(
                "expected an encoder with config.init='encoder', got encoder=None (or pass z_init)"
            )
        if not isinstance(operator, Identity):
            raise ValueError(
                f"expected the Identity operator for init='encoder' (the encoder reads images), got "
                f"{type(operator).__name__}; pass z_init instead"
            )
        if isinstance(y, torch.Tensor):  # before the encoder's first layer sees y
            _probe_image_shape(generator, y, k)
        with torch.set_grad_enabled(differentiable):
            z_init = encoder(y)
        if not isinstance(z_init, torch.Tensor) or tuple(z_init.shape) != (batch, k):
            got = tuple(z_init.shape) if isinstance(z_init, torch.Tensor) else type(z_init).__name__
            raise ValueError(f"expected the encoder to return latents ({batch}, {k}), got {got}")
        if z_init.is_floating_point() and not bool(torch.isfinite(z_init).all()):
            raise ValueError(
                f"expected the encoder {type(encoder).__name__} to return finite latents on finite images y, "
                "got NaN or inf entries"
            )
    if z_init is not None:
        if not isinstance(z_init, torch.Tensor):
            raise TypeError(f"expected z_init as a torch.Tensor, got {type(z_init).__name__}")
        if tuple(z_init.shape) not in ((batch, k), (batch, restarts, k)) or not z_init.is_floating_point():
            raise ValueError(
                f"expected a floating z_init of shape ({batch}, {k}) or ({batch}, {restarts}, {k}) "
                f"(latent_dim={k}), got {z_init.dtype} {tuple(z_init.shape)}"
            )
        if not bool(torch.isfinite(z_init).all()):
            raise ValueError("expected a finite z_init, got NaN or inf entries")
        z_init = z_init.to(device=device, dtype=dtype)
        if not differentiable:
            z_init = z_init.detach()
        if z_init.ndim == 3:
            return z_init
    std = config.init_std if config.init_std is not None else 1.0 / math.sqrt(k)
    noise = torch.stack(
        [torch.randn(restarts, k, generator=torch.Generator().manual_seed(s), dtype=dtype) for s in seeds]
    ).to(device)
    if z_init is None:
        return std * noise
    noise = torch.cat([torch.zeros_like(noise[:, :1]), noise[:, 1:]], dim=1)
    return z_init.unsqueeze(1) + std * noise


# ------------------------------------------------------------------------------------------ the core


def invert(
    generator: nn.Module,
    y: Measurements,
    operator: MeasurementOperator | None = None,
    config: InversionConfig | None = None,
    *,
    encoder: nn.Module | None = None,
    z_init: torch.Tensor | None = None,
    seeds: Sequence[int] | torch.Tensor | None = None,
    differentiable: bool = False,
) -> Inversion:
    """Find ``z`` (and a deviation ``v``) with ``A(G(z) + v) ~ y`` by gradient descent with restarts.

    Paper: Bora et al. 2017 (CSGM); Samangouei et al. 2018 (Defense-GAN projection, ``A = I``); Dhar et al.
    2018 (sparse deviations). Purpose: projection defense, compressed sensing, inverse problems, robust
    training.

    Args:
        generator: ``nn.Module`` with int ``latent_dim``; ``(N, k) -> (N, C, H, W)`` in [0, 1].
        y: measurements ``(B, ...)`` as produced by ``operator`` (a tuple for :class:`Mixture`); for the
            default Identity operator, images ``(B, C, H, W)``. Floating entries are cast to the generator's
            dtype (the library's one dtype rule, :func:`attacks.base.prepare_inputs`); outputs are in it.
        operator: the measurement operator; default ``Identity(y.shape[1:])``.
        config: :class:`InversionConfig` (default ``InversionConfig()``: Adam lr 0.01, 1000 steps, 1 restart).
        encoder: ``nn.Module`` images ``(B, C, H, W) -> (B, k)`` for ``config.init == "encoder"``.
        z_init: starting latents ``(B, k)`` (restart 0 there, others at ``z_init + init_std * noise``) or
            ``(B, R, k)`` (one per restart); takes precedence over ``config.init``.
        seeds: one int per sample for its restart noise (default ``config.seed`` for every sample); noise is
            drawn on CPU and moved to the device, so results do not depend on batch composition or device RNG
            state.
        differentiable: unroll all steps in the autograd graph so outputs are differentiable w.r.t. ``y`` (and
            ``z_init``); memory grows with ``steps * R * B``.

    Returns:
        :class:`Inversion` with ``z (B, k)``, ``x_hat (B, C, H, W)``, ``loss (B,)``,
        ``restart_losses (B, R)``, ``best_restart``, ``steps_run``, ``generator_evals (B,)``, ``deviation``.

    Example:
        >>> result = invert(generator, images, config=InversionConfig.defense_gan())  # doctest: +SKIP
        >>> result.x_hat.shape  # doctest: +SKIP
        torch.Size([B, 1, 28, 28])
    """
    k = _check_generator(generator)
    config = InversionConfig() if config is None else config
    if not isinstance(config, InversionConfig):
        raise TypeError(f"expected config as an InversionConfig, got {type(config).__name__}")
    if not isinstance(differentiable, bool):
        raise TypeError(f"expected differentiable as a bool, got {type(differentiable).__name__}")
    if operator is None:
        if not isinstance(y, torch.Tensor) or y.ndim != 4:
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"expected images y (B, C, H, W) for the default Identity operator, got {got}")
        operator = Identity((y.shape[1], y.shape[2], y.shape[3]))
    if not isinstance(operator, MeasurementOperator):
        raise TypeError(
            "expected operator as a MeasurementOperator (wrap a callable in Nonlinear), "
            f"got {type(operator).__name__}"
        )
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "invert needs autograd; expected a call outside torch.inference_mode(), got one inside"
        )
    leaves = _leaves(y)
    if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
        raise TypeError("expected y as a torch.Tensor or a tuple of tensors")
    batch = leaves[0].shape[0] if leaves[0].ndim else 0
    if batch < 1:
        raise ValueError(f"expected a non-empty batch of measurements, got shape {tuple(leaves[0].shape)}")
    operator.check_measurements(y, batch)
    device = leaves[0].device
    if any(t.device != device for t in leaves):
        raise ValueError(
            f"expected every measurement tensor on one device, got {sorted({str(t.device) for t in leaves})}"
        )
    _check_device(generator, device, "generator")
    _check_device(operator, device, "operator")
    _check_device(encoder, device, "encoder")
    operator.check_parameters()  # a NaN in A would make every loss NaN and be blamed on the generator
    dtype = _working_dtype(generator, y)
    y = _tree_map(lambda t: t.to(dtype) if t.is_floating_point() else t, y)
    if not differentiable:
        y = _tree_map(torch.Tensor.detach, y)
    seed_list = _resolve_seeds(seeds, batch, config.seed)

    with frozen(generator, operator, encoder), torch.enable_grad():
        z0 = _initial_latents(
            generator,
            y,
            operator,
            config,
            encoder,
            z_init,
            seed_list,
            (batch, config.restarts, k),
            device,
            dtype,
            differentiable,
        )
        return _optimize(generator, operator, y, z0, config, differentiable)


@dataclass
class _Outputs:
    """Per-row results, filled as rows finish (out-of-place writes, so unrolled graphs survive)."""

    z: torch.Tensor  # (N, k)
    loss: torch.Tensor  # (N,), inf until a row finishes; stays inf for pruned rows
    evals: torch.Tensor  # (B,) generator forward passes per sample
    x: torch.Tensor | None = None  # (N, C, H, W), allocated at the first forward
    v: torch.Tensor | None = None  # (N, C, H, W) pixel-space deviation, with config.deviation

    def record(
        self,
        step: int,
        ids: torch.Tensor,
        samples: torch.Tensor,
        frozen: torch.Tensor,
        leaving: torch.Tensor,
        values: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor],
        differentiable: bool,
    ) -> None:
        """Store the frozen rows' ``(z, x, v, loss)``; add ``step + 1`` evaluations per leaving row."""
        self.evals = self.evals.index_add(0, samples[leaving], torch.full_like(ids[leaving], step + 1))
        done = ids[frozen]
        z, x, v, loss = (t if t is None or differentiable else t.detach() for t in values)
        assert (
            z is not None and x is not None and loss is not None and self.x is not None
        )  # internal invariant
        self.z = self.z.index_copy(0, done, z[frozen])
        self.x = self.x.index_copy(0, done, x[frozen])
        self.loss = self.loss.index_copy(0, done, loss[frozen])
        if v is not None and self.v is not None:
            self.v = self.v.index_copy(0, done, v[frozen])


def _objective(
    operator: MeasurementOperator,
    x_gen: torch.Tensor,
    z: torch.Tensor,
    dev: _Deviation | None,
    y_rows: Measurements,
    config: InversionConfig,
    first: tuple[Measurements, int] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(v, x, measurement loss (N,), smooth objective (N,))`` for the active rows.

    The l1 term of the deviation is not in the objective: it is applied by the deviation's proximal step.
    ``first = (y, B)`` on the first step (images checked finite and in [0, 1]): ``y`` is checked against the
    operator's (now known) measurement shape before the loss reads it, and the operator's output and loss must be
    finite, else the operator is named.
    """
    v = None if dev is None else dev.pixels()
    x = x_gen if v is None else x_gen + v
    ax = operator(x)
    if first is not None:  # a Nonlinear operator learns its output shape on its first call
        operator.check_measurements(*first)
    meas = operator.loss(ax, y_rows)
    if not isinstance(meas, torch.Tensor) or tuple(meas.shape) != (z.shape[0],):
        got = tuple(meas.shape) if isinstance(meas, torch.Tensor) else type(meas).__name__
        raise ValueError(f"expected the operator's loss to return shape ({z.shape[0]},), got {got}")
    if first is not None:  # the forward's and the loss's finiteness in one device sync
        flags = [
            torch.isfinite(t.detach()).all() for t in (meas, *_leaves(ax)) if isinstance(t, torch.Tensor)
        ]
        if not bool(torch.stack(flags).all()):
            check_forward_finite(operator, ax, "on the generator's first images (finite, in [0, 1])")
            raise ValueError(
                f"{type(operator).__name__}: expected a finite measurement loss on the generator's first images "
                "(finite, in [0, 1]) and finite y, got NaN or inf: the operator's loss is not finite there"
            )
    objective = meas
    if config.z_prior_weight:
        objective = objective + config.z_prior_weight * z.pow(2).sum(dim=1)
    return v, x, meas, objective


def _check_nonfinite_latents(
    low: torch.Tensor,
    high: torch.Tensor,
    z_out: torch.Tensor,
    z_active: torch.Tensor,
    operator: MeasurementOperator,
) -> None:
    """After the loop, only when the generator's outputs went NaN or inf: say what went wrong (no per-step cost).

    The first step's images and loss were finite (checked then). NaN or inf latents mean a non-finite gradient
    moved ``z`` there: the operator's forward or loss at some later image, the generator at some later latent,
    or a step size that overflowed ``z`` (which came first is not recorded: that would cost a check per step).
    Finite latents with non-finite images are the generator's, reported by the range check that follows.
    """
    if bool(torch.isfinite(low) & torch.isfinite(high)):
        return
    if bool(torch.isfinite(z_out.detach()).all() & torch.isfinite(z_active.detach()).all()):
        return
    raise ValueError(
        "expected finite latents on every step, got NaN or inf latents after a finite first step (images and "
        f"loss): a non-finite gradient moved z there. Check the operator {type(operator).__name__} (its forward "
        "or loss NaN/inf, or not differentiable, at some image in [0, 1], e.g. sqrt or log at 0), the generator "
        "(NaN or inf at some latent) and the learning rate"
    )


def _optimize(
    generator: nn.Module,
    operator: MeasurementOperator,
    y: Measurements,
    z0: torch.Tensor,
    config: InversionConfig,
    differentiable: bool,
) -> Inversion:
    """The one loop. Rows are (sample, restart) pairs grouped by sample; a row leaves the computation when it
    finishes (last step, its sample converged) or is pruned."""
    batch, restarts, k = z0.shape
    n_rows = batch * restarts
    device, dtype = z0.device, z0.dtype
    ids = torch.arange(n_rows, device=device)  # global row id = sample * R + restart
    y_rows: Measurements = _tree_map(lambda t: t.repeat_interleave(restarts, dim=0), y)
    z = _project_ball(z0.reshape(n_rows, k), config.z_radius)
    dev: _Deviation | None = None  # deviation state (config.deviation), made at the first forward
    opt_state: list[list[torch.Tensor]] = []
    early = _EarlyStop(batch, config, device, dtype)
    out = _Outputs(
        z=torch.zeros(n_rows, k, device=device, dtype=dtype),
        loss=torch.full((n_rows,), math.inf, device=device, dtype=dtype),
        evals=torch.zeros(batch, dtype=torch.long, device=device),
    )

    step = 0
    while True:
        final = step >= config.steps
        need_graph = differentiable or not final
        with torch.set_grad_enabled(need_graph):
            if not differentiable:  # fast path: fresh leaves, the previous step's graph is dropped
                z = z.detach().requires_grad_(need_graph)
            elif not z.requires_grad:
                z = z.requires_grad_(True)
            x_gen = generator(z)
            if step == 0:
                _check_generated(x_gen, n_rows, operator)
                low, high = x_gen.detach().min(), x_gen.detach().max()
                dev = _start_deviation(x_gen, config)
                out.x = torch.zeros_like(x_gen, requires_grad=False)
                out.v = None if dev is None else torch.zeros_like(x_gen, requires_grad=False)
                opt_state = _initial_state([z], config)
            else:  # every step's range, reduced on the device and checked once at the end (no sync per step)
                low = torch.minimum(low, x_gen.detach().min())
                high = torch.maximum(high, x_gen.detach().max())
            v, x, meas, objective = _objective(
                operator, x_gen, z, dev, y_rows, config, (y, batch) if step == 0 else None
            )

        stay: torch.Tensor | None = None
        row_samples = torch.div(ids, restarts, rounding_mode="floor")
        exits = _exiting_rows(step, meas.detach(), row_samples, early, config, restarts)
        if exits is not None:
            frozen, pruned = exits
            leaving = frozen | pruned
            if bool(leaving.any()):
                out.record(step, ids, row_samples, frozen, leaving, (z, x, v, meas), differentiable)
                if bool(leaving.all()):
                    break
                stay = ~leaving

        if dev is None:
            (grad,) = torch.autograd.grad(objective.sum(), [z], create_graph=differentiable)
        else:  # Gauss-Seidel: the deviation's FISTA step at G(z_k), then z's gradient at (z_k, v_{k+1})
            if dev.lipschitz is None:
                dev.lipschitz = _deviation_lipschitz(operator, x_gen, dev, y_rows)
            z_on, x_on, y_on = z, x_gen, y_rows
            if stay is not None:
                dev.take(stay)
                z_on, x_on, y_on = z[stay], x_gen[stay], _take_rows(y_rows, stay)
            _deviation_step(operator, x_on, dev, y_on, step + 1, config, differentiable)
            objective = _objective(operator, x_on, z_on, dev, y_on, config)[3]
            (grad,) = torch.autograd.grad(objective.sum(), [z], create_graph=differentiable)
        if stay is not None:
            keep = stay
            ids = ids[keep]
            z, grad = z[keep], grad[keep]
            opt_state = [[s[keep] for s in group] for group in opt_state]
            y_rows = _take_rows(y_rows, keep)
        with torch.set_grad_enabled(differentiable):
            params, opt_state = _optimizer_update(
                [z], [grad], opt_state, config.lr_at(step), step + 1, config
            )
            z = _project_ball(params[0], config.z_radius)
        step += 1

    _check_nonfinite_latents(low, high, out.z, z, operator)
    _check_range(
        low,
        high,
        f"over the {step + 1} steps (the first step was in range: z left the generator's "
        "valid region; returning these images would hand out-of-range inputs to the classifier)",
    )
    losses = torch.nan_to_num(out.loss.detach(), nan=math.inf).reshape(batch, restarts)
    best = losses.argmin(dim=1)
    rows = torch.arange(batch, device=device) * restarts + best
    logger.debug("invert: %d samples x %d restarts, %d steps run", batch, restarts, step)
    assert out.x is not None  # internal invariant: set at the first forward
    return Inversion(
        z=out.z[rows],
        x_hat=out.x[rows],
        loss=out.loss[rows],
        restart_losses=out.loss.reshape(batch, restarts),
        best_restart=best,
        steps_run=step,
        generator_evals=out.evals,
        deviation=None if out.v is None else out.v[rows],
    )
