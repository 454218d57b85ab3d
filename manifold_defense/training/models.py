"""Trainers for the zoo's models: the classifier, the GAN (generator, critic, encoder), the encoder alone, the VAE.

Each trainer takes the model(s), a dataset of ``(image, label)`` pairs with images in [0, 1], a frozen config, a
``device`` and an optional checkpoint directory, and runs :func:`manifold_defense.training.loop.run_loop`, so every
one of them is seeded, shows a tqdm bar and resumes from its last checkpoint after an interruption.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from manifold_defense.devices import resolve_device
from manifold_defense.models import VAE, Critic, Encoder, Generator, MNISTClassifier, latent_dim_of
from manifold_defense.modes import frozen
from manifold_defense.training.loop import LoopConfig, check_images, dataset_tensors, run_loop

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


@dataclass(frozen=True)
class ClassifierTrainConfig:
    """Adam with cosine decay on cross-entropy. Defaults: about 5 epochs of MNIST's 50k training images."""

    steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    checkpoint_every: int = 500

    def __post_init__(self) -> None:
        _check_positive("ClassifierTrainConfig", lr=self.lr, weight_decay=self.weight_decay)

    def loop(self) -> LoopConfig:
        return LoopConfig(self.steps, self.batch_size, self.seed, self.checkpoint_every)


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

    The model is trained in place on ``device`` and left in eval mode.
    """
    dev = resolve_device(device)
    images, labels = dataset_tensors(dataset)[:2]
    check_images(images)
    model.to(dev).train()
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
class GANTrainConfig:
    """WGAN-GP with an encoder-reconstruction term (a Wasserstein auto-encoder / adversarial generator hybrid).

    Per step: ``n_critic`` critic updates on real images versus samples ``G(z), z ~ N(0, I)`` with gradient penalty
    ``gp_weight`` (Gulrajani et al. 2017; Defense-GAN: 10); then one generator + encoder update on
    ``rec_weight * ||G(E(x)) - x||^2`` (per image, summed over pixels) ``- adv_weight * D(G(z))`` (the WGAN generator
    loss on prior samples) ``+ mmd_weight * MMD(E(x), N(0, I))`` (inverse multiquadric kernel, Tolstikhin et al. 2018),
    which keeps the encoded latents where the prior puts its mass so that prior samples are digits too.
    Adam(lr, betas=(0.5, 0.9)) with cosine decay for all three networks.
    """

    steps: int = 6000
    batch_size: int = 64
    lr: float = 2e-4
    n_critic: int = 2
    gp_weight: float = 10.0
    rec_weight: float = 1.0
    adv_weight: float = 1.0
    mmd_weight: float = 10.0
    seed: int = 0
    checkpoint_every: int = 500

    def __post_init__(self) -> None:
        _check_positive(
            "GANTrainConfig",
            lr=self.lr,
            gp_weight=self.gp_weight,
            rec_weight=self.rec_weight,
            adv_weight=self.adv_weight,
            mmd_weight=self.mmd_weight,
        )
        if not isinstance(self.n_critic, int) or self.n_critic < 1:
            raise ValueError(f"GANTrainConfig.n_critic must be an int >= 1, got {self.n_critic!r}")

    def loop(self) -> LoopConfig:
        return LoopConfig(self.steps, self.batch_size, self.seed, self.checkpoint_every)


def imq_mmd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD^2 between samples ``a, b`` ``(n, k)`` with the inverse multiquadric kernels of WAE-MMD."""
    n, k = a.shape
    total = a.new_zeros(())
    off_diag = 1.0 - torch.eye(n, device=a.device, dtype=a.dtype)
    for scale in (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0):
        c = 2.0 * k * scale
        k_aa = c / (c + torch.cdist(a, a).pow(2))
        k_bb = c / (c + torch.cdist(b, b).pow(2))
        k_ab = c / (c + torch.cdist(a, b).pow(2))
        total = total + ((k_aa + k_bb) * off_diag).sum() / (n * (n - 1)) - 2.0 * k_ab.mean()
    return total


def _gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    eps = torch.rand(real.shape[0], 1, 1, 1, device=real.device, dtype=real.dtype)
    mix = (eps * real + (1.0 - eps) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(mix).sum(), mix, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1.0).pow(2).mean()


