"""GAN training for the generator prior: non-saturating DCGAN or WGAN-GP, with an EMA of the generator's weights.

Papers: Radford et al. 2016 (DCGAN; the non-saturating loss of Goodfellow et al. 2014), Gulrajani et al. 2017
(WGAN-GP, Defense-GAN's objective), Yazici et al. 2019 (an exponential moving average of the generator's weights
gives better samples than the last iterate). No encoder or reconstruction term: the generator is decided by the
adversarial game alone, so that its samples are digits; the encoder for warm starts is trained afterwards against
the frozen generator (:func:`manifold_defense.training.train_encoder`).

The trainer runs on :func:`manifold_defense.training.loop.run_loop` (seeded batches, atomic checkpoints, exact
resume); the EMA copy is part of the checkpoint. When ``ema_decay`` is set, the generator passed in ends holding the
EMA weights (the raw last iterate stays in the checkpoint under ``"generator"``), with batch-norm statistics
re-estimated for those weights on ``bn_batches`` fresh prior batches.

AmbientGAN (Bora, Price, Dimakis, ICLR 2018): with ``measurement=f`` the dataset holds measurements
``y = f_theta(x)`` only, and the discriminator compares them with ``f_theta'(G(z))``, the generator's output measured
with a fresh random ``theta'`` per sample and call (:mod:`manifold_defense.ambient` has the measurement models).
``theta'`` is drawn from the global torch RNG, which :func:`~manifold_defense.training.loop.run_loop` forks, seeds
and checkpoints, so an ambient run resumes exactly like any other.

Label-conditioned GANs (CausalGAN's image generator, :mod:`manifold_defense.causal`): with ``conditional=True`` the
dataset's second tensor holds one condition vector per image, the generator is called as ``generator(z, c)`` and the
discriminator as ``discriminator(x, c)``; generated images take the conditions of the real batch they are compared
with, so the conditions seen in training follow the data's own joint distribution.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from manifold_defense.devices import resolve_device
from manifold_defense.models import latent_dim_of
from manifold_defense.training.loop import (
    LoopConfig,
    check_finite_metrics,
    check_images,
    dataset_tensors,
    run_loop,
    run_settings,
)
from manifold_defense.training.models import _check_latent_match
from manifold_defense.training.schedule import ScheduleGuard, linear_decay_lr

PathLike = str | os.PathLike[str]
Objective = Literal["ns", "wgan-gp"]


@dataclass(frozen=True)
class GANTrainConfig:
    """Schedule and objective of :func:`train_gan`.

    Attributes:
        steps: generator updates.
        batch_size: real images per step (and as many prior samples).
        objective: ``"ns"`` (non-saturating DCGAN loss, one discriminator step per generator step) or
            ``"wgan-gp"`` (Wasserstein loss with gradient penalty ``gp_weight``, ``n_critic`` critic steps).
        lr, beta1, beta2: Adam for both networks (DCGAN: 2e-4, 0.5, 0.999; WGAN-GP: 1e-4, 0.5, 0.9).
        n_critic: discriminator steps per generator step.
        gp_weight: gradient-penalty weight (``wgan-gp`` only).
        ema_decay: decay of the generator's weight average (``None``: no average, the last iterate is kept).
        rec_weight: weight of an optional coverage term ``||G(E(x)) - x||^2`` (per image, summed over pixels)
            through an auxiliary encoder trained with the generator (0: pure adversarial training). Latents
            ``E(x)`` are not pulled towards the prior, so the term widens the range of ``G`` over all of latent
            space (what projection needs) while prior samples stay decided by the adversarial loss.
        bn_batches: prior batches of 256 used to re-estimate batch-norm statistics of the averaged weights.
        seed: batch order and latent noise.
        checkpoint_every: steps between checkpoints.
        pack: PacGAN's packing (Lin et al., NeurIPS 2018): the discriminator judges ``pack`` images of one kind
            (all real or all generated) stacked along the channels, so it must take ``pack`` times the image
            channels (``Critic(in_channels=pack)``); 1 is the plain GAN. ``batch_size`` must be a multiple.
        lr_decay_from: from this step on, both learning rates fall linearly to 0 at ``steps`` (``None``: constant).
            Until that step the run is the constant-rate run, so a constant-rate checkpoint at or before it
            continues into the decay exactly; once decaying, a run resumes only with the same ``steps``.

    Resume: the run is extendable (its steps do not depend on the total at a constant rate), so ``steps`` may grow
    on resume, and ``lr_decay_from`` may change as long as the rates of the steps done stay the same (checked by
    :class:`~manifold_defense.training.schedule.ScheduleGuard`). ``checkpoint_every`` and ``bn_batches`` (it only
    re-estimates the final average's batch-norm statistics, after the last step) may change too. Every other
    field is recorded in the checkpoint and a resume with another value is refused, naming it.
    """

    RESUME_MAY_CHANGE: ClassVar[tuple[str, ...]] = ("steps", "checkpoint_every", "lr_decay_from", "bn_batches")

    steps: int = 30000
    batch_size: int = 64
    objective: str = "ns"
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    n_critic: int = 1
    gp_weight: float = 10.0
    ema_decay: float | None = 0.999
    rec_weight: float = 0.0
    bn_batches: int = 40
    seed: int = 0
    checkpoint_every: int = 500
    lr_decay_from: int | None = None
    pack: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.pack, bool) or not isinstance(self.pack, int) or self.pack < 1:
            raise ValueError(f"GANTrainConfig.pack must be an int >= 1, got {self.pack!r}")
        if self.batch_size % self.pack:
            raise ValueError(
                f"GANTrainConfig.batch_size ({self.batch_size}) must be a multiple of pack ({self.pack})"
            )
        if self.lr_decay_from is not None and (
            isinstance(self.lr_decay_from, bool)
            or not isinstance(self.lr_decay_from, int)
            or not 0 <= self.lr_decay_from < self.steps
        ):
            raise ValueError(
                f"GANTrainConfig.lr_decay_from must be None or an int in [0, steps={self.steps}), "
                f"got {self.lr_decay_from!r}"
            )
        if self.objective not in ("ns", "wgan-gp"):
            raise ValueError(f"GANTrainConfig.objective must be 'ns' or 'wgan-gp', got {self.objective!r}")
        for name in ("lr", "gp_weight", "rec_weight"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"GANTrainConfig.{name} must be a finite number >= 0, got {value!r}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0.0 <= value < 1.0:
                raise ValueError(f"GANTrainConfig.{name} must be in [0, 1), got {value!r}")
        if self.ema_decay is not None and not (
            isinstance(self.ema_decay, int | float) and 0.0 < self.ema_decay < 1.0
        ):
            raise ValueError(f"GANTrainConfig.ema_decay must be None or in (0, 1), got {self.ema_decay!r}")
        for name in ("n_critic", "bn_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "n_critic" else 0):
                raise ValueError(f"GANTrainConfig.{name} must be an int >= {int(name == 'n_critic')}, got {value!r}")

    def loop(self, trainer: str = "gan", **extra: Any) -> LoopConfig:
        """The :class:`LoopConfig` of the run: ``trainer`` and the run-defining settings (the fields not in
        ``RESUME_MAY_CHANGE``, plus ``extra``, e.g. the measurement model) recorded in its checkpoint."""
        settings = run_settings(self, exclude=self.RESUME_MAY_CHANGE, **extra)
        return LoopConfig(self.steps, self.batch_size, self.seed, self.checkpoint_every, trainer=trainer,
                          settings=settings)  # fmt: skip

    def lr_at(self, step: int) -> float:
        """The learning rate of step ``step`` (0-based)."""
        return linear_decay_lr(self.lr, self.steps, self.lr_decay_from, step)


class WeightAverage(nn.Module):
    """An exponential moving average of a module's parameters; buffers (batch-norm statistics) are copied.

    ``update()`` after each optimizer step: ``avg = decay * avg + (1 - decay) * current``, with the effective decay
    ``min(decay, (1 + t) / (10 + t))`` at update ``t`` so that the early average is not dominated by the random
    initialization. Its ``state_dict`` holds the averaged module and the update count, so it checkpoints and resumes.
    """

    def __init__(self, module: nn.Module, decay: float) -> None:
        super().__init__()
        self.module = copy.deepcopy(module).eval().requires_grad_(False)
        self.decay = decay
        self.count: torch.Tensor
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self._source = [module]  # a list, so the source is not registered as a submodule

    @torch.no_grad()
    def update(self) -> None:
        source = self._source[0]
        t = int(self.count)
        d = min(self.decay, (1.0 + t) / (10.0 + t))
        for avg, cur in zip(self.module.parameters(), source.parameters(), strict=True):
            avg.lerp_(cur.detach(), 1.0 - d)
        for avg_b, cur_b in zip(self.module.buffers(), source.buffers(), strict=True):
            avg_b.copy_(cur_b)
        self.count += 1


@torch.no_grad()
def recalibrate_batchnorm(
    generator: nn.Module,
    batches: int,
    batch_size: int = 256,
    *,
    seed: int = 0,
    conditions: torch.Tensor | None = None,
) -> None:
    """Re-estimate the batch-norm running statistics of ``generator`` on ``batches`` prior batches ``z ~ N(0, I)``.

    Each batch-norm layer's statistics become the plain average over the batches (momentum ``None``); the
    generator is left in eval mode. Averaged weights need this: the running statistics copied from the last
    iterate belong to other weights. A conditional generator (``generator(z, c)``) takes ``conditions``: rows of
    it drawn uniformly (seeded) for each batch.
    """
    norms = [m for m in generator.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or batches == 0:
        generator.eval()
        return
    k = latent_dim_of(generator)
    dev = next(generator.parameters()).device
    rng = torch.Generator().manual_seed(seed)
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    generator.train()
    try:
        for _ in range(batches):
            z = torch.randn(batch_size, k, generator=rng).to(dev)
            if conditions is None:
                generator(z)
            else:
                rows = torch.randint(conditions.shape[0], (batch_size,), generator=rng)
                generator(z, conditions[rows].to(dev))
    finally:
        for m, mom in zip(norms, saved, strict=True):
            m.momentum = mom
        generator.eval()


@contextlib.contextmanager
def _batchnorm_eval(module: nn.Module) -> Iterator[None]:
    """Batch-norm layers of ``module`` in eval mode for the block (gradients still flow), then restored."""
    norms = [(m, m.training) for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    try:
        for m, _ in norms:
            m.eval()
        yield
    finally:
        for m, mode in norms:
            m.train(mode)


def _gradient_penalty(
    critic: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor, fake: torch.Tensor
) -> torch.Tensor:
    # one mixing weight per sample, broadcast over images (B, C, H, W) or measurement vectors (B, ...)
    eps = torch.rand(real.shape[0], *([1] * (real.dim() - 1)), device=real.device, dtype=real.dtype)
    mix = (eps * real + (1.0 - eps) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(mix).sum(), mix, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1.0).pow(2).mean()


def _check_generator(
    generator: nn.Module,
    data_shape: tuple[int, ...],
    device: torch.device,
    measurement: nn.Module | None = None,
    conditions: torch.Tensor | None = None,
) -> int:
    """The latent size, after one probe batch shows images in [0, 1] of the data's shape (measured, with a
    ``measurement``: then the measured images must have the shape of the data's measurements; a conditional
    generator is probed with the first ``conditions``)."""
    k = latent_dim_of(generator)
    was = generator.training
    generator.eval()
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        z = torch.randn(4, k, generator=torch.Generator().manual_seed(0)).to(device)
        probe = generator(z) if conditions is None else generator(z, conditions[:4].to(device))
        measured = measurement(probe) if measurement is not None and isinstance(probe, torch.Tensor) else probe
    generator.train(was)
    if not isinstance(probe, torch.Tensor) or probe.dim() != 4:
        got = tuple(probe.shape) if isinstance(probe, torch.Tensor) else type(probe).__name__
        raise ValueError(f"generator: expected images (B, C, H, W), got {got}")
    if measurement is None and tuple(probe.shape[1:]) != data_shape:
        raise ValueError(
            f"generator: expected images (B, {', '.join(map(str, data_shape))}) like the data, got {tuple(probe.shape)}"
        )
    if not torch.isfinite(probe).all() or float(probe.min()) < 0.0 or float(probe.max()) > 1.0:
        raise ValueError(
            f"generator: expected finite outputs in [0, 1] (end it with a sigmoid), got range "
            f"[{float(probe.min()):.4g}, {float(probe.max()):.4g}]"
        )
    if measurement is not None and (not isinstance(measured, torch.Tensor) or tuple(measured.shape[1:]) != data_shape):
        got = tuple(measured.shape) if isinstance(measured, torch.Tensor) else type(measured).__name__
        raise ValueError(
            f"measurement: expected the measured generator output to have the shape of the dataset's measurements "
            f"(B, {', '.join(map(str, data_shape))}), got {got}"
        )
    return k


def _check_measurements(data: torch.Tensor) -> None:
    if not isinstance(data, torch.Tensor) or not data.is_floating_point() or data.dim() < 2:
        got = f"{data.dtype} {tuple(data.shape)}" if isinstance(data, torch.Tensor) else type(data).__name__
        raise ValueError(f"measured training data: expected a float tensor (N, ...), got {got}")
    if not torch.isfinite(data).all():
        raise ValueError("measured training data: expected finite values, got NaN or inf")


def _check_conditions(images: torch.Tensor, tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The dataset's condition vectors (its second tensor): float ``(N, L)``, finite, one per image."""
    if len(tensors) < 2:
        raise ValueError("conditional GAN training: expected a dataset of (image, condition) pairs, got images only")
    cond = tensors[1]
    if not cond.is_floating_point() or cond.dim() != 2 or cond.shape[0] != images.shape[0]:
        raise ValueError(
            f"conditional GAN training: expected conditions as a float tensor (N, L) with N = {images.shape[0]} "
            f"images, got {cond.dtype} {tuple(cond.shape)}"
        )
    if not torch.isfinite(cond).all():
        raise ValueError("conditional GAN training: expected finite conditions, got NaN or inf")
    return cond


