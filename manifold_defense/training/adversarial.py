"""Robust training: Madry PGD adversarial training and robust manifold (on-manifold + overpowered) training.

Papers:
- Madry, Makelov, Schmidt, Tsipras, Vladu, "Towards Deep Learning Models Resistant to Adversarial Attacks"
  (ICLR 2018): ``min_theta E max_{||delta|| <= eps} CE(f(x + delta), y)``, the inner maximization by PGD.
- Jalal, Ilyas, Daskalakis, Dimakis, "The Robust Manifold Defense: Adversarial Training using Generative
  Models" (arXiv 1712.09196): l2-PGD adversarial training (eps 1.5, 40 steps on MNIST) plus examples on the
  generator's range (on-manifold attacks from the inverted latent of each training image) and overpowered
  (OP) pairs ``G(z1), G(z2)`` within ``eps`` that the classifier labels apart, penalized by a consistency loss.

Both trainers run the project's one loop (:func:`manifold_defense.training.loop.run_loop`: seeded batches,
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
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from attacks import (
    PGD,
    Attack,
    LatentAttack,
    LatentAttackConfig,
    Norm,
    OverpoweredAttack,
    OverpoweredConfig,
    PGDConfig,
    ThreatModel,
    pair_divergence,
)
from attacks.base import check_finite_logits, model_name, predict
from manifold_defense.inversion import InversionConfig, invert
from manifold_defense.modes import frozen
from manifold_defense.training.distributed import DistContext, setup_distributed
from manifold_defense.training.loop import (
    LoopConfig,
    check_finite_metrics,
    check_images,
    dataset_tensors,
    run_loop,
)

__all__ = [
    "AdversarialTrainConfig",
    "RobustManifoldConfig",
    "RobustTrainConfig",
    "TrainData",
    "adversarial_train",
    "attack_mode",
    "robust_manifold_train",
]

PathLike = str | os.PathLike[str]
#: Training or validation data: a dataset of ``(image, label)`` pairs, a ``DataLoader`` over one (its dataset is
#: used; batch order and size come from the config), or a tuple ``(images, labels)`` of tensors.
TrainData = Dataset[Any] | DataLoader[Any] | tuple[torch.Tensor, torch.Tensor]

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
    """

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

    def loop(self) -> LoopConfig:
        """The :class:`LoopConfig` of the run."""
        return LoopConfig(self.steps, self.batch_size, self.seed, self.checkpoint_every, self.log_every)


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


def _default_inversion() -> InversionConfig:
    return InversionConfig(init="encoder", steps=20, lr=0.05, restarts=1)


