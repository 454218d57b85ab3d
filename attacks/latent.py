"""On-manifold (latent-space) attacks: search ``z'`` near a given ``z`` so that ``G(z')`` fools a classifier.

Song, Shu, Kushman, Ermon, "Constructing Unrestricted Adversarial Examples with Generative Models"
(NeurIPS 2018); Athalye, Carlini, Wagner (ICML 2018), Defense-GAN section: "reparameterization" attack
(CW in z space so that ``G(z')`` is adversarial); Jalal, Ilyas, Daskalakis, Dimakis, "The Robust Manifold
Defense" (arXiv 1712.09196).

The adversarial example is ``x_adv = G(z_adv)``, computed by one final generator pass: it lies exactly on the
generator's range, which makes it a valid attack on any defense that projects onto that range.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, NamedTuple, final

import torch
from torch import Tensor

from attacks.base import (
    Model,
    check_finite_logits,
    check_labels,
    check_logits,
    model_name,
    per_sample_norm,
    prepare_inputs,
    warn_if_training,
)
from attacks.losses import LossFn, get_loss

__all__ = [
    "Generator",
    "LatentAttack",
    "LatentAttackConfig",
    "LatentAttackResult",
    "LatentConstraint",
    "check_latents",
    "generate",
    "update_multiplier",
]

Generator = Callable[[Tensor], Tensor]
"""A generator: latents ``(B, latent_dim)`` to images ``(B, C, H, W)`` in [0, 1]."""


class LatentConstraint(str, Enum):
    """How close ``z'`` must stay to ``z``: in latent space (projected) or in pixel space (Lagrangian)."""

    LATENT = "latent"
    PIXEL = "pixel"


def check_latents(z: Any, generator: Any, name: str = "z") -> Tensor:
    """Raise unless ``z`` is a finite float ``(B, k)`` tensor, ``k`` = ``generator.latent_dim`` if set."""
    if not isinstance(z, Tensor):
        raise TypeError(f"expected {name} to be a torch.Tensor, got {type(z).__name__}")
    if not z.is_floating_point():
        raise TypeError(f"expected {name} to be a floating-point tensor, got dtype {z.dtype}")
    if z.dim() != 2 or z.shape[0] == 0:
        raise ValueError(f"expected {name} of shape (B, latent_dim) with B >= 1, got shape {tuple(z.shape)}")
    latent_dim = getattr(generator, "latent_dim", None)
    if isinstance(latent_dim, int) and z.shape[1] != latent_dim:
        raise ValueError(
            f"expected {name} of shape (B, {latent_dim}) (generator.latent_dim), got {tuple(z.shape)}"
        )
    if not bool(torch.isfinite(z).all()):
        raise ValueError(f"expected {name} to be finite, got NaN or inf values")
    return z


def generate(generator: Generator, z: Tensor, check: bool = False) -> Tensor:
    """``generator(z)``; with ``check=True`` raise unless it is a float ``(B, C, H, W)`` tensor in [0, 1]."""
    x = generator(z)
    if check:
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() != 4 or x.shape[0] != z.shape[0]:
            got = f"{x.dtype} of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"expected the generator to return float images (B={z.shape[0]}, C, H, W), got {got}"
            )
        lo, hi = float(x.min()), float(x.max())
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise ValueError(f"expected the generator's images in [0, 1], got range [{lo:.4g}, {hi:.4g}]")
    return x


def update_multiplier(
    multiplier: Tensor, violation: Tensor, factor: float, bounds: tuple[float, float] = (1e-3, 1e4)
) -> Tensor:
    """Per-sample multiplicative update of a Lagrange multiplier of a constraint ``g <= 0``.

    ``lambda <- lambda * factor`` where the constraint is violated (``violation = g > 0``),
    ``lambda / factor`` where it holds, clipped to ``bounds``. Scale-free (unlike additive dual
    ascent) and keeps ``lambda > 0``.

    Args:
        multiplier: ``(B,)`` positive multipliers.
        violation: ``(B,)`` values of ``g``.
        factor: > 1.
        bounds: ``(low, high)`` clip range.

    Returns:
        ``(B,)`` a new tensor.
    """
    grown = torch.where(violation > 0, multiplier * factor, multiplier / factor)
    return grown.clamp(bounds[0], bounds[1])


def _pixel_distance(a: Tensor, b: Tensor) -> Tensor:
    """Smoothed l2 distance per sample (differentiable at 0)."""
    return ((a - b).reshape(a.shape[0], -1).pow(2).sum(dim=1) + 1e-12).sqrt()


