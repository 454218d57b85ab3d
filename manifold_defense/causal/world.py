"""The digit world: a labelled image data set made from MNIST whose causal graph and mechanisms are ours, so every
conditional and interventional distribution is known exactly.

Graph (``D -> T``, ``D -> S``, ``T -> S``)::

    D  digit class, one of 0, 1, 3, 4, 7            P(D)            = DIGIT_PRIOR
    T  stroke thickness, thin or thick              P(T=thick | D)  = THICK_GIVEN_DIGIT
    S  slant, left or right                         P(S=right | D,T) = RIGHT_GIVEN_DIGIT_THICKNESS

Mechanisms (:func:`render`): an MNIST image of class ``D`` (drawn uniformly from that class of the split) is
sheared so that its second-moment slant (``mu11 / mu02``, column shift per row down the image) is exactly
``-SLANT`` (left) or ``+SLANT`` (right), then binarized at 0.4, skeletonized (scikit-image), and dilated with a disk
of radius 1 (thin, strokes about 3 px wide) or 2 (thick, about 5 px), then smoothed by a Gaussian of sigma 0.5. The
image is drawn after the labels: the rendering order (shear, then stroke) is an implementation detail; the causal
order of the labels is the graph's.

Read back (:func:`read_attributes`), so a generated sample's attributes are measured, not trusted:

- ``T``: stroke thickness = foreground area / skeleton length (pixels above 0.5), thick above ``THICKNESS_SPLIT``;
- ``S``: slant = ``mu11 / mu02`` of the binarized image, right above 0;
- ``D``: the zoo MNIST classifier's argmax over the world's five digits (its ten-way argmax is 98.5-99.5% correct
  on them only with the five; 5, 8, 9 thick are read badly, hence the digit subset).

The digit subset was chosen by measurement: the zoo classifier reads the thick and slanted renderings of all ten
digits 94-97% correctly (per-class down to 79% for a thick 9), of these five 98.5-99.5%.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from manifold_defense.causal.graph import CausalGraph, Node, joint_table, marginal

__all__ = [
    "DIGITS",
    "DIGIT_PRIOR",
    "RIGHT_GIVEN_DIGIT_THICKNESS",
    "SLANT",
    "THICKNESS_SPLIT",
    "THICK_GIVEN_DIGIT",
    "DigitWorld",
    "WorldData",
    "measure_slant",
    "measure_thickness",
    "read_attributes",
    "render",
]

DIGITS: tuple[int, ...] = (0, 1, 3, 4, 7)
"""The world's digit classes (values of ``D``, in this order)."""
DIGIT_PRIOR: tuple[float, ...] = (0.25, 0.25, 0.20, 0.15, 0.15)
"""``P(D)``, in the order of :data:`DIGITS`."""
THICK_GIVEN_DIGIT: tuple[float, ...] = (0.85, 0.15, 0.80, 0.30, 0.20)
"""``P(T = thick | D)``: round digits are mostly thick, straight ones mostly thin."""
RIGHT_GIVEN_DIGIT_THICKNESS: tuple[tuple[float, ...], ...] = (
    (0.20, 0.35, 0.20, 0.30, 0.35),
    (0.75, 0.90, 0.75, 0.85, 0.90),
)
"""``P(S = right | D, T)``: rows are T (thin, thick), columns D; thick strokes lean right."""
SLANT: float = 0.25
"""Shear of the slant attribute (``|mu11 / mu02|`` of a rendered digit)."""
THICKNESS_SPLIT: float = 4.35
"""Thickness (area / skeleton length) separating thin (about 3.2) from thick (about 5.8)."""
#: Dilation radius of the skeleton for thin and thick strokes.
STROKE_RADIUS: tuple[int, int] = (1, 2)

_YY, _XX = np.mgrid[:28, :28].astype(np.float64)


def _moments(img: np.ndarray) -> tuple[float, float, float]:
    """Centre of mass (row, column) and slant ``mu11 / mu02`` of a 28x28 image (0 slant for an empty image)."""
    w = float(img.sum())
    if w <= 0:
        return 13.5, 13.5, 0.0
    cy, cx = float((_YY * img).sum()) / w, float((_XX * img).sum()) / w
    mu11 = float(((_YY - cy) * (_XX - cx) * img).sum()) / w
    mu02 = float(((_YY - cy) ** 2 * img).sum()) / w
    return cy, cx, mu11 / max(mu02, 1e-6)


