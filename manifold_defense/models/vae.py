"""The VAE of CSGM (Bora, Jalal, Price, Dimakis, ICML 2017) for MNIST: 784-500-500-20, softplus, sigmoid output.

As a zoo model the VAE follows the project's generator protocol: ``forward(z)`` decodes latents ``(B, 20)`` to
images ``(B, 1, 28, 28)`` in [0, 1]; :meth:`VAE.encode` gives the posterior mean and log-variance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class VAE(nn.Module):
    """CSGM's MNIST VAE. ``forward``: ``(B, latent_dim)`` -> ``(B, 1, 28, 28)`` in [0, 1]."""

    def __init__(self, latent_dim: int = 20, hidden: int = 500) -> None:
        super().__init__()
        if latent_dim <= 0 or hidden <= 0:
            raise ValueError(f"latent_dim and hidden must be positive, got {latent_dim} and {hidden}")
        self.latent_dim = latent_dim
        self.enc = nn.Sequential(
            nn.Linear(784, hidden), nn.Softplus(), nn.Linear(hidden, hidden), nn.Softplus()
        )
        self.enc_mu = nn.Linear(hidden, latent_dim)
        self.enc_logvar = nn.Linear(hidden, latent_dim)
        self.dec = nn.Sequential(
            nn.Linear(latent_dim, hidden),
            nn.Softplus(),
            nn.Linear(hidden, hidden),
            nn.Softplus(),
            nn.Linear(hidden, 784),
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance, each ``(B, latent_dim)``, of images ``(B, 1, 28, 28)``."""
        h = self.enc(x.reshape(x.shape[0], 784))
        return self.enc_mu(h), self.enc_logvar(h)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Bernoulli logits ``(B, 784)`` of the decoder."""
        return self.dec(z)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.dec(z)).view(z.shape[0], 1, 28, 28)

    def elbo_loss(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Negative ELBO per sample ``(B,)`` (Bernoulli likelihood), with reparameterization noise ``(B, latent_dim)``."""
        mu, logvar = self.encode(x)
        z = mu + torch.exp(0.5 * logvar) * noise
        rec = F.binary_cross_entropy_with_logits(
            self.dec(z), x.reshape(x.shape[0], 784), reduction="none"
        ).sum(1)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(1)
        return rec + kl
