"""Model definitions: the MNIST classifier, GAN generator/critic/encoder, and CSGM's VAE."""

from torch import nn

from manifold_defense.models.classifier import CompactMNISTClassifier, MNISTClassifier
from manifold_defense.models.gan import Critic, Encoder, Generator
from manifold_defense.models.vae import VAE


def latent_dim_of(generator: nn.Module) -> int:
    """The ``latent_dim`` of a generator (the project's generator protocol), checked to be a positive int."""
    k = getattr(generator, "latent_dim", None)
    if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
        raise TypeError(
            f"expected a generator with a positive int latent_dim, got {type(generator).__name__} with {k!r}"
        )
    return k


__all__ = [
    "VAE",
    "CompactMNISTClassifier",
    "Critic",
    "Encoder",
    "Generator",
    "MNISTClassifier",
    "latent_dim_of",
]
