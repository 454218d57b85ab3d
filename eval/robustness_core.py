"""The robustness evaluation harness as a Python API: an attack cascade over a set of defenses, worst case per point,
red-flag checks, resumable state and ``torchrun`` sharding.

Papers: Athalye, Carlini, Wagner, "Obfuscated Gradients Give a False Sense of Security" (ICML 2018: BPDA, EOT);
Carlini et al., "On Evaluating Adversarial Robustness" (arXiv 1902.06705: the red-flag checklist); Croce & Hein,
"Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free attacks" (ICML 2020:
APGD, worst case per point); Andriushchenko et al., "Square Attack" (ECCV 2020); Samangouei et al., "Defense-GAN"
(ICLR 2018); Jalal et al., "The Robust Manifold Defense" (arXiv 1712.09196: on-manifold and overpowered attacks).

Usage (any classifier, any generator, tensors)::

    defenses = [undefended_defense(clf), projection_defense("projection-fast", clf, gen, config, encoder=enc)]
    record = run_robustness(RobustnessSettings(n=100), defenses, x, y, Path("runs/rob"), generator=gen,
                            encoder=enc, latent_config=config)

The cascade (:data:`ATTACKS`, in this order; threat models :data:`DEFAULT_THREATS`):

- ``clean``: accuracy without attack (worst case over ``draws`` forward passes of a randomized defense).
- ``pgd``: the *naive* white-box PGD, using the gradient the defense exposes without adaptive effort: the model's
  own autograd gradient for a plain model; for a defense with a preprocessing step (a projection), the gradient of
  the bare classifier, i.e. the projection is ignored and the adversarial examples are transferred to the defended
  model. This is the attack under which a projection defense "looks robust".
- ``bpda-pgd``: PGD through the defended model with BPDA (forward = projection, backward = identity).
- ``bpda-eot-pgd``: the same with EOT (gradients averaged over ``eot_samples`` fresh projections per step); only for
  randomized defenses.
- ``unrolled-pgd``: PGD back-propagating through every step of the projection (``LatentProjector(gradient=
  "unrolled")``). Expensive: it runs ``unrolled_steps`` steps on the first ``unrolled_n`` points (by global index)
  that survived ``pgd``, *including* those BPDA already broke, so that BPDA and unrolled gradients are compared on
  the same points (the ``bpda-unrolled-gap`` check).
- ``apgd``: torchattacks APGD (CE loss, EOT iterations on randomized defenses) through the BPDA model.
- ``square``: torchattacks Square, black box (forward passes of the defended model only).
- ``onmanifold``: :class:`attacks.LatentAttack` on the bare classifier from ``z = invert(x)`` (pixel constraint
  ``||G(z') - G(z)||_2 <= budget``); the candidate ``G(z')`` is projected onto the threat ball around ``x``.
- ``overpowered``: :class:`attacks.OverpoweredAttack` pairs from ``z``; the pair member the classifier labels
  wrongly is projected onto the threat ball around ``x``.

Each attack runs only on the points still robust after the attacks before it (``unrolled-pgd`` as said above); a
point is robust after an attack when the defended model labels the candidate correctly in the attack's own final
pass and in every one of ``draws`` fresh forward passes (``draws = 1`` for deterministic defenses). The final
robust accuracy is the worst case per point over the cascade. Attacks that do not apply to a defense (BPDA on a
model without preprocessing, EOT on a deterministic one, latent attacks without a generator) are skipped and
marked so.

Red flags (:data:`FLAGS`) are computed per defense from the same run; see :data:`FLAGS` for each rule.

Reproducibility and scale-out: every stage splits the global (sorted) list of points it attacks into chunks of
``batch_size`` (``unrolled_batch`` for the unrolled attack); each chunk runs under its own seed, a function of the
run's seed, the stage and the chunk's first *global* point index, and randomized modules are reseeded per chunk.
Under ``torchrun`` rank ``r`` computes chunks ``r, r + W, ...`` and the results are gathered (gloo on CPU, NCCL on
CUDA), so ``W`` processes give exactly the table of one process with the same seed.

Resume: after every ``(defense, threat, attack)`` stage rank 0 writes ``DIR/state.pt`` (atomic replace), keyed by a
fingerprint of the settings, the data and the models' parameters; a later call with the same fingerprint skips
the finished stages, one with a different fingerprint is refused (never mixed). Within a stage rank 0 also saves
each chunk it finishes (and the starting latents of the latent attacks), so a long stage resumes at its first
missing chunk; chunks of other ranks are redone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from attacks import (
    LatentAttackConfig,
    Norm,
    OverpoweredConfig,
    PGDConfig,
    ThreatModel,
    TorchattacksAttack,
    per_sample_norm,
    project_onto_threat,
)
from attacks.base import check_logits, predict
from eval.defense_figures import (
    correct_in_every_draw,
    evaluate_onmanifold,
    evaluate_overpowered,
    evaluate_pgd,
    invert_latents,
)
from eval.inputs import check_labeled_images
from eval.run_folder import MARKER as RUN_MARKER
from eval.run_folder import claim_run_folder
from manifold_defense.defense import LatentProjector, ProjectedClassifier
from manifold_defense.inversion import InversionConfig
from manifold_defense.training.distributed import DistContext

__all__ = [
    "ATTACKS",
    "DEFAULT_THREATS",
    "FLAGS",
    "SCHEMA",
    "STATE_FILE",
    "Defense",
    "RobustnessSettings",
    "StateMismatchError",
    "check_monotone",
    "parse_threat",
    "projection_defense",
    "run_robustness",
    "threat_key",
    "undefended_defense",
]

SCHEMA = "manifold-defense robustness v1"
STATE_FILE = "state.pt"
#: Settings added to :class:`RobustnessSettings` after runs had been saved, with the value those runs used: a saved
#: state without one of them is read as having run at this value (so it resumes with that value, and only then).
LEGACY_SETTINGS: dict[str, Any] = {"op_temperature": 1.0}

#: The attack cascade, in the order it runs.
ATTACKS: tuple[str, ...] = (
    "clean",
    "pgd",
    "bpda-pgd",
    "bpda-eot-pgd",
    "unrolled-pgd",
    "apgd",
    "square",
    "onmanifold",
    "overpowered",
)
WHITE_BOX = ("pgd", "bpda-pgd", "bpda-eot-pgd", "unrolled-pgd", "apgd")
DEFAULT_THREATS: tuple[str, ...] = ("linf-0.3", "l2-2", "l2-4")

ATTACK_DOCS: dict[str, str] = {
    "clean": "no attack; worst case over `draws` forward passes of a randomized defense",
    "pgd": "naive white-box PGD: the model's own gradient; for a preprocessing defense the bare classifier's "
    "gradient (projection ignored), examples transferred to the defended model",
    "bpda-pgd": "PGD through the defense, BPDA (identity backward through the projection)",
    "bpda-eot-pgd": "BPDA + EOT (gradients averaged over eot_samples fresh projections); randomized defenses only",
    "unrolled-pgd": "PGD back-propagating through every projection step, on the first unrolled_n points that "
    "survived pgd (BPDA-broken ones included, for the BPDA-vs-unrolled comparison)",
    "apgd": "torchattacks APGD (CE, EOT iterations on randomized defenses) through the BPDA model",
    "square": "torchattacks Square, black box (forward passes of the defended model only)",
    "onmanifold": "LatentAttack on the bare classifier from z = invert(x); G(z') projected onto the threat ball",
    "overpowered": "OverpoweredAttack pairs from z; the wrongly labelled member projected onto the threat ball",
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
    "audit-failed": "an adversarial example outside its threat model, outside [0, 1], or with NaN values",
}


class StateMismatchError(ValueError):
    """The output folder holds another run's state (different settings, data or models)."""


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


