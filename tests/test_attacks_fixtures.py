"""Tiny deterministic models and data shared by the ``test_attacks_*`` files (cached once per session).

Data: 3 classes of 1x8x8 "images", each a fixed random prototype plus noise, clamped to [0, 1]. The classifier
is a small MLP trained for 150 full-batch Adam steps (well under a second on a CPU). The generator is a
fixed random 2-layer MLP with a sigmoid output and ``latent_dim = 4``. Other test files import the builders
(``from test_attacks_fixtures import ...``); the tests below check the fixtures themselves.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

NUM_CLASSES = 3
IMAGE_SHAPE = (1, 8, 8)
LATENT_DIM = 4


def make_data(n_per_class: int, seed: int) -> tuple[Tensor, Tensor]:
    """``(3 n, 1, 8, 8)`` images in [0, 1], ``(3 n,)`` int64 labels; prototypes fixed, noise from ``seed``."""
    protos = torch.rand((NUM_CLASSES, *IMAGE_SHAPE), generator=torch.Generator().manual_seed(1234))
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(NUM_CLASSES).repeat_interleave(n_per_class)
    noise = 0.25 * torch.randn((len(y), *IMAGE_SHAPE), generator=gen)
    return (protos[y] + noise).clamp(0, 1), y


class TinyMLP(nn.Module):
    """Flatten, Linear(64, 32), ReLU, Linear(32, 3): logits."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, NUM_CLASSES))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class TinyGenerator(nn.Module):
    """Fixed random generator ``(B, 4) -> (B, 1, 8, 8)`` in (0, 1)."""

    latent_dim = LATENT_DIM

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(LATENT_DIM, 32), nn.Tanh(), nn.Linear(32, 64), nn.Sigmoid())

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z).view(-1, *IMAGE_SHAPE)


def train_classifier(x: Tensor, y: Tensor, seed: int = 0, steps: int = 150) -> TinyMLP:
    """Full-batch Adam on cross-entropy; returns the model in eval mode with frozen parameters."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = TinyMLP()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@functools.cache
def trained_classifier() -> tuple[TinyMLP, Tensor, Tensor]:
    """The shared trained classifier and a held-out test set ``(x (300, 1, 8, 8), y (300,))``.

    Do not modify the returned objects: they are shared between test files.
    """
    x_train, y_train = make_data(200, seed=0)
    x_test, y_test = make_data(100, seed=1)
    return train_classifier(x_train, y_train), x_test, y_test


@functools.cache
def tiny_generator() -> TinyGenerator:
    """The shared fixed generator (eval mode, frozen)."""
    with torch.random.fork_rng():
        torch.manual_seed(7)
        generator = TinyGenerator()
    generator.eval()
    for p in generator.parameters():
        p.requires_grad_(False)
    return generator


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def test_trained_classifier_is_accurate_and_frozen() -> None:
    model, x, y = trained_classifier()
    assert accuracy(model, x, y) > 0.95
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())


def test_generator_outputs_images_in_unit_range() -> None:
    g = tiny_generator()
    x = g(torch.randn(5, LATENT_DIM))
    assert x.shape == (5, *IMAGE_SHAPE)
    assert float(x.min()) > 0 and float(x.max()) < 1
