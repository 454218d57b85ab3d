"""Per-sample attack losses on logits: cross-entropy, CW margin, DLR.

Every loss maps ``logits (B, K)`` and int64 labels ``y (B,)`` to a ``(B,)`` tensor that **grows as the sample
becomes more adversarial**, so an attack maximizes it. Losses are per sample (no reduction), so summing them
before ``backward`` gives each sample its own gradient, independent of the rest of the batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

__all__ = ["LOSSES", "LossFn", "ce_loss", "classification_margin", "dlr_loss", "get_loss", "margin_loss"]

LossFn = Callable[[Tensor, Tensor], Tensor]
"""``(logits (B, K), labels (B,)) -> (B,)``, larger is more adversarial."""


def _check(logits: Tensor, y: Tensor, min_classes: int = 2) -> None:
    if logits.dim() != 2 or y.shape != (logits.shape[0],):
        raise ValueError(
            f"expected logits (B, K) and labels (B,), got shapes {tuple(logits.shape)} and {tuple(y.shape)}"
        )
    if logits.shape[1] < min_classes:
        raise ValueError(f"expected at least {min_classes} classes, got {logits.shape[1]}")


def ce_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy ``-log softmax(logits)[y]`` per sample, ``(B,)``."""
    _check(logits, y, 1)
    return F.cross_entropy(logits, y, reduction="none")


def _true_and_best_other(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return true, others.amax(dim=1)


def classification_margin(logits: Tensor, y: Tensor) -> Tensor:
    """CW margin ``z_y - max_{j != y} z_j`` per sample, ``(B,)``: positive iff the sample is classified right.

    Carlini & Wagner, "Towards Evaluating the Robustness of Neural Networks" (2017), objective f6.
    """
    _check(logits, y)
    true, best_other = _true_and_best_other(logits, y)
    return true - best_other


def margin_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Attack objective from the CW margin, ``max_{j != y} z_j - z_y``, ``(B,)``: > 0 iff misclassified."""
    return -classification_margin(logits, y)


def dlr_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Difference of Logits Ratio, ``-(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3)``, ``(B,)``.

    Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free
    attacks" (ICML 2020), eq. (5). ``z_pi1 >= z_pi2 >= z_pi3`` are the sorted logits; the ratio is invariant
    to shifting and rescaling the logits. Needs at least 3 classes.
    """
    _check(logits, y, 3)
    sorted_logits = logits.sort(dim=1, descending=True).values
    true, best_other = _true_and_best_other(logits, y)
    return -(true - best_other) / (sorted_logits[:, 0] - sorted_logits[:, 2] + 1e-12)


LOSSES: dict[str, LossFn] = {"ce": ce_loss, "margin": margin_loss, "dlr": dlr_loss}
"""Loss names accepted by the attacks' ``loss`` argument."""


def get_loss(loss: str | LossFn) -> LossFn:
    """Resolve a loss name (``"ce"``, ``"margin"``, ``"dlr"``) or pass a callable through."""
    if callable(loss):
        return loss
    if isinstance(loss, str) and loss.lower() in LOSSES:
        return LOSSES[loss.lower()]
    raise ValueError(f"expected loss to be one of {sorted(LOSSES)} or a callable, got {loss!r}")