def _finite(name: str, step: int, value: torch.Tensor) -> torch.Tensor:
    """``value``, after the training loops' shared check (before backward, so NaN never reaches the weights)."""
    check_finite_metrics({name: float(value.detach())}, f"in GAN training at step {step}")
    return value


def train_gan(
    generator: nn.Module,
    discriminator: nn.Module,
    dataset: Dataset[Any],
    config: GANTrainConfig = GANTrainConfig(),
    *,
    device: str | torch.device = "cpu",
    checkpoint_dir: PathLike | None = None,
    progress: bool = True,
    validate: Callable[[nn.Module, int], Mapping[str, float]] | None = None,
    validate_every: int | None = None,
    encoder: nn.Module | None = None,
    measurement: nn.Module | None = None,
    conditional: bool = False,
) -> list[dict[str, float]]:
    """Train ``generator`` against ``discriminator`` on the images of ``dataset`` (see :class:`GANTrainConfig`).

    Args:
        generator: latents ``(B, latent_dim)`` to images ``(B, C, H, W)`` in [0, 1]; must carry ``latent_dim``.
        discriminator: images ``(B, C, H, W)`` to one logit (or critic score) each, ``(B,)``.
        dataset: ``(image, ...)`` examples, images float in [0, 1] (labels, if any, are ignored).
        config: objective and schedule.
        device: where to train.
        checkpoint_dir: checkpoints and ``history.json``; an interrupted run resumes from there.
        progress: show a progress bar.
        validate: optional ``validate(sample_generator, step) -> metrics`` called every ``validate_every`` steps
            with the generator that will be saved (the average, its batch norm re-estimated, when
            ``ema_decay`` is set); its metrics join the history.
        validate_every: steps between validations (required with ``validate``).
        encoder: images to latents ``(B, latent_dim)``, trained jointly for the ``rec_weight`` term (required
            when ``rec_weight > 0``, refused otherwise).
        measurement: AmbientGAN's random measurement model ``f_theta`` (images ``(B, C, H, W)`` to measurements
            ``(B, ...)``, a fresh ``theta`` per sample and call from the global RNG, differentiable in the
            images), e.g. :class:`manifold_defense.ambient.BlockPixels`. The dataset then holds measurements of
            that shape (:func:`manifold_defense.ambient.measure_dataset`), any finite values, and the
            discriminator sees only measurements, real and generated. Refused with an encoder (its
            reconstruction term needs clean images).
        conditional: a label-conditioned GAN: ``dataset`` yields ``(image, condition)`` with float condition
            vectors ``(L,)``; the networks are called as ``generator(z, c)`` and ``discriminator(x, c)``, and
            each generated image takes the condition of a real image of its batch. Refused with a measurement or
            an encoder.

    Returns:
        The history: mean losses and discriminator outputs every 100 steps, and the validation metrics.
        Both networks end in eval mode; ``generator`` holds the averaged weights when ``ema_decay`` is set.

    The checkpoint records the ``gan`` trainer, the run-defining fields of ``config`` and the measurement model's
    description and ``conditional``; a resume with others is refused, naming them.
    """
    return _train_gan(
        generator, discriminator, dataset, config, device=device, checkpoint_dir=checkpoint_dir, progress=progress,
        validate=validate, validate_every=validate_every, encoder=encoder, measurement=measurement,
        conditional=conditional,
    )  # fmt: skip