def _shear_to(img: np.ndarray, target: float) -> np.ndarray:
    """``img`` sheared (rows fixed, columns shifted) to slant ``target``, its centre of mass moved to the centre."""
    from scipy import ndimage  # scipy and scikit-image load on first use: importing the zoo stays light
    cy, cx, slant = _moments(img)
    a = target - slant
    m = np.array([[1.0, 0.0], [-a, 1.0]])  # input (row, col) = m @ output (row, col) + offset
    offset = np.array([cy, cx]) - m @ np.array([13.5, 13.5])
    return np.asarray(ndimage.affine_transform(img, m, offset=offset, order=1))


def render(image: np.ndarray, thick: int, right: int) -> np.ndarray:
    """The world's image of an MNIST digit ``image`` (28x28 in [0, 1]) with thickness ``thick`` (0 thin, 1 thick)
    and slant ``right`` (0 left, 1 right), float32 in [0, 1]."""
    from scipy import ndimage
    from skimage.morphology import disk, skeletonize
    sheared = _shear_to(image.astype(np.float64), SLANT if right else -SLANT)
    strokes = ndimage.binary_dilation(skeletonize(sheared > 0.4), structure=disk(STROKE_RADIUS[thick]))
    return np.clip(ndimage.gaussian_filter(strokes.astype(np.float32), 0.5), 0.0, 1.0)


def _as_numpy_images(images: torch.Tensor) -> np.ndarray:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != (1, 28, 28):
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected images (B, 1, 28, 28), got {got}")
    return images.detach().to("cpu", torch.float64)[:, 0].numpy()


def measure_thickness(images: torch.Tensor) -> torch.Tensor:
    """Stroke thickness of each image: foreground (above 0.5) area / skeleton length, ``(B,)`` (0 if empty)."""
    from skimage.morphology import skeletonize
    out = []
    for img in _as_numpy_images(images):
        fg = img > 0.5
        out.append(float(fg.sum()) / max(int(skeletonize(fg).sum()), 1))
    return torch.tensor(out, dtype=torch.float64)


def measure_slant(images: torch.Tensor) -> torch.Tensor:
    """Slant ``mu11 / mu02`` of each binarized image (column shift per row; positive leans right), ``(B,)``."""
    return torch.tensor([_moments((img > 0.5).astype(np.float64))[2] for img in _as_numpy_images(images)])


@torch.no_grad()
def read_attributes(
    images: torch.Tensor, classifier: nn.Module, batch_size: int = 500
) -> dict[str, torch.Tensor]:
    """``{"D", "T", "S"}`` value indices read from ``images`` (B, 1, 28, 28) in [0, 1] (see the module docstring),
    plus the raw ``thickness`` and ``slant`` measurements."""
    thickness, slant = measure_thickness(images), measure_slant(images)
    dev = next(classifier.parameters()).device
    logits = torch.cat([classifier(c.to(dev)).cpu() for c in images.split(batch_size)])
    digits = logits[:, list(DIGITS)].argmax(1)
    return {
        "D": digits,
        "T": (thickness > THICKNESS_SPLIT).long(),
        "S": (slant > 0.0).long(),
        "thickness": thickness,
        "slant": slant,
    }


@dataclass(frozen=True)
class WorldData:
    """A sample of the world: ``images`` (N, 1, 28, 28) float32 in [0, 1] and ``labels`` (N, 3) long value indices
    in the graph's order (D, T, S)."""

    images: torch.Tensor
    labels: torch.Tensor


