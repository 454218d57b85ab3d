"""Model definitions: the MNIST classifier, GAN generator/critic/encoder, and CSGM's VAE."""

from manifold_defense.models.classifier import MNISTClassifier
from manifold_defense.models.gan import Critic, Encoder, Generator
from manifold_defense.models.vae import VAE

__all__ = ["VAE", "Critic", "Encoder", "Generator", "MNISTClassifier"]
