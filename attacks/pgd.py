"""Projected gradient descent (PGD) in Linf and l2, with restarts, step-size schedules, loss choice and EOT.

Madry, Makelov, Schmidt, Tsipras, Vladu, "Towards Deep Learning Models Resistant to Adversarial Attacks"
(ICLR 2018). Expectation over Transformation (EOT): Athalye, Engstrom, Ilyas, Kwok, "Synthesizing Robust
Adversarial Examples" (ICML 2018) and Athalye, Carlini, Wagner, "Obfuscated Gradients Give a False Sense of
Security" (ICML 2018).

This is the project's one gradient loop. Variants are hooks of :class:`PGD`, as in foolbox's
``gradient_descent_base``: :meth:`PGD.loss_fn`, :meth:`PGD.value_and_grad` (EOT lives here),
:meth:`PGD.normalize_gradient`, :meth:`PGD.project`, :meth:`PGD.step_size_at` and :meth:`PGD.random_start`.
BPDA is not a variant of the loop: wrap the non-differentiable part of the model in
:class:`attacks.bpda.BPDA`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

import torch
from torch import Tensor

from attacks.base import (
    Attack,
    Model,
    Norm,
    ThreatModel,
    check_finite_logits,
    model_name,
    per_sample_norm,
    project_onto_threat,
)
from attacks.losses import LossFn, get_loss

__all__ = ["MADRY_MNIST", "MADRY_MNIST_THREAT", "PGD", "PGDConfig", "StepSchedule"]


def _mean(tensors: list[Tensor]) -> Tensor:
    return tensors[0] if len(tensors) == 1 else torch.stack(tensors).mean(dim=0)


class StepSchedule(str, Enum):
    """Step-size schedules: constant, step decay at fractions of the run, cosine annealing to 0."""

    CONSTANT = "constant"
    STEP = "step"
    COSINE = "cosine"


@dataclass(frozen=True)
class PGDConfig:
    """Settings of :class:`PGD`.

    Args:
        steps: gradient steps per restart (default 40).
        step_size: step length; Linf: each pixel moves by ``step_size * sign(grad)``; l2: the step has l2 norm
            ``step_size``. ``None`` (default) means ``2.5 * eps / steps`` (Madry et al.).
        random_start: start each restart uniformly at random in the eps-ball (default True); without it the
            first restart starts at ``x`` and the others still start at random.
        restarts: number of runs; per sample the most successful, then highest-loss, iterate over all runs and
            steps is kept; later runs only attack the samples not yet fooled (default 1).
        loss: ``"ce"`` (default), ``"margin"``, ``"dlr"`` or a callable ``(logits, y) -> (B,)`` to maximize.
        schedule: :class:`StepSchedule` or its value (default ``"constant"``).
        decay_milestones: for ``"step"``: fractions of ``steps`` at which the step is multiplied by
            ``decay_factor`` (default ``(0.5, 0.75)``).
        decay_factor: for ``"step"`` (default 0.1).
        eot_samples: forward/backward passes whose gradients are averaged per step, for randomized models
            (Expectation over Transformation; default 1).
        seed: seed of the random starts (a ``torch.Generator`` on the inputs' device; the global RNG is
            untouched).
        stop_when_fooled: early exit: ``k >= 1`` drops a sample from the loop once its iterate has fooled the
            model at ``k`` consecutive steps (its best iterate so far is kept, so the result is the fooling
            iterate of highest loss seen); ``0`` (default): every sample runs every step. It saves the gradient
            passes of points already broken; with EOT, "fooled" is judged on the averaged logits.
    """

    steps: int = 40
    step_size: float | None = None
    random_start: bool = True
    restarts: int = 1
    loss: str | LossFn = "ce"
    schedule: StepSchedule | str = StepSchedule.CONSTANT
    decay_milestones: tuple[float, ...] = (0.5, 0.75)
    decay_factor: float = 0.1
    eot_samples: int = 1
    seed: int = 0
    stop_when_fooled: int = 0

    def __post_init__(self) -> None:
        for name, low in (("steps", 0), ("restarts", 1), ("eot_samples", 1), ("seed", 0), ("stop_when_fooled", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"expected {name} to be an int >= {low}, got {value!r}")
        if self.step_size is not None and not (math.isfinite(self.step_size) and self.step_size > 0):
            raise ValueError(f"expected step_size > 0 or None, got {self.step_size!r}")
        try:
            object.__setattr__(self, "schedule", StepSchedule(self.schedule))
        except ValueError:
            valid = [s.value for s in StepSchedule]
            raise ValueError(f"expected schedule to be one of {valid}, got {self.schedule!r}") from None
        if not all(0 < m < 1 for m in self.decay_milestones):
            raise ValueError(f"expected decay_milestones in (0, 1), got {self.decay_milestones!r}")
        if not 0 < self.decay_factor <= 1:
            raise ValueError(f"expected decay_factor in (0, 1], got {self.decay_factor!r}")
        get_loss(self.loss)


MADRY_MNIST_THREAT = ThreatModel(Norm.LINF, 0.3)
"""The threat model of Madry et al.'s MNIST attack: Linf, eps 0.3."""
MADRY_MNIST = PGDConfig(steps=40, step_size=0.01, random_start=True)
"""The PGD settings of Madry et al.'s MNIST attack: 40 steps of 0.01 from a random start
(with :data:`MADRY_MNIST_THREAT`; :meth:`PGD.madry_mnist` builds the attack)."""


