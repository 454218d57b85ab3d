"""manifold-defense: generative-model defenses against adversarial examples, and their honest evaluation.

Submodules are imported lazily so that ``import manifold_defense`` does no heavy work: no data loading, no weights.

- :mod:`manifold_defense.data`: offline MNIST.
- :mod:`manifold_defense.models`, :mod:`manifold_defense.zoo`: architectures and shipped trained models.
- :mod:`manifold_defense.inversion`: the one latent-optimization core (projection, compressed sensing).
- :mod:`manifold_defense.defense`: :class:`LatentProjector` and :class:`ProjectedClassifier` (Defense-GAN).
- :mod:`manifold_defense.purification`: :class:`PurifiedClassifier`, any purifier in front of a classifier.
- :mod:`manifold_defense.presets`: the projection schedules (fast, Defense-GAN's) and defenses built on them.
- :mod:`manifold_defense.evaluation`: robust accuracy (worst case over draws), latent and overpowered attacks.
- :mod:`manifold_defense.baselines`: Lasso and Deep Image Prior for compressed sensing.
- :mod:`manifold_defense.training`: trainers with checkpoint/resume.
- :mod:`manifold_defense.ambient`: AmbientGAN's random measurement models, measured datasets and baselines.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = (
    "ambient",
    "baselines",
    "data",
    "defense",
    "devices",
    "evaluation",
    "inversion",
    "metrics",
    "models",
    "presets",
    "purification",
    "training",
    "zoo",
)
_EXPORTS = {
    "LatentProjector": "manifold_defense.defense",
    "ProjectedClassifier": "manifold_defense.defense",
    "PurifiedClassifier": "manifold_defense.purification",
    "invert": "manifold_defense.inversion",
    "InversionConfig": "manifold_defense.inversion",
    "Inversion": "manifold_defense.inversion",
    "load_mnist": "manifold_defense.data",
}


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"manifold_defense.{name}")
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'manifold_defense' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_SUBMODULES, *_EXPORTS])


__all__ = ["__version__", *_EXPORTS]
