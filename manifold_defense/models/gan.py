"""DCGAN-style generator, discriminator (critic) and encoder for 28x28 MNIST.

The generator is the zoo's ``mnist-gan``: latents ``z ~ N(0, I_k)`` to images in [0, 1] (sigmoid output). It is
trained by :func:`manifold_defense.training.train_gan` against :class:`Critic` (as a DCGAN discriminator with the
non-saturating loss, or as a WGAN-GP critic), its weights averaged over training; the :class:`Encoder` is trained
afterwards against the frozen generator (:func:`manifold_defense.training.train_encoder`) for warm starts.
"""

from __future__ import annotations

import torch
from torch import nn


class Generator(nn.Module):
    """``(B, latent_dim)`` latents to ``(B, 1, 28, 28)`` images in [0, 1].

    Architecture (DCGAN for MNIST, as in Defense-GAN's generator): Linear(k, 4w*7*7) - BN - ReLU -
    ConvT(4w, 2w, 4, s2) - BN - ReLU - ConvT(2w, 1, 4, s2) - sigmoid, with ``w = width`` (about 7 M multiply-adds
    per image at w = 32). Batch norm uses running statistics whenever the generator is in eval mode, as it is during
    inversion, so each sample is independent of its batch.
    """

    def __init__(self, latent_dim: int = 64, width: int = 32) -> None:
        super().__init__()
        if latent_dim <= 0 or width <= 0:
            raise ValueError(f"latent_dim and width must be positive, got {latent_dim} and {width}")
        self.latent_dim = latent_dim
        self._width = width
        self.fc = nn.Sequential(
            nn.Linear(latent_dim, 4 * width * 49), nn.BatchNorm1d(4 * width * 49), nn.ReLU()
        )
        self.net = nn.Sequential(
            nn.ConvTranspose2d(4 * width, 2 * width, 4, stride=2, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.ConvTranspose2d(2 * width, 1, 4, stride=2, padding=1),
            nn.Sigmoid(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).view(z.shape[0], 4 * self._width, 7, 7)
        return self.net(h)


def critic_features(width: int, in_channels: int = 1) -> list[nn.Module]:
    """The critic's feature layers: ``(B, in_channels, 28, 28)`` images to ``(B, 4 width * 16)`` features (three
    strided convolutions with ``width``, ``2 width``, ``4 width`` channels and leaky ReLU, then a flatten); shared by
    :class:`Critic` and the conditional critics, so their layer indices (and checkpoints) stay as they were."""
    return [
        nn.Conv2d(in_channels, width, 4, stride=2, padding=1),
        nn.LeakyReLU(0.2),
        nn.Conv2d(width, 2 * width, 4, stride=2, padding=1),
        nn.LeakyReLU(0.2),
        nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1),
        nn.LeakyReLU(0.2),
        nn.Flatten(),
    ]


class Critic(nn.Module):
    """Discriminator / critic: ``(B, 1, 28, 28)`` images to ``(B,)`` logits or scores.

    Three strided convolutions (``width``, ``2 width``, ``4 width`` channels) with leaky ReLU and a linear output; no
    batch norm, so it also serves as a WGAN-GP critic (the gradient penalty is per sample). ``in_channels`` > 1
    makes a PacGAN discriminator (Lin et al., NeurIPS 2018): it judges ``in_channels`` images stacked along the
    channels at once (``GANTrainConfig.pack``), which penalizes a generator that drops modes.
    """

    def __init__(self, width: int = 64, in_channels: int = 1) -> None:
        super().__init__()
        if width <= 0 or in_channels <= 0:
            raise ValueError(f"width and in_channels must be positive, got {width} and {in_channels}")
        self.net = nn.Sequential(*critic_features(width, in_channels), nn.Linear(4 * width * 16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)


class Encoder(nn.Module):
    """Images ``(B, 1, 28, 28)`` in [0, 1] to latents ``(B, latent_dim)`` of a generator (warm start for inversion)."""

    def __init__(self, latent_dim: int = 64, width: int = 32) -> None:
        super().__init__()
        if latent_dim <= 0 or width <= 0:
            raise ValueError(f"latent_dim and width must be positive, got {latent_dim} and {width}")
        self.latent_dim = latent_dim
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.LeakyReLU(0.2),
            nn.Flatten(),
            nn.Linear(2 * width * 49, 256),
            nn.LeakyReLU(0.2),
            nn.Linear(256, latent_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
