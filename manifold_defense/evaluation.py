"""Reusable evaluation pieces: robust accuracy under PGD (worst case over random draws of a randomized model),
on-manifold latent attacks, overpowered pairs and their step curves, for any classifier / generator pair.

Papers: Athalye, Carlini, Wagner, "Obfuscated Gradients Give a False Sense of Security" (ICML 2018: BPDA, EOT);
Jalal, Ilyas, Daskalakis, Dimakis, "The Robust Manifold Defense" (arXiv 1712.09196: on-manifold and overpowered
attacks); the worst case over draws of a randomized model is AutoAttack's "rand" practice (Croce and Hein, ICML
2020).

Every function takes its models and tensors as arguments (nothing is loaded here), works batch by batch on the
inputs' device and returns results on the CPU, so the robustness harness (``eval.harness``) and the commands reuse
them on any model. The optional ``on_batch`` callback is called once per processed batch (progress bars).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from attacks import (
    PGD,
    LatentAttack,
    LatentAttackConfig,
    LatentAttackResult,
    OverpoweredAttack,
    OverpoweredConfig,
    PGDConfig,
    ThreatModel,
)
from attacks.base import model_name, predict
from manifold_defense.inversion import InversionConfig, invert

__all__ = [
    "OnBatch",
    "OnManifoldEval",
    "OverpoweredEval",
    "RobustEval",
    "accuracy_at_steps",
    "consistency_at_steps",
    "correct_in_every_draw",
    "correct_per_draw",
    "evaluate_onmanifold",
    "evaluate_overpowered",
    "evaluate_pgd",
    "found_at_steps",
    "invert_latents",
    "step_marks",
]

OnBatch = Callable[[], None] | None
"""An optional callback with no arguments, called once per processed batch (progress bars)."""


def _tick(on_batch: OnBatch) -> None:
    if on_batch is not None:
        on_batch()


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"expected batch_size to be an int >= 1, got {batch_size!r}")


def _check_xy(x: Any, y: Any) -> None:
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(f"expected x and y as tensors, got {type(x).__name__} and {type(y).__name__}")
    if x.dim() != 4 or x.shape[0] == 0 or tuple(y.shape) != (x.shape[0],):
        raise ValueError(
            f"expected x (N >= 1, C, H, W) and y (N,), got {tuple(x.shape)} and {tuple(y.shape)}"
        )


@torch.no_grad()
def correct_per_draw(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    draws: int = 1,
    batch_size: int = 100,
    on_batch: OnBatch = None,
    name: str | None = None,
) -> Tensor:
    """``(draws, N)`` bool on CPU: whether ``model(x)`` predicts ``y`` in each of ``draws`` forward passes.

    The passes run batch by batch, ``draws`` passes per batch, in the order :func:`correct_in_every_draw` runs them
    (which is ``correct_per_draw(...).all(0)``): for a randomized model, ``.all(0)`` is the worst case over draws
    and ``.float().mean()`` the accuracy of one draw, averaged. Non-finite logits raise
    :class:`attacks.base.NonFiniteLogitsError` naming the model (``name``, default its class) and the batch.

    Args:
        model: ``(B, C, H, W) -> (B, K)`` logits.
        x: ``(N, C, H, W)``; y: ``(N,)`` int64 on the same device.
        draws: forward passes per point (>= 1).
        batch_size: images per forward pass.
    """
    _check_xy(x, y)
    _check_batch_size(batch_size)
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"expected draws to be an int >= 1, got {draws!r}")
    out = []
    for i in range(0, x.shape[0], batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        where = f"on images {i}-{i + xb.shape[0] - 1} of {x.shape[0]}"
        label = name or f"model {model_name(model)}"
        out.append(torch.stack([(predict(model, xb, label, where) == yb).cpu() for _ in range(draws)]))
        _tick(on_batch)
    return torch.cat(out, dim=1)


def correct_in_every_draw(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    draws: int = 1,
    batch_size: int = 100,
    on_batch: OnBatch = None,
    name: str | None = None,
) -> Tensor:
    """``(N,)`` bool on CPU: ``model(x)`` predicts ``y`` in each of ``draws`` forward passes (worst case).

    Non-finite logits raise :class:`attacks.base.NonFiniteLogitsError` naming the model (``name``, default its
    class) and the batch.

    For a randomized model (e.g. a projection with fresh restarts per call) one lucky pass is not enough:
    a point counts as correct only if every draw is correct (AutoAttack "rand" practice). Arguments and errors
    as :func:`correct_per_draw`, which gives each draw's verdicts.
    """
    return correct_per_draw(model, x, y, draws, batch_size, on_batch, name).all(dim=0)


class RobustEval(NamedTuple):
    """Result of :func:`evaluate_pgd`.

    Attributes:
        accuracy: fraction of points still classified correctly (worst case over draws).
        robust: ``(N,)`` bool on CPU, per point.
        x_adv: ``(N, C, H, W)`` adversarial images on CPU.
        attacked_model_accuracy: accuracy of the attacked model on ``x_adv`` (its own final pass); differs from
            ``accuracy`` for transfer attacks (``eval_model`` given) and randomized models.
        seconds: wall time.
    """

    accuracy: float
    robust: Tensor
    x_adv: Tensor
    attacked_model_accuracy: float
    seconds: float


def evaluate_pgd(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    config: PGDConfig,
    *,
    eval_model: Callable[[Tensor], Tensor] | None = None,
    draws: int = 1,
    clean_correct: Tensor | None = None,
    batch_size: int = 100,
    on_batch: OnBatch = None,
) -> RobustEval:
    """Robust accuracy of ``eval_model`` (default ``model``) under :class:`attacks.PGD` run against ``model``.

    Threat model: ``threat`` (Linf or l2 ball of radius eps, [0, 1] box), white box on ``model``. With
    ``eval_model`` given the attack is a transfer attack: the adversarial images are computed on ``model``
    (e.g. the bare classifier, ignoring a projection) and evaluated on ``eval_model`` (the defended model).

    A point is robust when ``eval_model`` classifies ``x_adv`` correctly in each of ``draws`` fresh forward
    passes, and (without ``eval_model``) also in the attack's own final pass, and (if given) ``clean_correct``
    holds: the worst case over draws, as a randomized defense must be evaluated.

    Args:
        model: the attacked model, ``(B, C, H, W)`` in [0, 1] -> ``(B, K)`` logits (eval mode).
        x: ``(N, C, H, W)`` images in [0, 1]; y: ``(N,)`` int64, same device.
        threat: :class:`ThreatModel`.
        config: :class:`PGDConfig` (steps, step size, restarts, loss, ``eot_samples``, seed).
        eval_model: the model that is scored (transfer); ``None``: ``model``.
        draws: fresh evaluation passes per point (>= 1; use > 1 for randomized models).
        clean_correct: optional ``(N,)`` bool (any device): points misclassified without attack count as not
            robust.
        batch_size: images per attack call.
        on_batch: called after each batch.

    Returns:
        :class:`RobustEval`.
    """
    _check_xy(x, y)
    _check_batch_size(batch_size)
    if clean_correct is not None and tuple(clean_correct.shape) != (x.shape[0],):
        raise ValueError(f"expected clean_correct of shape ({x.shape[0]},), got {tuple(clean_correct.shape)}")
    attack = PGD(threat, config)
    start = time.perf_counter()
    robust, adv, attacked_ok = [], [], []
    for i in range(0, x.shape[0], batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        result = attack(model, xb, yb)
        ok_attacked = ~result.success
        scorer = model if eval_model is None else eval_model
        ok = correct_in_every_draw(scorer, result.x_adv, yb, draws, batch_size)
        if eval_model is None:
            ok &= ok_attacked.cpu()
        robust.append(ok)
        adv.append(result.x_adv.cpu())
        attacked_ok.append(ok_attacked.cpu())
        _tick(on_batch)
    mask = torch.cat(robust)
    if clean_correct is not None:
        mask &= clean_correct.cpu().bool()
    return RobustEval(
        accuracy=float(mask.float().mean()),
        robust=mask,
        x_adv=torch.cat(adv),
        attacked_model_accuracy=float(torch.cat(attacked_ok).float().mean()),
        seconds=time.perf_counter() - start,
    )


def invert_latents(
    generator: nn.Module,
    x: Tensor,
    config: InversionConfig,
    *,
    encoder: nn.Module | None = None,
    batch_size: int = 100,
    on_batch: OnBatch = None,
) -> tuple[Tensor, Tensor]:
    """Latents ``z (N, k)`` with ``G(z) ~ x`` and the per-image MSE ``(N,)``, both on ``x``'s device.

    Uses :func:`manifold_defense.inversion.invert` (Identity operator) batch by batch; with
    ``config.init == "encoder"`` pass the generator's encoder (warm start).
    """
    _check_batch_size(batch_size)
    zs, losses = [], []
    for i in range(0, x.shape[0], batch_size):
        inv = invert(generator, x[i : i + batch_size], config=config, encoder=encoder)
        zs.append(inv.z.detach())
        losses.append(inv.loss.detach())
        _tick(on_batch)
    return torch.cat(zs), torch.cat(losses)


class OnManifoldEval(NamedTuple):
    """Result of :func:`evaluate_onmanifold` (tensors on CPU).

    Attributes:
        success_rate: among eligible points, the fraction whose ``G(z')`` the classifier gets wrong within the
            pixel budget (NaN when no point is eligible).
        eligible: ``(N,)`` bool, the classifier labels ``G(z)`` correctly (only those count).
        success: ``(N,)`` bool, ``eligible`` and the attack fooled the classifier.
        x0: ``(N, C, H, W)`` ``G(z)``; x_adv: ``G(z')``; pred_adv: ``(N,)`` labels of ``G(z')``.
        pixel_distance: ``(N,)`` ``||G(z') - G(z)||_2``; latent_distance: ``||z' - z||_2``.
        found_step: ``(N,)`` int64, the attack step of the first success, -1 if none
            (:class:`attacks.LatentAttackResult`); :func:`found_at_steps` with ``among=eligible`` reads the
            success-vs-steps curve.
        seconds: wall time.
    """

    success_rate: float
    eligible: Tensor
    success: Tensor
    x0: Tensor
    x_adv: Tensor
    pred_adv: Tensor
    pixel_distance: Tensor
    latent_distance: Tensor
    found_step: Tensor
    seconds: float


def evaluate_onmanifold(
    classifier: Callable[[Tensor], Tensor],
    generator: nn.Module,
    z: Tensor,
    y: Tensor,
    config: LatentAttackConfig,
    *,
    batch_size: int = 100,
    on_batch: OnBatch = None,
) -> OnManifoldEval:
    """On-manifold attack success rate: :class:`attacks.LatentAttack` from ``z``, counted on eligible points.

    Threat model: ``x_adv = G(z')`` with (``config.constraint == "pixel"``) ``||G(z') - G(z)||_2 <= eps``;
    such points lie on the generator's range, so a projection defense maps them (nearly) to themselves.

    Args:
        classifier: ``(B, C, H, W) -> (B, K)`` logits.
        generator: ``(B, k) -> (B, C, H, W)`` in [0, 1].
        z: ``(N, k)`` starting latents (e.g. from :func:`invert_latents` of test images); y: ``(N,)`` their
            true labels.
        config: :class:`LatentAttackConfig`.
    """
    _check_batch_size(batch_size)
    if tuple(y.shape) != (z.shape[0],):
        raise ValueError(f"expected y of shape ({z.shape[0]},), got {tuple(y.shape)}")
    attack = LatentAttack(config)
    start = time.perf_counter()
    eligible_parts, x0_parts, pred_parts = [], [], []
    results: list[LatentAttackResult] = []
    for i in range(0, z.shape[0], batch_size):
        zb, yb = z[i : i + batch_size], y[i : i + batch_size]
        with torch.no_grad():
            x0 = generator(zb)
            where = f"on G(z) of latents {i}-{i + zb.shape[0] - 1}"
            eligible_parts.append((predict(classifier, x0, "classifier", where) == yb).cpu())
        result = attack(classifier, generator, zb, yb)
        results.append(result)
        x0_parts.append(x0.cpu())
        pred_parts.append(result.logits.argmax(1).cpu())
        _tick(on_batch)
    eligible = torch.cat(eligible_parts)
    success = eligible & torch.cat([r.success.cpu() for r in results])
    count = int(eligible.sum())
    return OnManifoldEval(
        success_rate=float(success.sum()) / count if count else float("nan"),
        eligible=eligible,
        success=success,
        x0=torch.cat(x0_parts),
        x_adv=torch.cat([r.x_adv.detach().cpu() for r in results]),
        pred_adv=torch.cat(pred_parts),
        pixel_distance=torch.cat([r.pixel_distance.detach().cpu() for r in results]),
        latent_distance=torch.cat([r.latent_distance.detach().cpu() for r in results]),
        found_step=torch.cat([r.found_step.detach().cpu() for r in results]),
        seconds=time.perf_counter() - start,
    )


class OverpoweredEval(NamedTuple):
    """Result of :func:`evaluate_overpowered` (tensors on CPU).

    Attributes:
        consistency: fraction of starting points near which the classifier stayed consistent (no valid pair
            found): the accuracy under the overpowered attack in Jalal et al.'s sense.
        accuracy: fraction of points that are consistent *and* whose first point gets the true label.
        x1, x2: ``(N, C, H, W)`` the pairs; pred1, pred2: ``(N,)`` labels; distance: ``(N,)`` ``||x1 - x2||``.
        success: ``(N,)`` bool, valid pair (labels differ, distance <= eps).
        found_step: ``(N,)`` int64, the attack step at which the pair became valid, -1 if never
            (:class:`attacks.OverpoweredResult`); :func:`consistency_at_steps` reads the accuracy-vs-steps curve.
        seconds: wall time.
    """

    consistency: float
    accuracy: float
    x1: Tensor
    x2: Tensor
    pred1: Tensor
    pred2: Tensor
    distance: Tensor
    success: Tensor
    found_step: Tensor
    seconds: float


def step_marks(steps: int) -> list[int]:
    """The step counts of an attack-strength curve: 10, 30, 100, 300, 1000, ... below ``steps``, and ``steps``."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"expected steps as an int >= 0, got {steps!r}")
    marks = [t for base in (10, 30) for t in (base * 10**e for e in range(7)) if t < steps]
    return sorted({*marks, steps})


def _check_found_step(found_step: Tensor) -> Tensor:
    if not isinstance(found_step, Tensor):
        raise TypeError(f"expected found_step as a torch.Tensor, got {type(found_step).__name__}")
    if found_step.ndim != 1 or found_step.numel() == 0 or found_step.is_floating_point():
        raise ValueError(
            f"expected a non-empty 1-D integer found_step, got {found_step.dtype} {tuple(found_step.shape)}"
        )
    return found_step.cpu()


def found_at_steps(found_step: Tensor, steps: int, among: Tensor | None = None) -> dict[int, float]:
    """Share of the points (of ``among``) whose attack had succeeded after ``t`` steps, for ``t`` in
    :func:`step_marks` ``(steps)``.

    Exact, not re-run, for attacks whose points run independently and whose step does not depend on the step
    count (:class:`attacks.OverpoweredResult`, :class:`attacks.LatentAttackResult` in ``"pixel"`` mode): a
    ``t``-step attack succeeds exactly where ``0 <= found_step <= t``. A curve that still moves at its last step
    has not converged: the attack's figure is then a bound that more steps would move.

    Args:
        found_step: ``(N,)`` int64 steps (-1: never found), N >= 1.
        steps: the attack's step count.
        among: optional ``(N,)`` bool, the points that count (e.g. the eligible ones); NaN shares if none.
    """
    found = _check_found_step(found_step)
    marks = step_marks(steps)
    if among is None:
        mask = torch.ones_like(found, dtype=torch.bool)
    else:
        if not isinstance(among, Tensor) or among.shape != found.shape:
            raise ValueError(f"expected among as a bool tensor of shape {tuple(found.shape)}, got {among!r}")
        mask = among.cpu().bool()
    count = int(mask.sum())
    return {
        t: round(float((mask & (found >= 0) & (found <= t)).sum()) / count, 4) if count else float("nan")
        for t in marks
    }


def consistency_at_steps(found_step: Tensor, steps: int) -> dict[int, float]:
    """Consistency under the overpowered attack (fraction of starts without a valid pair) after ``t`` steps,
    for ``t`` in :func:`step_marks` ``(steps)``: one minus :func:`found_at_steps` (exact, see there).

    Args:
        found_step: ``(N,)`` int64 steps (-1: never found), N >= 1.
        steps: the attack's step count.
    """
    return {t: round(1.0 - v, 4) for t, v in found_at_steps(found_step, steps).items()}


def accuracy_at_steps(found_step: Tensor, steps: int, start_correct: Tensor) -> dict[int, float]:
    """Accuracy under the overpowered attack after ``t`` steps: the share of starts that the classifier labels
    correctly (``start_correct``: label of ``G(z1)`` at the start equals the true label) and near which no valid
    pair was found within ``t`` steps (Jalal et al.'s correctness and consistency together).

    Args:
        found_step: ``(N,)`` int64 steps (-1: never found), N >= 1.
        steps: the attack's step count.
        start_correct: ``(N,)`` bool.
    """
    found = _check_found_step(found_step)
    if not isinstance(start_correct, Tensor) or start_correct.shape != found.shape:
        raise ValueError(
            f"expected start_correct as a bool tensor of shape {tuple(found.shape)}, got {start_correct!r}"
        )
    ok = start_correct.cpu().bool()
    return {
        t: round(float((ok & ~((found >= 0) & (found <= t))).float().mean()), 4) for t in step_marks(steps)
    }


def evaluate_overpowered(
    classifier: Callable[[Tensor], Tensor],
    generator: nn.Module,
    z: Tensor,
    y: Tensor,
    config: OverpoweredConfig,
    *,
    batch_size: int = 100,
    on_batch: OnBatch = None,
) -> OverpoweredEval:
    """Accuracy under :class:`attacks.OverpoweredAttack` started at ``z1 = z``.

    Threat model: pairs ``G(z1), G(z2)`` with ``||G(z1) - G(z2)||_2 <= eps`` that the classifier labels
    differently; both points lie on the generator's range, so no projection onto the range can separate them.

    Args:
        classifier, generator: as :func:`evaluate_onmanifold`.
        z: ``(N, k)`` starting latents; y: ``(N,)`` true labels of the images they were inverted from.
        config: :class:`OverpoweredConfig`.
    """
    _check_batch_size(batch_size)
    if tuple(y.shape) != (z.shape[0],):
        raise ValueError(f"expected y of shape ({z.shape[0]},), got {tuple(y.shape)}")
    attack = OverpoweredAttack(config)
    start = time.perf_counter()
    res = []
    for i in range(0, z.shape[0], batch_size):
        res.append(attack(classifier, generator, z[i : i + batch_size]))
        _tick(on_batch)

    def cat(name: str) -> Tensor:
        return torch.cat([getattr(r, name).detach().cpu() for r in res])

    robust, pred1 = cat("robust"), cat("pred1")
    return OverpoweredEval(
        consistency=float(robust.float().mean()),
        accuracy=float((robust & (pred1 == y.cpu())).float().mean()),
        x1=cat("x1"),
        x2=cat("x2"),
        pred1=pred1,
        pred2=cat("pred2"),
        distance=cat("distance"),
        success=cat("success"),
        found_step=cat("found_step"),
        seconds=time.perf_counter() - start,
    )
