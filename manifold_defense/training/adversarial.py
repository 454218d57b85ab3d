"""Robust training: Madry PGD adversarial training and robust manifold (on-manifold + overpowered) training.

Papers:
- Madry, Makelov, Schmidt, Tsipras, Vladu, "Towards Deep Learning Models Resistant to Adversarial Attacks"
  (ICLR 2018): ``min_theta E max_{||delta|| <= eps} CE(f(x + delta), y)``, the inner maximization by PGD.
- Jalal, Ilyas, Daskalakis, Dimakis, "The Robust Manifold Defense: Adversarial Training using Generative
  Models" (arXiv 1712.09196): l2-PGD adversarial training (eps 1.5, 40 steps on MNIST) plus examples on the
  generator's range (on-manifold attacks from the inverted latent of each training image) and overpowered
  (OP) pairs ``G(z1), G(z2)`` within ``eps`` that the classifier labels apart, penalized by a consistency loss.

Robust manifold training (its config and trainer) lives in :mod:`manifold_defense.training.manifold` and reuses
this module's schedule, loop wrapper and helpers. Both trainers run the project's one loop (:func:`manifold_defense.training.loop.run_loop`: seeded batches,
atomic checkpoints, exact resume, tqdm, history in ``checkpoint_dir/history.json``), the project's attacks
(:mod:`attacks`) as inner maximizations and :func:`manifold_defense.inversion.invert` for latents; they contain
no gradient loop of their own. While an attack is generated the classifier is in eval mode with every parameter
frozen (:func:`attack_mode`); both are restored exactly afterwards, also when the attack raises.

Distributed: under ``torchrun`` both trainers use DistributedDataParallel without code changes (see
:mod:`manifold_defense.training.distributed`): every rank attacks and trains on its equal shard of each global
batch of ``config.batch_size`` examples, only rank 0 writes checkpoints and history, and every rank resumes from
them. The per-rank loss is the mean over its shard, so the averaged gradient equals that of the global batch.
Attacks with random starts draw different noise in a different batch layout (PGD's random start depends on
a sample's position in its batch), so a distributed run equals the single-process run exactly only for
deterministic attacks; the latent-space parts (inversion seeds, OP start noise) are per-sample seeded and
layout-independent.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from attacks import (
    Attack,
)
from attacks.base import check_finite_logits, model_name, predict
from manifold_defense.modes import frozen
from manifold_defense.training.distributed import DistContext, setup_distributed
from manifold_defense.training.loop import (
    LoopConfig,
    check_class_count,
    check_finite_metrics,
    image_label_tensors,
    module_fingerprint,
    run_loop,
    run_settings,
)

__all__ = [
    "AdversarialTrainConfig",
    "RobustTrainConfig",
    "TrainData",
    "adversarial_train",
    "attack_mode",
]

PathLike = str | os.PathLike[str]
TrainData = Dataset[Any] | tuple[torch.Tensor, torch.Tensor]
"""Training or validation data: a dataset of ``(image, label)`` pairs or a tuple ``(images, labels)`` of tensors
(:func:`~manifold_defense.training.loop.dataset_tensors`). A ``DataLoader`` is refused: batch order and size come
from the config, so its sampler and batch size would be ignored; pass ``loader.dataset``."""

_SEED_MOD = 2**62


def attack_mode(*modules: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Eval mode and ``requires_grad=False`` on every parameter of ``modules`` for the duration.

    Purpose: generate adversarial examples against a model under training without dropout/batch-norm updates
    and without accumulating parameter gradients (advertorch's ``ctx_noparamgrad_and_eval``). Every
    submodule's ``training`` flag and every parameter's ``requires_grad`` flag are restored exactly on exit,
    also when the body raises. Same as :func:`manifold_defense.modes.frozen`.
    """
    return frozen(*modules)