def describe_measurement(measurement: nn.Module | None) -> Any:
    """A measurement model as its checkpoint records it: ``spec()`` when it has one (the ambient models), else
    its class name and ``repr``; ``None`` for none."""
    if measurement is None:
        return None
    spec = getattr(measurement, "spec", None)
    if callable(spec):
        return spec()
    return {"type": type(measurement).__name__, "repr": repr(measurement)}


def _train_gan(
    generator: nn.Module,
    discriminator: nn.Module,
    dataset: Dataset[Any],
    config: GANTrainConfig,
    *,
    device: str | torch.device,
    checkpoint_dir: PathLike | None,
    progress: bool,
    validate: Callable[[nn.Module, int], Mapping[str, float]] | None,
    validate_every: int | None,
    encoder: nn.Module | None,
    measurement: nn.Module | None,
    conditional: bool,
    trainer: str = "gan",
    extra_settings: Mapping[str, Any] | None = None,
) -> list[dict[str, float]]:
    """:func:`train_gan` under the name ``trainer``, with ``extra_settings`` (inputs that define the run but are
    not in the config: the ambient method and measured data, the causal graph) recorded in its checkpoint."""
    if not isinstance(config, GANTrainConfig):
        raise TypeError(f"expected config to be a GANTrainConfig, got {type(config).__name__}")
    dev = resolve_device(device)
    tensors = dataset_tensors(dataset)
    images = tensors[0]
    conditions: torch.Tensor | None = None
    if conditional:
        if measurement is not None or encoder is not None:
            raise ValueError("expected no measurement and no encoder with conditional=True")
        conditions = _check_conditions(images, tensors)
    if measurement is not None:
        if not isinstance(measurement, nn.Module):
            raise TypeError(f"expected measurement to be an nn.Module or None, got {type(measurement).__name__}")
        if encoder is not None:
            raise ValueError("expected no encoder with a measurement: the reconstruction term needs clean images")
        _check_measurements(images)
        measurement.to(dev).requires_grad_(False)
    else:
        check_images(images)
    generator.to(dev)
    discriminator.to(dev)
    k = _check_generator(generator, tuple(images.shape[1:]), dev, measurement, conditions)

    def measured(x: torch.Tensor) -> torch.Tensor:
        return x if measurement is None else measurement(x)

    def gen(z: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        return generator(z) if c is None else generator(z, c)

    def disc(x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        if config.pack > 1:  # PacGAN: groups of `pack` consecutive examples stacked along the channels
            x = x.reshape(x.shape[0] // config.pack, config.pack * x.shape[1], *x.shape[2:])
        return discriminator(x) if c is None else discriminator(x, c)

    if config.pack > 1:
        if conditional:
            raise ValueError(f"expected pack=1 with conditional=True, got pack={config.pack}")
        try:
            with torch.no_grad():
                disc(images[: config.pack].to(dev), None)
        except RuntimeError as err:
            raise ValueError(
                f"the discriminator does not take {config.pack} examples stacked along the channels "
                f"(GANTrainConfig.pack={config.pack}): build it for {config.pack}x the channels, e.g. "
                f"Critic(in_channels={config.pack}) ({str(err).splitlines()[0]})"
            ) from None
    if (config.rec_weight > 0) != (encoder is not None):
        raise ValueError(
            f"expected an encoder exactly when rec_weight > 0, got rec_weight {config.rec_weight} and "
            f"encoder {type(encoder).__name__ if encoder is not None else None}"
        )
    g_params = list(generator.parameters())
    if encoder is not None:
        _check_latent_match(generator, encoder)
        encoder.to(dev).train()
        g_params += list(encoder.parameters())
    generator.train()
    discriminator.train()
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=config.lr, betas=(config.beta1, config.beta2))
    opt_g = torch.optim.Adam(g_params, lr=config.lr, betas=(config.beta1, config.beta2))
    ema = WeightAverage(generator, config.ema_decay) if config.ema_decay is not None else None
    wgan = config.objective == "wgan-gp"

    def d_loss(
        real: torch.Tensor, fake: torch.Tensor, c: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out_real, out_fake = disc(real, c), disc(fake, c)
        if wgan:
            penalty = _gradient_penalty(lambda v: disc(v, c), real, fake)
            loss = out_fake.mean() - out_real.mean() + config.gp_weight * penalty
        else:
            loss = F.softplus(-out_real).mean() + F.softplus(out_fake).mean()
        return loss, out_real, out_fake

    guard = ScheduleGuard(config)

    def step_fn(step: int, batch: tuple[torch.Tensor, ...]) -> dict[str, float]:
        if guard.done == 0 and step > 0:
            guard.check(step)
        guard.done = step + 1
        lr = config.lr_at(step)
        for group in (*opt_d.param_groups, *opt_g.param_groups):
            group["lr"] = lr
        x = batch[0]
        c = batch[1] if conditional else None
        b = x.shape[0]
        for _ in range(config.n_critic):
            with torch.no_grad():
                fake = measured(gen(torch.randn(b, k, device=dev), c))
            loss_d, out_real, out_fake = d_loss(x, fake, c)
            opt_d.zero_grad(set_to_none=True)
            _finite("loss_d", step, loss_d).backward()
            opt_d.step()
        discriminator.requires_grad_(False)
        out_gen = disc(measured(gen(torch.randn(b, k, device=dev), c)), c)
        if encoder is not None:
            # batch norm on running statistics, as the projection will use the generator, and left unchanged
            # by the encoded latents (the statistics stay those of prior samples)
            with _batchnorm_eval(generator):
                rec = (generator(encoder(x)) - x).pow(2).flatten(1).sum(1).mean()
        loss_g = -out_gen.mean() if wgan else F.softplus(-out_gen).mean()
        if encoder is not None:
            loss_g = loss_g + config.rec_weight * rec
        opt_g.zero_grad(set_to_none=True)
        _finite("loss_g", step, loss_g).backward()
        opt_g.step()
        discriminator.requires_grad_(True)
        if ema is not None:
            ema.update()
        extra = {"rec_mse": rec.item() / x[0].numel()} if encoder is not None else {}
        return {
            **extra,
            "loss_d": loss_d.item(),
            "loss_g": loss_g.item(),
            "d_real": out_real.mean().item() if wgan else torch.sigmoid(out_real).mean().item(),
            "d_fake": out_fake.mean().item() if wgan else torch.sigmoid(out_fake).mean().item(),
        }

    def final_generator() -> nn.Module:
        """The generator that is saved: the average (batch norm re-estimated) or the last iterate (eval mode)."""
        if ema is None:
            return generator
        sample_gen = copy.deepcopy(ema.module)
        recalibrate_batchnorm(sample_gen, config.bn_batches, seed=config.seed, conditions=conditions)
        return sample_gen

    hook = None
    if validate is not None:

        def hook(done: int) -> Mapping[str, float]:
            was = generator.training
            sample_gen = final_generator()
            sample_gen.eval()
            try:
                return validate(sample_gen, done)
            finally:
                generator.train(was)

    state: dict[str, Any] = {
        "generator": generator,
        "discriminator": discriminator,
        "opt_d": opt_d,
        "opt_g": opt_g,
        "schedule": guard,
    }
    if ema is not None:
        state["ema"] = ema
    if encoder is not None:
        state["encoder"] = encoder
    loop = config.loop(
        trainer,
        measurement=describe_measurement(measurement),
        conditional=bool(conditional),
        **(extra_settings or {}),
    )
    history = run_loop(
        step_fn,
        (images,) if conditions is None else (images, conditions),
        loop,
        state,
        device=dev,
        checkpoint_dir=checkpoint_dir,
        progress=progress,
        desc=f"gan ({config.objective}{', ambient' if measurement is not None else ''}"
        f"{', conditional' if conditional else ''})",
        validate=hook,
        validate_every=validate_every,
        extendable=True,  # more --steps continue the run; the schedule guard refuses a decay that would rewrite it
    )
    if ema is not None:
        generator.load_state_dict(final_generator().state_dict())
    for m in (generator, discriminator, encoder):
        if m is not None:
            m.eval()
    return history
