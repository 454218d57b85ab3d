"""The overpowered (OP) pair attack: two close points on a generator's range that the classifier labels apart.

Jalal, Ilyas, Daskalakis, Dimakis, "The Robust Manifold Defense: Adversarial Training using Generative Models"
(arXiv 1712.09196). The attack is "overpowered" because it is free to move *both* points: it certifies
non-robustness of a classifier on the generator's range (some pair ``G(z1), G(z2)`` within ``eps`` gets two
labels), which no defense that projects onto the range can repair. Robust manifold training uses such pairs
with a consistency loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, final

import torch
import torch.nn.functional as F
from torch import Tensor

from attacks.base import (
    Model,
    check_finite_logits,
    check_logits,
    model_name,
    per_sample_norm,
    prepare_inputs,
    warn_if_training,
)
from attacks.latent import Generator, _pixel_distance, check_latents, generate, update_multiplier

__all__ = ["OverpoweredAttack", "OverpoweredConfig", "OverpoweredResult", "pair_divergence"]


def pair_divergence(logits1: Tensor, logits2: Tensor) -> Tensor:
    """Symmetric cross-entropy between two predictions, ``(B,)``; large when the two labels disagree.

    ``CE(p1, p2) + CE(p2, p1)`` with ``p = softmax(logits)`` and ``CE(p, q) = -sum_k p_k log q_k``.
    Jalal et al. maximize the one-sided ``CE(p1, p2)``; the symmetric form treats both points
    alike.
    """
    logp1, logp2 = F.log_softmax(logits1, dim=1), F.log_softmax(logits2, dim=1)
    return -(logp1.exp() * logp2).sum(dim=1) - (logp2.exp() * logp1).sum(dim=1)


@dataclass(frozen=True)
class OverpoweredConfig:
    """Settings of :class:`OverpoweredAttack`.

    Args:
        eps: bound on the pair's pixel distance ``||G(z1) - G(z2)||_2`` (total l2 over the image).
        steps: Adam steps on ``(z1, z2)`` (default 500; Jalal et al. use up to 1000).
        step_size: Adam learning rate (default 0.01).
        multiplier_init: initial Lagrange multiplier of the distance constraint (default 1.0).
        multiplier_factor: per-step multiplicative adaptation of each pair's multiplier (default 1.1), see
            :func:`attacks.latent.update_multiplier`.
        multiplier_bounds: clip range of the multiplier (default ``(1e-3, 1e4)``).
        latent_penalty: weight of ``||z1||_2 + ||z2||_2`` in the objective, keeping the latents where the
            generator was trained (default 1e-4, as Jalal et al.).
        init_noise: standard deviation of the Gaussian noise added to ``z1`` to start ``z2`` when no ``z2`` is
            given (default 0.1; must be > 0, identical starts never separate).
        seed: seed of that noise (a ``torch.Generator`` on the latents' device; the global RNG is untouched).
        temperature: the divergence is taken of ``logits / temperature`` (default 1, Jalal et al.'s loss). The
            labels, and so success, do not depend on it; a temperature > 1 keeps the loss from saturating on a
            confident classifier, whose softmax is nearly one-hot so that the divergence and its gradient vanish
            between two points of the same label (on the zoo's standard classifier, 300 steps at eps 1.5 left 0.34
            of 200 starts consistent at temperature 1 and 0.13 at temperature 10: ``python -m eval defense
            --figures overpowered --n 200 --op-eps 1.5 [--op-temperature 10]``).
    """

    eps: float
    steps: int = 500
    step_size: float = 0.01
    multiplier_init: float = 1.0
    multiplier_factor: float = 1.1
    multiplier_bounds: tuple[float, float] = (1e-3, 1e4)
    latent_penalty: float = 1e-4
    init_noise: float = 0.1
    seed: int = 0
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps) and self.eps >= 0):
            raise ValueError(f"expected eps to be finite and >= 0, got {self.eps!r}")
        for name, low in (("steps", 0), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"expected {name} to be an int >= {low}, got {value!r}")
        for name in ("step_size", "multiplier_init", "init_noise", "temperature"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"expected {name} > 0, got {value!r}")
        if not self.multiplier_factor > 1:
            raise ValueError(f"expected multiplier_factor > 1, got {self.multiplier_factor!r}")
        if not self.latent_penalty >= 0:
            raise ValueError(f"expected latent_penalty >= 0, got {self.latent_penalty!r}")
        lo, hi = self.multiplier_bounds
        if not 0 < lo <= hi:
            raise ValueError(f"expected multiplier_bounds (low, high) with 0 < low <= high, got {(lo, hi)!r}")


class OverpoweredResult(NamedTuple):
    """Result of :class:`OverpoweredAttack` (all ``(B, ...)``, one row per starting latent).

    Attributes:
        z1, z2: ``(B, k)`` the pair's latents.
        x1, x2: ``(B, C, H, W)`` exactly ``G(z1)``, ``G(z2)``.
        pred1, pred2: ``(B,)`` int64 the classifier's labels of ``x1``, ``x2``.
        distance: ``(B,)`` ``||x1 - x2||_2``.
        disagree: ``(B,)`` bool, ``pred1 != pred2``.
        success: ``(B,)`` bool, ``disagree & (distance <= eps)``: a valid OP pair.
        robust: ``(B,)`` bool, ``~success``: the classifier stayed consistent within ``eps`` near this start.
            Accuracy under the OP attack is, e.g., ``(robust & (pred1 == y)).float().mean()``.
        found_step: ``(B,)`` int64, the step ``t`` (0 to ``steps``) at which the pair first became valid and was
            frozen, -1 if never. Pairs run independently (Adam is element-wise, frozen pairs stop), so
            ``found_step <= t`` is exactly the success of a ``t``-step attack from the same starts: one long run
            gives the whole accuracy-vs-steps curve.
    """

    z1: Tensor
    z2: Tensor
    x1: Tensor
    x2: Tensor
    pred1: Tensor
    pred2: Tensor
    distance: Tensor
    disagree: Tensor
    success: Tensor
    robust: Tensor
    found_step: Tensor


class OverpoweredAttack:
    """Overpowered pair attack (Jalal et al., arXiv 1712.09196): disagreeing pairs within ``eps`` on G(Z).

    Threat model: on-manifold pairs, ``||G(z1) - G(z2)||_2 <= eps``; white box through generator and
    classifier; no label needed. Per pair, Adam minimizes

        ``-pair_divergence(f(G(z1)), f(G(z2))) + lambda * max(0, ||G(z1) - G(z2)||_2 - eps)
        + latent_penalty * (||z1|| + ||z2||)``

    with a per-pair multiplier ``lambda`` raised while the distance constraint is violated and lowered while
    it holds. A pair is frozen as soon as it is valid (labels differ and the distance is within ``eps``);
    pairs never found valid return their last iterate.

    Args:
        config: :class:`OverpoweredConfig`.

    Shapes: ``z1`` (and ``z2`` if given): ``(B, k)``; ``generator``: ``(B, k) -> (B, C, H, W)`` in [0, 1];
    ``classifier``: ``(B, C, H, W) -> (B, K)`` logits.

    Example:
        >>> op = OverpoweredAttack(OverpoweredConfig(eps=2.0, steps=500, seed=0))
        >>> res = op(classifier.eval(), generator.eval(), z_inverted)        # doctest: +SKIP
        >>> op_accuracy = (res.robust & (res.pred1 == y)).float().mean()     # doctest: +SKIP
    """

    def __init__(self, config: OverpoweredConfig) -> None:
        if not isinstance(config, OverpoweredConfig):
            raise TypeError(f"expected config to be an OverpoweredConfig, got {type(config).__name__}")
        self.config = config

    @final
    def __call__(
        self, classifier: Model, generator: Generator, z1: Tensor, z2: Tensor | None = None
    ) -> OverpoweredResult:
        """Search a disagreeing pair from each start ``z1`` (and ``z2``, default ``z1`` plus seeded noise)."""
        cfg = self.config
        if not callable(classifier) or not callable(generator):
            raise TypeError("expected classifier and generator to be callable")
        z1_0 = prepare_inputs(
            check_latents(z1, generator, "z1").detach(), generator, "z1", "generator"
        ).clone()
        if z2 is None:
            gen = torch.Generator(device=z1_0.device).manual_seed(cfg.seed)
            noise = torch.randn(z1_0.shape, generator=gen, device=z1_0.device, dtype=z1_0.dtype)
            z2_0 = z1_0 + cfg.init_noise * noise
        else:
            z2_0 = prepare_inputs(
                check_latents(z2, generator, "z2").detach(), generator, "z2", "generator"
            ).clone()
            if z2_0.shape != z1_0.shape or z2_0.device != z1_0.device:
                raise ValueError(
                    f"expected z2 like z1 {tuple(z1_0.shape)} on {z1_0.device}, "
                    f"got {tuple(z2_0.shape)} on {z2_0.device}"
                )
        warn_if_training(classifier, "classifier")
        warn_if_training(generator, "generator")
        batch = z1_0.shape[0]
        label = f"classifier {model_name(classifier)}"
        with torch.no_grad():
            x_pair = prepare_inputs(
                generate(generator, torch.cat([z1_0, z2_0]), check=True), classifier, "G(z)", "classifier"
            )
            check_logits(classifier(x_pair), 2 * batch, None, "classifier", label=label)

        z1_adv, z2_adv, found_step = self._run(classifier, generator, z1_0, z2_0)
        with torch.no_grad():
            x_pair = generate(generator, torch.cat([z1_adv, z2_adv]), check=True)
            logits = check_finite_logits(classifier(x_pair), label, f"on the final pairs of {self!r}")
            pred = logits.argmax(dim=1)
        x1, x2 = x_pair[:batch], x_pair[batch:]
        pred1, pred2 = pred[:batch], pred[batch:]
        distance = per_sample_norm(x1 - x2, "l2")
        disagree = pred1 != pred2
        success = disagree & (distance <= cfg.eps)
        return OverpoweredResult(
            z1_adv, z2_adv, x1, x2, pred1, pred2, distance, disagree, success, ~success, found_step
        )

    def _run(
        self, classifier: Model, generator: Generator, z1_0: Tensor, z2_0: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        cfg = self.config
        batch = z1_0.shape[0]
        z1 = z1_0.clone().requires_grad_(True)
        z2 = z2_0.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([z1, z2], lr=cfg.step_size)
        multiplier = torch.full((batch,), cfg.multiplier_init, dtype=z1_0.dtype, device=z1_0.device)
        found = torch.zeros(batch, dtype=torch.bool, device=z1_0.device)
        found_step = torch.full((batch,), -1, dtype=torch.int64, device=z1_0.device)
        kept1, kept2 = z1_0.clone(), z2_0.clone()
        for t in range(cfg.steps + 1):
            with torch.enable_grad():
                x = generator(torch.cat([z1, z2]))
                logits = classifier(x)
                x1, x2, l1, l2 = x[:batch], x[batch:], logits[:batch], logits[batch:]
            with torch.no_grad():
                check_finite_logits(
                    logits, f"classifier {model_name(classifier)}", f"at overpowered step {t}"
                )
                valid = (l1.argmax(1) != l2.argmax(1)) & (per_sample_norm(x1 - x2, "l2") <= cfg.eps)
                new = valid & ~found
                kept1[new], kept2[new] = z1[new], z2[new]
                found_step[new] = t
                found |= new
            if t == cfg.steps or bool(found.all()):
                break
            with torch.enable_grad():
                distance = _pixel_distance(x1, x2)
                objective = (
                    -pair_divergence(l1 / cfg.temperature, l2 / cfg.temperature)
                    # hinge: no pull towards each other while the pair is within budget (a plain
                    # lambda * (d - eps) term collapses pairs before the divergence can separate them)
                    + multiplier * torch.relu(distance - cfg.eps)
                    + cfg.latent_penalty * (per_sample_norm(z1, "l2") + per_sample_norm(z2, "l2"))
                )
                g1, g2 = torch.autograd.grad((objective * (~found)).sum(), [z1, z2])
            z1.grad, z2.grad = g1, g2
            optimizer.step()
            with torch.no_grad():
                # Frozen pairs stay exactly where they were found (Adam's momentum would move them).
                z1[found], z2[found] = kept1[found], kept2[found]
            multiplier = update_multiplier(
                multiplier, distance.detach() - cfg.eps, cfg.multiplier_factor, cfg.multiplier_bounds
            )
        with torch.no_grad():
            out1 = torch.where(found[:, None], kept1, z1)
            out2 = torch.where(found[:, None], kept2, z2)
        return out1.detach(), out2.detach(), found_step

    def __repr__(self) -> str:
        return f"OverpoweredAttack({self.config})"