def train_gan(
    generator: Generator | nn.Module,
    critic: Critic | nn.Module,
    encoder: Encoder | nn.Module,
    dataset: Dataset[Any],
    config: GANTrainConfig = GANTrainConfig(),
    *,
    device: str | torch.device = "cpu",
    checkpoint_dir: PathLike | None = None,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Train generator, critic and encoder jointly (see :class:`GANTrainConfig`); models end in eval mode."""
    dev = resolve_device(device)
    k = _check_latent_match(generator, encoder)
    images = dataset_tensors(dataset)[0]
    check_images(images)
    for m in (generator, critic, encoder):
        m.to(dev).train()
    betas = (0.5, 0.9)
    opt_d = torch.optim.Adam(critic.parameters(), lr=config.lr, betas=betas)
    opt_g = torch.optim.Adam([*generator.parameters(), *encoder.parameters()], lr=config.lr, betas=betas)
    sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, lambda s: _cosine(s, config.steps))
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, lambda s: _cosine(s, config.steps))

    def step_fn(step: int, batch: tuple[torch.Tensor, ...]) -> dict[str, float]:
        x = batch[0]
        b = x.shape[0]
        for _ in range(config.n_critic):
            with torch.no_grad():
                fake = generator(torch.randn(b, k, device=dev))
            wdist = critic(x).mean() - critic(fake).mean()
            loss_d = -wdist + config.gp_weight * _gradient_penalty(critic, x, fake)
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
        for p in critic.parameters():
            p.requires_grad_(False)
        z_enc = encoder(x)
        z_prior = torch.randn(b, k, device=dev)
        out = generator(torch.cat([z_enc, z_prior]))
        rec = (out[:b] - x).pow(2).flatten(1).sum(1).mean()
        adv = -critic(out[b:]).mean()
        mmd = imq_mmd(z_enc, torch.randn(b, k, device=dev))
        loss_g = config.rec_weight * rec + config.adv_weight * adv + config.mmd_weight * mmd
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        for p in critic.parameters():
            p.requires_grad_(True)
        sched_d.step()
        sched_g.step()
        return {"wdist": wdist.item(), "rec_mse": rec.item() / x[0].numel(), "mmd": mmd.item()}

    state = {
        "generator": generator,
        "critic": critic,
        "encoder": encoder,
        "opt_d": opt_d,
        "opt_g": opt_g,
        "sched_d": sched_d,
        "sched_g": sched_g,
    }
    history = run_loop(
        step_fn,
        (images,),
        config.loop(),
        state,
        device=dev,
        checkpoint_dir=checkpoint_dir,
        progress=progress,
        desc="gan",
    )
    for m in (generator, critic, encoder):
        m.eval()
    return history


@dataclass(frozen=True)
class EncoderTrainConfig:
    """Fine-tune an encoder for a frozen generator: minimize ``||G(E(x)) - x||^2 + latent_weight * ||E(x)||^2``."""

    steps: int = 2000
    batch_size: int = 128
    lr: float = 5e-4
    latent_weight: float = 1e-3
    seed: int = 0
    checkpoint_every: int = 500

    def __post_init__(self) -> None:
        _check_positive("EncoderTrainConfig", lr=self.lr, latent_weight=self.latent_weight)

    def loop(self) -> LoopConfig:
        return LoopConfig(self.steps, self.batch_size, self.seed, self.checkpoint_every)


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
    """Train ``encoder`` so that ``generator(encoder(x))`` reconstructs ``x``; the generator stays frozen and in eval mode."""
    dev = resolve_device(device)
    _check_latent_match(generator, encoder)
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
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        return {"rec_mse": rec.item() / x[0].numel()}

    with frozen(generator):
        history = run_loop(
            step_fn,
            (images,),
            config.loop(),
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
    """Adam on the negative ELBO with a Bernoulli likelihood, as CSGM trained its MNIST VAE."""

    steps: int = 15000
    batch_size: int = 100
    lr: float = 1e-3
    seed: int = 0
    checkpoint_every: int = 2500

    def __post_init__(self) -> None:
        _check_positive("VAETrainConfig", lr=self.lr)

    def loop(self) -> LoopConfig:
        return LoopConfig(self.steps, self.batch_size, self.seed, self.checkpoint_every)


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