class PGD(Attack):
    """Projected gradient descent in Linf or l2 (Madry et al. 2018), with restarts and EOT.

    Threat model: ``||x_adv - x||_p <= eps``, ``x_adv`` in [0, 1], ``p`` in {inf, 2}; white box (gradients of
    the model with respect to its input). Untargeted: maximizes the chosen loss of the true label.

    Each step: ``x <- project(x + step_size_at(t) * normalize_gradient(grad))`` with ``grad`` from
    :meth:`value_and_grad` (the mean over ``eot_samples`` passes). The iterate kept per sample is the best one
    seen (fooled first, then highest loss) over all steps and restarts.

    Args:
        threat: :class:`ThreatModel`.
        config: :class:`PGDConfig` (default ``PGDConfig()``: 40 steps, step ``2.5 eps / 40``, random start).

    Shapes: ``model(x)``: ``(B, C, H, W) -> (B, K)``; ``x``: ``(B, C, H, W)`` in [0, 1]; ``y``: ``(B,)``
    int64.

    Example:
        >>> attack = PGD(ThreatModel(Norm.LINF, 0.3), PGDConfig(steps=40, step_size=0.01))
        >>> result = attack(model.eval(), x, y)          # doctest: +SKIP
        >>> robust_accuracy = 1 - result.success.float().mean()   # doctest: +SKIP
        >>> eot = PGD(ThreatModel(Norm.L2, 2.0), PGDConfig(steps=100, eot_samples=20))  # randomized defense
    """

    def __init__(self, threat: ThreatModel, config: PGDConfig | None = None) -> None:
        super().__init__(threat)
        config = PGDConfig() if config is None else config
        if not isinstance(config, PGDConfig):
            raise TypeError(f"expected config to be a PGDConfig, got {type(config).__name__}")
        self.config = config
        self._loss = get_loss(config.loss)

    @classmethod
    def madry_mnist(cls, seed: int = 0, **overrides: Any) -> PGD:
        """Madry et al.'s MNIST attack: Linf eps 0.3, 40 steps of 0.01, random start (fields overridable)."""
        return cls(MADRY_MNIST_THREAT, replace(MADRY_MNIST, seed=seed, **overrides))

    # ----------------------------------------------------------------------------------------------- hooks
    def loss_fn(self, logits: Tensor, y: Tensor) -> Tensor:
        """Per-sample loss to maximize, ``(B,)``; default: the configured loss."""
        return self._loss(logits, y)

    def value_and_grad(self, model: Model, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Loss ``(B,)``, its gradient with respect to ``x`` ``(B, C, H, W)`` and logits ``(B, K)`` at ``x``.

        With ``eot_samples = k`` the model is run ``k`` times and the losses, gradients and logits are
        averaged (EOT). Gradients flow to ``x`` only (``torch.autograd.grad``), never into the
        model's ``.grad``.
        """
        losses, grads, all_logits = [], [], []
        for _ in range(self.config.eot_samples):
            x_req = x.detach().requires_grad_(True)
            with torch.enable_grad():
                logits = model(x_req)
                loss = self.loss_fn(logits, y)
                (grad,) = torch.autograd.grad(loss.sum(), x_req)
            losses.append(loss.detach())
            grads.append(grad)
            all_logits.append(logits.detach())
        return _mean(losses), _mean(grads), _mean(all_logits)

    def evaluate(self, model: Model, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Loss ``(B,)`` and logits ``(B, K)`` at ``x``, no gradients, mean over ``eot_samples`` passes."""
        losses, all_logits = [], []
        with torch.no_grad():
            for _ in range(self.config.eot_samples):
                logits = model(x)
                losses.append(self.loss_fn(logits, y))
                all_logits.append(logits)
        return _mean(losses), _mean(all_logits)

    def normalize_gradient(self, grad: Tensor) -> Tensor:
        """Steepest-ascent direction of unit norm: ``sign(grad)`` for Linf, ``grad / ||grad||_2`` for l2."""
        if self.threat.norm is Norm.LINF:
            return grad.sign()
        norms = per_sample_norm(grad, Norm.L2).clamp_min(1e-12)
        return grad / norms.view(-1, *([1] * (grad.dim() - 1)))

    def project(self, x_adv: Tensor, x: Tensor) -> Tensor:
        """Project onto the eps-ball around ``x`` and onto [0, 1]."""
        return project_onto_threat(x_adv, x, self.threat)

    def step_size_at(self, t: int) -> float:
        """Step size at step ``t`` (0-based) under the configured schedule."""
        cfg = self.config
        base = cfg.step_size if cfg.step_size is not None else 2.5 * self.threat.eps / max(cfg.steps, 1)
        if cfg.schedule is StepSchedule.STEP:
            passed = sum(t >= m * cfg.steps for m in cfg.decay_milestones)
            return base * cfg.decay_factor**passed
        if cfg.schedule is StepSchedule.COSINE:
            return base * 0.5 * (1 + math.cos(math.pi * t / max(cfg.steps, 1)))
        return base

    def random_start(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """``(B, C, H, W)`` offsets drawn uniformly from the eps-ball (one restart's start).

        Linf: uniform in ``[-eps, eps]`` per pixel. l2: the first ``d`` coordinates of a normalized Gaussian
        vector in ``d + 2`` dimensions, which is uniform in the ``d``-ball (Voelker, Gosmann, Stewart 2017).
        Each sample's offset uses consecutive draws, so on a CPU generator the first ``b`` samples of a batch
        get the same start as those ``b`` samples attacked alone.
        """
        eps = self.threat.eps
        if self.threat.norm is Norm.LINF:
            u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            return (2 * u - 1) * eps
        d = x[0].numel()
        # Gaussians by Box-Muller from uniforms: torch.rand fills a CPU tensor in order, torch.randn does not.
        u = torch.rand((x.shape[0], 2, d + 2), generator=generator, device=x.device, dtype=x.dtype)
        g = (-2 * u[:, 0].clamp_min(1e-12).log()).sqrt() * torch.cos(2 * math.pi * u[:, 1])
        g = g / torch.linalg.vector_norm(g, dim=1, keepdim=True).clamp_min(1e-12)
        return (eps * g[:, :d]).reshape(x.shape)

    # ------------------------------------------------------------------------------------------------ loop
    def run(self, model: Model, x: Tensor, y: Tensor) -> Tensor:
        """Run all restarts; return per sample the best iterate (fooled first, then highest loss)."""
        cfg = self.config
        # One generator per restart, seeded from cfg.seed: restart r starts the same whatever `restarts` is.
        restart_seeds = torch.randint(
            2**62, (cfg.restarts,), generator=torch.Generator().manual_seed(cfg.seed)
        )
        best_x = x.clone()
        best_success = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        best_loss = torch.full((x.shape[0],), float("-inf"), dtype=x.dtype, device=x.device)

        label = f"model {model_name(model)}"

        def keep_best(idx: Tensor, x_cur: Tensor, loss: Tensor, logits: Tensor, where: str) -> Tensor:
            check_finite_logits(logits, label, where)
            success = logits.argmax(dim=1) != y[idx]
            old_success, old_loss = best_success[idx], best_loss[idx]
            better = (success & ~old_success) | ((success == old_success) & (loss > old_loss))
            chosen = idx[better]
            best_x[chosen] = x_cur[better]
            best_success[chosen] = success[better]
            best_loss[chosen] = loss[better].to(best_loss.dtype)
            return success

        for r in range(cfg.restarts):
            idx = (~best_success).nonzero().squeeze(1) if r > 0 else torch.arange(x.shape[0], device=x.device)
            if idx.numel() == 0:
                break
            x_r, y_r = x[idx], y[idx]
            if cfg.random_start or r > 0:
                generator = torch.Generator(device=x.device).manual_seed(int(restart_seeds[r]))
                x_cur = self.project(x_r + self.random_start(x, generator)[idx], x_r)
            else:
                x_cur = x_r.clone()
            streak = torch.zeros(idx.shape[0], dtype=torch.long, device=x.device)
            for t in range(cfg.steps):
                loss, grad, logits = self.value_and_grad(model, x_cur, y_r)
                success = keep_best(idx, x_cur, loss, logits, f"at PGD step {t} of restart {r}")
                x_cur = self.project(x_cur + self.step_size_at(t) * self.normalize_gradient(grad), x_r)
                if cfg.stop_when_fooled:  # early exit: drop the points fooled at k consecutive steps
                    streak = (streak + 1) * success
                    going = streak < cfg.stop_when_fooled
                    if not bool(going.all()):
                        idx, x_cur, x_r, y_r, streak = idx[going], x_cur[going], x_r[going], y_r[going], streak[going]
                        if idx.numel() == 0:
                            break
            if idx.numel() == 0:
                continue
            loss, logits = self.evaluate(model, x_cur, y_r)
            keep_best(idx, x_cur, loss, logits, f"after the last PGD step of restart {r}")
        return best_x

    def __repr__(self) -> str:
        return f"PGD({self.threat}, {self.config})"
