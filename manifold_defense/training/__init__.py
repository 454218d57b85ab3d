"""Training: one seeded, checkpointed loop and the trainers of the zoo's models."""

from manifold_defense.training.loop import LoopConfig, run_loop
from manifold_defense.training.models import (
    ClassifierTrainConfig,
    EncoderTrainConfig,
    GANTrainConfig,
    VAETrainConfig,
    train_classifier,
    train_encoder,
    train_gan,
    train_vae,
)

__all__ = [
    "ClassifierTrainConfig",
    "EncoderTrainConfig",
    "GANTrainConfig",
    "LoopConfig",
    "VAETrainConfig",
    "run_loop",
    "train_classifier",
    "train_encoder",
    "train_gan",
    "train_vae",
]