# ------------------------------------------------------------------------------------------------- configs


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class RobustTrainConfig:
    """Optimization schedule shared by :class:`AdversarialTrainConfig` and :class:`RobustManifoldConfig`.

    Attributes:
        steps: optimizer steps (global batches) in the run (default 2000).
        batch_size: global batch size; under ``torchrun`` split evenly over the ranks (default 64).
        lr: base learning rate (default 1e-3).
        optimizer: ``"adam"`` (default) or ``"sgd"`` (with ``momentum``).
        momentum: SGD momentum in [0, 1) (default 0.9; ignored by Adam).
        weight_decay: L2 weight decay >= 0 (default 0).
        schedule: learning-rate schedule per step: ``"cosine"`` (default, to 0 at the end), ``"step"``
            (times ``decay_factor`` at each of ``decay_milestones``) or ``"constant"`` (Madry et al.).
        decay_milestones: fractions of ``steps`` for ``"step"`` (default ``(0.5, 0.75)``).
        decay_factor: multiplier in (0, 1] for ``"step"`` (default 0.1).
        clean_weight: weight >= 0 of the cross-entropy on the clean images (default 0: adversarial only).
        attack_labels: labels the attacks maximize the loss of: ``"true"`` (default) or ``"predicted"`` (the
            model's own predictions, against label leaking; Kurakin et al. 2017).
        reseed_attacks: give attacks whose ``config`` dataclass has a ``seed`` field (PGD) a fresh seed per step
            and rank, so random starts differ between batches (default True).
        seed: seeds the batch order, the RNG of the run and the attacks (default 0).
        checkpoint_every: steps between checkpoints (default 500).
        log_every: steps between history entries (default 100).
        validate_every: steps between validations; ``None`` (default) means once per epoch
            (``len(data) // batch_size`` steps), and always after the last step.

    Resume: ``checkpoint_every``, ``log_every`` and ``validate_every`` (and the validation data and attack) only
    change what is logged and may differ on resume; every other field is recorded in the checkpoint (``steps``
    too: the learning-rate schedule and the budget warm-up span the run), with the trainer's attack, and a
    resume with another value is refused, naming it.
    """

    RESUME_MAY_CHANGE: ClassVar[tuple[str, ...]] = ("checkpoint_every", "log_every", "validate_every")

    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    decay_milestones: tuple[float, ...] = (0.5, 0.75)
    decay_factor: float = 0.1
    clean_weight: float = 0.0
    attack_labels: Literal["true", "predicted"] = "true"
    reseed_attacks: bool = True
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 100
    validate_every: int | None = None

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"{owner}.{name}: expected a positive int, got {value!r}")
        if self.validate_every is not None and (not _is_int(self.validate_every) or self.validate_every <= 0):
            raise ValueError(
                f"{owner}.validate_every: expected None or a positive int, got {self.validate_every!r}"
            )
        if not _is_int(self.seed) or not 0 <= self.seed < 2**31:
            raise ValueError(f"{owner}.seed: expected an int in [0, 2**31), got {self.seed!r}")
        if not (_is_number(self.lr) and self.lr > 0):
            raise ValueError(f"{owner}.lr: expected a finite float > 0, got {self.lr!r}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"{owner}.optimizer: expected 'adam' or 'sgd', got {self.optimizer!r}")
        if not (_is_number(self.momentum) and 0 <= self.momentum < 1):
            raise ValueError(f"{owner}.momentum: expected a float in [0, 1), got {self.momentum!r}")
        if self.schedule not in ("cosine", "step", "constant"):
            raise ValueError(
                f"{owner}.schedule: expected 'cosine', 'step' or 'constant', got {self.schedule!r}"
            )
        if not all(_is_number(m) and 0 < m < 1 for m in self.decay_milestones):
            raise ValueError(
                f"{owner}.decay_milestones: expected fractions in (0, 1), got {self.decay_milestones!r}"
            )
        if not (_is_number(self.decay_factor) and 0 < self.decay_factor <= 1):
            raise ValueError(f"{owner}.decay_factor: expected a float in (0, 1], got {self.decay_factor!r}")
        if self.attack_labels not in ("true", "predicted"):
            raise ValueError(
                f"{owner}.attack_labels: expected 'true' or 'predicted', got {self.attack_labels!r}"
            )
        _check_nonnegative(self, "weight_decay", "clean_weight")

    def loop(self, trainer: str = "", **extra: Any) -> LoopConfig:
        """The :class:`LoopConfig` of the run: ``trainer`` and the run-defining settings (every field but
        ``RESUME_MAY_CHANGE``, plus ``extra``: inputs that define the run but are not fields, like the attack)."""
        return LoopConfig(
            self.steps, self.batch_size, self.seed, self.checkpoint_every, self.log_every, trainer=trainer,
            settings=run_settings(self, exclude=self.RESUME_MAY_CHANGE, **extra),
        )  # fmt: skip


def _check_nonnegative(config: Any, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not (_is_number(value) and value >= 0):
            raise ValueError(f"{type(config).__name__}.{name}: expected a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class AdversarialTrainConfig(RobustTrainConfig):
    """Settings of :func:`adversarial_train` (all of :class:`RobustTrainConfig`, plus the adversarial weight).

    The loss per step is ``adv_weight * CE(f(x_adv), y) + clean_weight * CE(f(x), y)`` (Madry et al.: 1 and 0).

    Attributes:
        adv_weight: weight >= 0 of the cross-entropy on the attacked images (default 1).
        eps_warmup: fraction in [0, 1) of ``steps`` over which the attack's budget grows linearly from
            ``eps / warmup_steps`` to its full ``eps`` (default 0: the full budget from the first step). The
            threat model's ``eps`` and a ``config.step_size`` of the attack (PGD's) are scaled together, so a
            warm-up step is the same attack in a smaller ball; an attack that keeps its own copy of ``eps``
            (a torchattacks/foolbox adapter) is projected onto the smaller ball. From scratch, Linf 0.3 PGD
            training of MNIST nets can sit at chance (loss ln 10) for thousands of steps; a warm-up of a tenth
            of the run avoids the plateau (measured on :class:`~manifold_defense.models.CompactMNISTClassifier`).
    """

    adv_weight: float = 1.0
    eps_warmup: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_nonnegative(self, "adv_weight")
        if not (_is_number(self.eps_warmup) and 0 <= self.eps_warmup < 1):
            raise ValueError(
                f"AdversarialTrainConfig.eps_warmup: expected a fraction in [0, 1), got {self.eps_warmup!r}"
            )

    def budget_factor(self, step: int) -> float:
        """Multiplier in (0, 1] of the attack's budget at 0-based ``step`` (1 after the warm-up)."""
        warmup = self.eps_warmup * self.steps
        if warmup <= 0:
            return 1.0
        return min(1.0, (step + 1) / warmup)


# ------------------------------------------------------------------------------------------------- helpers


def attack_settings(attack: Any) -> dict[str, Any]:
    """An attack as a checkpoint's settings record it: its class, threat model (norm, eps) and settings (a
    ``config`` dataclass; an adapter's ``name``, ``seed`` and ``kwargs``); a resume against another is refused."""
    record: dict[str, Any] = {"type": type(attack).__name__}
    threat = getattr(attack, "threat", None)
    if threat is not None:
        record.update(norm=threat.norm, eps=threat.eps)
    for name in ("config", "name", "seed", "kwargs"):
        if hasattr(attack, name):
            record[name] = getattr(attack, name)
    return record


def _lr_lambda(config: RobustTrainConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if config.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(step, config.steps) / config.steps))
        if config.schedule == "step":
            return float(
                config.decay_factor ** sum(step >= m * config.steps for m in config.decay_milestones)
            )
        return 1.0

    return factor


def _optimizer(params: Sequence[nn.Parameter], config: RobustTrainConfig) -> torch.optim.Optimizer:
    if not params:
        raise ValueError("expected a classifier with at least one parameter that requires grad, got none")
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


def _mix_seed(*parts: int) -> int:
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + int(part)) % _SEED_MOD
    return seed


def _reseeded(attack: Any, seed: int) -> Any:
    """A shallow copy of ``attack`` whose ``config.seed`` is ``seed`` (the attack itself when it has none)."""
    cfg = getattr(attack, "config", None)
    if cfg is None or not is_dataclass(cfg) or isinstance(cfg, type):
        return attack
    if "seed" not in {f.name for f in fields(cfg)}:
        return attack
    new = copy.copy(attack)
    new.config = replace(cfg, seed=seed)
    return new


def _scaled_budget(attack: Attack, factor: float) -> Attack:
    """A shallow copy of ``attack`` with its threat model's ``eps`` (and a ``config.step_size``) times ``factor``."""
    if factor == 1.0:
        return attack
    new = attack.with_eps(attack.threat.eps * factor)
    cfg = getattr(attack, "config", None)
    if cfg is not None and is_dataclass(cfg) and not isinstance(cfg, type):
        step_size = getattr(cfg, "step_size", None)
        if isinstance(step_size, float | int) and not isinstance(step_size, bool):
            new.config = replace(cfg, step_size=step_size * factor)  # type: ignore[attr-defined]
    return new


def _attack_targets(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: RobustTrainConfig
) -> torch.Tensor:
    if config.attack_labels == "true":
        return y
    return predict(
        model, x, f"classifier {model_name(model)}", "on the batch whose predicted labels are attacked"
    )


def _validation(
    ctx: DistContext,
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    attack: Attack,
    batch_size: int,
) -> Callable[[int], dict[str, float]]:
    """The per-epoch hook: clean and attacked accuracy/loss on ``data``, each rank taking every world-th row."""
    images, labels = data
    rows = torch.arange(ctx.rank, images.shape[0], ctx.world_size)

    def validate(step: int) -> dict[str, float]:
        totals = torch.zeros(5, dtype=torch.float64)
        with attack_mode(model):
            for start in range(0, rows.numel(), batch_size):
                idx = rows[start : start + batch_size]
                x, y = images[idx].to(ctx.device), labels[idx].to(ctx.device)
                with torch.no_grad():
                    clean = check_finite_logits(
                        model(x), f"classifier {model_name(model)}", f"on validation rows {start}+"
                    )
                adv = attack(model, x, y)
                totals += torch.tensor(
                    [
                        float((clean.argmax(1) == y).sum()),
                        float((adv.logits.argmax(1) == y).sum()),
                        float(F.cross_entropy(clean, y, reduction="sum")),
                        float(F.cross_entropy(adv.logits, y, reduction="sum")),
                        float(y.numel()),
                    ],
                    dtype=torch.float64,
                )
        totals = ctx.sum_tensor(totals)
        n = max(float(totals[4]), 1.0)
        return {
            "val_clean_acc": float(totals[0]) / n,
            "val_adv_acc": float(totals[1]) / n,
            "val_clean_loss": float(totals[2]) / n,
            "val_adv_loss": float(totals[3]) / n,
        }

    return validate


StepLoss = Callable[
    [int, nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, float]]
]


