"""Trainers for the zoo's models: the classifier, the GAN (generator, critic, encoder), the encoder alone, the VAE.

Each trainer takes the model(s), a dataset of ``(image, label)`` pairs with images in [0, 1] (what is accepted:
:func:`manifold_defense.training.loop.dataset_tensors`), a frozen config, a ``device`` and an optional checkpoint
directory, and runs :func:`manifold_defense.training.loop.run_loop`, so every one of them is seeded, shows a tqdm bar
and resumes from its last checkpoint after an interruption. Each checkpoint records its trainer and the settings of
its config that define the run; a resume under other settings is refused, naming them. Only the fields in a config's
``RESUME_MAY_CHANGE`` may differ on resume (their cosine schedules depend on ``steps``, so it is run-defining).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from manifold_defense.devices import resolve_device
from manifold_defense.models import VAE, Encoder, MNISTClassifier, latent_dim_of
from manifold_defense.modes import frozen
from manifold_defense.training.loop import (
    LoopConfig,
    check_class_count,
    check_finite_metrics,
    check_images,
    dataset_tensors,
    image_label_tensors,
    module_fingerprint,
    run_loop,
    run_settings,
)

PathLike = str | os.PathLike[str]


def _check_positive(owner: str, **values: float) -> None:
    for name, value in values.items():
        if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{owner}.{name} must be a finite number >= 0, got {value!r}")


def _check_latent_match(generator: nn.Module, encoder: nn.Module) -> int:
    """The generator's latent size, after checking that the encoder produces latents of that size."""
    k = latent_dim_of(generator)
    if getattr(encoder, "latent_dim", None) != k:
        raise ValueError(
            f"encoder latent size {getattr(encoder, 'latent_dim', None)} does not match the generator's latent_dim {k}"
        )
    return k


def _cosine(step: int, total: int) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * step / total))


def _loop(config: Any, trainer: str, **extra: Any) -> LoopConfig:
    """The :class:`LoopConfig` of ``config``, bound to ``trainer`` and the run-defining settings (every field but
    ``config.RESUME_MAY_CHANGE``, plus ``extra``)."""
    return LoopConfig(
        config.steps,
        config.batch_size,
        config.seed,
        config.checkpoint_every,
        trainer=trainer,
        settings=run_settings(config, exclude=config.RESUME_MAY_CHANGE, **extra),
    )


@dataclass(frozen=True)
class ClassifierTrainConfig:
    """Adam with cosine decay on cross-entropy. Defaults: about 5 epochs of MNIST's 50k training images.

    Every field but ``checkpoint_every`` defines the run and is recorded in its checkpoint (``steps`` too: the
    cosine decay spans the whole run); a resume with another value is refused.
    """

    RESUME_MAY_CHANGE: ClassVar[tuple[str, ...]] = ("checkpoint_every",)

    steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    checkpoint_every: int = 500

    def __post_init__(self) -> None:
        _check_positive("ClassifierTrainConfig", lr=self.lr, weight_decay=self.weight_decay)

    def loop(self) -> LoopConfig:
        return _loop(self, "classifier")


