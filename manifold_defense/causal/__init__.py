"""CausalGAN (Kocaoglu, Snyder, Dimakis, Vishwanath, ICLR 2018) on a digit world whose causal truth is known.

- :mod:`~manifold_defense.causal.graph`: causal graphs over discrete attributes, exact joint / conditional /
  interventional distributions from conditional probability tables, TVD.
- :mod:`~manifold_defense.causal.world`: the digit world (D -> T, D -> S, T -> S from MNIST), its stated tables,
  sampler and the morphometrics that read a sample's attributes back from its pixels.
- :mod:`~manifold_defense.causal.controller`: the causal controller (one small network per node, topological order).
- :mod:`~manifold_defense.causal.models`: the label-conditioned generator, its projection discriminator and
  :class:`CausalGAN` (``sample(n, condition=...)`` versus ``sample(n, intervene=...)``), and its trainer
  :func:`train_causal_gan`.
"""

from manifold_defense.causal.controller import CausalController, train_controller
from manifold_defense.causal.graph import CausalGraph, Node, joint_table, marginal, tvd
from manifold_defense.causal.models import (
    CausalGAN,
    CausalSample,
    ConditionalGenerator,
    ProjectionCritic,
    one_hot_labels,
    train_causal_gan,
)
from manifold_defense.causal.world import DigitWorld, WorldData, read_attributes, render

__all__ = [
    "CausalController",
    "CausalGAN",
    "CausalGraph",
    "CausalSample",
    "ConditionalGenerator",
    "DigitWorld",
    "Node",
    "ProjectionCritic",
    "WorldData",
    "joint_table",
    "marginal",
    "one_hot_labels",
    "read_attributes",
    "render",
    "train_causal_gan",
    "train_controller",
    "tvd",
]