def _fingerprint(modules: Sequence[nn.Module]) -> str:
    """One fingerprint of the frozen models in order ('' when there are none, so plain adversarial training
    checkpoints stay unbound and resume as before)."""
    return ",".join(module_fingerprint(m) for m in modules)


def _train(
    classifier: nn.Module,
    data: TrainData,
    config: RobustTrainConfig,
    make_step_loss: Callable[[DistContext, nn.Module], StepLoss],
    *,
    frozen: Sequence[nn.Module],
    check: Callable[[DistContext, torch.Tensor], None],
    val_data: TrainData | None,
    val_attack: Attack,
    device: str | torch.device,
    checkpoint_dir: PathLike | None,
    progress: bool,
    desc: str,
    trainer: str,
    settings: dict[str, Any],
) -> list[dict[str, float]]:
    """Shared driver: data checks, distributed context, DDP, optimizer, schedule, validation, run_loop.

    ``make_step_loss(ctx, ddp_model)`` returns ``loss(step, ddp_model, x, y, idx) -> (loss, metrics)`` on one
    rank's shard; ``frozen`` modules (generator, encoder) stay in eval mode with frozen parameters for the run.
    The checkpoint records ``trainer``, the config's run-defining fields and ``settings`` (the attack...).
    """
    if not isinstance(classifier, nn.Module):
        raise TypeError(f"expected the classifier as a torch.nn.Module, got {type(classifier).__name__}")
    images, labels = image_label_tensors(data, "training")
    val = image_label_tensors(val_data, "validation") if val_data is not None else None
    if not isinstance(val_attack, Attack):
        raise TypeError(f"expected val_attack to be an attacks.Attack, got {type(val_attack).__name__}")
    if images.shape[0] < config.batch_size:
        raise ValueError(
            f"expected at least batch_size={config.batch_size} training examples, got {images.shape[0]}"
        )
    modes = [(sub, sub.training) for sub in classifier.modules()]
    flags = [(p, p.requires_grad) for p in classifier.parameters()]
    ctx = setup_distributed(device)
    ctx.shard_size(config.batch_size)
    classifier.to(ctx.device)
    check_class_count(classifier, images, labels, ctx.device)
    if val is not None:
        check_class_count(classifier, *val, ctx.device, "validation labels")
    for m in frozen:
        m.to(ctx.device)
    try:
        with attack_mode(*frozen):
            check(ctx, images)
            classifier.train()
            trainable = [p for p in classifier.parameters() if p.requires_grad]
            opt = _optimizer(trainable, config)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(config))
            ddp = ctx.wrap(classifier)
            step_loss = make_step_loss(ctx, ddp)

            def step_fn(step: int, batch: tuple[torch.Tensor, ...]) -> dict[str, float]:
                x, y, idx = ctx.shard(batch)
                loss, metrics = step_loss(step, ddp, x, y, idx)
                check_finite_metrics(  # before backward: NaN logits must not reach the weights
                    {"loss": loss.detach()},
                    f"of classifier {type(classifier).__name__} at step {step} (examples {idx[:8].tolist()} ...)",
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                return ctx.mean_metrics({"loss": float(loss.detach()), **metrics})

            validate = None
            if val is not None:
                validate = _validation(ctx, classifier, val, val_attack, config.batch_size)
            history = run_loop(
                step_fn,
                (images, labels, torch.arange(images.shape[0])),
                # bound to the frozen models (generator, encoder): a checkpoint is never resumed against others
                replace(config.loop(trainer, **settings), bound_to=_fingerprint(frozen)),
                {"model": classifier, "opt": opt, "sched": sched},
                device=ctx.device,
                checkpoint_dir=checkpoint_dir,
                progress=progress and ctx.is_main,
                desc=desc,
                save_checkpoints=ctx.is_main,
                validate=validate,
                validate_every=config.validate_every or max(1, images.shape[0] // config.batch_size),
            )
    except BaseException:
        for sub, mode in modes:
            sub.training = mode
        raise
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    classifier.eval()
    return history


# ----------------------------------------------------------------------------------------------- trainers


def adversarial_train(
    classifier: nn.Module,
    data: TrainData,
    attack: Attack,
    config: AdversarialTrainConfig = AdversarialTrainConfig(),
    *,
    val_data: TrainData | None = None,
    val_attack: Attack | None = None,
    device: str | torch.device = "cpu",
    checkpoint_dir: PathLike | None = None,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Madry-style adversarial training of ``classifier`` against ``attack`` (Madry et al., ICLR 2018).

    Threat model: whatever ``attack`` enforces, e.g. ``PGD(ThreatModel(Norm.LINF, 0.3), PGDConfig(steps=40,
    step_size=0.01))`` for Madry's MNIST model. Each step: ``x_adv = attack(classifier, x, y).x_adv`` with the
    classifier in eval mode and frozen (:func:`attack_mode`), then one optimizer step on
    ``adv_weight * CE(f(x_adv), y) + clean_weight * CE(f(x), y)`` in train mode.

    Args:
        classifier: ``(B, C, H, W)`` images in [0, 1] -> ``(B, K)`` logits; trained in place on ``device`` (its
            parameters with ``requires_grad=False`` stay fixed), left in eval mode.
        data: ``(image, label)`` pairs (a dataset or ``(images, labels)`` tensors, see :data:`TrainData`), images
            float ``(N, C, H, W)`` in [0, 1], labels class indices of any integer dtype.
        attack: any :class:`attacks.Attack` (PGD, torchattacks/foolbox adapters, ...): the inner maximization.
        config: :class:`AdversarialTrainConfig`.
        val_data: optional validation pairs, evaluated clean and under ``val_attack`` every
            ``config.validate_every`` steps (default once per epoch) into the history (``val_clean_acc``,
            ``val_adv_acc``, ``val_clean_loss``, ``val_adv_loss``).
        val_attack: the validation attack (default ``attack`` with its own fixed seed).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (under ``torchrun``, ``cuda`` means the rank's GPU).
        checkpoint_dir: folder for ``checkpoint.pt`` and ``history.json``; rerunning the same call resumes. The
            checkpoint records the ``adversarial`` trainer, the config's run-defining fields and ``attack``
            (:func:`attack_settings`): a resume against another threat model or attack, or from another
            trainer's checkpoint (a standard-training one), is refused, naming what differs.
        progress: tqdm bar (rank 0 only).

    Returns:
        The history: every ``config.log_every`` steps ``{"step", "loss", "adv_loss", "adv_acc", ...}`` (means
        over the interval and over ranks), plus validation metrics.

    Example:
        >>> attack = PGD(ThreatModel(Norm.LINF, 0.3), PGDConfig(steps=40, step_size=0.01))  # doctest: +SKIP
        >>> adversarial_train(model, train_set, attack, AdversarialTrainConfig(steps=10_000, lr=1e-4,
        ...     schedule="constant"), val_data=val_set, checkpoint_dir="runs/pgd-at")  # doctest: +SKIP
    """
    if not isinstance(attack, Attack):
        raise TypeError(f"expected attack to be an attacks.Attack, got {type(attack).__name__}")
    if not isinstance(config, AdversarialTrainConfig):
        raise TypeError(f"expected config to be an AdversarialTrainConfig, got {type(config).__name__}")

    def make_step_loss(ctx: DistContext, ddp: nn.Module) -> StepLoss:
        def step_loss(
            step: int, model: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor
        ) -> tuple[torch.Tensor, dict[str, float]]:
            inner = (
                _reseeded(attack, _mix_seed(config.seed, step, ctx.rank)) if config.reseed_attacks else attack
            )
            inner = _scaled_budget(inner, config.budget_factor(step))
            with attack_mode(classifier):
                target = _attack_targets(classifier, x, y, config)
                x_adv = inner(classifier, x, target).x_adv
            use_clean = config.clean_weight > 0
            logits = model(torch.cat([x_adv, x]) if use_clean else x_adv)
            b = x.shape[0]
            adv_loss = F.cross_entropy(logits[:b], y)
            loss = config.adv_weight * adv_loss
            metrics = {
                "adv_loss": float(adv_loss.detach()),
                "adv_acc": float((logits[:b].argmax(1) == y).float().mean()),
            }
            if use_clean:
                clean_loss = F.cross_entropy(logits[b:], y)
                loss = loss + config.clean_weight * clean_loss
                metrics["clean_loss"] = float(clean_loss.detach())
                metrics["clean_acc"] = float((logits[b:].argmax(1) == y).float().mean())
            return loss, metrics

        return step_loss

    return _train(
        classifier,
        data,
        config,
        make_step_loss,
        frozen=(),
        check=lambda ctx, images: None,
        val_data=val_data,
        val_attack=attack if val_attack is None else val_attack,
        device=device,
        checkpoint_dir=checkpoint_dir,
        progress=progress,
        desc="pgd-at",
        trainer="adversarial",
        settings={"attack": attack_settings(attack)},
    )
