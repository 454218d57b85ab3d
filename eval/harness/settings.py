"""Settings of the robustness harness: the attack cascade, the red-flag rules, threat models and
:class:`RobustnessSettings` (every number of a run, frozen and validated).

Papers: Athalye, Carlini, Wagner, "Obfuscated Gradients Give a False Sense of Security" (ICML 2018: BPDA, EOT);
Carlini et al., "On Evaluating Adversarial Robustness" (arXiv 1902.06705: the red-flag checklist); Croce & Hein
(ICML 2020: APGD, worst case per point); Andriushchenko et al., "Square Attack" (ECCV 2020); Jalal et al., "The
Robust Manifold Defense" (arXiv 1712.09196: on-manifold and overpowered attacks).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from attacks import Norm, ThreatModel

__all__ = [
    "ATTACKS",
    "ATTACK_DOCS",
    "DEFAULT_THREATS",
    "FLAGS",
    "LEGACY_SETTINGS",
    "MNIST_SHAPE",
    "SCHEMA",
    "STATE_FILE",
    "SURROGATE_STAGES",
    "WHITE_BOX",
    "RobustnessSettings",
    "check_monotone",
    "default_curve_eps",
    "jsonable",
    "parse_threat",
    "threat_key",
]

SCHEMA = "manifold-defense robustness v1"
STATE_FILE = "state.pt"
#: The image shape the default threat models and curve budgets were chosen for (MNIST).
MNIST_SHAPE: tuple[int, int, int] = (1, 28, 28)

#: The attack cascade, in the order it runs.
ATTACKS: tuple[str, ...] = (
    "clean",
    "pgd",
    "bpda-pgd",
    "bpda-eot-pgd",
    "surrogate-pgd",
    "unrolled-pgd",
    "apgd",
    "square",
    "onmanifold",
    "overpowered",
    "real-bpda-eot",
)
WHITE_BOX = ("pgd", "bpda-pgd", "bpda-eot-pgd", "surrogate-pgd", "unrolled-pgd", "apgd", "real-bpda-eot")
#: Stages whose inner loop runs on a defense's named surrogate when it has one (:class:`eval.harness.Defense`).
SURROGATE_STAGES = ("bpda-pgd", "bpda-eot-pgd", "surrogate-pgd", "apgd", "square")
DEFAULT_THREATS: tuple[str, ...] = ("linf-0.3", "l2-2", "l2-4")

ATTACK_DOCS: dict[str, str] = {
    "clean": "no attack; worst case over `draws` forward passes of a randomized defense",
    "pgd": "naive white-box PGD: the model's own gradient; for a preprocessing defense the bare classifier's "
    "gradient (projection ignored), examples transferred to the defended model",
    "bpda-pgd": "PGD through the defense, BPDA (identity backward through the projection); inner loop on the "
    "defense's surrogate when it names one",
    "bpda-eot-pgd": "BPDA + EOT (gradients averaged over eot_samples fresh projections); randomized defenses only; "
    "inner loop on the surrogate when named",
    "surrogate-pgd": "PGD (EOT on randomized surrogates) through each surrogate the defense names in turn (e.g. "
    "the differentiable G(E(x))); verdicts on the real defense",
    "unrolled-pgd": "PGD back-propagating through every projection step, on the points that survived pgd "
    "(the first unrolled_n, or all; BPDA-broken ones included, for the BPDA-vs-unrolled comparison)",
    "apgd": "torchattacks APGD (CE, EOT iterations on randomized defenses) through the BPDA model (or surrogate)",
    "square": "torchattacks Square, black box (queries to the defended model, or to its surrogate)",
    "onmanifold": "LatentAttack on the bare classifier from z = invert(x); G(z') projected onto the threat ball",
    "overpowered": "OverpoweredAttack pairs from z; the wrongly labelled member projected onto the threat ball",
    "real-bpda-eot": "a final round of BPDA + EOT with real forward passes on every point still robust; only for "
    "defenses with surrogates (the points the surrogate attacks left)",
}

#: Red-flag checks: name -> rule (also printed in the report).
FLAGS: dict[str, str] = {
    "unbounded-eps-not-zero": "at an unbounded budget (Linf >= 1, or l2 >= sqrt(d)) the curve attack must reach "
    "~0% accuracy; flagged when the accuracy there exceeds `unbounded_tol`",
    "non-monotone-in-eps": "accuracy must not rise with eps: flagged when an accuracy-vs-eps curve point exceeds "
    "the previous one (clean at eps 0) by more than max(1 point, `monotone_tol` n), or an l2 worst case at a "
    "larger eps exceeds one at a smaller eps",
    "black-box-stronger": "Square (black box) newly breaks more than `blackbox_tol` n of the points every "
    "white-box attack before it left robust",
    "bpda-unrolled-gap": "on the points both attacked, BPDA (bpda-pgd, bpda-eot-pgd) and unrolled gradients break "
    "numbers of points that differ by more than max(1 point, `gap_tol` of those points)",
    "zero-or-nan-gradients": "the input gradient of the cross-entropy (each gradient source the cascade uses) is "
    "non-finite anywhere, or exactly zero at more than `zero_grad_tol` of the checked points",
    "randomized-defense": "the defense's output changes between two calls on the same input; every verdict is "
    "then the worst case over `draws` fresh passes (the flag reports how many points one draw would have "
    "counted robust)",
    "surrogate-transfer-gap": "a stage whose inner loop ran on a surrogate: fewer than `transfer_min` of the "
    "points the surrogate misclassified are misclassified by the real defense (and at least 2 did not "
    "transfer): the surrogate does not stand in for the defense",
    "real-bpda-eot-broke": "for a defense whose inner loops ran on a surrogate: the final real-forward BPDA + EOT "
    "round broke more than `blackbox_tol` n points the surrogate attacks left robust (the surrogate path was "
    "weaker than the real one)",
    "audit-failed": "an adversarial example outside its threat model, outside [0, 1], or with NaN values",
}

#: Settings added to :class:`RobustnessSettings` after runs had been saved, with the value those runs used: a saved
#: state without one of them is read as having run at this value (so it resumes with that value, and only then).
LEGACY_SETTINGS: dict[str, Any] = {
    "op_temperature": 1.0,
    "final_steps": 20,
    "transfer_min": 0.5,
    "cascade": True,
    "latent_budget": None,
    "op_budget": None,
}


# ------------------------------------------------------------------------------------------------ threats
def parse_threat(name: str) -> ThreatModel:
    """``"linf-0.3"`` / ``"l2-2"`` -> :class:`attacks.ThreatModel`; ``ValueError`` names the expected form."""
    if not isinstance(name, str) or "-" not in name:
        raise ValueError(f"expected a threat model like 'linf-0.3' or 'l2-4' (NORM-EPS), got {name!r}")
    norm, _, eps_text = name.partition("-")
    try:
        eps = float(eps_text)
    except ValueError:
        raise ValueError(
            f"expected a threat model like 'linf-0.3' or 'l2-4' (NORM-EPS), got {name!r}"
        ) from None
    if norm not in ("linf", "l2") or not (math.isfinite(eps) and eps > 0):
        raise ValueError(
            f"expected a threat model NORM-EPS with NORM in ['linf', 'l2'] and EPS > 0, got {name!r}"
        )
    return ThreatModel(Norm(norm), eps)


def threat_key(threat: ThreatModel) -> str:
    """The canonical name of a threat model, ``"linf-0.3"``."""
    return f"{threat.norm.value}-{threat.eps:g}"


def check_monotone(eps: Sequence[float], accuracy: Sequence[float], n: int, tol: float) -> list[str]:
    """Violations of "accuracy is non-increasing in eps": one message per rise above ``max(1/n, tol)``.

    Args:
        eps: increasing budgets; accuracy: the accuracy at each; n: points the accuracies are over (>= 1);
        tol: tolerated rise as a fraction of n.
    """
    if len(eps) != len(accuracy):
        raise ValueError(f"expected as many accuracies as eps values, got {len(accuracy)} and {len(eps)}")
    allowed = max(1.0 / max(n, 1), tol) + 1e-9
    return [
        f"accuracy rises from {accuracy[i]:.4g} at eps {eps[i]:g} to {accuracy[i + 1]:.4g} at eps {eps[i + 1]:g}"
        for i in range(len(eps) - 1)
        if accuracy[i + 1] - accuracy[i] > allowed
    ]


def default_curve_eps(threats: Sequence[str], shape: Sequence[int]) -> dict[str, tuple[float, ...]]:
    """Curve budgets for images of another shape than MNIST's: half, once and twice each threat's eps, and an
    unbounded budget (Linf 1; l2 ``ceil(sqrt(d))``, ``d`` the pixels of ``shape = (C, H, W)``).

    Returns ``{"curve_eps_linf": (...), "curve_eps_l2": (...)}`` for the norms among ``threats``.
    """
    dim = math.prod(int(s) for s in shape)
    out: dict[str, tuple[float, ...]] = {}
    for norm, unbounded in (("linf", 1.0), ("l2", float(math.ceil(math.sqrt(dim))))):
        eps = [parse_threat(t).eps for t in threats if parse_threat(t).norm.value == norm]
        if eps:
            values = {round(f * e, 6) for e in eps for f in (0.5, 1.0, 2.0)} | {unbounded}
            out[f"curve_eps_{norm}"] = tuple(sorted(v for v in values if v <= unbounded))
    return out


# ----------------------------------------------------------------------------------------------- settings
def _check_int(owner: object, name: str, low: int, optional: bool = False) -> None:
    value = getattr(owner, name)
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        none = " or None" if optional else ""
        raise ValueError(f"expected {name} to be an int >= {low}{none}, got {value!r}")


def _check_float(
    owner: object, name: str, low: float = 0.0, strict: bool = True, optional: bool = False
) -> None:
    value = getattr(owner, name)
    if optional and value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= low if strict else value < low):
        raise ValueError(
            f"expected {name} to be a finite number {'>' if strict else '>='} {low}"
            f"{' or None' if optional else ''}, got {value!r}"
        )


def _check_names(kind: str, names: Sequence[str], valid: Sequence[str]) -> tuple[str, ...]:
    names = tuple(names)
    unknown = [a for a in names if a not in valid]
    if unknown or not names:
        raise ValueError(
            f"unknown {kind} {unknown}: expected a non-empty subset of {list(valid)}, got {list(names)}"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"expected distinct {kind} names, got {list(names)}")
    return names


@dataclass(frozen=True)
class RobustnessSettings:
    """Every setting of :func:`eval.harness.run_robustness` (defaults: the full protocol).

    Args:
        n: evaluation points (the first ``n`` given), >= 1.
        n_per_defense: cap on the points of named defenses (the first ``k`` of the ``n``), for expensive ones.
        threats: threat model names (:func:`parse_threat`), default ``("linf-0.3", "l2-2", "l2-4")`` (MNIST's).
        attacks: subset of :data:`ATTACKS` (run in cascade order); ``"clean"`` always runs.
        cascade: ``True`` (default): each attack runs on the points still robust after the attacks before it;
            ``False``: each attack runs on every clean-correct point ("each attack alone"; the worst case per
            point is the same rule), the mode of ``python -m eval defense``.
        seed: seed of every random choice (chunk seeds derive from it).
        batch_size: points per chunk (attack call).
        draws: fresh forward passes of a randomized defense per verdict (worst case); deterministic: 1.
        pgd_steps, pgd_restarts: ``pgd`` (step ``2.5 eps / steps``, random start).
        bpda_steps: ``bpda-pgd``, ``bpda-eot-pgd`` and ``surrogate-pgd`` steps; eot_samples: EOT passes per step.
        unrolled_steps, unrolled_batch: the unrolled attack's steps and chunk size (memory is bounded by the
            chunk: one chunk's unrolled graph at a time).
        unrolled_n: points of the unrolled attack (the first that survived ``pgd``); ``None`` (default): every
            one of them.
        apgd_steps: APGD iterations (one restart).
        square_queries: Square queries per point (one restart, p_init 0.8).
        latent_steps, latent_step_size: on-manifold attack (Adam on z, pixel constraint).
        op_steps, op_step_size, op_multiplier_init: overpowered attack.
        op_temperature: the overpowered attack maximizes the divergence of ``logits / op_temperature`` (default
            10; :class:`attacks.OverpoweredConfig`). Runs saved before this setting existed ran at 1.
        latent_linf_budget: l2 budget of the latent attacks under a Linf threat (under l2: the threat's eps).
        latent_budget, op_budget: fixed l2 budgets of the on-manifold and overpowered attacks (``None``: as
            above); the candidates are still projected onto each threat ball.
        final_steps: steps of ``real-bpda-eot`` (the final real-forward BPDA + EOT round of surrogate runs).
        transfer_min: the ``surrogate-transfer-gap`` threshold (share of surrogate successes that must transfer).
        curve_eps_linf, curve_eps_l2: budgets of the accuracy-vs-eps curves (for the norms among ``threats``);
            a Linf budget >= 1 or an l2 budget >= sqrt(d) is "unbounded".
        curve_steps: steps of the curve attack (BPDA PGD for preprocessing defenses, else PGD; EOT
            ``curve_eot`` passes on randomized defenses).
        grad_check_n: points (the first, by index) at which input gradients are checked.
        grid_examples: broken points (and on-manifold pairs) shown per (defense, threat) grid.
        unbounded_tol, monotone_tol, blackbox_tol, gap_tol, zero_grad_tol: red-flag thresholds (:data:`FLAGS`).
        quick: a reduced smoke run (recorded in the outputs).
    """

    n: int = 200
    n_per_defense: Mapping[str, int] = field(default_factory=lambda: {"projection-defense-gan": 100})
    threats: tuple[str, ...] = DEFAULT_THREATS
    attacks: tuple[str, ...] = ATTACKS
    cascade: bool = True
    seed: int = 0
    batch_size: int = 50
    draws: int = 3
    pgd_steps: int = 40
    pgd_restarts: int = 1
    bpda_steps: int = 40
    eot_samples: int = 4
    unrolled_steps: int = 10
    unrolled_n: int | None = None
    unrolled_batch: int = 5
    apgd_steps: int = 20
    square_queries: int = 500
    latent_steps: int = 200
    latent_step_size: float = 0.05
    op_steps: int = 300
    op_step_size: float = 0.05
    op_multiplier_init: float = 0.001
    op_temperature: float = 10.0
    latent_linf_budget: float = 4.0
    latent_budget: float | None = None
    op_budget: float | None = None
    final_steps: int = 20
    transfer_min: float = 0.5
    curve_eps_linf: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 1.0)
    # 28 = sqrt(784): an unbounded l2 budget for MNIST (the unbounded-eps check needs one on each curve)
    curve_eps_l2: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0, 6.0, 28.0)
    curve_steps: int = 20
    curve_eot: int = 1
    grad_check_n: int = 8
    grid_examples: int = 6
    unbounded_tol: float = 0.02
    monotone_tol: float = 0.02
    blackbox_tol: float = 0.02
    gap_tol: float = 0.1
    zero_grad_tol: float = 0.1
    quick: bool = False

    def __post_init__(self) -> None:
        for name in ("n", "batch_size", "draws", "pgd_steps", "pgd_restarts", "bpda_steps", "eot_samples"):
            _check_int(self, name, 1)
        for name in ("unrolled_steps", "unrolled_batch", "apgd_steps", "square_queries"):
            _check_int(self, name, 1)
        _check_int(self, "unrolled_n", 1, optional=True)
        for name in ("seed", "latent_steps", "op_steps", "curve_steps", "grad_check_n", "grid_examples"):
            _check_int(self, name, 0)
        _check_int(self, "final_steps", 1)
        _check_int(self, "curve_eot", 1)
        for name in ("latent_step_size", "op_step_size", "op_multiplier_init", "op_temperature"):
            _check_float(self, name)
        _check_float(self, "latent_linf_budget")
        for name in ("latent_budget", "op_budget"):
            _check_float(self, name, optional=True)
        for name in (
            "unbounded_tol",
            "monotone_tol",
            "blackbox_tol",
            "gap_tol",
            "zero_grad_tol",
            "transfer_min",
        ):
            _check_float(self, name, 0.0, strict=False)
        if not isinstance(self.cascade, bool):
            raise TypeError(f"expected cascade as a bool, got {type(self.cascade).__name__}")
        object.__setattr__(self, "threats", _check_names("threat model", self.threats, self.threats))
        keys = [threat_key(parse_threat(t)) for t in self.threats]
        if len(set(keys)) != len(keys):
            raise ValueError(f"expected distinct threat models, got {list(self.threats)}")
        object.__setattr__(self, "threats", tuple(keys))
        attacks = _check_names("attack", self.attacks, ATTACKS)
        object.__setattr__(self, "attacks", tuple(a for a in ATTACKS if a in attacks or a == "clean"))
        for name in ("curve_eps_linf", "curve_eps_l2"):
            values = tuple(getattr(self, name))
            if not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values):
                raise ValueError(f"expected {name} to be finite floats > 0, got {values!r}")
            object.__setattr__(self, name, tuple(sorted(float(v) for v in values)))
        caps = dict(self.n_per_defense)
        for key, value in caps.items():
            if not isinstance(key, str) or isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"expected n_per_defense as {{name: int >= 1}}, got {caps!r}")
        object.__setattr__(self, "n_per_defense", caps)

    @classmethod
    def quick_preset(cls, **overrides: Any) -> RobustnessSettings:
        """A smoke run of a few minutes on one CPU thread (fields overridable); see :meth:`reductions`."""
        base: dict[str, Any] = {
            "n": 10,
            "n_per_defense": {"projection-defense-gan": 2},
            "batch_size": 10,
            "draws": 2,
            "pgd_steps": 20,
            "bpda_steps": 5,
            "eot_samples": 2,
            "unrolled_steps": 3,
            "unrolled_n": 3,
            "unrolled_batch": 3,
            "apgd_steps": 5,
            "square_queries": 20,
            "latent_steps": 50,
            "op_steps": 100,
            "final_steps": 5,
            "curve_eps_linf": (0.1, 0.3, 1.0),
            "curve_eps_l2": (1.0, 2.0, 4.0, 28.0),
            "curve_steps": 5,
            "grad_check_n": 4,
            "quick": True,
        }
        base.update(overrides)
        return cls(**base)

    def reductions(self) -> dict[str, dict[str, Any]]:
        """Settings that differ from the full protocol: ``{field: {"this_run": v, "full": v_full}}``."""
        full = RobustnessSettings()
        out = {}
        for f in dataclasses.fields(self):
            if f.name == "quick":
                continue
            mine, theirs = getattr(self, f.name), getattr(full, f.name)
            if mine != theirs:
                out[f.name] = {"this_run": jsonable(mine), "full": jsonable(theirs)}
        return out

    def to_json(self) -> dict[str, Any]:
        """The settings as plain JSON values."""
        return {f.name: jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON data (dataclasses and mappings as dicts, enums as values, floats to 6 digits)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if hasattr(value, "value") and isinstance(getattr(value, "value", None), str):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [jsonable(v) for v in value]
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return repr(value)
