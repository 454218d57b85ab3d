"""``InversionConfig``: every setting of the latent-optimization core in one frozen, validated dataclass.

Purpose: the same loop serves the projection defense (Defense-GAN, Samangouei et al. 2018), compressed sensing
(CSGM, Bora et al. 2017), sparse-deviation recovery (Dhar, Grover & Ermon 2018) and robust training; each is a
preset or a ``dataclasses.replace`` of this config. Presets: :meth:`InversionConfig.defense_gan`,
:meth:`InversionConfig.csgm`.

The objective minimised for every (sample, restart) row, summed over rows (never a batch mean, so each
sample's trajectory is independent of its batch)::

    loss_A(A(G(z) + v), y) + z_prior_weight * ||z||_2^2 + deviation_weight * ||v or DCT(v)||_1
    [+ the constraint G(z) + v in deviation_range, pixel deviations only]

``z`` follows ``optimizer``; ``v`` follows accelerated proximal gradient (FISTA) with step ``1 / L``, ``L`` the
Lipschitz constant of the data term in ``v`` (see :func:`manifold_defense.inversion.invert`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["InversionConfig"]

_OPTIMIZERS = ("adam", "sgd")
_SCHEDULES = ("constant", "step", "cosine")
_INITS = ("random", "encoder")
_DEVIATIONS = (None, "pixel", "dct")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class InversionConfig:
    """Settings of :func:`manifold_defense.inversion.invert` (units in brackets).

    Attributes:
        optimizer: ``"adam"`` or ``"sgd"`` (heavy-ball momentum, ``buf = momentum*buf + grad; z -= lr*buf``,
            as TF's MomentumOptimizer and torch's SGD with dampening 0).
        lr: base learning rate [latent units per unit gradient], ``> 0``.
        momentum: SGD momentum in ``[0, 1)`` [dimensionless]; must be 0 with Adam (use ``betas``).
        betas: Adam's ``(beta1, beta2)``, each in ``[0, 1)``.
        adam_eps: Adam's denominator epsilon, ``> 0``.
        steps: number of optimizer steps ``L >= 0`` [steps]; the loss is evaluated ``steps + 1`` times, the
            last time at the returned latent.
        restarts: random restarts ``R >= 1`` per sample, stacked along the batch dimension; the restart with
            the lowest final measurement loss is returned.
        schedule: ``"constant"``; ``"step"`` (lr times ``decay_factor`` from step ``floor(decay_at * steps)``
            on, Defense-GAN's x0.1 at 0.8 L); ``"cosine"`` (``lr * (1 + cos(pi t / steps)) / 2``).
        decay_at: fraction of ``steps`` where the step decay happens, in ``(0, 1]`` [fraction of steps].
        decay_factor: multiplier of the step decay, in ``(0, 1]``.
        z_prior_weight: weight of ``||z||_2^2`` added to each row's loss (CSGM's lambda), ``>= 0``
            [loss units per squared latent norm].
        z_radius: ``None`` or the radius ``> 0`` of the ball ``||z||_2 <= z_radius`` onto which every iterate
            (and the initial latent) is projected [latent norm].
        init: ``"random"``: ``z ~ N(0, init_std^2 I)`` per restart; ``"encoder"``: restart 0 at
            ``encoder(y)``, the others at that plus ``N(0, init_std^2 I)`` (Identity operator only; otherwise
            pass ``z_init``).
        init_std: std of the random initial latents / restart noise [latent units], ``>= 0``; ``None`` means
            ``1/sqrt(latent_dim)`` (Defense-GAN's ``N(0, 1/k)``).
        early_stop_tol: ``None`` (off) or the tolerance ``>= 0`` [measurement-loss units]: a sample whose best
            restart loss has not dropped by more than this for ``early_stop_patience`` consecutive steps is
            frozen (all its restarts leave the computation); the loop ends when every sample is frozen.
        early_stop_patience: consecutive non-improving steps before a sample is frozen, ``>= 1`` [steps].
        prune_after: ``None`` (off) or the step ``0 <= prune_after < steps`` at which each sample keeps only
            its ``prune_keep`` best restarts (by measurement loss at that step) and drops the rest [steps].
        prune_keep: restarts kept per sample when pruning, ``1 <= prune_keep < restarts``.
        deviation: ``None``; ``"pixel"`` or ``"dct"``: optimise ``x = G(z) + v`` jointly over ``z`` and a
            deviation ``v`` (``v`` itself, or its orthonormal 2-D DCT coefficients), starting at ``v = 0``
            (Dhar, Grover & Ermon 2018, "sparse-gen"). ``z`` takes ``optimizer`` steps; the coefficients take
            one FISTA step per loop step (gradient step ``1 / L`` on the data term, then the l1 proximal map),
            alternating with the ``z`` step.
        deviation_weight: weight of the l1 norm of the deviation coefficients, ``>= 0`` [loss units per unit
            l1].
        deviation_range: ``None`` or ``(lo, hi)`` with ``lo < hi``: keep ``x = G(z) + v`` inside ``[lo, hi]``
            per pixel (for images in [0, 1]: ``(0.0, 1.0)``), enforced exactly by the proximal step (the prox
            of ``t|v| + indicator(lo <= G + v <= hi)`` is the soft-threshold clipped to
            ``[lo - G, hi - G]`` with ``G`` the current ``G(z)``, so the returned ``x`` can leave the range
            only by the change of ``G(z)`` in the last ``z`` step). ``deviation="pixel"`` only (ignored without
            a deviation).
        seed: default per-sample seed of the restart noise, ``0 <= seed < 2**63``.
    """

    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = 0.01
    momentum: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    steps: int = 1000
    restarts: int = 1
    schedule: Literal["constant", "step", "cosine"] = "constant"
    decay_at: float = 0.8
    decay_factor: float = 0.1
    z_prior_weight: float = 0.0
    z_radius: float | None = None
    init: Literal["random", "encoder"] = "random"
    init_std: float | None = 1.0
    early_stop_tol: float | None = None
    early_stop_patience: int = 20
    prune_after: int | None = None
    prune_keep: int = 1
    deviation: Literal["pixel", "dct"] | None = None
    deviation_weight: float = 0.0
    deviation_range: tuple[float, float] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"InversionConfig.{name}: expected {expected}, got {getattr(self, name)!r}")

        if self.optimizer not in _OPTIMIZERS:
            raise bad("optimizer", f"one of {_OPTIMIZERS}")
        if not (_is_real(self.lr) and self.lr > 0):
            raise bad("lr", "a finite float > 0")
        if not (_is_real(self.momentum) and 0 <= self.momentum < 1):
            raise bad("momentum", "a float in [0, 1)")
        if self.optimizer == "adam" and self.momentum != 0:
            raise bad("momentum", "0 with optimizer='adam' (set betas instead)")
        if not (
            isinstance(self.betas, tuple)
            and len(self.betas) == 2
            and all(_is_real(b) and 0 <= b < 1 for b in self.betas)
        ):
            raise bad("betas", "a tuple of two floats in [0, 1)")
        if not (_is_real(self.adam_eps) and self.adam_eps > 0):
            raise bad("adam_eps", "a finite float > 0")
        if not (_is_int(self.steps) and self.steps >= 0):
            raise bad("steps", "an int >= 0")
        if not (_is_int(self.restarts) and self.restarts >= 1):
            raise bad("restarts", "an int >= 1")
        if self.schedule not in _SCHEDULES:
            raise bad("schedule", f"one of {_SCHEDULES}")
        if not (_is_real(self.decay_at) and 0 < self.decay_at <= 1):
            raise bad("decay_at", "a float in (0, 1]")
        if not (_is_real(self.decay_factor) and 0 < self.decay_factor <= 1):
            raise bad("decay_factor", "a float in (0, 1]")
        if not (_is_real(self.z_prior_weight) and self.z_prior_weight >= 0):
            raise bad("z_prior_weight", "a finite float >= 0")
        if self.z_radius is not None and not (_is_real(self.z_radius) and self.z_radius > 0):
            raise bad("z_radius", "None or a finite float > 0")
        if self.init not in _INITS:
            raise bad("init", f"one of {_INITS}")
        if self.init_std is not None and not (_is_real(self.init_std) and self.init_std >= 0):
            raise bad("init_std", "None or a finite float >= 0")
        if self.early_stop_tol is not None and not (
            _is_real(self.early_stop_tol) and self.early_stop_tol >= 0
        ):
            raise bad("early_stop_tol", "None or a finite float >= 0")
        if not (_is_int(self.early_stop_patience) and self.early_stop_patience >= 1):
            raise bad("early_stop_patience", "an int >= 1")
        if self.prune_after is not None:
            if not (_is_int(self.prune_after) and 0 <= self.prune_after < self.steps):
                raise bad("prune_after", f"None or an int in [0, steps={self.steps})")
            if not (_is_int(self.prune_keep) and 1 <= self.prune_keep < self.restarts):
                raise bad("prune_keep", f"an int in [1, restarts={self.restarts}) when pruning")
        elif not (_is_int(self.prune_keep) and self.prune_keep >= 1):
            raise bad("prune_keep", "an int >= 1")
        if self.deviation not in _DEVIATIONS:
            raise bad("deviation", f"one of {_DEVIATIONS}")
        if not (_is_real(self.deviation_weight) and self.deviation_weight >= 0):
            raise bad("deviation_weight", "a finite float >= 0")
        if self.deviation_range is not None:
            if not (
                isinstance(self.deviation_range, tuple)
                and len(self.deviation_range) == 2
                and all(_is_real(b) for b in self.deviation_range)
                and self.deviation_range[0] < self.deviation_range[1]
            ):
                raise bad("deviation_range", "None or a tuple (lo, hi) of finite floats with lo < hi")
            if self.deviation == "dct":
                raise bad(
                    "deviation_range", "None with deviation='dct' (the range is enforced on pixel deviations)"
                )
        if not (_is_int(self.seed) and 0 <= self.seed < 2**63):
            raise bad("seed", "an int in [0, 2**63)")

    def replace(self, **changes: Any) -> InversionConfig:
        """A validated copy with ``changes`` applied (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def lr_at(self, step: int) -> float:
        """Learning rate used for the update at ``step`` (0-based), following ``schedule``."""
        if self.schedule == "step":
            return self.lr * self.decay_factor if step >= math.floor(self.decay_at * self.steps) else self.lr
        if self.schedule == "cosine":
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * step / max(self.steps, 1)))
        return self.lr

    @classmethod
    def defense_gan(cls, **overrides: Any) -> InversionConfig:
        """Defense-GAN's projection (kabkabm/defensegan): SGD momentum 0.7, lr 10, L = 200 steps, R = 10
        restarts, lr x0.1 at 0.8 L, ``z ~ N(0, 1/z_dim)``, per-pixel MSE (use with the Identity operator)."""
        base = cls(
            optimizer="sgd",
            lr=10.0,
            momentum=0.7,
            steps=200,
            restarts=10,
            schedule="step",
            decay_at=0.8,
            decay_factor=0.1,
            init_std=None,
        )
        return base.replace(**overrides)

    @classmethod
    def csgm(cls, **overrides: Any) -> InversionConfig:
        """CSGM "VAE+Reg" (AshishBora/csgm, MNIST): Adam lr 0.01, 1000 steps, 10 restarts, z-prior weight 0.1,
        ``z ~ N(0, I)``, mean squared measurement error. Pass ``z_prior_weight=0.0`` for plain "VAE"."""
        base = cls(optimizer="adam", lr=0.01, steps=1000, restarts=10, z_prior_weight=0.1, init_std=1.0)
        return base.replace(**overrides)