@dataclass(frozen=True)
class RobustManifoldConfig(RobustTrainConfig):
    """Settings of :func:`robust_manifold_train` (Jalal et al., arXiv 1712.09196); budgets are total l2 norms.

    Loss per step (mean over the batch of each term; a term with weight 0 is skipped with its attack):

        ``clean_weight * CE(f(x), y) + pixel_weight * CE(f(x_pgd), y) + manifold_weight * CE(f(G(z_adv)), y)
        + op_weight * D(f(G(z1)), f(G(z2)))``  (the OP term only every ``op_every`` steps)

    with ``z = invert(G, x)`` warm-started by the encoder, ``x_pgd`` from pixel-space PGD, ``z_adv`` from the
    on-manifold :class:`attacks.LatentAttack` around ``z``, ``(z1, z2)`` the :class:`attacks.OverpoweredAttack`
    pair started at ``(z, z + op_init_noise * noise)`` and ``D`` :func:`attacks.pair_divergence` (symmetric
    cross-entropy, the consistency loss).

    Attributes:
        pixel_weight: weight >= 0 of pixel-space PGD adversarial training (default 1).
        pixel_norm: ``"l2"`` (default, the paper's) or ``"linf"``.
        pixel_eps: pixel budget (default 1.5, the paper's MNIST l2 training budget).
        pixel_steps: PGD steps (default 40).
        pixel_step_size: PGD step; ``None`` (default) means ``2.5 * pixel_eps / pixel_steps``.
        pixel_random_start: PGD starts at a random point of the ball (default True).
        manifold_weight: weight >= 0 of the on-manifold adversarial loss (default 1).
        latent_constraint: ``"pixel"`` (default: ``||G(z') - G(z)||_2 <= latent_eps``) or ``"latent"``
            (``||z' - z||_2 <= latent_eps``).
        latent_eps: on-manifold budget (default 1.5).
        latent_steps: latent attack steps (default 40).
        latent_step_size: ``None`` (default) means the :class:`attacks.LatentAttackConfig` default.
        op_weight: weight >= 0 of the OP consistency loss (default 1).
        op_every: the OP term is computed on steps ``0, op_every, 2 op_every, ...`` (default 10).
        op_eps: OP pair budget ``||G(z1) - G(z2)||_2 <= op_eps`` (default 1.5).
        op_steps: OP attack steps (default 100; Jalal et al. use up to 1000 for evaluation).
        op_step_size: OP Adam learning rate on the latents (default 0.01).
        op_init_noise: std > 0 of the per-sample seeded Gaussian noise that starts ``z2`` (default 0.1).
        op_temperature: the training OP attack maximizes the divergence of ``logits / op_temperature`` (default 1,
            the paper's; see :class:`attacks.OverpoweredConfig`: at 1 the attack stalls between confidently
            classified points). The consistency loss itself is always taken at temperature 1.
        op_multiplier_init: initial Lagrange multiplier > 0 of the OP pair-distance constraint (default 1e-3:
            with the attack library's 1.0 the pair is pulled together before the divergence term separates it, and
            the pairs collapse to distance ~0.04 where the divergence is stationary; measured in ``eval defense``).
        op_pairs: ``"all"`` (default): the consistency loss is the mean over every pair the OP attack returned;
            ``"valid"``: over the pairs it found valid only (labels differ within ``op_eps``; Jalal et al.'s code),
            zero on a step without one.
        inversion: :class:`InversionConfig` of the latent search (default: encoder warm start, 20 Adam steps
            of 0.05, one restart).
    """

    pixel_weight: float = 1.0
    pixel_norm: Literal["l2", "linf"] = "l2"
    pixel_eps: float = 1.5
    pixel_steps: int = 40
    pixel_step_size: float | None = None
    pixel_random_start: bool = True
    manifold_weight: float = 1.0
    latent_constraint: Literal["pixel", "latent"] = "pixel"
    latent_eps: float = 1.5
    latent_steps: int = 40
    latent_step_size: float | None = None
    op_weight: float = 1.0
    op_every: int = 10
    op_eps: float = 1.5
    op_steps: int = 100
    op_step_size: float = 0.01
    op_init_noise: float = 0.1
    op_temperature: float = 1.0
    op_multiplier_init: float = 0.001
    op_pairs: Literal["all", "valid"] = "all"
    inversion: InversionConfig = field(default_factory=_default_inversion)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_nonnegative(
            self, "pixel_weight", "manifold_weight", "op_weight", "pixel_eps", "latent_eps", "op_eps"
        )
        for name in ("pixel_steps", "latent_steps", "op_steps"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ValueError(f"RobustManifoldConfig.{name}: expected an int >= 0, got {value!r}")
        if not _is_int(self.op_every) or self.op_every < 1:
            raise ValueError(f"RobustManifoldConfig.op_every: expected an int >= 1, got {self.op_every!r}")
        for name in ("pixel_step_size", "latent_step_size"):
            value = getattr(self, name)
            if value is not None and not (_is_number(value) and value > 0):
                raise ValueError(f"RobustManifoldConfig.{name}: expected None or a float > 0, got {value!r}")
        for name in ("op_step_size", "op_init_noise", "op_temperature", "op_multiplier_init"):
            value = getattr(self, name)
            if not (_is_number(value) and value > 0):
                raise ValueError(f"RobustManifoldConfig.{name}: expected a finite float > 0, got {value!r}")
        if self.pixel_norm not in ("l2", "linf"):
            raise ValueError(
                f"RobustManifoldConfig.pixel_norm: expected 'l2' or 'linf', got {self.pixel_norm!r}"
            )
        if self.op_pairs not in ("all", "valid"):
            raise ValueError(
                f"RobustManifoldConfig.op_pairs: expected 'all' or 'valid', got {self.op_pairs!r}"
            )
        if self.latent_constraint not in ("pixel", "latent"):
            raise ValueError(
                f"RobustManifoldConfig.latent_constraint: expected 'pixel' or 'latent', got {self.latent_constraint!r}"
            )
        if not isinstance(self.inversion, InversionConfig):
            raise TypeError(
                f"RobustManifoldConfig.inversion: expected an InversionConfig, got {type(self.inversion).__name__}"
            )

    def pixel_attack(self) -> PGD:
        """The pixel-space PGD attack of these settings (seeded by ``seed``)."""
        return PGD(
            ThreatModel(Norm(self.pixel_norm), self.pixel_eps),
            PGDConfig(
                steps=self.pixel_steps,
                step_size=self.pixel_step_size,
                random_start=self.pixel_random_start,
                seed=self.seed,
            ),
        )

    def latent_attack(self) -> LatentAttack:
        """The on-manifold :class:`attacks.LatentAttack` of these settings."""
        return LatentAttack(
            LatentAttackConfig(
                eps=self.latent_eps,
                constraint=self.latent_constraint,
                steps=self.latent_steps,
                step_size=self.latent_step_size,
            )
        )

    def op_attack(self) -> OverpoweredAttack:
        """The :class:`attacks.OverpoweredAttack` of these settings."""
        return OverpoweredAttack(
            OverpoweredConfig(
                eps=self.op_eps,
                steps=self.op_steps,
                step_size=self.op_step_size,
                multiplier_init=self.op_multiplier_init,
                temperature=self.op_temperature,
                seed=self.seed,
            )
        )


# ------------------------------------------------------------------------------------------------- helpers


def _as_pairs(data: Any, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` CPU tensors of a dataset / loader / tensor pair, checked."""
    if isinstance(data, DataLoader):
        data = data.dataset
    if isinstance(data, tuple | list) and len(data) >= 2 and all(isinstance(t, torch.Tensor) for t in data):
        columns: tuple[torch.Tensor, ...] = tuple(data)
    elif isinstance(data, Dataset):
        columns = dataset_tensors(data)
    else:
        raise TypeError(
            f"{what}: expected a Dataset, DataLoader or (images, labels) tensors, got {type(data).__name__}"
        )
    if len(columns) < 2:
        raise ValueError(f"{what}: expected (image, label) pairs, got {len(columns)} column(s)")
    images, labels = columns[0].detach().cpu(), columns[1].detach().cpu()
    check_images(images, what)
    if labels.dtype != torch.int64 or labels.shape != (images.shape[0],):
        raise ValueError(
            f"{what}: expected int64 labels of shape ({images.shape[0]},), got {labels.dtype} {tuple(labels.shape)}"
        )
    return images, labels


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
) -> list[dict[str, float]]:
    """Shared driver: data checks, distributed context, DDP, optimizer, schedule, validation, run_loop.

    ``make_step_loss(ctx, ddp_model)`` returns ``loss(step, ddp_model, x, y, idx) -> (loss, metrics)`` on one
    rank's shard; ``frozen`` modules (generator, encoder) stay in eval mode with frozen parameters for the run.
    """
    if not isinstance(classifier, nn.Module):
        raise TypeError(f"expected the classifier as a torch.nn.Module, got {type(classifier).__name__}")
    images, labels = _as_pairs(data, "training images")
    val = _as_pairs(val_data, "validation images") if val_data is not None else None
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
                config.loop(),
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
        data: ``(image, label)`` pairs (dataset, loader or tensors), images ``(N, C, H, W)`` in [0, 1].
        attack: any :class:`attacks.Attack` (PGD, torchattacks/foolbox adapters, ...): the inner maximization.
        config: :class:`AdversarialTrainConfig`.
        val_data: optional validation pairs, evaluated clean and under ``val_attack`` every
            ``config.validate_every`` steps (default once per epoch) into the history (``val_clean_acc``,
            ``val_adv_acc``, ``val_clean_loss``, ``val_adv_loss``).
        val_attack: the validation attack (default ``attack`` with its own fixed seed).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (under ``torchrun``, ``cuda`` means the rank's GPU).
        checkpoint_dir: folder for ``checkpoint.pt`` and ``history.json``; rerunning the same call resumes.
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
    )


def _latent_dim(generator: nn.Module) -> int:
    k = getattr(generator, "latent_dim", None)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise TypeError(f"expected generator.latent_dim as a positive int, got {k!r}")
    return k


def _per_sample_normal(seeds: Sequence[int], k: int, like: torch.Tensor) -> torch.Tensor:
    """``(B, k)`` standard normal rows, row ``i`` from its own CPU generator seeded by ``seeds[i]``."""
    rows = [torch.randn(k, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(rows).to(device=like.device, dtype=like.dtype)


def robust_manifold_train(
    classifier: nn.Module,
    generator: nn.Module,
    data: TrainData,
    config: RobustManifoldConfig = RobustManifoldConfig(),
    *,
    encoder: nn.Module | None = None,
    val_data: TrainData | None = None,
    val_attack: Attack | None = None,
    device: str | torch.device = "cpu",
    checkpoint_dir: PathLike | None = None,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Robust manifold adversarial training (Jalal, Ilyas, Daskalakis, Dimakis, arXiv 1712.09196).

    Threat model of training: pixel-space ``||delta||_p <= pixel_eps`` (PGD), on-manifold ``G(z')`` with
    ``||G(z') - G(z)||_2 <= latent_eps`` around the inverted latent ``z`` of each training image, and OP pairs
    on the generator's range within ``op_eps``. Per step, on each rank's shard ``(x, y)``:

    1. ``z = invert(generator, x, config.inversion, encoder=encoder)`` (warm start ``encoder(x)``; per-sample
       seeds from the example's index, so independent of the batch layout);
    2. with the classifier in eval mode and frozen: ``x_pgd`` by :meth:`RobustManifoldConfig.pixel_attack`,
       ``G(z_adv)`` by :class:`attacks.LatentAttack` from ``z`` with label ``y``, and every ``op_every`` steps an
       OP pair ``(G(z1), G(z2))`` by :class:`attacks.OverpoweredAttack` from ``(z, z + op_init_noise * n)``;
    3. one optimizer step on the weighted loss of :class:`RobustManifoldConfig`, with one forward pass of the
       concatenated inputs in train mode.

    Args:
        classifier: ``(B, C, H, W)`` in [0, 1] -> ``(B, K)`` logits; trained in place, left in eval mode.
        generator: ``nn.Module`` with int ``latent_dim``, ``(B, k) -> (B, C, H, W)`` in [0, 1]; frozen and in
            eval mode for the run (restored afterwards), never trained.
        data: ``(image, label)`` pairs, images ``(N, C, H, W)`` in [0, 1] of the generator's image shape.
        config: :class:`RobustManifoldConfig`.
        encoder: images ``(B, C, H, W) -> (B, k)`` for the warm start (required with
            ``config.inversion.init == "encoder"``, the default); frozen like the generator.
        val_data: optional validation pairs, evaluated clean and under ``val_attack`` each epoch.
        val_attack: validation attack (default :meth:`RobustManifoldConfig.pixel_attack`).
        device, checkpoint_dir, progress: as :func:`adversarial_train`.

    Returns:
        The history: ``loss``, ``inv_mse`` (inversion error per pixel), ``pixel_loss``/``pixel_acc``,
        ``manifold_loss``/``manifold_acc``, ``op_loss``/``op_success`` (OP steps only: means over those steps),
        ``clean_loss``/``clean_acc`` when used, and validation metrics.

    Example:
        >>> robust_manifold_train(model, zoo.load("mnist-gan"), train_set, RobustManifoldConfig(steps=5000),
        ...     encoder=zoo.load("mnist-encoder"), checkpoint_dir="runs/rmd")  # doctest: +SKIP
    """
    if not isinstance(config, RobustManifoldConfig):
        raise TypeError(f"expected config to be a RobustManifoldConfig, got {type(config).__name__}")
    if not isinstance(generator, nn.Module):
        raise TypeError(f"expected the generator as a torch.nn.Module, got {type(generator).__name__}")
    if encoder is not None and not isinstance(encoder, nn.Module):
        raise TypeError(f"expected the encoder as a torch.nn.Module or None, got {type(encoder).__name__}")
    k = _latent_dim(generator)
    if config.inversion.init == "encoder" and encoder is None:
        raise ValueError("expected an encoder with config.inversion.init='encoder', got encoder=None")
    pixel_attack = config.pixel_attack()
    latent_attack = config.latent_attack()
    op_attack = config.op_attack()
    frozen = (generator,) if encoder is None else (generator, encoder)

    def check(ctx: DistContext, images: torch.Tensor) -> None:
        x = images[:2].to(ctx.device)
        with torch.no_grad():
            if encoder is not None:
                enc_k = getattr(encoder, "latent_dim", None)
                z = encoder(x)
                if (
                    (_is_int(enc_k) and enc_k != k)
                    or not isinstance(z, torch.Tensor)
                    or tuple(z.shape) != (2, k)
                ):
                    got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
                    raise ValueError(
                        f"encoder latent size does not match the generator: expected latents (B, {k}) "
                        f"(generator.latent_dim), got encoder.latent_dim={enc_k!r} and output {got}"
                    )
            out = generator(torch.zeros(2, k, device=ctx.device))
        if not isinstance(out, torch.Tensor) or tuple(out.shape[1:]) != tuple(images.shape[1:]):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"expected the generator to return images (B, {', '.join(map(str, images.shape[1:]))}) like the "
                f"training images, got {got}"
            )

    def make_step_loss(ctx: DistContext, ddp: nn.Module) -> StepLoss:
        def step_loss(
            step: int, model: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor
        ) -> tuple[torch.Tensor, dict[str, float]]:
            inv = invert(
                generator,
                x,
                config=config.inversion,
                encoder=encoder,
                seeds=[_mix_seed(config.seed, int(i)) for i in idx.tolist()],
            )
            z = inv.z.detach()
            metrics: dict[str, float] = {"inv_mse": float((inv.x_hat - x).pow(2).mean())}
            parts: list[tuple[str, torch.Tensor]] = []
            do_op = config.op_weight > 0 and step % config.op_every == 0
            with attack_mode(classifier):
                target = _attack_targets(classifier, x, y, config)
                if config.clean_weight > 0:
                    parts.append(("clean", x))
                if config.pixel_weight > 0:
                    pgd = (
                        _reseeded(pixel_attack, _mix_seed(config.seed, step, ctx.rank))
                        if config.reseed_attacks
                        else pixel_attack
                    )
                    parts.append(("pixel", pgd(classifier, x, target).x_adv))
                if config.manifold_weight > 0:
                    parts.append(("manifold", latent_attack(classifier, generator, z, target).x_adv))
                if do_op:
                    seeds = [_mix_seed(config.seed, step, int(i), 1) for i in idx.tolist()]
                    z2 = z + config.op_init_noise * _per_sample_normal(seeds, k, z)
                    pair = op_attack(classifier, generator, z, z2)
                    metrics["op_success"] = float(pair.success.float().mean())
                    op_mask = pair.success if config.op_pairs == "valid" else torch.ones_like(pair.success)
                    parts += [("op1", pair.x1), ("op2", pair.x2)]
            if not parts:
                raise ValueError("expected at least one loss term with a positive weight, got all weights 0")
            logits = model(torch.cat([p for _, p in parts]))
            chunks = dict(zip([name for name, _ in parts], logits.split(x.shape[0]), strict=True))
            loss = logits.new_zeros(())
            for name, weight in (
                ("clean", config.clean_weight),
                ("pixel", config.pixel_weight),
                ("manifold", config.manifold_weight),
            ):
                if name in chunks:
                    term = F.cross_entropy(chunks[name], y)
                    loss = loss + weight * term
                    metrics[f"{name}_loss"] = float(term.detach())
                    metrics[f"{name}_acc"] = float((chunks[name].argmax(1) == y).float().mean())
            if do_op:
                divergence = pair_divergence(chunks["op1"], chunks["op2"])
                consistency = (divergence * op_mask).sum() / op_mask.sum().clamp_min(1)
                loss = loss + config.op_weight * consistency
                metrics["op_loss"] = float(consistency.detach())
            return loss, metrics

        return step_loss

    return _train(
        classifier,
        data,
        config,
        make_step_loss,
        frozen=frozen,
        check=check,
        val_data=val_data,
        val_attack=pixel_attack if val_attack is None else val_attack,
        device=device,
        checkpoint_dir=checkpoint_dir,
        progress=progress,
        desc="rmd",
    )