def train_classifier(
    model: MNISTClassifier | nn.Module,
    dataset: Dataset[Any],
    config: ClassifierTrainConfig = ClassifierTrainConfig(),
    *,
    device: str | torch.device = "cpu",
    checkpoint_dir: PathLike | None = None,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Train a classifier on ``(image, label)`` pairs by cross-entropy; returns the logged history.

    Args:
        model: ``(B, C, H, W)`` images in [0, 1] to ``(B, K)`` logits; trained in place on ``device``, left in
            eval mode.
        dataset: see :func:`~manifold_defense.training.loop.dataset_tensors`; images float ``(N, C, H, W)`` in
            [0, 1], labels class indices in ``0..K-1`` of any integer dtype (converted to int64; whole-number
            floats are converted too, fractional ones refused).
        config, device, checkpoint_dir, progress: the schedule, where to train, the checkpoint folder (a rerun
            resumes; another trainer's or another config's checkpoint is refused), the progress bar.
    """
    dev = resolve_device(device)
    images, labels = image_label_tensors(dataset)
    model.to(dev)
    check_class_count(model, images, labels, dev)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, config.steps))

    def step_fn(step: int, batch: tuple[torch.Tensor, ...]) -> dict[str, float]:
        x, y = batch
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        return {"loss": loss.item(), "acc": (logits.argmax(1) == y).float().mean().item()}

    state = {"model": model, "opt": opt, "sched": sched}
    history = run_loop(
        step_fn,
        (images, labels),
        config.loop(),
        state,
        device=dev,
        checkpoint_dir=checkpoint_dir,
        progress=progress,
        desc="classifier",
    )
    model.eval()
    return history


@dataclass(frozen=True)
class EncoderTrainConfig:
    """Train an encoder for a frozen generator (warm starts of the projection), on real images and on samples.

    Per step, with a batch ``x`` of real images and as many prior latents ``z ~ N(0, I)``, minimize
    ``||G(E(x)) - x||^2 + latent_weight * ||E(x)||^2 + sample_weight * ||E(G(z)) - z||^2`` (squared norms per
    example, summed over pixels or latent coordinates, averaged over the batch): the first term fits the real
    images through the generator, the last teaches the encoder the generator's own latents (so ``E(x)`` lands where
    the prior has mass), the middle one keeps the latents small. Adam with cosine decay.

    Every field but ``checkpoint_every`` defines the run (``steps`` too: the cosine decay spans the run); the
    checkpoint is also bound to the generator's weights.
    """

    RESUME_MAY_CHANGE: ClassVar[tuple[str, ...]] = ("checkpoint_every",)

    steps: int = 2000
    batch_size: int = 128
    lr: float = 5e-4
    latent_weight: float = 1e-3
    sample_weight: float = 0.1
    seed: int = 0
    checkpoint_every: int = 500

    def __post_init__(self) -> None:
        _check_positive(
            "EncoderTrainConfig", lr=self.lr, latent_weight=self.latent_weight, sample_weight=self.sample_weight
        )

    def loop(self) -> LoopConfig:
        return _loop(self, "encoder")


def train_encoder(
    encoder: Encoder | nn.Module,
    generator: nn.Module,
    dataset: Dataset[Any],
    config: EncoderTrainConfig = EncoderTrainConfig(),
    *,
    device: str | torch.device = "cpu",
    checkpoint_dir: PathLike | None = None,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Train ``encoder`` for ``generator`` (see :class:`EncoderTrainConfig`); the generator stays frozen, in eval mode.

    The checkpoint is bound to the generator's weights (:func:`~manifold_defense.training.loop.module_fingerprint`):
    a folder whose encoder checkpoint was trained for other weights raises instead of being resumed (or returned
    finished) against this generator.
    """
    dev = resolve_device(device)
    k = _check_latent_match(generator, encoder)
    images = dataset_tensors(dataset)[0]
    check_images(images)
    generator.to(dev)
    encoder.to(dev).train()
    opt = torch.optim.Adam(encoder.parameters(), lr=config.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, config.steps))

    def step_fn(step: int, batch: tuple[torch.Tensor, ...]) -> dict[str, float]:
        x = batch[0]
        z = encoder(x)
        rec = (generator(z) - x).pow(2).flatten(1).sum(1).mean()
        loss = rec + config.latent_weight * z.pow(2).sum(1).mean()
        metrics = {"rec_mse": rec.item() / x[0].numel()}
        if config.sample_weight > 0:
            z_prior = torch.randn(x.shape[0], k, device=dev)
            with torch.no_grad():
                samples = generator(z_prior)
            latent_err = (encoder(samples) - z_prior).pow(2).sum(1).mean()
            loss = loss + config.sample_weight * latent_err
            metrics["latent_mse"] = latent_err.item() / k
        check_finite_metrics({"loss": loss.item()}, f"in encoder training at step {step}")  # before backward
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        return metrics

    with frozen(generator):
        history = run_loop(
            step_fn,
            (images,),
            dataclasses.replace(config.loop(), bound_to=module_fingerprint(generator)),
            {"encoder": encoder, "opt": opt, "sched": sched},
            device=dev,
            checkpoint_dir=checkpoint_dir,
            progress=progress,
            desc="encoder",
        )
    encoder.eval()
    return history


@dataclass(frozen=True)
class VAETrainConfig:
    """Adam on the negative ELBO with a Bernoulli likelihood, as CSGM trained its MNIST VAE.

    Every field but ``checkpoint_every`` defines the run (``steps`` too: the cosine decay spans the run).
    """

    RESUME_MAY_CHANGE: ClassVar[tuple[str, ...]] = ("checkpoint_every",)

    steps: int = 15000
    batch_size: int = 100
    lr: float = 1e-3
    seed: int = 0
    checkpoint_every: int = 2500

    def __post_init__(self) -> None:
        _check_positive("VAETrainConfig", lr=self.lr)

    def loop(self) -> LoopConfig:
        return _loop(self, "vae")


def train_vae(
    vae: VAE,
    dataset: Dataset[Any],
    config: VAETrainConfig = VAETrainConfig(),
    *,
    device: str | torch.device = "cpu",
    checkpoint_dir: PathLike | None = None,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Train CSGM's VAE by maximizing the ELBO; the model ends in eval mode."""
    dev = resolve_device(device)
    images = dataset_tensors(dataset)[0]
    check_images(images)
    vae.to(dev).train()
    opt = torch.optim.Adam(vae.parameters(), lr=config.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, config.steps))

    def step_fn(step: int, batch: tuple[torch.Tensor, ...]) -> dict[str, float]:
        x = batch[0]
        loss = vae.elbo_loss(x, torch.randn(x.shape[0], vae.latent_dim, device=dev)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        return {"neg_elbo": loss.item()}

    history = run_loop(
        step_fn,
        (images,),
        config.loop(),
        {"vae": vae, "opt": opt, "sched": sched},
        device=dev,
        checkpoint_dir=checkpoint_dir,
        progress=progress,
        desc="vae",
    )
    vae.eval()
    return history
