"""The settings objects of the harness that no attack of :mod:`attacks` defines itself: the torchattacks APGD,
APGD-T, FAB and Square attacks as the cascade runs them, and the red-flag thresholds. Every other attack's settings
are that attack's own config (:class:`attacks.PGDConfig`, :class:`attacks.LatentAttackConfig`,
:class:`attacks.OverpoweredConfig`), nested in :class:`eval.harness.RobustnessSettings`.

The AutoAttack components (APGD-T, FAB-T, Square; Croce & Hein, ICML 2020) have two budgets: AutoAttack's own on a
*plain* model (no preprocessing, no surrogate: every pass is one classifier pass, so the cascade is at least
AutoAttack standard there), and a smaller one on a defense whose every pass runs its preprocessing (a purifier, a
projection), where AutoAttack's budget would cost tens of times the rest of the cascade."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

__all__ = [
    "LEAN_CHANGES",
    "QUICK_CHANGES",
    "APGDConfig",
    "APGDTConfig",
    "FABConfig",
    "FlagThresholds",
    "SquareConfig",
    "check_float",
    "check_int",
    "doubled",
]


def check_int(owner: object, name: str, low: int, optional: bool = False, prefix: str = "") -> None:
    """``ValueError`` unless ``owner.name`` is an int >= ``low`` (or ``None`` when ``optional``)."""
    value = getattr(owner, name)
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        none = " or None" if optional else ""
        raise ValueError(f"expected {prefix}{name} to be an int >= {low}{none}, got {value!r}")


def check_float(
    owner: object, name: str, low: float = 0.0, strict: bool = True, optional: bool = False, prefix: str = ""
) -> None:
    """``ValueError`` unless ``owner.name`` is a finite number > ``low`` (>= when not ``strict``)."""
    value = getattr(owner, name)
    if optional and value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= low if strict else value < low):
        raise ValueError(
            f"expected {prefix}{name} to be a finite number {'>' if strict else '>='} {low}"
            f"{' or None' if optional else ''}, got {value!r}"
        )


@dataclass(frozen=True)
class APGDConfig:
    """Settings of torchattacks' APGD (Croce & Hein, ICML 2020) as the ``apgd`` stage runs it
    (:class:`attacks.TorchattacksAttack` ``"APGD"``).

    Args:
        steps: iterations per restart (default 20); restarts: restarts (default 1); loss: ``"ce"`` or ``"dlr"``.
        eot_samples: EOT iterations per step on a randomized defense (default 4; 1 on a deterministic one).
    """

    steps: int = 20
    restarts: int = 1
    loss: str = "ce"
    eot_samples: int = 4

    def __post_init__(self) -> None:
        for name in ("steps", "restarts", "eot_samples"):
            check_int(self, name, 1, prefix="apgd.")
        if self.loss not in ("ce", "dlr"):
            raise ValueError(f"expected apgd.loss 'ce' or 'dlr', got {self.loss!r}")

    def kwargs(self) -> dict[str, Any]:
        """The torchattacks constructor arguments."""
        return {
            "steps": self.steps,
            "n_restarts": self.restarts,
            "loss": self.loss,
            "eot_iter": self.eot_samples,
        }


@dataclass(frozen=True)
class APGDTConfig:
    """Settings of torchattacks' APGD-T (Croce & Hein, ICML 2020: APGD on the targeted DLR loss, run toward each of
    the ``n_classes - 1`` most likely other classes in turn, AutoAttack standard's second attack) as the ``apgd-t``
    stage runs it (:class:`attacks.TorchattacksAttack` ``"APGDT"``; ``n_classes`` from the model's output).

    Args:
        steps: iterations per target class on a defense with preprocessing or a surrogate (default 10:
            torchattacks' AutoAttack's; each iteration is ``eot_samples`` passes of the defense).
        plain_steps: iterations per target class on a plain model (default 100: AutoAttack's reference
            implementation; ``steps`` replaces it in the stage's recorded settings).
        restarts: restarts per target class (default 1).
        eot_samples: EOT iterations per step on a randomized defense (default 4; 1 on a deterministic one).
        targets: target classes per point, the most likely other classes first (``None``, default: all
            ``n_classes - 1``, AutoAttack's; ``k >= 3``: the ``k`` most likely, the lean cascade's budget).

    Cost per attacked point: ``targets * steps * restarts * eot_samples`` gradient passes (10 classes, the
    defaults: 900 on a deterministic plain model; 360 on a randomized preprocessing defense, 4.5 times
    ``apgd``'s 80).
    """

    steps: int = 10
    plain_steps: int = 100
    restarts: int = 1
    eot_samples: int = 4
    targets: int | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "plain_steps", "restarts", "eot_samples"):
            check_int(self, name, 1, prefix="apgd_t.")
        check_int(self, "targets", 3, optional=True, prefix="apgd_t.")

    def kwargs(self) -> dict[str, Any]:
        """The torchattacks constructor arguments (``steps``: the budget the stage chose; ``n_classes`` =
        ``targets + 1`` when ``targets`` is set: torchattacks targets the ``n_classes - 1`` most likely)."""
        out: dict[str, Any] = {"steps": self.steps, "n_restarts": self.restarts, "eot_iter": self.eot_samples}
        return out | ({} if self.targets is None else {"n_classes": self.targets + 1})


@dataclass(frozen=True)
class FABConfig:
    """Settings of torchattacks' FAB-T (Croce & Hein, ICML 2020: the minimum-norm Fast Adaptive Boundary attack,
    targeted at each of the ``n_classes - 1`` most likely other classes in turn, AutoAttack standard's third
    attack; a result counts only within eps) as the ``fab`` stage runs it (:class:`attacks.TorchattacksAttack`
    ``"FAB"``, ``multi_targeted=True``). Deterministic defenses only (the stage skips randomized ones).

    Args:
        steps: iterations per target class on a defense with preprocessing or a surrogate (default 10:
            torchattacks' AutoAttack's).
        plain_steps: iterations per target class on a plain model (default 100: AutoAttack's reference
            implementation).
        restarts: restarts per target class (default 1; a restart starts from a random point).

    Cost per attacked point: ``(n_classes - 1) * steps * restarts`` iterations of two forward passes and one
    backward (the gradient of a logit difference, then the label of the new iterate); 10 classes, the defaults:
    900 iterations on a plain model, 90 otherwise, for a point that survives every target class (within one
    class FAB runs all its steps, shrinking the perturbation after a success; a broken point is not attacked for
    the next class).
    """

    steps: int = 10
    plain_steps: int = 100
    restarts: int = 1

    def __post_init__(self) -> None:
        for name in ("steps", "plain_steps", "restarts"):
            check_int(self, name, 1, prefix="fab.")

    def kwargs(self) -> dict[str, Any]:
        """The torchattacks constructor arguments (``steps``: the budget the stage chose)."""
        return {"steps": self.steps, "n_restarts": self.restarts, "multi_targeted": True}


@dataclass(frozen=True)
class SquareConfig:
    """Settings of torchattacks' Square (Andriushchenko et al., ECCV 2020) as the ``square`` stage runs it.

    Args:
        queries: queries per point on a defense with preprocessing or a surrogate (default 500).
        plain_queries: queries per point on a plain model (default 5000: AutoAttack standard's; the stage records
            the number it used as ``n_queries``).
        restarts: (default 1); p_init: initial share of pixels changed per query (default 0.8).
        queries_to: ``"defense"`` (default): the queries go to the defense (or to its named surrogate);
            ``"stand-in"`` (the lean cascade): to the defense's cheap query stand-in when it has one
            (:class:`eval.harness.Defense`, ``query_stand_in``; e.g. ``G(E(x))`` for a projection, the 2-step
            reverse process for DiffPure), every example still judged on the real defense.
    """

    queries: int = 500
    plain_queries: int = 5000
    restarts: int = 1
    p_init: float = 0.8
    queries_to: str = "defense"

    def __post_init__(self) -> None:
        for name in ("queries", "plain_queries", "restarts"):
            check_int(self, name, 1, prefix="square.")
        check_float(self, "p_init", prefix="square.")
        if self.queries_to not in ("defense", "stand-in"):
            raise ValueError(f"expected square.queries_to 'defense' or 'stand-in', got {self.queries_to!r}")

    def kwargs(self) -> dict[str, Any]:
        """The torchattacks constructor arguments (``queries``: the budget the stage chose)."""
        return {"n_queries": self.queries, "n_restarts": self.restarts, "p_init": self.p_init}


@dataclass(frozen=True)
class FlagThresholds:
    """Thresholds of the red-flag checks (:data:`eval.harness.flags.FLAGS`), shares of the points ``n``.

    Args:
        unbounded: accuracy tolerated at an unbounded budget (``unbounded-eps-not-zero``, default 0.02).
        monotone: rise of accuracy with eps tolerated, beyond one point (``non-monotone-in-eps``, 0.02).
        blackbox: points Square or the final real round may newly break (``black-box-stronger``,
            ``real-bpda-eot-broke``, 0.02).
        gap: BPDA vs unrolled difference tolerated, beyond one point (``bpda-unrolled-gap``, 0.1).
        zero_grad: share of points with an exactly zero gradient tolerated (``zero-or-nan-gradients``, 0.1).
        transfer_min: share of surrogate successes that must transfer (``surrogate-transfer-gap``, 0.5).
        not_converged: points the convergence rerun may newly break (``not-converged``, default 0.01: one
            percentage point of the figure).
    """

    unbounded: float = 0.02
    monotone: float = 0.02
    blackbox: float = 0.02
    gap: float = 0.1
    zero_grad: float = 0.1
    transfer_min: float = 0.5
    not_converged: float = 0.01

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check_float(self, f.name, 0.0, strict=False, prefix="thresholds.")


def doubled(config: Any, eot: bool) -> Any:
    """``config`` with twice its ``steps`` (and twice its ``eot_samples`` when ``eot``): the convergence rerun.

    Works on any attack config with an int ``steps`` field (and optionally ``eot_samples``); ``TypeError`` for
    another object."""
    if not dataclasses.is_dataclass(config) or not hasattr(config, "steps"):
        raise TypeError(f"expected an attack config with a steps field, got {type(config).__name__}")
    changes: dict[str, Any] = {"steps": 2 * config.steps}
    if eot and hasattr(config, "eot_samples"):
        changes["eot_samples"] = 2 * config.eot_samples
    return dataclasses.replace(cast(Any, config), **changes)


#: The quick preset's changes to the full protocol (:meth:`eval.harness.RobustnessSettings.quick_preset`).
QUICK_CHANGES: Mapping[str, Any] = {
    "n": 10,
    "n_per_defense": {"projection-defense-gan": 2},
    "batch_size": 10,
    "draws": 2,
    "pgd.steps": 20,
    "bpda.steps": 5,
    "bpda.eot_samples": 2,
    "unrolled.steps": 3,
    "unrolled_n": 3,
    "unrolled_batch": 3,
    "apgd.steps": 5,
    "apgd.eot_samples": 2,
    "apgd_t.steps": 1,
    "apgd_t.plain_steps": 5,
    "apgd_t.eot_samples": 1,
    "fab.steps": 2,
    "fab.plain_steps": 5,
    "square.queries": 20,
    "square.plain_queries": 50,
    "onmanifold.steps": 50,
    "overpowered.steps": 100,
    "final.steps": 5,
    "final.eot_samples": 2,
    "curve_eps_linf": (0.1, 0.3, 1.0),
    "curve_eps_l2": (1.0, 2.0, 4.0, 28.0),
    "curve.steps": 5,
    "grad_check_n": 4,
    "quick": True,
}

#: The lean cascade's changes to the full protocol (:meth:`eval.harness.RobustnessSettings.lean_preset` says why each).
LEAN_CHANGES: Mapping[str, Any] = {
    "square.queries_to": "stand-in",
    "pgd.stop_when_fooled": 3,
    "bpda.stop_when_fooled": 3,
    "final.stop_when_fooled": 3,
    "apgd_t.targets": 3,
    "lean": True,
}
