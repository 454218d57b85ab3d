"""Threat models, the attack result, and the :class:`Attack` base class every pixel-space attack derives from.

The base class follows foolbox's ``attacks/base.py`` design: a *final* ``__call__`` validates the input,
clones it, calls the subclass's abstract :meth:`Attack.run`, re-projects whatever ``run`` returned onto the
eps-ball around the clean input and onto the image box [0, 1], and evaluates the success mask itself.
A subclass therefore cannot return a perturbation outside its threat model, and never sees (or modifies) the
caller's tensors.
"""

from __future__ import annotations

import copy
import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, NamedTuple, TypeVar, final

import torch
from torch import Tensor, nn

__all__ = [
    "Attack",
    "AttackResult",
    "Model",
    "NonFiniteLogitsError",
    "Norm",
    "ThreatModel",
    "check_finite_logits",
    "check_images",
    "check_labels",
    "check_logits",
    "model_name",
    "per_sample_norm",
    "predict",
    "prepare_inputs",
    "project_onto_threat",
    "warn_if_training",
]

Model = Callable[[Tensor], Tensor]
"""A classifier: ``(B, C, H, W)`` images in [0, 1] to ``(B, num_classes)`` logits."""

#: Tolerance on the [0, 1] range of input images.
RANGE_TOLERANCE = 1e-6


class NonFiniteLogitsError(ValueError):
    """A model returned NaN or inf logits: an argmax of them, and every accuracy computed from it, is wrong."""


class Norm(str, Enum):
    """The norm of a threat model's perturbation ball."""

    LINF = "linf"
    L2 = "l2"


@dataclass(frozen=True)
class ThreatModel:
    """A perturbation budget: ``||x_adv - x||_norm <= eps`` and ``x_adv`` in [0, 1].

    Args:
        norm: :class:`Norm` (or its value ``"linf"`` / ``"l2"``).
        eps: radius of the ball, finite and >= 0. For ``Norm.L2`` it is the total l2 norm of the perturbation
            of one image (not per pixel).

    Example:
        >>> ThreatModel(Norm.LINF, 0.3)
        ThreatModel(norm=<Norm.LINF: 'linf'>, eps=0.3)
    """

    norm: Norm
    eps: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "norm", _as_norm(self.norm))
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)):
            raise TypeError(f"expected eps to be a float, got {type(self.eps).__name__}")
        if not math.isfinite(self.eps) or self.eps < 0:
            raise ValueError(f"expected eps to be finite and >= 0, got {self.eps}")
        object.__setattr__(self, "eps", float(self.eps))


class AttackResult(NamedTuple):
    """What every :class:`Attack` returns.

    Attributes:
        x_adv: ``(B, C, H, W)`` adversarial images, inside the threat model and [0, 1].
        success: ``(B,)`` bool, ``model(x_adv).argmax(1) != y`` on one final forward pass.
        logits: ``(B, num_classes)`` the model's output on ``x_adv`` (from that same forward pass).
        distance: ``(B,)`` ``||x_adv - x||`` in the threat model's norm.
    """

    x_adv: Tensor
    success: Tensor
    logits: Tensor
    distance: Tensor


def _as_norm(norm: Any) -> Norm:
    if isinstance(norm, Norm):
        return norm
    if isinstance(norm, str):
        try:
            return Norm(norm.lower())
        except ValueError:
            pass
    valid = ", ".join(repr(n.value) for n in Norm)
    raise ValueError(f"expected norm to be one of {valid}, got {norm!r}")


def per_sample_norm(delta: Tensor, norm: Norm | str) -> Tensor:
    """``(B,)`` norm of each sample of ``delta`` (any shape ``(B, ...)``), computed in the delta's dtype."""
    flat = delta.reshape(delta.shape[0], -1)
    if _as_norm(norm) is Norm.LINF:
        return flat.abs().amax(dim=1) if flat.shape[1] > 0 else flat.new_zeros(flat.shape[0])
    return torch.linalg.vector_norm(flat, ord=2, dim=1)