@dataclass(frozen=True)
class LatentAttackConfig:
    """Settings of :class:`LatentAttack`.

    Args:
        eps: the budget: ``||z' - z||_2 <= eps`` (``constraint="latent"``) or ``||G(z') - G(z)||_2 <= eps``
            (``constraint="pixel"``, total l2 over the image).
        constraint: :class:`LatentConstraint` or its value (default ``"latent"``).
        steps: gradient steps (default 100).
        step_size: ``"latent"``: l2 length of each normalized-gradient step in z (default
            ``2.5 eps / steps``);
            ``"pixel"``: Adam learning rate on z (default 0.05).
        loss: ``"ce"`` (default), ``"margin"``, ``"dlr"`` or a callable ``(logits, y) -> (B,)`` to maximize.
        multiplier_init: ``"pixel"``: initial Lagrange multiplier of the distance constraint (default 1.0).
        multiplier_factor: ``"pixel"``: per-step multiplicative adaptation of each sample's multiplier
            (default 1.2), see :func:`update_multiplier`.
        multiplier_bounds: ``"pixel"``: clip range of the multiplier (default ``(1e-3, 1e4)``).
    """

    eps: float
    constraint: LatentConstraint | str = LatentConstraint.LATENT
    steps: int = 100
    step_size: float | None = None
    loss: str | LossFn = "ce"
    multiplier_init: float = 1.0
    multiplier_factor: float = 1.2
    multiplier_bounds: tuple[float, float] = (1e-3, 1e4)

    def __post_init__(self) -> None:
        if not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps) and self.eps >= 0):
            raise ValueError(f"expected eps to be finite and >= 0, got {self.eps!r}")
        try:
            object.__setattr__(self, "constraint", LatentConstraint(self.constraint))
        except ValueError:
            valid = [c.value for c in LatentConstraint]
            raise ValueError(f"expected constraint to be one of {valid}, got {self.constraint!r}") from None
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"expected steps to be an int >= 0, got {self.steps!r}")
        if self.step_size is not None and not (math.isfinite(self.step_size) and self.step_size > 0):
            raise ValueError(f"expected step_size > 0 or None, got {self.step_size!r}")
        if not self.multiplier_init > 0 or not self.multiplier_factor > 1:
            raise ValueError(
                f"expected multiplier_init > 0 and multiplier_factor > 1, "
                f"got {self.multiplier_init!r} and {self.multiplier_factor!r}"
            )
        lo, hi = self.multiplier_bounds
        if not 0 < lo <= hi:
            raise ValueError(f"expected multiplier_bounds (low, high) with 0 < low <= high, got {(lo, hi)!r}")
        get_loss(self.loss)


class LatentAttackResult(NamedTuple):
    """Result of :class:`LatentAttack`.

    Attributes:
        z_adv: ``(B, k)`` adversarial latents.
        x_adv: ``(B, C, H, W)`` exactly ``generator(z_adv)``.
        success: ``(B,)`` bool, ``classifier(x_adv).argmax(1) != y``.
        logits: ``(B, K)`` ``classifier(x_adv)``.
        latent_distance: ``(B,)`` ``||z_adv - z||_2``.
        pixel_distance: ``(B,)`` ``||x_adv - G(z)||_2``.
        found_step: ``(B,)`` int64, the first step ``t`` (0 to ``steps``) whose iterate was feasible and fooled the
            classifier, -1 if none did. Samples run independently (Adam and the multipliers are per sample), so
            with a fixed ``step_size`` (always in ``"pixel"`` mode, whose learning rate does not depend on
            ``steps``) ``0 <= found_step <= t`` is exactly the success of a ``t``-step attack from the same start:
            one long run gives the whole success-vs-steps curve. In ``"latent"`` mode with the default step
            ``2.5 eps / steps`` the step length depends on ``steps``, and the curve is only that of this run.
    """

    z_adv: Tensor
    x_adv: Tensor
    success: Tensor
    logits: Tensor
    latent_distance: Tensor
    pixel_distance: Tensor
    found_step: Tensor


