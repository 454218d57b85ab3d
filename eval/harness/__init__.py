"""The robustness evaluation harness: one runner for every robustness figure of the library.

An attack cascade over a set of defenses, worst case per point, red-flag checks, resumable state and ``torchrun``
sharding; surrogate attacks verified on the real defense. Modules (each one a reader can hold):

- :mod:`eval.harness.settings`: threat models and :class:`RobustnessSettings` (each attack's settings nested as
  its own config object; :mod:`eval.harness.configs`: APGD, Square and the flag thresholds);
- :mod:`eval.harness.registry`: typed stage keys (:class:`StageKey`), the :class:`Stage` contract and the
  registry (:func:`register_stage`: adding a stage is one class); :mod:`eval.harness.cascade`: the built-in
  stages (:data:`ATTACKS`; the latent ones in :mod:`eval.harness.latent_stages`);
- :mod:`eval.harness.defenses`: :class:`Defense` (model, BPDA / unrolled variants, surrogates) and constructors
  (:func:`purifier_defense`: any purifier in front of a classifier; :func:`projection_defense`: Defense-GAN's);
- :mod:`eval.harness.state`: fingerprint, saved state, per-chunk seeds and the sharded chunk runner;
- :mod:`eval.harness.runner`: the runner (clean, the cascade, its verdicts, the convergence rerun);
- :mod:`eval.harness.sections`: the other stages (info and the gradient check, projection figures,
  accuracy-vs-eps curves, example grids);
- :mod:`eval.harness.record` and :mod:`eval.harness.flags`: the per-defense record (transfer counts, audit) and
  the red-flag checks (:data:`FLAGS`, one function per flag);
- :mod:`eval.harness.api`: :func:`run_robustness` and :func:`evaluate_robustness` (one call: models or purifier
  defenses, tensors, threats -> a typed :class:`RobustnessReport`, :mod:`eval.harness.report`);
- :mod:`eval.harness.purifiers`: a user's purifier on the command line (``--purifier FILE.py:factory``...);
- :mod:`eval.harness.models`: models and data named on the command line (zoo names, ``module:factory``,
  ``path.py:factory``, safetensors weights); :mod:`eval.harness.command`: the typed evaluation request of the
  ``robustness``, ``defense`` and ``demo`` commands;
- :mod:`eval.robustness_report`: ``results.json`` schema and ``report.md`` (:mod:`eval.harness.plots`: the plots);
- :mod:`eval.robustness` / :mod:`eval.defense_eval`: the ``python -m eval robustness`` / ``defense`` commands.

The cascade (:data:`ATTACKS`, in this order):

- ``clean``: accuracy without attack (worst case over ``draws`` forward passes of a randomized defense).
- ``pgd``: the *naive* white-box PGD: the model's own gradient; for a defense with a preprocessing step, the
  gradient of the bare classifier (the projection ignored, the examples transferred): where a projection defense
  "looks robust".
- ``bpda-pgd`` / ``bpda-eot-pgd``: PGD through the defense with BPDA (identity backward through the projection),
  with EOT (``bpda.eot_samples`` fresh projections per step) on randomized defenses.
- ``surrogate-pgd``: PGD through each surrogate the defense names (e.g. the differentiable ``G(E(x))``).
- ``unrolled-pgd``: PGD back-propagating through every projection step, chunk by chunk (``unrolled_batch``
  points at a time bound the memory), on every point that survived ``pgd`` (``unrolled_n`` caps it).
- ``apgd`` (torchattacks APGD through BPDA, EOT on randomized defenses), ``apgd-t`` (APGD-T: the targeted DLR loss
  toward each other class, EOT on randomized defenses), ``fab`` (FAB-T, deterministic defenses) and ``square``
  (torchattacks Square, black box): AutoAttack standard's attacks, at its budgets on a plain model
  (:mod:`eval.harness.autoattack_stages`).
- ``onmanifold`` / ``overpowered``: latent attacks on the bare classifier from ``z = invert(x)``, the candidate
  projected onto the threat ball around ``x``.
- ``real-bpda-eot``: for defenses with surrogates, a final round of BPDA + EOT with real forward passes on
  every point still robust.
- ``convergence`` (after every cascade): the strongest white-box stage of the threat (the gradient stage that
  broke the most points) rerun on the survivors with twice its steps (and EOT samples on a randomized defense);
  what it breaks counts in the worst case, and more than one percentage point raises ``not-converged``.

Verdicts: a point is robust after an attack when the real defense labels the candidate correctly in every one of
``draws`` fresh forward passes (and in the attack's own final pass when that pass was the real defense's); the
final robust accuracy is the worst case per point over the cascade. An attack whose inner loop ran on a stand-in
(a surrogate, or the bare classifier for ``pgd``) records how many of its successes on the stand-in transferred
to the real defense. Attacks that do not apply are skipped and marked so.

Resume and sharding: :mod:`eval.harness.state`.
"""

from eval.harness.api import (
    as_defense,
    evaluate_robustness,
    run_robustness,
    summary_json,
    tensors_from_loader,
)
from eval.harness.cascade import ATTACKS
from eval.harness.configs import APGDConfig, APGDTConfig, FABConfig, FlagThresholds, SquareConfig
from eval.harness.defenses import (
    Defense,
    EncoderProjection,
    diffpure_defense,
    projection_defense,
    projection_surrogates,
    purifier_defense,
    undefended_defense,
)
from eval.harness.flags import FLAGS, check_monotone
from eval.harness.registry import (
    Stage,
    StageEnv,
    StageKey,
    StageView,
    register_stage,
    registered_stages,
    unregister_stage,
)
from eval.harness.report import Check, DefenseReport, RobustnessReport, StageReport, Transfer
from eval.harness.settings import (
    DEFAULT_THREATS,
    SCHEMA,
    STATE_FILE,
    RobustnessSettings,
    parse_threat,
    threat_key,
)
from eval.harness.state import StateMismatchError, fingerprint, load_state

__all__ = [
    "ATTACKS",
    "DEFAULT_THREATS",
    "FLAGS",
    "SCHEMA",
    "STATE_FILE",
    "APGDConfig",
    "APGDTConfig",
    "Check",
    "Defense",
    "DefenseReport",
    "EncoderProjection",
    "FABConfig",
    "FlagThresholds",
    "RobustnessReport",
    "RobustnessSettings",
    "SquareConfig",
    "Stage",
    "StageEnv",
    "StageKey",
    "StageReport",
    "StageView",
    "StateMismatchError",
    "Transfer",
    "as_defense",
    "check_monotone",
    "diffpure_defense",
    "evaluate_robustness",
    "fingerprint",
    "load_state",
    "parse_threat",
    "projection_defense",
    "projection_surrogates",
    "purifier_defense",
    "register_stage",
    "registered_stages",
    "run_robustness",
    "summary_json",
    "tensors_from_loader",
    "threat_key",
    "undefended_defense",
    "unregister_stage",
]