def project_onto_threat(x_adv: Tensor, x: Tensor, threat: ThreatModel) -> Tensor:
    """Project ``x_adv`` onto ``{x': ||x' - x||_norm <= eps} ∩ [0, 1]^d``, per sample.

    The ball projection comes first, then the box clamp; since ``x`` lies in the box, the clamp only moves
    coordinates towards ``x`` and the result stays in the ball (exactly for Linf, up to rounding for l2).

    Args:
        x_adv: ``(B, ...)`` candidate points.
        x: ``(B, ...)`` ball centres, same shape.
        threat: the ball.

    Returns:
        ``(B, ...)`` a new tensor (the inputs are not modified).
    """
    delta = x_adv - x
    if threat.norm is Norm.LINF:
        delta = delta.clamp(-threat.eps, threat.eps)
    else:
        norms = per_sample_norm(delta, Norm.L2).view(-1, *([1] * (delta.dim() - 1)))
        # Shrink by slightly more than eps / norm so rounding never lands just outside the ball.
        factor = torch.where(
            norms > threat.eps, threat.eps / norms.clamp_min(1e-30) * (1 - 1e-6), torch.ones_like(norms)
        )
        delta = delta * factor
    return (x + delta).clamp(0.0, 1.0)


def check_images(x: Any, name: str = "x") -> Tensor:
    """Raise unless ``x`` is a float ``(B, C, H, W)`` tensor with finite values in [0, 1] (tolerance 1e-6)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"expected {name} to be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"expected {name} to be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"expected {name} of shape (B, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"expected {name} to hold at least one image, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"expected {name} to be finite, got NaN or inf values")
    lo, hi = float(x.min()), float(x.max())
    if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
        raise ValueError(f"expected {name} values in [0, 1], got range [{lo:.4g}, {hi:.4g}]")
    return x


def check_labels(y: Any, batch_size: int, device: torch.device, name: str = "y") -> Tensor:
    """Raise unless ``y`` is an int64 ``(batch_size,)`` tensor on ``device``."""
    if not isinstance(y, Tensor):
        raise TypeError(f"expected {name} to be a torch.Tensor, got {type(y).__name__}")
    if y.dtype != torch.int64:
        raise TypeError(f"expected {name} of dtype torch.int64, got {y.dtype}")
    if tuple(y.shape) != (batch_size,):
        raise ValueError(f"expected {name} of shape ({batch_size},), got shape {tuple(y.shape)}")
    if y.device != device:
        raise ValueError(f"expected {name} on device {device} (the inputs' device), got {y.device}")
    return y


def check_logits(
    logits: Any, batch_size: int, y: Tensor | None = None, name: str = "model", *, label: str | None = None
) -> Tensor:
    """Raise unless ``logits`` is a finite float ``(batch_size, K)`` tensor and ``y`` (if given) lies in ``[0, K)``.

    Non-finite logits raise :class:`NonFiniteLogitsError` (see :func:`check_finite_logits`), naming the model
    as ``label`` (default ``name``) and the check as being on the clean images.

    Warns (``UserWarning``) when the rows look like probabilities (all values in [0, 1], rows summing to 1):
    attacks expect logits, and softmax outputs saturate the cross-entropy gradient.
    """
    if not isinstance(logits, Tensor):
        raise TypeError(f"expected {name} to return a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point() or logits.dim() != 2 or logits.shape[0] != batch_size:
        raise ValueError(
            f"expected {name} to return float logits of shape ({batch_size}, num_classes), "
            f"got {logits.dtype} of shape {tuple(logits.shape)}"
        )
    num_classes = logits.shape[1]
    if y is not None and y.numel() > 0 and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"expected labels in [0, {num_classes}) (num_classes from the {name}'s output), "
            f"got range [{int(y.min())}, {int(y.max())}]"
        )
    check_finite_logits(logits, label or name, "on the clean images")
    with torch.no_grad():
        in_unit = bool(((logits >= 0) & (logits <= 1)).all())
        if (
            in_unit
            and num_classes > 1
            and bool(torch.allclose(logits.sum(1), logits.new_ones(()), atol=1e-3))
        ):
            warnings.warn(
                f"the {name}'s outputs look like probabilities (rows in [0, 1] summing to 1); attacks expect "
                "logits: remove the final softmax",
                UserWarning,
                stacklevel=3,
            )
    return logits


def model_name(model: Any) -> str:
    """A short name of a model for messages: its class (``nn.Module``) or its qualified name (a function)."""
    if isinstance(model, nn.Module):
        return type(model).__name__
    return str(getattr(model, "__qualname__", type(model).__name__))


def check_finite_logits(logits: Tensor, name: str = "model", where: str = "") -> Tensor:
    """Raise :class:`NonFiniteLogitsError` unless every entry of ``logits`` ``(B, K)`` is finite.

    The one check behind every place that turns logits into a verdict (attacks, harnesses, AutoAttack,
    training): ``argmax`` of a NaN row is an arbitrary class, so a model with NaN or inf logits would be
    reported as fooled or robust at random. The message names ``name`` (the model), ``where`` (the batch or
    step) and the offending rows.
    """
    with torch.no_grad():
        flat = logits.detach().reshape(logits.shape[0], -1) if logits.dim() else logits.detach().reshape(1, 1)
        bad = ~torch.isfinite(flat).all(dim=1)
        if bool(bad.any()):
            rows = bad.nonzero().flatten().tolist()
            shown = ", ".join(str(r) for r in rows[:8]) + (" ..." if len(rows) > 8 else "")
            at = f" {where}" if where else ""
            raise NonFiniteLogitsError(
                f"expected finite logits from the {name}{at}, got NaN or inf in {len(rows)} of "
                f"{flat.shape[0]} rows (rows {shown}): a verdict computed from them would be wrong"
            )
    return logits


def predict(model: Callable[[Tensor], Tensor], x: Tensor, name: str = "model", where: str = "") -> Tensor:
    """``(B,)`` predicted classes ``model(x).argmax(1)`` without gradients, after :func:`check_finite_logits`."""
    with torch.no_grad():
        logits = model(x)
        return check_finite_logits(logits, name, where).argmax(dim=1)


def _first_float_tensor(model: Any) -> Tensor | None:
    if not isinstance(model, nn.Module):
        return None
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t
    return None


def prepare_inputs(x: Tensor, model: Any, name: str = "x", model_label: str = "model") -> Tensor:
    """``x`` checked against an ``nn.Module`` model's device and cast to its floating dtype.

    The library's one dtype rule, applied wherever images (or latents) enter a model (attacks, the defended
    model, :func:`manifold_defense.inversion.invert`): floating inputs of another dtype than the model's first
    floating parameter (float64 images for a float32 model, say) are **cast to the model's dtype**, and what
    comes back is in that dtype. Inputs on another device than the model raise ``ValueError`` before the
    first layer runs. A plain callable (no parameters) gets ``x`` unchanged.
    """
    ref = _first_float_tensor(model)
    if ref is None:
        return x
    if ref.device != x.device:
        raise ValueError(
            f"expected {name} on the {model_label}'s device {ref.device}, got {x.device}; "
            f"move it with .to({str(ref.device)!r})"
        )
    return x.to(ref.dtype) if x.is_floating_point() and x.dtype != ref.dtype else x


def warn_if_training(model: Any, name: str = "model") -> None:
    """Warn when ``model`` is an ``nn.Module`` in training mode (dropout / batch-norm statistics change)."""
    if isinstance(model, nn.Module) and model.training:
        warnings.warn(
            f"the {name} is in training mode; call .eval() before attacking it (dropout and batch norm make "
            "the attack non-deterministic and batch-dependent)",
            UserWarning,
            stacklevel=3,
        )


#: The type of an attack's copy (:meth:`Attack.with_eps` returns the subclass it is called on); a TypeVar rather
#: than ``typing.Self``, which needs Python 3.11.
_AttackT = TypeVar("_AttackT", bound="Attack")


class Attack(ABC):
    """Base of all pixel-space attacks: a final ``__call__`` around an abstract :meth:`run`.

    ``attack(model, x, y)``:

    1. validates ``x`` (float ``(B, C, H, W)`` in [0, 1] within 1e-6, finite, on an ``nn.Module`` model's
       device; cast to the model's dtype, see :func:`prepare_inputs`), ``y`` (int64 ``(B,)`` on the same
       device, in ``[0, num_classes)`` with ``num_classes`` read from the model's output), the model's logits
       (finite, else :class:`NonFiniteLogitsError`) and the threat model; warns when the model is an
       ``nn.Module`` in training mode or returns probabilities;
    2. calls ``run(model, x.clone(), y.clone())`` (the caller's tensors are never touched);
    3. projects the returned images onto the eps-ball around ``x`` and onto [0, 1];
    4. evaluates ``success = model(x_adv).argmax(1) != y`` under ``torch.no_grad()`` (non-finite logits on
       ``x_adv`` raise :class:`NonFiniteLogitsError`: a NaN row would otherwise count as fooled).

    Subclasses implement :meth:`run` only; defining ``__call__`` in a subclass raises ``TypeError``.

    Args:
        threat: the :class:`ThreatModel` (norm and eps).
    """

    def __init__(self, threat: ThreatModel) -> None:
        if not isinstance(threat, ThreatModel):
            raise TypeError(f"expected threat to be a ThreatModel, got {type(threat).__name__}")
        self._threat = threat

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__call__" in cls.__dict__:
            raise TypeError(
                f"{cls.__name__} must not override Attack.__call__ (it enforces the threat model); "
                "implement run() instead"
            )

    @property
    def threat(self) -> ThreatModel:
        """The attack's threat model."""
        return self._threat

    def with_eps(self: _AttackT, eps: float) -> _AttackT:
        """A shallow copy of this attack whose threat model has budget ``eps`` (same norm, same settings).

        The copy's results are projected onto the new ball by :meth:`__call__`. An attack that keeps its own
        copy of the budget (a torchattacks/foolbox adapter built with ``eps``) still searches its original
        ball before that projection; :class:`attacks.PGD` reads the budget from :attr:`threat` and so follows.
        """
        new = copy.copy(self)
        new._threat = ThreatModel(self._threat.norm, eps)
        return new

    @abstractmethod
    def run(self, model: Model, x: Tensor, y: Tensor) -> Tensor:
        """Return ``(B, C, H, W)`` candidate adversarial images for ``x`` (a private copy), labels ``y``."""

    @final
    def __call__(self, model: Model, x: Tensor, y: Tensor) -> AttackResult:
        """Attack ``model`` at ``x`` with true labels ``y``; see the class docstring.

        Args:
            model: classifier, ``(B, C, H, W)`` in [0, 1] to ``(B, num_classes)`` logits.
            x: ``(B, C, H, W)`` float images in [0, 1].
            y: ``(B,)`` int64 labels.

        Returns:
            :class:`AttackResult`.
        """
        if not callable(model):
            raise TypeError(f"expected model to be callable, got {type(model).__name__}")
        threat = self._threat
        if not isinstance(threat, ThreatModel):
            raise TypeError(f"expected threat to be a ThreatModel, got {type(threat).__name__}")
        _as_norm(threat.norm)
        if not math.isfinite(threat.eps) or threat.eps < 0:
            raise ValueError(f"expected eps to be finite and >= 0, got {threat.eps}")
        check_images(x)
        y = check_labels(y, x.shape[0], x.device)
        warn_if_training(model)
        label = f"model {model_name(model)}"
        x0 = prepare_inputs(x.detach(), model).clone()
        y0 = y.detach().clone()
        with torch.no_grad():
            check_logits(model(x0), x0.shape[0], y0, label=label)

        x_run = self.run(model, x0.clone(), y0.clone())
        if not isinstance(x_run, Tensor) or x_run.shape != x0.shape:
            got = tuple(x_run.shape) if isinstance(x_run, Tensor) else type(x_run).__name__
            raise ValueError(
                f"expected {type(self).__name__}.run to return shape {tuple(x0.shape)}, got {got}"
            )
        x_adv = project_onto_threat(x_run.detach().to(device=x0.device, dtype=x0.dtype), x0, threat)
        with torch.no_grad():
            logits = check_finite_logits(model(x_adv), label, f"on the adversarial images of {self!r}")
        success = logits.argmax(dim=1) != y0
        return AttackResult(x_adv, success, logits.detach(), per_sample_norm(x_adv - x0, threat.norm))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._threat})"