class DigitWorld:
    """The digit world's graph, stated tables and sampler (module docstring).

    Args:
        mnist_images, mnist_labels: the MNIST split the digits are drawn from ((N, 1, 28, 28) in [0, 1], (N,)).
    """

    graph = CausalGraph(
        [
            Node("D", tuple(str(d) for d in DIGITS)),
            Node("T", ("thin", "thick"), ("D",)),
            Node("S", ("left", "right"), ("D", "T")),
        ]
    )

    def __init__(self, mnist_images: torch.Tensor, mnist_labels: torch.Tensor) -> None:
        if mnist_images.dim() != 4 or mnist_labels.shape != (mnist_images.shape[0],):
            raise ValueError(
                f"expected MNIST images (N, 1, 28, 28) and labels (N,), got {tuple(mnist_images.shape)} and "
                f"{tuple(mnist_labels.shape)}"
            )
        self._pools = [torch.nonzero(mnist_labels == d).squeeze(1) for d in DIGITS]
        missing = [d for d, pool in zip(DIGITS, self._pools, strict=True) if len(pool) == 0]
        if missing:
            raise ValueError(f"expected MNIST images of every world digit {DIGITS}, got none of {missing}")
        self._images = mnist_images

    @staticmethod
    def cpt(node: str, parent_values: torch.Tensor) -> torch.Tensor:
        """The stated tables as a CPT function (:data:`~manifold_defense.causal.graph.CPT`)."""
        r = parent_values.shape[0]
        if node == "D":
            return torch.tensor(DIGIT_PRIOR, dtype=torch.float64).expand(r, -1)
        if node == "T":
            p = torch.tensor(THICK_GIVEN_DIGIT, dtype=torch.float64)[parent_values[:, 0]]
        elif node == "S":
            table = torch.tensor(RIGHT_GIVEN_DIGIT_THICKNESS, dtype=torch.float64)
            p = table[parent_values[:, 1], parent_values[:, 0]]
        else:
            raise ValueError(f"unknown node {node!r}: expected one of {list(DigitWorld.graph.order)}")
        return torch.stack([1.0 - p, p], dim=1)

    @classmethod
    def joint(cls, intervene: Mapping[str, Any] | None = None) -> torch.Tensor:
        """The exact joint ``P(D, T, S)`` (under ``do(intervene)``), shape (5, 2, 2)."""
        return joint_table(cls.graph, cls.cpt, intervene)

    @classmethod
    def distribution(
        cls,
        node: str,
        *,
        condition: Mapping[str, Any] | None = None,
        intervene: Mapping[str, Any] | None = None,
    ) -> torch.Tensor:
        """Exact ``P(node | condition)`` under ``do(intervene)``."""
        return marginal(cls.graph, cls.joint(intervene), node, condition)

    @classmethod
    def sample_labels(
        cls,
        n: int,
        seed: int,
        *,
        condition: Mapping[str, Any] | None = None,
        intervene: Mapping[str, Any] | None = None,
    ) -> torch.Tensor:
        """``n`` label rows (D, T, S) drawn from the exact joint (under ``do(intervene)``, given ``condition``)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"expected n to be a positive int, got {n!r}")
        joint = cls.joint(intervene)
        for name, index in cls.graph.assignment(condition).items():
            keep = torch.zeros(cls.graph[name].cardinality, dtype=joint.dtype)
            keep[index] = 1.0
            shape = [1] * joint.dim()
            shape[cls.graph.order.index(name)] = -1
            joint = joint * keep.reshape(shape)
        if float(joint.sum()) <= 0:
            raise ValueError(f"condition {condition} has probability 0 under intervention {intervene}")
        flat = torch.multinomial(
            (joint / joint.sum()).flatten(),
            n,
            replacement=True,
            generator=torch.Generator().manual_seed(seed),
        )
        return torch.stack(torch.unravel_index(flat, cls.graph.shape), dim=1)

    def render_labels(self, labels: torch.Tensor, seed: int) -> torch.Tensor:
        """Images for label rows ``(N, 3)``: a digit of class ``D`` drawn uniformly (seeded) from its class,
        rendered with ``T`` and ``S``."""
        labels = self.graph.label_rows(labels)
        rng = torch.Generator().manual_seed(seed)
        out = np.zeros((labels.shape[0], 1, 28, 28), dtype=np.float32)
        source = self._images[:, 0].numpy()
        for i, (d, t, s) in enumerate(labels.tolist()):
            pool = self._pools[d]
            index = int(pool[int(torch.randint(len(pool), (1,), generator=rng))])
            out[i, 0] = render(source[index], t, s)
        return torch.from_numpy(out)

    def sample(
        self,
        n: int,
        seed: int = 0,
        *,
        condition: Mapping[str, Any] | None = None,
        intervene: Mapping[str, Any] | None = None,
    ) -> WorldData:
        """``n`` labelled images of the world (observational by default), seeded."""
        labels = self.sample_labels(n, seed, condition=condition, intervene=intervene)
        return WorldData(self.render_labels(labels, seed + 1), labels)
