"""Training the diffusion prior (DDPM): noise prediction with Adam, warm-up, gradient clipping and EMA weights.

Paper: Ho, Jain, Abbeel, "Denoising Diffusion Probabilistic Models" (NeurIPS 2020): the simple loss (mean squared
error of the predicted noise at a uniform timestep), Adam, an exponential moving average of the weights for
sampling. The learning rate is constant after a linear warm-up, so a run can be continued to more steps
(``extendable``): the step target may grow between sessions, every other setting must match the checkpoint's.

Mixed precision: ``autocast="bf16"`` runs the network's forward pass under ``torch.autocast`` in bfloat16 (weights,
optimizer and EMA stay float32); on a CPU with AVX512-BF16 it halves the step time. It is a run-defining setting.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from manifold_defense.devices import resolve_device
from manifold_defense.diffusion import DiffusionModel
from manifold_defense.training.gan import WeightAverage
from manifold_defense.training.loop import (
    LoopConfig,
    check_finite_metrics,
    check_images,
    dataset_tensors,
    run_loop,
    run_settings,
)

__all__ = ["DDPMTrainConfig", "train_ddpm"]

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class DDPMTrainConfig:
    """Settings of a DDPM run.

    Attributes:
        steps: optimizer steps (may grow on resume: the schedule is constant after warm-up).
        batch_size: images per step.
        lr: Adam's learning rate after warm-up; warmup: steps of linear warm-up from 0.
        ema_decay: decay of the weight average used for sampling (the shipped weights).
        grad_clip: global gradient-norm clip (0: none).
        autocast: ``"bf16"`` (bfloat16 autocast of the forward pass) or ``"none"``.
        seed: seeds the batch order, timesteps and noise.
        checkpoint_every, log_every: checkpoint and logging intervals (not run-defining).
    """

    steps: int = 20000
    batch_size: int = 64
    lr: float = 2e-4
    warmup: int = 500
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    autocast: str = "bf16"
    seed: int = 0
    checkpoint_every: int = 250
    log_every: int = 100

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"DDPMTrainConfig.{name} must be a positive int, got {value!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"DDPMTrainConfig.warmup must be an int >= 0, got {self.warmup!r}")
        if not (isinstance(self.lr, int | float) and 0 < self.lr < 1):
            raise ValueError(f"DDPMTrainConfig.lr must be in (0, 1), got {self.lr!r}")
        if not (isinstance(self.ema_decay, int | float) and 0 <= self.ema_decay < 1):
            raise ValueError(f"DDPMTrainConfig.ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if not (isinstance(self.grad_clip, int | float) and self.grad_clip >= 0):
            raise ValueError(f"DDPMTrainConfig.grad_clip must be >= 0, got {self.grad_clip!r}")
        if self.autocast not in ("bf16", "none"):
            raise ValueError(f"DDPMTrainConfig.autocast must be 'bf16' or 'none', got {self.autocast!r}")

    def loop(self, model: DiffusionModel) -> LoopConfig:
        settings = run_settings(
            self,
            timesteps=model.timesteps,
            beta_start=model.beta_start,
            beta_end=model.beta_end,
            network=type(model.network).__name__,
            network_channels=getattr(model.network, "channels", None),
            network_blocks=getattr(model.network, "blocks", None),
        )
        return LoopConfig(
            self.steps, self.batch_size, self.seed, self.checkpoint_every, self.log_every,
            trainer="ddpm", settings=settings,
        )  # fmt: skip


def train_ddpm(
    model: DiffusionModel,
    dataset: Dataset[Any],
    config: DDPMTrainConfig = DDPMTrainConfig(),
    *,
    device: str | torch.device = "cpu",
    checkpoint_dir: PathLike | None = None,
    progress: bool = True,
) -> tuple[WeightAverage, list[dict[str, float]]]:
    """Train ``model`` (in place) on the images of ``dataset``; returns the EMA weights and the logged history.

    Args:
        model: the diffusion prior to train (its noise network is updated in place).
        dataset: ``(image, ...)`` examples with images ``(C, H, W)`` in [0, 1] (labels are ignored).
        config: the run's settings.
        device: where to train; checkpoint_dir: folder of ``checkpoint.pt`` (rerunning resumes exactly).
        progress: show progress.

    Returns:
        ``(ema, history)``: ``ema.module`` is a :class:`DiffusionModel` with the averaged weights (ship these).
    """
    if not isinstance(model, DiffusionModel):
        raise TypeError(f"expected a DiffusionModel to train, got {type(model).__name__}")
    dev = resolve_device(device)
    images = dataset_tensors(dataset)[0]
    check_images(images)
    if tuple(images.shape[1:]) != tuple(model.image_shape):
        raise ValueError(f"expected training images of shape {model.image_shape}, got {tuple(images.shape[1:])}")
    model.to(dev).train()
    ema = WeightAverage(model, config.ema_decay).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / config.warmup) if config.warmup else 1.0
    )
    use_bf16 = config.autocast == "bf16"

    def step_fn(step: int, batch: tuple[torch.Tensor, ...]) -> dict[str, float]:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = model.loss(batch[0])
        value = loss.item()
        check_finite_metrics({"loss": value}, f"in DDPM training at step {step}")  # before the update
        opt.zero_grad(set_to_none=True)
        loss.float().backward()
        grad_norm = (
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip) if config.grad_clip else None
        )
        opt.step()
        sched.step()
        ema.update()
        metrics = {"loss": value}
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        return metrics

    history = run_loop(
        step_fn,
        (images,),
        config.loop(model),
        {"model": model, "ema": ema, "opt": opt, "sched": sched},
        device=dev,
        checkpoint_dir=checkpoint_dir,
        progress=progress,
        desc="ddpm",
        extendable=True,
    )
    model.eval()
    ema.module.eval()
    return ema, history