# ----------------------------------------------------------------------------------------------- settings
def _check_int(owner: object, name: str, low: int) -> None:
    value = getattr(owner, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"expected {name} to be an int >= {low}, got {value!r}")


def _check_float(owner: object, name: str, low: float = 0.0, strict: bool = True) -> None:
    value = getattr(owner, name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= low if strict else value < low):
        raise ValueError(
            f"expected {name} to be a finite number {'>' if strict else '>='} {low}, got {value!r}"
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
    """Every setting of :func:`run_robustness` (defaults: the full protocol).

    Args:
        n: evaluation points (the first ``n`` given), >= 1.
        n_per_defense: cap on the points of named defenses (the first ``k`` of the ``n``), for expensive ones.
        threats: threat model names (:func:`parse_threat`), default ``("linf-0.3", "l2-2", "l2-4")``.
        attacks: subset of :data:`ATTACKS` (run in cascade order); ``"clean"`` always runs.
        seed: seed of every random choice (chunk seeds derive from it).
        batch_size: points per chunk (attack call).
        draws: fresh forward passes of a randomized defense per verdict (worst case); deterministic: 1.
        pgd_steps, pgd_restarts: ``pgd`` (step ``2.5 eps / steps``, random start).
        bpda_steps: ``bpda-pgd`` and ``bpda-eot-pgd`` steps; eot_samples: EOT passes per step.
        unrolled_steps, unrolled_n, unrolled_batch: the unrolled attack's steps, points and chunk size.
        apgd_steps: APGD iterations (one restart).
        square_queries: Square queries per point (one restart, p_init 0.8).
        latent_steps, latent_step_size: on-manifold attack (Adam on z, pixel constraint).
        op_steps, op_step_size, op_multiplier_init: overpowered attack.
        op_temperature: the overpowered attack maximizes the divergence of ``logits / op_temperature`` (default
            10; :class:`attacks.OverpoweredConfig`): at 1, the paper's loss, the attack stalls between points
            that a confident classifier labels alike (on the zoo's standard classifier at l2 1.5: OP accuracy
            0.34 at temperature 1, 0.13 at 10, 200 points). Runs saved before this setting existed ran at 1
            (:data:`LEGACY_SETTINGS`).
        latent_linf_budget: l2 budget of the latent attacks under a Linf threat (under l2: the threat's eps).
        curve_eps_linf, curve_eps_l2: budgets of the accuracy-vs-eps curves (for the norms among ``threats``);
            a Linf budget >= 1 or an l2 budget >= sqrt(d) is "unbounded".
        curve_steps: steps of the curve attack (BPDA PGD for preprocessing defenses, else PGD; EOT
            ``curve_eot`` passes on randomized defenses).
        grad_check_n: points (the first, by index) at which input gradients are checked.
        grid_examples: broken points shown per (defense, threat) grid.
        unbounded_tol, monotone_tol, blackbox_tol, gap_tol, zero_grad_tol: red-flag thresholds (:data:`FLAGS`).
        quick: a reduced smoke run (recorded in the outputs).
    """

    n: int = 200
    n_per_defense: Mapping[str, int] = field(default_factory=lambda: {"projection-defense-gan": 50})
    threats: tuple[str, ...] = DEFAULT_THREATS
    attacks: tuple[str, ...] = ATTACKS
    seed: int = 0
    batch_size: int = 50
    draws: int = 3
    pgd_steps: int = 40
    pgd_restarts: int = 1
    bpda_steps: int = 40
    eot_samples: int = 4
    unrolled_steps: int = 10
    unrolled_n: int = 20
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
        for name in ("unrolled_steps", "unrolled_n", "unrolled_batch", "apgd_steps", "square_queries"):
            _check_int(self, name, 1)
        for name in ("seed", "latent_steps", "op_steps", "curve_steps", "grad_check_n", "grid_examples"):
            _check_int(self, name, 0)
        _check_int(self, "curve_eot", 1)
        for name in (
            "latent_step_size",
            "op_step_size",
            "op_multiplier_init",
            "op_temperature",
            "latent_linf_budget",
        ):
            _check_float(self, name)
        for name in ("unbounded_tol", "monotone_tol", "blackbox_tol", "gap_tol", "zero_grad_tol"):
            _check_float(self, name, 0.0, strict=False)
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
                out[f.name] = {"this_run": _jsonable(mine), "full": _jsonable(theirs)}
        return out

    def to_json(self) -> dict[str, Any]:
        """The settings as plain JSON values."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if hasattr(value, "value") and isinstance(getattr(value, "value", None), str):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return repr(value)


# ------------------------------------------------------------------------------------------------ defenses
@dataclass
class Defense:
    """One evaluated model and the differentiable variants the adaptive attacks need.

    Args:
        name: shown in the report and the JSON.
        model: the defended model as given, ``(B, C, H, W)`` in [0, 1] -> ``(B, K)`` logits, eval mode; every
            verdict uses its forward pass. Without ``classifier``, ``pgd`` uses its autograd gradient.
        classifier: the bare classifier behind a preprocessing step (``pgd`` takes its gradient, the latent
            attacks attack it); ``None``: the model is not preprocessed (``model`` plays this role).
        preprocess: the preprocessing module itself (images -> images), used to show projected adversarial
            examples; ``None`` for a plain model.
        bpda_model: same forward as ``model`` with an identity (BPDA) backward through the preprocessing;
            enables ``bpda-pgd``, ``bpda-eot-pgd`` and routes ``apgd`` through it.
        unrolled_model: same forward with the exact gradient through the preprocessing; enables
            ``unrolled-pgd``.
        randomized: whether the forward pass is random; ``None`` (default): detected by two forward passes.
    """

    name: str
    model: nn.Module
    classifier: nn.Module | None = None
    preprocess: nn.Module | None = None
    bpda_model: nn.Module | None = None
    unrolled_model: nn.Module | None = None
    randomized: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or "|" in self.name:
            raise ValueError(f"expected a non-empty defense name without '|', got {self.name!r}")
        for attr in ("model", "classifier", "preprocess", "bpda_model", "unrolled_model"):
            value = getattr(self, attr)
            if value is not None and not isinstance(value, nn.Module):
                raise TypeError(
                    f"expected {attr} of defense {self.name!r} as an nn.Module, got {type(value).__name__}"
                )
        if self.model is None:
            raise TypeError(f"expected the model of defense {self.name!r} as an nn.Module, got None")

    def modules(self) -> list[nn.Module]:
        """The distinct modules of the defense."""
        found: list[nn.Module] = []
        for m in (self.model, self.classifier, self.preprocess, self.bpda_model, self.unrolled_model):
            if m is not None and all(m is not f for f in found):
                found.append(m)
        return found


def undefended_defense(classifier: nn.Module, name: str = "undefended") -> Defense:
    """The bare classifier as a :class:`Defense` (no preprocessing: BPDA and unrolled attacks are skipped)."""
    return Defense(name=name, model=classifier.eval())


def projection_defense(
    name: str,
    classifier: nn.Module,
    generator: nn.Module,
    config: InversionConfig,
    *,
    encoder: nn.Module | None = None,
    randomized: bool = True,
    seed: int = 0,
) -> Defense:
    """The projection defense ``classifier(G(z*(x)))`` (Defense-GAN) with its BPDA and unrolled variants.

    Args:
        name: e.g. ``"projection-fast"``.
        classifier: [0, 1] images -> logits; generator: ``nn.Module`` with int ``latent_dim``.
        config: projection schedule (e.g. :func:`eval.defense_figures.schedule_config`).
        encoder: needed when ``config.init == "encoder"``.
        randomized: fresh restart noise on every call (Defense-GAN's random restarts; the honest setting);
            ``False``: a deterministic function of the input.
        seed: seed of the restart noise.
    """
    enc = encoder if config.init == "encoder" else None

    def projector(gradient: str) -> LatentProjector:
        return LatentProjector(generator, config, gradient, encoder=enc, seed=seed, randomize=randomized)  # type: ignore[arg-type]

    bpda = ProjectedClassifier(classifier, projector("bpda")).eval()
    unrolled = ProjectedClassifier(classifier, projector("unrolled")).eval()
    shown = LatentProjector(generator, config, "bpda", encoder=enc, seed=seed, randomize=False).eval()
    return Defense(
        name=name,
        model=bpda,
        classifier=classifier.eval(),
        preprocess=shown,
        bpda_model=bpda,
        unrolled_model=unrolled,
        randomized=randomized,
    )


# ------------------------------------------------------------------------------------------- fingerprint
def _hash_tensor(h: Any, t: Tensor) -> None:
    h.update(str(tuple(t.shape)).encode())
    h.update(t.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())


def fingerprint(
    settings: RobustnessSettings, defenses: Sequence[Defense], x: Tensor, y: Tensor, extra: Any
) -> dict[str, Any]:
    """What identifies a run: settings, data hash, each defense's name and parameter hash, extra settings."""
    h = hashlib.sha256()
    _hash_tensor(h, x)
    _hash_tensor(h, y)
    models = {}
    for d in defenses:
        hm = hashlib.sha256()
        for m in d.modules():
            for p in list(m.parameters()) + list(m.buffers()):
                _hash_tensor(hm, p)
            hm.update(m.extra_repr().encode())
        models[d.name] = hm.hexdigest()[:16]
    return {
        "schema": SCHEMA,
        "settings": settings.to_json(),
        "data": h.hexdigest()[:16],
        "defenses": models,
        "extra": _jsonable(extra),
    }


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: saved {a!r}, now {b!r}"]


# ------------------------------------------------------------------------------------------------ runner
def _chunk_seed(seed: int, stage: str, first: int) -> int:
    return zlib.crc32(f"{seed}|{stage}|{first}".encode()) + seed


@contextmanager
def _seeded(seed: int, defense: Defense, device: torch.device) -> Iterator[None]:
    """Fork the global RNG at ``seed`` and reseed the randomized modules of the defense."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for root in defense.modules():
            for m in root.modules():
                reseed = getattr(m, "reseed", None)
                if callable(reseed) and getattr(m, "randomize", True):
                    reseed(seed)
        yield


class _Stage:
    """Per-point results of one stage, in global point order."""

    def __init__(self, parts: dict[str, Tensor]) -> None:
        self.parts = parts


class _Runner:
    def __init__(
        self,
        settings: RobustnessSettings,
        defenses: Sequence[Defense],
        x: Tensor,
        y: Tensor,
        out: Path,
        ctx: DistContext,
        generator: nn.Module | None,
        encoder: nn.Module | None,
        latent_config: InversionConfig | None,
        state: dict[str, Any],
        progress: bool,
        on_stage: Callable[[str], None] | None,
    ) -> None:
        self.s = settings
        self.defenses = list(defenses)
        self.x, self.y = x, y
        self.out = out
        self.ctx = ctx
        self.generator, self.encoder, self.latent_config = generator, encoder, latent_config
        self.state = state
        self.on_stage = on_stage
        # Latents of the points, kept in the state so that a resumed run reuses the very latents the
        # interrupted one computed (a later stage would otherwise invert them in another batch composition).
        self.latents: dict[int, Tensor] = state.setdefault("latents", {})
        # Results of the finished chunks of the stage in progress (``{key: {chunk: {...}}}``), saved after
        # every chunk: a long stage (the Defense-GAN schedule on a CPU) resumes at its first missing chunk.
        state.setdefault("partial", {})
        self.bar = tqdm(total=self._count_stages(), disable=not (progress and ctx.is_main), unit="stage")
        self.bar.update(sum(1 for k in state["stages"] if not k.endswith("|info")))

    def _count_stages(self) -> int:
        per_threat = len(self.s.attacks) - 1
        curves = sum(len(self._curve_eps(n)) for n in self._curve_norms())
        return len(self.defenses) * (1 + len(self.s.threats) * per_threat + curves + len(self.s.threats))

    def _curve_norms(self) -> list[str]:
        return sorted({parse_threat(t).norm.value for t in self.s.threats}, key=lambda v: v != "linf")

    def _curve_eps(self, norm: str) -> tuple[float, ...]:
        return self.s.curve_eps_linf if norm == "linf" else self.s.curve_eps_l2

    # ---------------------------------------------------------------------------------------- plumbing
    def _save(self) -> None:
        if self.ctx.is_main:
            tmp = self.out / (STATE_FILE + ".tmp")
            torch.save(self.state, tmp)
            os.replace(tmp, self.out / STATE_FILE)

    def _finish(self, key: str, record: dict[str, Any]) -> None:
        self.state["stages"][key] = record
        self.state["partial"].pop(key, None)
        self._save()
        self.bar.update(1)
        if self.on_stage is not None:
            self.on_stage(key)

    def _run_chunks(
        self,
        key: str,
        defense: Defense,
        indices: Tensor,
        size: int,
        fn: Callable[[Tensor], dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        """Split ``indices`` into chunks of ``size``, run this rank's share under per-chunk seeds, gather.

        A chunk finished by an interrupted run (saved in ``state["partial"]`` with the same point indices) is
        reused instead of recomputed; every chunk runs under its own seed, so reuse changes no other chunk.
        Rank 0 saves its chunks after each one; under ``torchrun`` other ranks' unfinished stages are redone.
        """
        chunks = [indices[i : i + size] for i in range(0, len(indices), size)]
        saved: dict[int, dict[str, Any]] = self.state["partial"].setdefault(key, {})
        mine: list[tuple[int, dict[str, Tensor]]] = []
        for j, chunk in enumerate(chunks):
            if j % self.ctx.world_size != self.ctx.rank:
                continue
            self.bar.set_postfix_str(f"{key} chunk {j + 1}/{len(chunks)}")
            done = saved.get(j)
            if done is not None and torch.equal(done["indices"], chunk.cpu()):
                mine.append((j, done["result"]))
                continue
            with _seeded(_chunk_seed(self.s.seed, key, int(chunk[0])), defense, self.x.device):
                result = fn(chunk)
            mine.append((j, {k: v.detach().cpu() for k, v in result.items()}))
            if len(chunks) > 1:
                saved[j] = {"indices": chunk.cpu(), "result": mine[-1][1]}
                self._save()
        if self.ctx.distributed:
            import torch.distributed as dist

            gathered: list[Any] = [None] * self.ctx.world_size
            dist.all_gather_object(gathered, mine)
            mine = [item for part in gathered for item in part]
        mine.sort(key=lambda item: item[0])
        if not mine:
            return {}
        return {k: torch.cat([r[k] for _, r in mine]) for k in mine[0][1]}

    def _verdict(
        self, d: Defense, draws: int, x_adv: Tensor, y: Tensor, base_ok: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``(robust, first_ok)``: correct in the attack's pass and every draw; and in the first draw only."""
        name = f"model of defense {d.name!r}"
        oks = [
            correct_in_every_draw(d.model, x_adv, y, 1, max(1, x_adv.shape[0]), name=name)
            for _ in range(draws)
        ]
        first = base_ok.cpu() & oks[0]
        robust = first.clone()
        for ok in oks[1:]:
            robust &= ok
        return robust, first

    # ------------------------------------------------------------------------------------------ defense
    def run(self) -> None:
        for d in self.defenses:
            n_d = min(self.s.n, self.s.n_per_defense.get(d.name, self.s.n))
            info = self._info(d, n_d)
            draws = self.s.draws if info["randomized"] else 1
            clean = self._clean(d, n_d, draws)
            for t in self.s.threats:
                self._cascade(d, n_d, draws, parse_threat(t), clean)
            for norm in self._curve_norms():
                for eps in self._curve_eps(norm):
                    self._curve(d, draws, ThreatModel(Norm(norm), eps), clean)
            for t in self.s.threats:
                self._examples(d, parse_threat(t))
        self.bar.close()

    def _info(self, d: Defense, n_d: int) -> dict[str, Any]:
        key = f"{d.name}|info"
        if key in self.state["stages"]:
            return dict(self.state["stages"][key])
        x, y = self.x[: min(2, n_d)], self.y[: min(2, n_d)]
        with torch.no_grad(), _seeded(self.s.seed, d, x.device):
            out1 = d.model(x)
            check_logits(out1, x.shape[0], y, f"model of defense {d.name!r}")
            out2 = d.model(x)
        if d.classifier is not None:
            with torch.no_grad():
                c = d.classifier(x)
            check_logits(c, x.shape[0], y, f"classifier of defense {d.name!r}")
            if c.shape != out1.shape:
                raise ValueError(
                    f"expected the classifier of defense {d.name!r} to return logits like its model "
                    f"{tuple(out1.shape)}, got {tuple(c.shape)}"
                )
        labels = self.y[:n_d]
        if int(labels.max()) >= out1.shape[1]:
            raise ValueError(
                f"expected the model of defense {d.name!r} to return logits for every label: labels in "
                f"[0, {out1.shape[1]}) (its output size), got labels up to {int(labels.max())}"
            )
        randomized = d.randomized if d.randomized is not None else not torch.equal(out1, out2)
        grads = self._gradient_check(d, min(self.s.grad_check_n, n_d))
        info = {
            "n": n_d,
            "randomized": bool(randomized),
            "detected_random": not torch.equal(out1, out2),
            "gradients": grads,
        }
        self.state["stages"][key] = info
        self._save()
        return info

    def _gradient_sources(self, d: Defense) -> dict[str, nn.Module]:
        sources: dict[str, nn.Module] = {}
        attacks = self.s.attacks
        if "pgd" in attacks:
            sources["pgd"] = d.classifier if d.classifier is not None else d.model
        if d.bpda_model is not None and ({"bpda-pgd", "bpda-eot-pgd", "apgd"} & set(attacks)):
            sources["bpda"] = d.bpda_model
        if d.unrolled_model is not None and "unrolled-pgd" in attacks:
            sources["unrolled"] = d.unrolled_model
        return sources

    def _gradient_check(self, d: Defense, k: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if k == 0:
            return out
        x, y = self.x[:k], self.y[:k]
        for name, module in self._gradient_sources(d).items():
            with _seeded(self.s.seed, d, x.device):
                x_req = x.detach().clone().requires_grad_(True)
                with torch.enable_grad():
                    loss = nn.functional.cross_entropy(module(x_req), y, reduction="sum")
                    grads = torch.autograd.grad(loss, x_req, allow_unused=True)[0]
            g = torch.zeros_like(x) if grads is None else grads.detach()
            flat = g.reshape(k, -1)
            out[name] = {
                "points": k,
                "nan_or_inf": int((~torch.isfinite(flat)).sum()),
                "zero_fraction": round(float((flat == 0).all(dim=1).float().mean()), 4),
                "norm_median": round(float(torch.nan_to_num(flat).norm(dim=1).median()), 6),
            }
        return out

    def _clean(self, d: Defense, n_d: int, draws: int) -> Tensor:
        key = f"{d.name}|clean"
        if key not in self.state["stages"]:
            start = time.perf_counter()
            idx = torch.arange(n_d)

            def fn(chunk: Tensor) -> dict[str, Tensor]:
                xb, yb = self.x[chunk], self.y[chunk]
                robust, first = self._verdict(d, draws, xb, yb, torch.ones(len(chunk), dtype=torch.bool))
                return {"robust": robust, "first_ok": first}

            parts = self._run_chunks(key, d, idx, self.s.batch_size, fn)
            self._finish(
                key, {"status": "ran", "indices": idx, **parts, "seconds": time.perf_counter() - start}
            )
        return self.state["stages"][key]["robust"].clone()

    # ------------------------------------------------------------------------------------------ cascade
    def _skip_reason(self, d: Defense, attack: str, randomized: bool) -> str | None:
        if attack in ("bpda-pgd", "bpda-eot-pgd") and d.bpda_model is None:
            return "no preprocessing: BPDA equals the plain gradient (pgd)"
        if attack == "bpda-eot-pgd" and not randomized:
            return "deterministic defense: EOT equals bpda-pgd"
        if attack == "unrolled-pgd" and d.unrolled_model is None:
            return "no preprocessing to unroll"
        if attack in ("onmanifold", "overpowered") and self.generator is None:
            return "no generator given"
        return None

    def _cascade(self, d: Defense, n_d: int, draws: int, threat: ThreatModel, clean: Tensor) -> None:
        tk = threat_key(threat)
        robust = clean.clone()
        randomized = draws > 1 or bool(self.state["stages"][f"{d.name}|info"]["randomized"])
        after_pgd = robust.clone()
        for attack in self.s.attacks[1:]:
            key = f"{d.name}|{tk}|{attack}"
            if key not in self.state["stages"]:
                reason = self._skip_reason(d, attack, randomized)
                if reason is not None:
                    self._finish(key, {"status": "skipped", "reason": reason})
                else:
                    if attack == "unrolled-pgd":
                        idx = after_pgd.nonzero().squeeze(1)[: self.s.unrolled_n]
                    else:
                        idx = robust.nonzero().squeeze(1)
                    self._attack(key, d, draws, threat, attack, idx, randomized)
            rec = self.state["stages"][key]
            if rec["status"] == "ran" and len(rec["indices"]):
                robust[rec["indices"]] &= rec["robust"]
            if attack == "pgd":
                after_pgd = robust.clone()

    def _attack(
        self,
        key: str,
        d: Defense,
        draws: int,
        threat: ThreatModel,
        attack: str,
        idx: Tensor,
        randomized: bool,
    ) -> None:
        s = self.s
        start = time.perf_counter()
        size = s.unrolled_batch if attack == "unrolled-pgd" else s.batch_size
        settings: dict[str, Any] = {}
        extra_stats: dict[str, Any] = {}

        def pgd_fn(
            model: nn.Module, config: PGDConfig, eval_model: nn.Module | None
        ) -> Callable[[Tensor], dict[str, Tensor]]:
            def fn(chunk: Tensor) -> dict[str, Tensor]:
                xb, yb = self.x[chunk], self.y[chunk]
                seed = torch.initial_seed() % (2**62)
                cfg = dataclasses.replace(config, seed=int(seed))
                res = evaluate_pgd(
                    model, xb, yb, threat, cfg, eval_model=eval_model, draws=1, batch_size=len(chunk)
                )
                return self._package(d, draws, xb, yb, res.x_adv.to(xb.device), res.robust, threat)

            return fn

        def adapter_fn(
            name: str, model: nn.Module, kwargs: dict[str, Any]
        ) -> Callable[[Tensor], dict[str, Tensor]]:
            def fn(chunk: Tensor) -> dict[str, Tensor]:
                xb, yb = self.x[chunk], self.y[chunk]
                seed = int(torch.initial_seed() % (2**31))
                # (torchattacks' APGD / Square also reseed torch with their own `seed` argument, default 0)
                res = TorchattacksAttack(name, threat, seed=seed, **kwargs)(model, xb, yb)
                return self._package(d, draws, xb, yb, res.x_adv, ~res.success, threat)

            return fn

        budget = threat.eps if threat.norm is Norm.L2 else s.latent_linf_budget

        def latent_fn(kind: str) -> Callable[[Tensor], dict[str, Tensor]]:
            clf = d.classifier if d.classifier is not None else d.model
            gen = self.generator
            assert gen is not None

            def fn(chunk: Tensor) -> dict[str, Tensor]:
                xb, yb = self.x[chunk], self.y[chunk]
                z = self._latents_for(chunk)
                if kind == "onmanifold":
                    cfg = LatentAttackConfig(
                        eps=budget, constraint="pixel", steps=s.latent_steps, step_size=s.latent_step_size
                    )
                    res = evaluate_onmanifold(clf, gen, z, yb, cfg, batch_size=len(chunk))
                    cand = res.x_adv.to(xb.device)
                    found = res.success
                else:
                    seed = int(torch.initial_seed() % (2**62))
                    ocfg = OverpoweredConfig(
                        eps=budget,
                        steps=s.op_steps,
                        step_size=s.op_step_size,
                        multiplier_init=s.op_multiplier_init,
                        temperature=s.op_temperature,
                        seed=seed,
                    )
                    op = evaluate_overpowered(clf, gen, z, yb, ocfg, batch_size=len(chunk))
                    wrong1 = (op.pred1 != yb.cpu())[:, None, None, None]
                    cand = torch.where(wrong1, op.x1, op.x2).to(xb.device)
                    found = op.success
                x_adv = project_onto_threat(cand.to(xb.dtype), xb, threat)
                out = self._package(d, draws, xb, yb, x_adv, torch.ones(len(chunk), dtype=torch.bool), threat)
                out["found"] = found.cpu()
                return out

            return fn

        l2_or_linf = "l2" if threat.norm is Norm.L2 else "linf"
        if attack == "pgd":
            cfg = PGDConfig(steps=s.pgd_steps, restarts=s.pgd_restarts, random_start=True)
            grad_model = d.classifier if d.classifier is not None else d.model
            fn = pgd_fn(grad_model, cfg, d.model if d.classifier is not None else None)
            settings = {
                "steps": s.pgd_steps,
                "restarts": s.pgd_restarts,
                "step_size": f"2.5 eps / {s.pgd_steps}",
                "gradient": "bare classifier (transfer)" if d.classifier is not None else "model autograd",
            }
        elif attack in ("bpda-pgd", "bpda-eot-pgd"):
            eot = s.eot_samples if attack == "bpda-eot-pgd" else 1
            cfg = PGDConfig(steps=s.bpda_steps, random_start=True, eot_samples=eot)
            assert d.bpda_model is not None
            fn = pgd_fn(d.bpda_model, cfg, None)
            settings = {"steps": s.bpda_steps, "eot_samples": eot, "step_size": f"2.5 eps / {s.bpda_steps}"}
        elif attack == "unrolled-pgd":
            cfg = PGDConfig(steps=s.unrolled_steps, random_start=True)
            assert d.unrolled_model is not None
            fn = pgd_fn(d.unrolled_model, cfg, None)
            settings = {
                "steps": s.unrolled_steps,
                "points": s.unrolled_n,
                "step_size": f"2.5 eps / {s.unrolled_steps}",
            }
        elif attack == "apgd":
            model = d.bpda_model if d.bpda_model is not None else d.model
            kwargs = {
                "steps": s.apgd_steps,
                "n_restarts": 1,
                "loss": "ce",
                "eot_iter": s.eot_samples if randomized else 1,
            }
            fn = adapter_fn("APGD", model, kwargs)
            settings = {
                **kwargs,
                "through": "BPDA model" if d.bpda_model is not None else "model",
                "norm": l2_or_linf,
            }
        elif attack == "square":
            kwargs = {"n_queries": s.square_queries, "n_restarts": 1, "p_init": 0.8}
            fn = adapter_fn("Square", d.model, kwargs)
            settings = {**kwargs, "norm": l2_or_linf}
        else:
            fn = latent_fn(attack)
            settings = {
                "budget_l2": budget,
                "steps": s.latent_steps if attack == "onmanifold" else s.op_steps,
                "step_size": s.latent_step_size if attack == "onmanifold" else s.op_step_size,
                "candidate": "projected onto the threat ball around x",
            }
            if attack == "overpowered":
                settings["multiplier_init"] = s.op_multiplier_init

        parts = self._run_chunks(key, d, idx, size, fn) if len(idx) else {}
        record = self._stage_record(idx, parts, start)
        record["settings"] = settings
        if "found" in parts:
            extra_stats["candidates_found"] = int(parts["found"].sum())
        record["extra"] = extra_stats
        self._finish(key, record)

    def _package(
        self,
        d: Defense,
        draws: int,
        xb: Tensor,
        yb: Tensor,
        x_adv: Tensor,
        base_ok: Tensor,
        threat: ThreatModel,
    ) -> dict[str, Tensor]:
        robust, first = self._verdict(d, draws, x_adv, yb, base_ok)
        dist_ = per_sample_norm((x_adv - xb).double(), threat.norm).float()
        return {"robust": robust, "first_ok": first, "x_adv": x_adv, "distance": dist_}

    def _stage_record(self, idx: Tensor, parts: dict[str, Tensor], start: float) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "status": "ran",
            "indices": idx.clone(),
            "seconds": time.perf_counter() - start,
        }
        if not parts:
            rec.update(robust=torch.zeros(0, dtype=torch.bool), first_ok=torch.zeros(0, dtype=torch.bool))
            rec["audit"] = {"max_distance": 0.0, "nan": 0, "min": None, "max": None}
            return rec
        x_adv = parts["x_adv"]
        broken = ~parts["robust"]
        rec["robust"] = parts["robust"]
        rec["first_ok"] = parts["first_ok"]
        rec["broken_x_adv"] = x_adv[broken].clone()
        finite = x_adv[torch.isfinite(x_adv)]
        rec["audit"] = {
            "max_distance": float(torch.nan_to_num(parts["distance"], nan=float("inf")).max()),
            "nan": int(torch.isnan(x_adv).sum()),
            "min": float(finite.min()) if finite.numel() else None,
            "max": float(finite.max()) if finite.numel() else None,
        }
        return rec

    def _latents_for(self, chunk: Tensor) -> Tensor:
        missing = [int(i) for i in chunk if int(i) not in self.latents]
        if missing:
            assert self.generator is not None
            cfg = (
                self.latent_config
                if self.latent_config is not None
                else InversionConfig.defense_gan(seed=self.s.seed)
            )
            enc = self.encoder if cfg.init == "encoder" else None
            z, _ = invert_latents(self.generator, self.x[missing], cfg, encoder=enc, batch_size=len(missing))
            for i, zi in zip(missing, z, strict=True):
                self.latents[i] = zi.detach()
        return torch.stack([self.latents[int(i)] for i in chunk])

    # ------------------------------------------------------------------------------------- curves etc.
    def _curve(self, d: Defense, draws: int, threat: ThreatModel, clean: Tensor) -> None:
        key = f"{d.name}|curve|{threat_key(threat)}"
        if key in self.state["stages"]:
            return
        start = time.perf_counter()
        randomized = draws > 1
        model = d.bpda_model if d.bpda_model is not None else d.model
        eot = self.s.curve_eot if randomized else 1
        cfg = PGDConfig(steps=self.s.curve_steps, random_start=True, eot_samples=eot)
        idx = clean.nonzero().squeeze(1)

        def fn(chunk: Tensor) -> dict[str, Tensor]:
            xb, yb = self.x[chunk], self.y[chunk]
            c = dataclasses.replace(cfg, seed=int(torch.initial_seed() % (2**62)))
            res = evaluate_pgd(model, xb, yb, threat, c, draws=1, batch_size=len(chunk))
            return self._package(d, draws, xb, yb, res.x_adv.to(xb.device), res.robust, threat)

        parts = self._run_chunks(key, d, idx, self.s.batch_size, fn) if len(idx) else {}
        rec = self._stage_record(idx, parts, start)
        rec.pop("broken_x_adv", None)
        rec["settings"] = {
            "attack": "bpda-pgd" if d.bpda_model is not None else "pgd",
            "steps": self.s.curve_steps,
            "eot_samples": eot,
        }
        self._finish(key, rec)

    def _examples(self, d: Defense, threat: ThreatModel) -> None:
        key = f"{d.name}|{threat_key(threat)}|examples"
        if key in self.state["stages"]:
            return
        shown_idx: list[int] = []
        shown_adv: list[Tensor] = []
        shown_by: list[str] = []
        for attack in self.s.attacks[1:]:
            rec = self.state["stages"][f"{d.name}|{threat_key(threat)}|{attack}"]
            if rec["status"] != "ran" or "broken_x_adv" not in rec:
                continue
            broken = rec["indices"][~rec["robust"]]
            for i, xa in zip(broken.tolist(), rec["broken_x_adv"], strict=True):
                if i not in shown_idx and len(shown_idx) < self.s.grid_examples:
                    shown_idx.append(i)
                    shown_adv.append(xa)
                    shown_by.append(attack)
        record: dict[str, Any] = {
            "status": "ran",
            "indices": torch.tensor(shown_idx, dtype=torch.long),
            "attacks": shown_by,
            "labels": self.y[shown_idx].cpu() if shown_idx else torch.zeros(0, dtype=torch.long),
        }
        if shown_idx:
            x_adv = torch.stack(shown_adv)
            record["clean"] = self.x[shown_idx].cpu()
            record["x_adv"] = x_adv
            with torch.no_grad():
                adv_dev = x_adv.to(self.x.device)
                where = "on the example images"
                record["pred"] = predict(d.model, adv_dev, f"model of defense {d.name!r}", where).cpu()
                if d.preprocess is not None:
                    with _seeded(self.s.seed, d, self.x.device):
                        record["projected"] = d.preprocess(adv_dev).cpu()
        self._finish(key, record)


# ----------------------------------------------------------------------------------------------- results
def _defense_record(settings: RobustnessSettings, stages: Mapping[str, Any], name: str) -> dict[str, Any]:
    info = stages[f"{name}|info"]
    n_d = int(info["n"])
    clean_rec = stages[f"{name}|clean"]
    clean_mask = clean_rec["robust"]
    clean_acc = float(clean_mask.float().mean())
    attacks: dict[str, dict[str, Any]] = {"clean": {}}
    worst: dict[str, float] = {}
    audit: dict[str, Any] = {}
    checks: list[dict[str, Any]] = []
    examples: dict[str, Any] = {}
    flips_total = int((clean_rec["first_ok"] & ~clean_rec["robust"]).sum())
    broken_by: dict[str, dict[str, int]] = {}
    for tk in settings.threats:
        threat = parse_threat(tk)
        robust = clean_mask.clone()
        attacks["clean"][tk] = {
            "status": "ran",
            "accuracy": round(clean_acc, 4),
            "attacked": n_d,
            "broken": int((~clean_mask).sum()),
        }
        max_d, nan, lo, hi = 0.0, 0, math.inf, -math.inf
        white_robust: Tensor | None = None
        after_pgd = clean_mask.clone()
        broken_by[tk] = {}
        for attack in settings.attacks[1:]:
            if attack == "square":
                white_robust = robust.clone()
            rec = stages[f"{name}|{tk}|{attack}"]
            entry: dict[str, Any] = {"status": rec["status"]}
            if rec["status"] == "skipped":
                entry["reason"] = rec["reason"]
            else:
                idx = rec["indices"]
                before = robust.clone()
                if len(idx):
                    robust[idx] &= rec["robust"]
                newly = int((before & ~robust).sum())
                a = rec["audit"]
                max_d = max(max_d, a["max_distance"])
                nan += a["nan"]
                lo = min(lo, a["min"]) if a["min"] is not None else lo
                hi = max(hi, a["max"]) if a["max"] is not None else hi
                flips_total += int((rec["first_ok"] & ~rec["robust"]).sum())
                entry.update(
                    accuracy=round(float(robust.float().mean()), 4),
                    attacked=len(idx),
                    broken=newly,
                    broken_alone=int((~rec["robust"]).sum()),
                    seconds=round(rec["seconds"], 2),
                    settings=_jsonable(rec.get("settings", {})),
                    **_jsonable(rec.get("extra", {})),
                )
                broken_by[tk][attack] = newly
                if attack == "unrolled-pgd" and len(idx):
                    entry["compare"] = _gap(stages, name, tk, idx, rec["robust"], after_pgd)
            if attack == "pgd":
                after_pgd = robust.clone()
            attacks.setdefault(attack, {})[tk] = entry
        worst[tk] = round(float(robust.float().mean()), 4)
        audit[tk] = {
            "norm": threat.norm.value,
            "eps": threat.eps,
            "max_perturbation": round(max_d, 6),
            "nan_count": nan,
            "value_range": [
                None if lo == math.inf else round(lo, 6),
                None if hi == -math.inf else round(hi, 6),
            ],
        }
        ok_audit = (
            max_d <= threat.eps * (1 + 1e-4) + 1e-6
            and nan == 0
            and (lo == math.inf or (lo >= -1e-6 and hi <= 1 + 1e-6))
        )
        checks.append(
            _check(
                "audit-failed",
                not ok_audit,
                tk,
                f"max {threat.norm.value} perturbation {max_d:.6g} (eps {threat.eps:g}), NaN {nan}, range [{lo:.4g}, {hi:.4g}]"
                if lo != math.inf
                else f"no adversarial examples; max perturbation {max_d:.4g}",
            )
        )
        # black box vs white box
        sq = stages[f"{name}|{tk}|square"] if "square" in settings.attacks else None
        if sq is None or sq["status"] != "ran" or white_robust is None:
            checks.append(_check("black-box-stronger", None, tk, "square not run"))
        else:
            extra_broken = broken_by[tk].get("square", 0)
            fired = extra_broken > settings.blackbox_tol * n_d
            checks.append(
                _check(
                    "black-box-stronger",
                    fired,
                    tk,
                    f"square newly broke {extra_broken} of {n_d} points the white-box attacks left robust (tolerance {settings.blackbox_tol:g} n)",
                )
            )
        # BPDA vs unrolled
        cmp_ = attacks.get("unrolled-pgd", {}).get(tk, {}).get("compare")
        if cmp_ is None:
            checks.append(
                _check(
                    "bpda-unrolled-gap", None, tk, "no BPDA / unrolled comparison (not run or not applicable)"
                )
            )
        else:
            gap_points = abs(cmp_["bpda_accuracy"] - cmp_["unrolled_accuracy"]) * cmp_["points"]
            fired = gap_points > max(1.0, settings.gap_tol * cmp_["points"]) + 1e-6
            checks.append(
                _check(
                    "bpda-unrolled-gap",
                    fired,
                    tk,
                    f"on {cmp_['points']} points: BPDA accuracy {cmp_['bpda_accuracy']:.4g}, unrolled {cmp_['unrolled_accuracy']:.4g} (tolerance max(1 point, {settings.gap_tol:g} of the points))",
                )
            )
        rec_ex = stages.get(f"{name}|{tk}|examples")
        if rec_ex is not None:
            examples[tk] = {
                "indices": rec_ex["indices"].tolist(),
                "attacks": rec_ex["attacks"],
                "labels": rec_ex["labels"].tolist(),
            }
    # curves
    curves: dict[str, Any] = {}
    for norm in ("linf", "l2"):
        eps_list = settings.curve_eps_linf if norm == "linf" else settings.curve_eps_l2
        keys = [f"{name}|curve|{norm}-{e:g}" for e in eps_list]
        if not all(k in stages for k in keys):
            continue
        accs = []
        for k in keys:
            rec = stages[k]
            mask = clean_mask.clone()
            if len(rec["indices"]):
                mask[rec["indices"]] &= rec["robust"]
            accs.append(round(float(mask.float().mean()), 4))
        curves[norm] = {
            "attack": stages[keys[0]]["settings"]["attack"],
            "eps": [0.0, *eps_list],
            "accuracy": [round(clean_acc, 4), *accs],
            "settings": _jsonable(stages[keys[0]]["settings"]),
        }
        dim = int(info.get("dim", 0)) or None
        unbounded = [
            (e, a)
            for e, a in zip(eps_list, accs, strict=True)
            if (e >= 1.0 if norm == "linf" else (dim is not None and e >= math.sqrt(dim)))
        ]
        if unbounded:
            e, a = unbounded[-1]
            checks.append(
                _check(
                    "unbounded-eps-not-zero",
                    a > settings.unbounded_tol,
                    norm,
                    f"accuracy {a:.4g} at {norm} eps {e:g} under {curves[norm]['attack']} (tolerance {settings.unbounded_tol:g})",
                )
            )
        else:
            checks.append(
                _check("unbounded-eps-not-zero", None, norm, f"no unbounded budget on the {norm} curve")
            )
        bad = check_monotone(curves[norm]["eps"], curves[norm]["accuracy"], n_d, settings.monotone_tol)
        checks.append(
            _check(
                "non-monotone-in-eps",
                bool(bad),
                norm,
                "; ".join(bad) if bad else f"{norm} curve non-increasing",
            )
        )
    l2 = sorted((parse_threat(t).eps, worst[t]) for t in settings.threats if t.startswith("l2-"))
    bad = (
        check_monotone([e for e, _ in l2], [a for _, a in l2], n_d, settings.monotone_tol)
        if len(l2) > 1
        else []
    )
    if bad:
        checks.append(_check("non-monotone-in-eps", True, "l2 worst case", "; ".join(bad)))
    # gradients
    grads = info.get("gradients", {})
    if not grads:
        checks.append(_check("zero-or-nan-gradients", None, "-", "no gradient source checked"))
    for src, g in grads.items():
        fired = g["nan_or_inf"] > 0 or g["zero_fraction"] > settings.zero_grad_tol
        checks.append(
            _check(
                "zero-or-nan-gradients",
                fired,
                src,
                f"{src} gradient at {g['points']} clean points: zero at {g['zero_fraction']:.0%}, non-finite entries {g['nan_or_inf']}, median norm {g['norm_median']:.4g}",
            )
        )
    rnd = bool(info["randomized"])
    checks.append(
        _check(
            "randomized-defense",
            rnd,
            "-",
            f"outputs differ between calls; verdicts are worst case over {settings.draws} draws; {flips_total} verdicts (clean, attacks and curves) robust in one draw but not in all"
            if rnd
            else "outputs identical between calls (deterministic; 1 draw)",
        )
    )
    return {
        "n": n_d,
        "randomized": rnd,
        "draws": settings.draws if rnd else 1,
        "clean": round(clean_acc, 4),
        "attacks": attacks,
        "worst_case": worst,
        "curves": curves,
        "audit": audit,
        "gradients": grads,
        "checks": checks,
        "flags": [c for c in checks if c["status"] == "flag"],
        "examples": examples,
    }


def _gap(
    stages: Mapping[str, Any], name: str, tk: str, idx: Tensor, unrolled_robust: Tensor, after_pgd: Tensor
) -> dict[str, Any]:
    """BPDA vs unrolled verdicts on the unrolled attack's points (all of which pgd left robust)."""
    bpda_ok = torch.ones(len(idx), dtype=torch.bool)
    used = []
    for attack in ("bpda-pgd", "bpda-eot-pgd"):
        rec = stages.get(f"{name}|{tk}|{attack}")
        if rec is None or rec["status"] != "ran":
            continue
        used.append(attack)
        pos = {int(i): j for j, i in enumerate(rec["indices"].tolist())}
        for k, i in enumerate(idx.tolist()):
            if i in pos:
                bpda_ok[k] &= bool(rec["robust"][pos[i]])
    if not used:
        return None  # type: ignore[return-value]
    return {
        "points": len(idx),
        "bpda_attacks": used,
        "bpda_accuracy": round(float(bpda_ok.float().mean()), 4),
        "unrolled_accuracy": round(float(unrolled_robust.float().mean()), 4),
    }


def _check(name: str, fired: bool | None, where: str, detail: str) -> dict[str, Any]:
    status = "n/a" if fired is None else ("flag" if fired else "ok")
    return {"flag": name, "status": status, "where": where, "detail": detail, "rule": FLAGS[name]}


# --------------------------------------------------------------------------------------------------- API
def load_state(out: Path, fp: dict[str, Any]) -> dict[str, Any]:
    """The saved state in ``out`` if it matches ``fp``; a fresh one if there is none; refuse another run's."""
    path = out / STATE_FILE
    if not path.exists():
        foreign = [p.name for p in out.iterdir() if p.name != RUN_MARKER] if out.exists() else []
        if foreign:
            raise StateMismatchError(
                f"expected {out} to be empty or to hold a robustness run's {STATE_FILE}, got other files "
                f"{sorted(foreign)[:5]}: choose another output folder"
            )
        return {"fingerprint": fp, "stages": {}}
    state = torch.load(
        path, map_location="cpu", weights_only=True
    )  # tensors and plain data only: no code runs
    if not isinstance(state, dict) or "fingerprint" not in state:
        raise StateMismatchError(f"expected {path} to be a robustness state file, got {type(state).__name__}")
    saved_settings = state["fingerprint"].get("settings") if isinstance(state["fingerprint"], dict) else None
    if isinstance(saved_settings, dict):
        for key, value in LEGACY_SETTINGS.items():
            saved_settings.setdefault(key, value)
    if state["fingerprint"] != fp:
        diff = _diff(state["fingerprint"], fp)
        raise StateMismatchError(
            f"{out} holds another run's state (refusing to mix results); differences: {'; '.join(diff[:6])}"
            f"{' ...' if len(diff) > 6 else ''}. Use the same settings to resume, another --out, or --fresh to "
            "discard it"
        )
    return state


def run_robustness(
    settings: RobustnessSettings,
    defenses: Sequence[Defense],
    x: Tensor,
    y: Tensor,
    out: Path,
    *,
    generator: nn.Module | None = None,
    encoder: nn.Module | None = None,
    latent_config: InversionConfig | None = None,
    ctx: DistContext | None = None,
    progress: bool = True,
    fresh: bool = False,
    meta: Mapping[str, Any] | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the cascade on every defense, write ``out/results.json``, ``out/report.md`` and the plots.

    Args:
        settings: :class:`RobustnessSettings`.
        defenses: :class:`Defense` objects (distinct names), models in eval mode on ``x``'s device.
        x: ``(N, C, H, W)`` images in [0, 1], ``N >= settings.n`` (a data loader: concatenate its batches, e.g.
            with :func:`tensors_from_loader`); y: ``(N,)`` int64 labels, same device.
        out: output folder (created); holds ``state.pt`` while and after running.
        generator: ``(B, k) -> (B, C, H, W)`` for the latent attacks (skipped without it); encoder: optional
            warm start; latent_config: the inversion schedule for the starting latents (default Defense-GAN's).
        ctx: distributed context (default: single process); every rank must call with the same arguments.
        progress: tqdm bar (rank 0).
        fresh: discard a saved state of *this* harness in ``out`` (never other files).
        meta: extra top-level JSON fields (command, device...).
        on_stage: called with each finished stage's key (after its state is saved).

    Returns:
        The results record (also ``out/results.json``), schema in :mod:`eval.robustness_report`.

    Raises:
        StateMismatchError: ``out`` holds another run's state or foreign files.
        ValueError / TypeError: unknown names, bad tensors, a model whose output is not ``(B, K)`` logits.
    """
    from eval.robustness_report import write_outputs

    if not isinstance(settings, RobustnessSettings):
        raise TypeError(f"expected settings as RobustnessSettings, got {type(settings).__name__}")
    defenses = list(defenses)
    if not defenses or not all(isinstance(d, Defense) for d in defenses):
        raise TypeError("expected a non-empty sequence of Defense objects")
    names = [d.name for d in defenses]
    if len(set(names)) != len(names):
        raise ValueError(f"expected distinct defense names, got {names}")
    check_labeled_images(x, y, settings.n)
    ctx = ctx if ctx is not None else DistContext(0, 1, x.device)
    x, y = x[: settings.n].detach(), y[: settings.n].detach()
    out = Path(out)
    extra = {
        "generator": None if generator is None else type(generator).__name__,
        "latent_config": latent_config,
        "order": names,
    }
    fp = fingerprint(settings, defenses, x, y, extra)
    if generator is not None:
        h = hashlib.sha256()
        for p in generator.parameters():
            _hash_tensor(h, p)
        fp["generator"] = h.hexdigest()[:16]
    if ctx.is_main:
        claim_run_folder(out, "robustness")  # the settings are checked by the state's fingerprint
        if fresh and (out / STATE_FILE).exists():
            (out / STATE_FILE).unlink()
            for name in ("results.json", "report.md"):
                (out / name).unlink(missing_ok=True)
            for png in out.glob("*.png"):
                png.unlink()
        state = load_state(out, fp)
        out.mkdir(parents=True, exist_ok=True)
    if ctx.distributed:
        import torch.distributed as dist

        box: list[Any] = [state if ctx.is_main else None]
        dist.broadcast_object_list(box, src=0)
        state = box[0]
    resumed = len(state["stages"])
    start = time.perf_counter()
    runner = _Runner(
        settings, defenses, x, y, out, ctx, generator, encoder, latent_config, state, progress, on_stage
    )
    runner.run()
    for d in defenses:
        state["stages"][f"{d.name}|info"]["dim"] = int(x[0].numel())
    seconds = time.perf_counter() - start
    record: dict[str, Any] = {
        "schema": SCHEMA,
        "threat_models": list(settings.threats),
        "n": settings.n,
        "settings": settings.to_json(),
        "quick": settings.quick,
        "reduced_vs_full": settings.reductions(),
        **dict(meta or {}),
        "world_size": ctx.world_size,
        "resumed_stages": resumed,
        "seconds_this_call": round(seconds, 1),
        "seconds_stages": round(
            sum(float(v.get("seconds", 0.0)) for v in state["stages"].values() if isinstance(v, dict)), 1
        ),
        "attack_definitions": {a: ATTACK_DOCS[a] for a in settings.attacks},
        "flag_definitions": dict(FLAGS),
        "defenses": {d.name: _defense_record(settings, state["stages"], d.name) for d in defenses},
    }
    if ctx.is_main:
        torch.save(state, out / (STATE_FILE + ".tmp"))
        os.replace(out / (STATE_FILE + ".tmp"), out / STATE_FILE)
        write_outputs(record, state["stages"], out)
    if ctx.distributed:
        ctx.barrier()
    return record


def tensors_from_loader(loader: Any, limit: int | None = None) -> tuple[Tensor, Tensor]:
    """Concatenate ``(x, y)`` batches of a data loader (the first ``limit`` points)."""
    xs, ys, count = [], [], 0
    for batch in loader:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TypeError(f"expected the loader to yield (x, y) batches, got {type(batch).__name__}")
        xs.append(batch[0])
        ys.append(batch[1])
        count += len(batch[1])
        if limit is not None and count >= limit:
            break
    if not xs:
        raise ValueError("expected a non-empty data loader")
    x, y = torch.cat(xs), torch.cat(ys)
    return (x, y) if limit is None else (x[:limit], y[:limit])


def summary_json(record: Mapping[str, Any]) -> str:
    """The record as JSON text (indent 1)."""
    return json.dumps(record, indent=1) + "\n"
