"""Robust manifold training (Jalal, Ilyas, Daskalakis, Dimakis, "The Robust Manifold Defense", arXiv 1712.09196).

l2-PGD adversarial training plus examples on the generator's range (on-manifold attacks from the inverted latent of
each training image) and overpowered (OP) pairs ``G(z1), G(z2)`` within ``eps`` that the classifier labels apart,
penalized by a consistency loss. The schedule, the loop wrapper (:func:`manifold_defense.training.adversarial._train`,
the project's one training loop), attack freezing and distributed behaviour are those of
:mod:`manifold_defense.training.adversarial`; this module holds the config and the per-step loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

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
from manifold_defense.inversion import InversionConfig, invert
from manifold_defense.training.adversarial import (
    PathLike,
    RobustTrainConfig,
    StepLoss,
    TrainData,
    _attack_targets,
    _check_nonnegative,
    _is_int,
    _is_number,
    _mix_seed,
    _reseeded,
    _train,
    attack_mode,
)
from manifold_defense.training.distributed import DistContext

__all__ = ["RobustManifoldConfig", "robust_manifold_train"]


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

    Resume: as :class:`RobustTrainConfig` (only ``checkpoint_every``, ``log_every`` and ``validate_every`` may
    change); the checkpoint is also bound to the generator's and encoder's weights.
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
        trainer="robust-manifold",
        settings={"encoder": encoder is not None},
    )
