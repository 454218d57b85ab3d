"""The settings objects of the harness that no attack of :mod:`attacks` defines itself: the torchattacks APGD and
Square attacks as the cascade runs them, and the red-flag thresholds. Every other attack's settings are that
attack's own config (:class:`attacks.PGDConfig`, :class:`attacks.LatentAttackConfig`,
:class:`attacks.OverpoweredConfig`), nested in :class:`eval.harness.RobustnessSettings`."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, cast

__all__ = ["APGDConfig", "FlagThresholds", "SquareConfig", "check_float", "check_int", "doubled"]


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
class SquareConfig:
    """Settings of torchattacks' Square (Andriushchenko et al., ECCV 2020) as the ``square`` stage runs it.

    Args:
        queries: queries per point (default 500); restarts: (default 1); p_init: initial share of pixels changed
            per query (default 0.8).
    """

    queries: int = 500
    restarts: int = 1
    p_init: float = 0.8

    def __post_init__(self) -> None:
        for name in ("queries", "restarts"):
            check_int(self, name, 1, prefix="square.")
        check_float(self, "p_init", prefix="square.")

    def kwargs(self) -> dict[str, Any]:
        """The torchattacks constructor arguments."""
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
