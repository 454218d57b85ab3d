"""The attack suite: one PGD loop (Linf/l2, restarts, schedules, losses, EOT), BPDA, on-manifold latent
attacks, the overpowered pair attack, and adapters to torchattacks and foolbox.

Depends on torch and numpy only (torchattacks / foolbox are imported lazily inside :mod:`attacks.adapters`).
Every pixel-space attack derives from :class:`Attack`, whose final ``__call__`` validates the input, keeps
the caller's tensors untouched, projects onto the :class:`ThreatModel` and evaluates success.

Example:
    >>> from attacks import PGD, Norm, ThreatModel
    >>> result = PGD.madry_mnist()(model.eval(), x, y)      # doctest: +SKIP
    >>> robust_accuracy = 1 - result.success.float().mean()  # doctest: +SKIP
"""

from attacks.adapters import (
    AUTOATTACK_REFERENCE,
    FOOLBOX_ATTACKS,
    TORCHATTACKS_ATTACKS,
    AutoAttackReference,
    FoolboxAttack,
    TorchattacksAttack,
)
from attacks.base import (
    Attack,
    AttackResult,
    Model,
    Norm,
    ThreatModel,
    per_sample_norm,
    project_onto_threat,
)
from attacks.bpda import BPDA
from attacks.latent import (
    Generator,
    LatentAttack,
    LatentAttackConfig,
    LatentAttackResult,
    LatentConstraint,
    update_multiplier,
)
from attacks.losses import LOSSES, ce_loss, classification_margin, dlr_loss, get_loss, margin_loss
from attacks.overpowered import OverpoweredAttack, OverpoweredConfig, OverpoweredResult, pair_divergence
from attacks.pgd import MADRY_MNIST, MADRY_MNIST_THREAT, PGD, PGDConfig, StepSchedule

__all__ = [
    "AUTOATTACK_REFERENCE",
    "BPDA",
    "FOOLBOX_ATTACKS",
    "LOSSES",
    "MADRY_MNIST",
    "MADRY_MNIST_THREAT",
    "PGD",
    "TORCHATTACKS_ATTACKS",
    "Attack",
    "AttackResult",
    "AutoAttackReference",
    "FoolboxAttack",
    "Generator",
    "LatentAttack",
    "LatentAttackConfig",
    "LatentAttackResult",
    "LatentConstraint",
    "Model",
    "Norm",
    "OverpoweredAttack",
    "OverpoweredConfig",
    "OverpoweredResult",
    "PGDConfig",
    "StepSchedule",
    "ThreatModel",
    "TorchattacksAttack",
    "ce_loss",
    "classification_margin",
    "dlr_loss",
    "get_loss",
    "margin_loss",
    "pair_divergence",
    "per_sample_norm",
    "project_onto_threat",
    "update_multiplier",
]
