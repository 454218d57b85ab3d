"""Settings of the robustness harness: threat models and :class:`RobustnessSettings` (every number of a run,
frozen and validated), each attack's settings nested as that attack's own config object.

Papers: Athalye, Carlini, Wagner, "Obfuscated Gradients Give a False Sense of Security" (ICML 2018: BPDA, EOT);
Carlini et al., "On Evaluating Adversarial Robustness" (arXiv 1902.06705: the red-flag checklist); Croce & Hein
(ICML 2020: APGD, APGD-T, FAB-T, worst case per point); Andriushchenko et al., "Square Attack" (ECCV 2020); Jalal et al., "The
Robust Manifold Defense" (arXiv 1712.09196: on-manifold and overpowered attacks).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from attacks import LatentAttackConfig, LatentConstraint, Norm, OverpoweredConfig, PGDConfig, ThreatModel
from eval.harness.cascade import ATTACKS
from eval.harness.configs import (
    LEAN_CHANGES,
    QUICK_CHANGES,
    APGDConfig,
    APGDTConfig,
    FABConfig,
    FlagThresholds,
    SquareConfig,
    check_float,
    check_int,
)
from eval.harness.registry import registered_stages

__all__ = [
    "DEFAULT_THREATS",
    "LEAN_CHANGES",
    "MNIST_SHAPE",
    "SCHEMA",
    "STATE_FILE",
    "RobustnessSettings",
    "default_curve_eps",
    "jsonable",
    "parse_threat",
    "threat_key",
]

#: The format of the state and results this version writes; a run folder of another is refused.
SCHEMA = "manifold-defense robustness v2"
STATE_FILE = "state.pt"
#: The image shape the default threat models and curve budgets were chosen for (MNIST).
MNIST_SHAPE: tuple[int, int, int] = (1, 28, 28)
DEFAULT_THREATS: tuple[str, ...] = ("linf-0.3", "l2-2", "l2-4")


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


#: The nested attack configs: field -> (its type, the stages that read it).
CONFIGS: dict[str, tuple[type, str]] = {
    "pgd": (PGDConfig, "pgd"),
    "bpda": (PGDConfig, "bpda-pgd (eot_samples 1), bpda-eot-pgd, surrogate-pgd"),
    "unrolled": (PGDConfig, "unrolled-pgd"),
    "apgd": (APGDConfig, "apgd"),
    "apgd_t": (APGDTConfig, "apgd-t"),
    "fab": (FABConfig, "fab"),
    "square": (SquareConfig, "square"),
    "onmanifold": (LatentAttackConfig, "onmanifold"),
    "overpowered": (OverpoweredConfig, "overpowered"),
    "final": (PGDConfig, "real-bpda-eot"),
    "curve": (PGDConfig, "the accuracy-vs-eps curves"),
    "thresholds": (FlagThresholds, "the red-flag checks"),
}


@dataclass(frozen=True)
class RobustnessSettings:
    """Every setting of :func:`eval.harness.run_robustness` (defaults: the full protocol).

    Each attack's settings are that attack's own config object; a stage sets the fields it owns per call: the
    ``seed`` of every config (per chunk), ``eps`` of the latent configs (per threat, see
    ``latent_budget_from_threat``) and ``eot_samples`` (1 on a deterministic defense).

    Args:
        n: evaluation points (the first ``n`` given), >= 1.
        n_per_defense: cap on the points of named defenses (the first ``k`` of the ``n``), for expensive ones.
        threats: threat model names (:func:`parse_threat`), default ``("linf-0.3", "l2-2", "l2-4")`` (MNIST's).
        attacks: registered stages (:data:`ATTACKS` and any added with
            :func:`eval.harness.register_stage`), run in cascade order; ``"clean"`` always runs.
        cascade: ``True`` (default): each attack runs on the points still robust after the attacks before it;
            ``False``: each attack runs on every clean-correct point ("each attack alone"; the worst case per
            point is the same rule), the mode of ``python -m eval defense``.
        seed: seed of every random choice (chunk seeds derive from it).
        batch_size: points per chunk (attack call).
        draws: fresh forward passes of a randomized defense per verdict (worst case); deterministic: 1.
        pgd: the naive ``pgd`` (:class:`attacks.PGDConfig`: 40 steps of ``2.5 eps / steps``, random start).
        bpda: ``bpda-pgd`` (run with ``eot_samples`` 1), ``bpda-eot-pgd`` and ``surrogate-pgd`` (40 steps, EOT 4).
        unrolled: the unrolled attack (10 steps); unrolled_n: its points (the first that survived ``pgd``;
            ``None``, the default: all); unrolled_batch: its chunk size (one chunk's unrolled graph at a time).
        apgd: :class:`eval.harness.APGDConfig` (20 steps, CE, EOT 4).
        apgd_t: :class:`eval.harness.APGDTConfig` (``apgd-t``: targeted DLR toward each other class; 100 steps per
            target class on a plain model, AutoAttack's; 10 through preprocessing or a surrogate; EOT 4).
        fab: :class:`eval.harness.FABConfig` (``fab``: FAB-T, deterministic defenses; 100 steps per target class
            on a plain model, 10 through preprocessing or a surrogate).
        square: :class:`eval.harness.SquareConfig` (5000 queries on a plain model, AutoAttack's; 500 through
            preprocessing or to a surrogate; p_init 0.8).
        onmanifold: :class:`attacks.LatentAttackConfig` (pixel constraint, 200 Adam steps of 0.05, ``eps`` 4).
        overpowered: :class:`attacks.OverpoweredConfig` (300 steps of 0.05, multiplier 0.001, ``eps`` 4,
            temperature 10: the divergence of ``logits / 10``, which does not saturate on a confident
            classifier and breaks more pairs than Jalal et al.'s temperature 1; ``docs/robustness.md``).
        latent_budget_from_threat: ``True`` (default): under an l2 threat the latent attacks' pixel l2 budget is
            the threat's eps, under Linf their config's ``eps``; ``False``: their config's ``eps`` under every
            threat (``python -m eval defense``). Candidates are always projected onto each threat ball.
        final: ``real-bpda-eot``, the final real-forward BPDA + EOT round of surrogate runs (20 steps, EOT 4).
        curve: the curve attack (BPDA PGD for preprocessing defenses, else PGD; 20 steps, EOT ``eot_samples`` 1
            on randomized defenses); curve_eps_linf, curve_eps_l2: its budgets (for the norms among
            ``threats``); a Linf budget >= 1 or an l2 budget >= sqrt(d) is "unbounded".
        grad_check_n: points (the first, by index) at which input gradients are checked.
        grid_examples: broken points (and on-manifold pairs) shown per (defense, threat) grid.
        thresholds: :class:`eval.harness.FlagThresholds` of the red flags.
        convergence: rerun the strongest white-box stage of each threat with twice its steps (the convergence
            check); ``False`` only in a quick protocol (the report says it was off).
        convergence_rounds: the most reruns of the convergence ladder per threat (default 1: the single rerun).
            Rerun ``k`` runs the same stage with ``2**k`` times its steps (and EOT samples on a randomized
            defense) on the points every earlier stage and rerun left; the ladder stops at the first rerun that
            newly breaks at most ``thresholds.not_converged`` of the points (converged) or after this many reruns
            (``not-converged`` then reads the last). Not part of a run's fingerprint: each rerun is a stage of its
            own, so raising it on a finished run adds the missing reruns to its ladder (they can only lower a figure).
        majority: on a randomized defense, every verdict passes all ``draws`` fresh purifications (also for points
            the first pass already misclassified) and records how many classified correctly, so the report gives
            the majority-vote figure beside the worst case (a few more forward passes per broken point).
        quick: a reduced smoke run (recorded in the outputs).
        lean: the lean cascade (:meth:`lean_preset`; recorded in the outputs): cheaper budgets whose worst case
            is compared with the full cascade's on the same points (``manifold-defense cascade-profile``).
    """

    n: int = 200
    n_per_defense: Mapping[str, int] = field(default_factory=lambda: {"projection-defense-gan": 100})
    threats: tuple[str, ...] = DEFAULT_THREATS
    attacks: tuple[str, ...] = ATTACKS
    cascade: bool = True
    seed: int = 0
    batch_size: int = 50
    draws: int = 3
    pgd: PGDConfig = field(default_factory=lambda: PGDConfig(steps=40))
    bpda: PGDConfig = field(default_factory=lambda: PGDConfig(steps=40, eot_samples=4))
    unrolled: PGDConfig = field(default_factory=lambda: PGDConfig(steps=10))
    unrolled_n: int | None = None
    unrolled_batch: int = 5
    apgd: APGDConfig = field(default_factory=APGDConfig)
    apgd_t: APGDTConfig = field(default_factory=APGDTConfig)
    fab: FABConfig = field(default_factory=FABConfig)
    square: SquareConfig = field(default_factory=SquareConfig)
    onmanifold: LatentAttackConfig = field(
        default_factory=lambda: LatentAttackConfig(eps=4.0, constraint="pixel", steps=200, step_size=0.05)
    )
    overpowered: OverpoweredConfig = field(
        default_factory=lambda: OverpoweredConfig(
            eps=4.0, steps=300, step_size=0.05, multiplier_init=0.001, temperature=10.0
        )
    )
    latent_budget_from_threat: bool = True
    final: PGDConfig = field(default_factory=lambda: PGDConfig(steps=20, eot_samples=4))
    curve: PGDConfig = field(default_factory=lambda: PGDConfig(steps=20, eot_samples=1))
    curve_eps_linf: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 1.0)
    # 28 = sqrt(784): an unbounded l2 budget for MNIST (the unbounded-eps check needs one on each curve)
    curve_eps_l2: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0, 6.0, 28.0)
    grad_check_n: int = 8
    grid_examples: int = 6
    thresholds: FlagThresholds = field(default_factory=FlagThresholds)
    convergence: bool = True
    convergence_rounds: int = 1
    majority: bool = False
    quick: bool = False
    lean: bool = False

    def __post_init__(self) -> None:
        for name in ("n", "batch_size", "draws", "unrolled_batch", "convergence_rounds"):
            check_int(self, name, 1)
        check_int(self, "unrolled_n", 1, optional=True)
        for name in ("seed", "grad_check_n", "grid_examples"):
            check_int(self, name, 0)
        for name in ("cascade", "latent_budget_from_threat", "convergence", "majority", "quick", "lean"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"expected {name} as a bool, got {type(getattr(self, name)).__name__}")
        if not self.convergence and not self.quick:
            raise ValueError(
                "expected convergence=True: the convergence check can be turned off in a quick protocol only "
                "(quick=True), got convergence=False with quick=False"
            )
        self._check_configs()
        object.__setattr__(self, "threats", _check_names("threat model", self.threats, self.threats))
        keys = [threat_key(parse_threat(t)) for t in self.threats]
        if len(set(keys)) != len(keys):
            raise ValueError(f"expected distinct threat models, got {list(self.threats)}")
        object.__setattr__(self, "threats", tuple(keys))
        valid = ("clean", *registered_stages())
        attacks = _check_names("attack", self.attacks, valid)
        object.__setattr__(self, "attacks", tuple(a for a in valid if a in attacks or a == "clean"))
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

    def _check_configs(self) -> None:
        for name, (kind, used_by) in CONFIGS.items():
            value = getattr(self, name)
            if not isinstance(value, kind):
                raise TypeError(
                    f"expected {name} (the settings of {used_by}) as {kind.__name__}, got {type(value).__name__}"
                )
        for name in ("pgd", "bpda", "unrolled", "final", "curve"):
            check_int(getattr(self, name), "steps", 1, prefix=f"{name}.")
        for name in ("onmanifold", "overpowered"):
            check_float(getattr(self, name), "eps", prefix=f"{name}.")
        constraint = LatentConstraint(self.onmanifold.constraint).value
        if constraint != "pixel":
            raise ValueError(f"expected onmanifold.constraint 'pixel', got {constraint!r}")

    def updated(self, changes: Mapping[str, Any]) -> RobustnessSettings:
        """A copy with ``changes`` applied (validated): keys are field names (``"n"``) or a field of a nested
        config (``"pgd.steps"``, ``"overpowered.temperature"``).

        Raises:
            ValueError: an unknown field, or a value the field refuses.
        """
        top: dict[str, Any] = {}
        nested: dict[str, dict[str, Any]] = {}
        names = {f.name for f in dataclasses.fields(self)}
        for key, value in changes.items():
            head, _, rest = key.partition(".")
            if head not in names or (rest and head not in CONFIGS):
                raise ValueError(f"unknown setting {key!r}: expected a field of RobustnessSettings {sorted(names)} "
                                 f"or CONFIG.FIELD with CONFIG in {sorted(CONFIGS)}")  # fmt: skip
            if rest:
                nested.setdefault(head, {})[rest] = value
            else:
                top[head] = value
        for head, fields_ in nested.items():
            base = top.get(head, getattr(self, head))
            known = {f.name for f in dataclasses.fields(base)}
            unknown = sorted(set(fields_) - known)
            if unknown:
                raise ValueError(f"unknown setting '{head}.{unknown[0]}': {head} has {sorted(known)}")
            try:
                top[head] = dataclasses.replace(base, **fields_)
            except (TypeError, ValueError) as err:
                raise type(err)(f"{head}: {err}") from None
        return dataclasses.replace(self, **top)

    @classmethod
    def quick_preset(cls, changes: Mapping[str, Any] | None = None, **fields: Any) -> RobustnessSettings:
        """A smoke run of a few minutes on one CPU thread; ``changes`` (dotted keys, :meth:`updated`) and
        ``fields`` override it; see :meth:`reductions`."""
        return cls(quick=True).updated({**QUICK_CHANGES, **dict(changes or {}), **fields})

    @classmethod
    def lean_preset(cls, changes: Mapping[str, Any] | None = None, **fields: Any) -> RobustnessSettings:
        """The lean cascade (issue 35): the full protocol's stages and points at three cheaper budgets, each a cut
        of work that the cost profile showed rarely changes a verdict; ``changes`` (dotted keys, :meth:`updated`)
        and ``fields`` override it.

        - ``square.queries_to = "stand-in"``: Square's queries go to the defense's cheap query stand-in
          (``G(E(x))`` for a projection with an encoder, the 2-step reverse process for DiffPure), its examples
          judged on the real defense; on the profiled runs Square through the real purifier took about half the
          process time and broke no point.
        - ``stop_when_fooled = 3`` for ``pgd``, ``bpda`` and ``final``: a point leaves a PGD loop through the real
          defense once it has fooled it at 3 consecutive steps (early exit; never through a stand-in).
        - ``apgd_t.targets = 3``: APGD-T toward the 3 most likely other classes instead of all 9.

        Whether the worst case stays the full cascade's is a measured claim, not a property: compare the two runs
        on the same points with ``manifold-defense cascade-profile FULL/results.json --compare LEAN/results.json``.
        Measured on the fast projection at Linf 0.3 (first 100 test images, ``docs/leaderboard.md``) it did not
        stay: the lean worst case was 5 points higher, 3 of them points that only Square through the real defense
        broke. It is a screening cascade, not a substitute for the full one.
        """
        return cls().updated({**LEAN_CHANGES, **dict(changes or {}), **fields})

    def reductions(self) -> dict[str, dict[str, Any]]:
        """Settings that differ from the full protocol: ``{field or config.field: {"this_run": v, "full": v}}``
        (a longer convergence ladder strengthens the protocol and is not listed)."""
        out: dict[str, dict[str, Any]] = {}
        for key, (mine, theirs) in _leaves(self, RobustnessSettings()).items():
            if key == "convergence_rounds" and mine >= theirs:
                continue
            if key not in ("quick", "lean") and mine != theirs:
                out[key] = {"this_run": jsonable(mine), "full": jsonable(theirs)}
        return out

    def to_json(self) -> dict[str, Any]:
        """The settings as plain JSON values (nested configs as objects)."""
        return {f.name: jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _leaves(a: RobustnessSettings, b: RobustnessSettings) -> dict[str, tuple[Any, Any]]:
    """``{"n": (a.n, b.n), ..., "pgd.steps": (a.pgd.steps, b.pgd.steps), ...}``."""
    out: dict[str, tuple[Any, Any]] = {}
    for f in dataclasses.fields(a):
        mine, theirs = getattr(a, f.name), getattr(b, f.name)
        if f.name in CONFIGS:
            for g in dataclasses.fields(mine):
                out[f"{f.name}.{g.name}"] = (getattr(mine, g.name), getattr(theirs, g.name))
        else:
            out[f.name] = (mine, theirs)
    return out


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
