"""MNIST classifier in the style of Defense-GAN's "model A" (Samangouei, Kabkab, Chellappa, ICLR 2018).

Model A is Conv(64, 5x5) - ReLU - Conv(64, 5x5) - ReLU - Dropout(0.25) - FC(128) - ReLU - Dropout(0.5) - FC(10).
Here a 2x2 max-pool follows the second convolution, which cuts the fully connected layer (and the shipped
weights) four-fold at no cost in accuracy. Inputs are [0, 1] images; normalization happens inside the model
(registered buffers), so the model can be wrapped by any attack library unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


class MNISTClassifier(nn.Module):
    """Logits for ``(B, 1, 28, 28)`` images in [0, 1].

    Args:
        num_classes: output size (10 for MNIST).
        width: channels of both convolutions (64 in model A).
        hidden: size of the penultimate layer (128 in model A); :meth:`features` returns it.

    Shapes:
        ``forward``: ``(B, 1, 28, 28)`` -> ``(B, num_classes)``; ``features``: ``(B, 1, 28, 28)`` -> ``(B, hidden)``.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, num_classes: int = 10, width: int = 64, hidden: int = 128) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer("mean", torch.tensor(MNIST_MEAN))
        self.register_buffer("std", torch.tensor(MNIST_STD))
        self.conv = nn.Sequential(
            nn.Conv2d(1, width, 5),
            nn.ReLU(),
            nn.Conv2d(width, width, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Dropout(0.25),
            nn.Flatten(),
            nn.Linear(width * 10 * 10, hidden),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(0.5), nn.Linear(hidden, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer activations ``(B, hidden)`` (used for the Fréchet sample distance)."""
        return self.conv((x - self.mean) / self.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class CompactMNISTClassifier(nn.Module):
    """A small, fast MNIST CNN: the architecture of Wong, Rice, Kolter's MNIST experiments, with adjustable widths.

    Paper: Wong, Rice, Kolter, "Fast is better than free: Revisiting adversarial training" (ICLR 2020), whose
    MNIST model is Conv(16, 4x4, stride 2) - ReLU - Conv(32, 4x4, stride 2) - ReLU - FC(100) - ReLU - FC(10).
    With ``channels=(32, 64)`` and ``hidden=512`` (the zoo's ``mnist-pgd-at``) one forward and backward pass costs
    about a sixth of :class:`MNISTClassifier`'s on a CPU (strided convolutions, no 64-to-64 5x5 layer), which
    is what makes multi-epoch PGD adversarial training fit a 2-core budget. Inputs are [0, 1] images;
    normalization happens inside the model, as in :class:`MNISTClassifier`.

    Args:
        num_classes: output size (10 for MNIST).
        channels: output channels of the two strided convolutions (default ``(32, 64)``).
        hidden: size of the penultimate layer (default 512); :meth:`features` returns it.

    Shapes:
        ``forward``: ``(B, 1, 28, 28)`` -> ``(B, num_classes)``; ``features``: ``(B, 1, 28, 28)`` -> ``(B, hidden)``.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self, num_classes: int = 10, channels: tuple[int, int] = (32, 64), hidden: int = 512
    ) -> None:
        super().__init__()
        if len(channels) != 2 or not all(
            isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in channels
        ):
            raise ValueError(f"expected channels as two positive ints, got {channels!r}")
        self.num_classes = num_classes
        self.register_buffer("mean", torch.tensor(MNIST_MEAN))
        self.register_buffer("std", torch.tensor(MNIST_STD))
        c1, c2 = channels
        self.conv = nn.Sequential(
            nn.Conv2d(1, c1, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(c2 * 7 * 7, hidden),
            nn.ReLU(),
        )
        self.head = nn.Linear(hidden, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer activations ``(B, hidden)``."""
        return self.conv((x - self.mean) / self.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
