"""CausalGAN's image side: a label-conditioned generator, a projection discriminator, and :class:`CausalGAN`, which
samples labels from a causal controller (conditioned or intervened) and images from the generator given them.

The paper (Kocaoglu et al., ICLR 2018) trains its image generator with a label-estimating "Labeler" and
"Anti-Labeler"; we use the simpler projection discriminator (Miyato & Koyama, ICLR 2018), trained by the shared
GAN trainer (:func:`train_causal_gan`: :func:`manifold_defense.training.train_gan` with ``conditional=True`` on the
one-hot label rows). The controller and the image generator are trained separately, as in the paper.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from manifold_defense.causal.controller import CausalController
from manifold_defense.causal.graph import CausalGraph
from manifold_defense.models import latent_dim_of
from manifold_defense.models.gan import critic_features
from manifold_defense.training.gan import GANTrainConfig, _train_gan
from manifold_defense.training.loop import check_images

__all__ = [
    "CausalGAN", "CausalSample", "ConditionalGenerator", "ProjectionCritic", "one_hot_labels", "train_causal_gan",
]  # fmt: skip


def one_hot_labels(graph: CausalGraph, labels: torch.Tensor) -> torch.Tensor:
    """Label rows ``(N, len(nodes))`` of value indices to the concatenated one-hot condition vectors ``(N, L)``.

    A fractional value or a value index outside a node's range raises ``ValueError`` naming the node, the value and
    the allowed range (:meth:`CausalGraph.label_rows`).
    """
    labels = graph.label_rows(labels)
    parts = [F.one_hot(labels[:, i], graph[n].cardinality) for i, n in enumerate(graph.order)]
    return torch.cat(parts, dim=1).float()


class ConditionalGenerator(nn.Module):
    """``(B, latent_dim)`` latents and ``(B, label_dim)`` condition vectors to ``(B, 1, 28, 28)`` images in [0, 1].

    The zoo's DCGAN generator (:class:`manifold_defense.models.Generator`) with the condition concatenated to the
    latent: Linear(k + L, 4w*7*7) - BN - ReLU - ConvT(4w, 2w) - BN - ReLU - ConvT(2w, 1) - sigmoid.
    """

    def __init__(self, latent_dim: int = 64, label_dim: int = 9, width: int = 32) -> None:
        super().__init__()
        if min(latent_dim, label_dim, width) <= 0:
            raise ValueError(
                f"expected positive sizes, got latent_dim {latent_dim}, label_dim {label_dim}, width {width}"
            )
        self.latent_dim, self.label_dim, self._width = latent_dim, label_dim, width
        self.fc = nn.Sequential(nn.Linear(latent_dim + label_dim, 4 * width * 49), nn.BatchNorm1d(4 * width * 49),
                                nn.ReLU())  # fmt: skip
        self.net = nn.Sequential(
            nn.ConvTranspose2d(4 * width, 2 * width, 4, stride=2, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.ConvTranspose2d(2 * width, 1, 4, stride=2, padding=1),
            nn.Sigmoid(),
        )

    def forward(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if c.dim() != 2 or c.shape != (z.shape[0], self.label_dim):
            raise ValueError(f"expected conditions ({z.shape[0]}, {self.label_dim}), got {tuple(c.shape)}")
        h = self.fc(torch.cat([z, c.to(z.dtype)], dim=1)).view(z.shape[0], 4 * self._width, 7, 7)
        return self.net(h)


class ProjectionCritic(nn.Module):
    """Projection discriminator: ``(B, 1, 28, 28)`` images and ``(B, L)`` conditions to ``(B,)`` logits,
    ``psi(h) + <embed(c), h>`` over the features ``h`` of the zoo's critic (three strided convolutions)."""

    def __init__(self, label_dim: int = 9, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(*critic_features(width))
        self.out = nn.Linear(4 * width * 16, 1)
        self.embed = nn.Linear(label_dim, 4 * width * 16, bias=False)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        return self.out(h).squeeze(1) + (self.embed(c.to(h.dtype)) * h).sum(1)


@dataclass(frozen=True)
class CausalSample:
    """Images ``(n, 1, 28, 28)`` and their label rows ``(n, len(nodes))`` (value indices, topological order)."""

    images: torch.Tensor
    labels: torch.Tensor

    def label(self, graph: CausalGraph, node: str) -> torch.Tensor:
        """The ``(n,)`` value indices of ``node``."""
        return self.labels[:, graph.order.index(graph.check_node(node))]


class CausalGAN:
    """A causal controller and a label-conditioned image generator: conditional and interventional image samples.

    ``sample(n, condition={...})`` draws labels from the controller and keeps those satisfying the condition
    (rejection), ``sample(n, intervene={...})`` sets the intervened labels and samples their descendants from the
    controller's mechanisms; images are ``generator(z, one_hot(labels))`` with ``z ~ N(0, I)``.

    Example:
        >>> gan = CausalGAN(controller, generator)            # doctest: +SKIP
        >>> gan.sample(16, intervene={"T": "thick"}, seed=0)  # doctest: +SKIP
    """

    def __init__(self, controller: CausalController, generator: nn.Module) -> None:
        label_dim = sum(controller.graph[n].cardinality for n in controller.graph.order)
        if getattr(generator, "label_dim", label_dim) != label_dim:
            raise ValueError(
                f"expected a generator of label_dim {label_dim} (the graph's one-hot size), got {generator.label_dim}"
            )
        self.controller, self.generator, self.graph = controller, generator, controller.graph

    @torch.no_grad()
    def images_for(self, labels: torch.Tensor, seed: int = 0, batch_size: int = 500) -> torch.Tensor:
        """Generated images for label rows ``(n, len(nodes))``, latents seeded by ``seed``."""
        self.generator.eval()
        dev = next(self.generator.parameters()).device
        z = torch.randn(
            labels.shape[0], latent_dim_of(self.generator), generator=torch.Generator().manual_seed(seed)
        )
        c = one_hot_labels(self.graph, labels)
        return torch.cat([
            self.generator(zb.to(dev), cb.to(dev)).cpu()
            for zb, cb in zip(z.split(batch_size), c.split(batch_size), strict=True)
        ])  # fmt: skip

    def sample(
        self,
        n: int,
        *,
        condition: Mapping[str, Any] | None = None,
        intervene: Mapping[str, Any] | None = None,
        seed: int = 0,
    ) -> CausalSample:
        """``n`` images with their labels; the same ``seed`` gives the same sample."""
        labels = self.controller.sample(n, condition=condition, intervene=intervene, seed=seed)
        return CausalSample(self.images_for(labels, seed + 1), labels)


def train_causal_gan(
    generator: nn.Module,
    discriminator: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    graph: CausalGraph,
    config: GANTrainConfig,
    *,
    device: str | torch.device = "cpu",
    checkpoint_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    validate: Callable[[nn.Module, int], Mapping[str, float]] | None = None,
    validate_every: int | None = None,
) -> list[dict[str, float]]:
    """Train the label-conditioned image generator on ``images`` ``(N, C, H, W)`` in [0, 1] and their label rows
    ``(N, len(graph.nodes))`` (value indices, :meth:`CausalGraph.label_rows`), conditioned on
    :func:`one_hot_labels`: :func:`manifold_defense.training.train_gan` with ``conditional=True``.

    The checkpoint records the ``causal-gan`` trainer, the run-defining fields of ``config``
    (:class:`~manifold_defense.training.GANTrainConfig` says which may change) and ``graph.spec()``; a resume
    with others is refused, naming them. Other arguments and the returned history are ``train_gan``'s.
    """
    if not isinstance(graph, CausalGraph):
        raise TypeError(f"expected graph to be a CausalGraph, got {type(graph).__name__}")
    check_images(images, "causal GAN training images")
    conditions = one_hot_labels(graph, labels)
    if conditions.shape[0] != images.shape[0]:
        raise ValueError(f"expected one label row per image ({images.shape[0]}), got {conditions.shape[0]} rows")
    return _train_gan(
        generator, discriminator, TensorDataset(images, conditions), config, device=device,
        checkpoint_dir=checkpoint_dir, progress=progress, validate=validate, validate_every=validate_every,
        encoder=None, measurement=None, conditional=True, trainer="causal-gan",
        extra_settings={"graph": graph.spec()},
    )  # fmt: skip