class LatentAttack:
    """PGD in a generator's latent space: find ``z'`` near ``z`` with ``classifier(G(z'))`` wrong.

    Threat model: on-manifold, untargeted, white box through generator and classifier. Two constraints:

    * ``"latent"``: ``||z' - z||_2 <= eps``; l2-normalized gradient ascent on the loss, projected onto the
      ball after every step.
    * ``"pixel"``: ``||G(z') - G(z)||_2 <= eps``; Adam on ``-loss + lambda * max(0, ||G(z') - G(z)|| - eps)`` with a
      per-sample multiplier ``lambda`` raised while the constraint is violated and lowered while it holds.

    Per sample the best iterate that satisfies the constraint is kept (fooled first, then highest loss);
    ``z`` itself is the first candidate, so the constraint always holds. If ``G(z)`` is already misclassified
    the attack succeeds with ``z_adv = z``.

    Args:
        config: :class:`LatentAttackConfig`.

    Shapes: ``z``: ``(B, k)``; ``generator(z)``: ``(B, C, H, W)`` in [0, 1]; ``classifier``: ``(B, C, H, W) ->
    (B, K)`` logits; ``y``: ``(B,)`` int64 (typically the true label of the image ``z`` was inverted from).

    Example:
        >>> attack = LatentAttack(LatentAttackConfig(eps=3.0, constraint="pixel", steps=200))
        >>> res = attack(classifier.eval(), generator.eval(), z, y)   # doctest: +SKIP
        >>> torch.equal(generator(res.z_adv), res.x_adv)               # doctest: +SKIP
        True
    """

    def __init__(self, config: LatentAttackConfig) -> None:
        if not isinstance(config, LatentAttackConfig):
            raise TypeError(f"expected config to be a LatentAttackConfig, got {type(config).__name__}")
        self.config = config
        self._loss = get_loss(config.loss)

    def loss_fn(self, logits: Tensor, y: Tensor) -> Tensor:
        """Per-sample loss to maximize, ``(B,)``; default: the configured loss."""
        return self._loss(logits, y)

    @final
    def __call__(self, classifier: Model, generator: Generator, z: Tensor, y: Tensor) -> LatentAttackResult:
        """Attack ``classifier`` on the range of ``generator`` around ``z``; see the class docstring."""
        if not callable(classifier) or not callable(generator):
            raise TypeError("expected classifier and generator to be callable")
        z0 = prepare_inputs(check_latents(z, generator).detach(), generator, "z", "generator").clone()
        y0 = check_labels(y, z0.shape[0], z0.device).detach().clone()
        warn_if_training(classifier, "classifier")
        warn_if_training(generator, "generator")
        label = f"classifier {model_name(classifier)}"
        with torch.no_grad():
            x0 = prepare_inputs(generate(generator, z0, check=True), classifier, "G(z)", "classifier")
            check_logits(classifier(x0), z0.shape[0], y0, "classifier", label=label)
        z_adv, found_step = self._run(classifier, generator, z0, x0, y0)
        with torch.no_grad():
            x_adv = generate(generator, z_adv, check=True)
            logits = check_finite_logits(classifier(x_adv), label, f"on the adversarial images of {self!r}")
        return LatentAttackResult(
            z_adv=z_adv,
            x_adv=x_adv,
            success=logits.argmax(dim=1) != y0,
            logits=logits,
            latent_distance=per_sample_norm(z_adv - z0, "l2"),
            pixel_distance=per_sample_norm(x_adv - x0, "l2"),
            found_step=found_step,
        )

    def _run(
        self, classifier: Model, generator: Generator, z0: Tensor, x0: Tensor, y: Tensor
    ) -> tuple[Tensor, Tensor]:
        cfg = self.config
        latent_mode = cfg.constraint is LatentConstraint.LATENT
        batch = z0.shape[0]
        best_z = z0.clone()
        best_success = torch.zeros(batch, dtype=torch.bool, device=z0.device)
        best_loss = torch.full((batch,), float("-inf"), dtype=z0.dtype, device=z0.device)
        found_step = torch.full((batch,), -1, dtype=torch.int64, device=z0.device)
        z_param = z0.clone().requires_grad_(True)
        step = cfg.step_size if cfg.step_size is not None else 2.5 * cfg.eps / max(cfg.steps, 1)
        optimizer: torch.optim.Optimizer | None = None
        if not latent_mode:
            optimizer = torch.optim.Adam([z_param], lr=cfg.step_size if cfg.step_size is not None else 0.05)
        multiplier = torch.full((batch,), cfg.multiplier_init, dtype=z0.dtype, device=z0.device)

        for t in range(cfg.steps + 1):
            with torch.enable_grad():
                x = generator(z_param)
                logits = classifier(x)
                loss = self.loss_fn(logits, y)
                pixel_d = _pixel_distance(x, x0)
            with torch.no_grad():
                if latent_mode:
                    feasible = per_sample_norm(z_param - z0, "l2") <= cfg.eps
                else:
                    feasible = per_sample_norm(x - x0, "l2") <= cfg.eps
                check_finite_logits(
                    logits, f"classifier {model_name(classifier)}", f"at latent attack step {t}"
                )
                success = logits.argmax(dim=1) != y
                better = feasible & (
                    (success & ~best_success) | ((success == best_success) & (loss > best_loss))
                )
                found_step[feasible & success & (found_step < 0)] = t
                best_z[better] = z_param[better]
                best_success[better] = success[better]
                best_loss[better] = loss[better].to(best_loss.dtype)
            if t == cfg.steps:
                break
            if latent_mode:
                (grad,) = torch.autograd.grad(loss.sum(), z_param)
                with torch.no_grad():
                    direction = grad / per_sample_norm(grad, "l2").clamp_min(1e-12)[:, None]
                    delta = z_param + step * direction - z0
                    norms = per_sample_norm(delta, "l2")[:, None]
                    shrink = torch.where(norms > cfg.eps, cfg.eps / norms.clamp_min(1e-30) * (1 - 1e-6), 1.0)
                    z_param.copy_(z0 + delta * shrink)
            elif optimizer is not None:
                # hinge: the distance only costs once it exceeds the budget
                objective = -loss + multiplier * torch.relu(pixel_d - cfg.eps)
                (grad,) = torch.autograd.grad(objective.sum(), z_param)
                z_param.grad = grad
                optimizer.step()
                multiplier = update_multiplier(
                    multiplier, pixel_d.detach() - cfg.eps, cfg.multiplier_factor, cfg.multiplier_bounds
                )
        return best_z.detach(), found_step

    def __repr__(self) -> str:
        return f"LatentAttack({self.config})"
