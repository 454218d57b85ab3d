"""Training: one seeded, checkpointed loop, the trainers of the zoo's models, and robust (adversarial) training."""

from manifold_defense.training.adversarial import (
    AdversarialTrainConfig,
    RobustTrainConfig,
    adversarial_train,
    attack_mode,
)
from manifold_defense.training.distributed import DistContext, setup_distributed
from manifold_defense.training.gan import GANTrainConfig, WeightAverage, recalibrate_batchnorm, train_gan
from manifold_defense.training.loop import LoopConfig, run_loop
from manifold_defense.training.manifold import RobustManifoldConfig, robust_manifold_train
from manifold_defense.training.models import (
    ClassifierTrainConfig,
    EncoderTrainConfig,
    VAETrainConfig,
    train_classifier,
    train_encoder,
    train_vae,
)

__all__ = [
    "AdversarialTrainConfig",
    "ClassifierTrainConfig",
    "DistContext",
    "EncoderTrainConfig",
    "GANTrainConfig",
    "LoopConfig",
    "RobustManifoldConfig",
    "RobustTrainConfig",
    "VAETrainConfig",
    "WeightAverage",
    "adversarial_train",
    "attack_mode",
    "recalibrate_batchnorm",
    "robust_manifold_train",
    "run_loop",
    "setup_distributed",
    "train_classifier",
    "train_encoder",
    "train_gan",
    "train_vae",
]
