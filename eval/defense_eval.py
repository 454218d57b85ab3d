"""``python -m eval defense``: a preset of the robustness harness (:mod:`eval.harness`) for the projection defense
(Defense-GAN) and the attacks that break it, each attack run *alone* on every clean-correct point.

Figures (``--figures``, each a stage or report section of the harness run it starts):

- ``undefended``: the classifier alone under PGD at Linf ``--pgd-eps`` (default 0.3; the ``pgd`` stage of the
  ``undefended`` defense);
- ``defended-clean``: accuracy of ``classifier(G(z*(x)))`` and the projection's per-pixel MSE and generator passes
  (the ``clean`` stage and the ``projection`` section of the ``projection-<schedule>`` defense);
- ``naive``: l2 PGD on the bare classifier transferred to the defended model (its ``pgd`` stage, with the bare
  classifier's own accuracy in the transfer table), at each ``--l2-eps``;
- ``bpda``: l2 PGD with BPDA + EOT through the randomized defended model (``bpda-eot-pgd``), worst case over
  ``--draws`` fresh projections;
- ``onmanifold``: :class:`attacks.LatentAttack` on the classifier alone, pixel l2 ``<= --latent-eps`` (success rate
  on the points whose ``G(z)`` it labels correctly; the pairs grid ``onmanifold_undefended_<threat>.png``);
- ``overpowered``: :class:`attacks.OverpoweredAttack`, pair l2 ``<= --op-eps`` (accuracy = share of starts
  without a class-changing pair, and the same after fewer steps).

Settings: the harness's (:class:`eval.harness.RobustnessSettings`, the overpowered attack's temperature 10
included) except the figure protocol :data:`PROTOCOL` (100 points, 20 BPDA + EOT steps with 2 samples, 100 naive
PGD steps, budgets 3 and 4 for the latent attacks under every threat); each attack runs alone, and the strongest
white-box stage is rerun with twice its steps on the survivors (the convergence check of :mod:`eval.harness`).

Schedules: ``defense-gan`` = Defense-GAN's own (SGD momentum 0.7, lr 10, L = 200, R = 10); ``fast`` = Adam lr 0.05,
50 steps, 2 restarts from the encoder's E(x). ``--quick`` = n 20, fast schedule, fewer steps: a smoke run.
Writes the harness outputs (``results.json``, ``report.md``, grids) into ``--out``; ``--write`` merges the
on-manifold and overpowered figures of the classifier alone into its zoo record after checking its SHA-256.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from eval.harness import RobustnessSettings
from eval.harness.command import CLASSIFIERS, run_evaluation
from eval.robustness import add_model_args, add_points_arg, evaluation_from_args, summary_lines
from eval.run_folder import claim_run_folder
from manifold_defense import zoo
from manifold_defense.presets import SCHEDULES

log = logging.getLogger(__name__)

__all__ = [
    "CLASSIFIER_FIGURES",
    "FIGURES",
    "PROTOCOL",
    "add_parsers",
    "preset",
    "record_classifier_figures",
    "run_command",
]

#: Figure groups (``--figures`` selects a subset).
FIGURES: tuple[str, ...] = ("undefended", "defended-clean", "naive", "bpda", "onmanifold", "overpowered")
#: Figures that measure the classifier alone (no projection): ``--write`` records them.
CLASSIFIER_FIGURES = ("onmanifold", "overpowered")


#: The protocol of the Defense-GAN figures where it is not the harness's own default (``RobustnessSettings``):
#: setting -> (full, quick), ``None`` for the harness's default. Every other setting (the overpowered attack's
#: temperature 10 included) is the harness default; ``naive_pgd_steps`` are ``pgd.steps`` with the naive figure.
PROTOCOL: dict[str, tuple[Any, Any]] = {
    "n": (100, 20),
    "batch_size": (100, 100),
    "draws": (None, 2),
    "naive_pgd_steps": (100, 40),
    "bpda.steps": (20, 10),
    "bpda.eot_samples": (2, 2),
    "onmanifold.steps": (None, 100),
    "overpowered.steps": (None, 150),
    "onmanifold.eps": (3.0, 3.0),
    "overpowered.eps": (4.0, 4.0),
}
#: Options of the command -> the setting each one sets.
_OPTIONS = {
    "n": "n", "batch": "batch_size", "draws": "draws", "bpda_steps": "bpda.steps", "eot": "bpda.eot_samples",
    "latent_steps": "onmanifold.steps", "op_steps": "overpowered.steps", "latent_eps": "onmanifold.eps",
    "op_eps": "overpowered.eps", "op_temperature": "overpowered.temperature",
}  # fmt: skip


def _protocol(key: str, quick: bool) -> Any:
    """The protocol's value of ``key`` (the harness default where :data:`PROTOCOL` says ``None``)."""
    value = PROTOCOL[key][1 if quick else 0]
    if value is None:
        head, _, rest = ("pgd.steps" if key == "naive_pgd_steps" else key).partition(".")
        default = getattr(RobustnessSettings(), head)
        value = getattr(default, rest) if rest else default
    return value


def preset(args: argparse.Namespace) -> tuple[RobustnessSettings, tuple[str, ...]]:
    """The harness settings and defenses of a ``python -m eval defense`` command line (:data:`PROTOCOL`).

    Raises:
        ValueError: bad values (named as the harness names them), ``--quick`` with the Defense-GAN schedule.
    """
    figs = set(args.figures)
    schedule = args.schedule or "fast"
    if args.quick and schedule != "fast":
        raise ValueError(f"expected --quick with the fast schedule, got --schedule {schedule}")
    changes: dict[str, Any] = {k: _protocol(k, args.quick) for k in PROTOCOL if k != "naive_pgd_steps"}
    changes |= {_OPTIONS[k]: getattr(args, k) for k in _OPTIONS if getattr(args, k, None) is not None}
    if "naive" in figs:
        changes["pgd.steps"] = _protocol("naive_pgd_steps", args.quick)
    defenses = []
    if figs & {"undefended", "onmanifold", "overpowered"}:
        defenses.append("undefended")
    if figs & {"defended-clean", "naive", "bpda"}:
        defenses.append(f"projection-{schedule}")
    threats = [f"linf-{args.pgd_eps:g}"] if "undefended" in figs else []
    if figs & {"naive", "bpda"}:
        threats += [f"l2-{e:g}" for e in (args.l2_eps if args.l2_eps is not None else (2.0, 4.0))]
    if not threats:
        threats = [f"l2-{changes['onmanifold.eps' if 'onmanifold' in figs else 'overpowered.eps']:g}"]
    if args.threats is not None:  # images of another shape than MNIST's: the user's budgets
        threats = [t.strip() for t in args.threats.split(",") if t.strip()]
    attacks = ["clean"]
    attacks += ["pgd"] if figs & {"undefended", "naive"} else []
    attacks += ["bpda-eot-pgd"] if "bpda" in figs else []
    attacks += [f for f in ("onmanifold", "overpowered") if f in figs]
    changes |= {"n_per_defense": {}, "threats": tuple(threats), "attacks": tuple(attacks), "cascade": False,
                "seed": args.seed, "latent_budget_from_threat": False, "curve_eps_linf": (), "curve_eps_l2": ()}  # fmt: skip
    return RobustnessSettings(quick=bool(args.quick)).updated(changes), tuple(defenses)


def _default(key: str) -> str:
    full, quick = _protocol(key, False), _protocol(key, True)
    return f"default {full:g}" + ("" if quick == full else f"; quick {quick:g}")


def add_parsers(sub: Any) -> None:
    """Register ``defense`` on the ``python -m eval`` sub-parsers."""
    p = sub.add_parser(
        "defense",
        help="the projection defense (Defense-GAN) and the attacks that break it: a preset of the harness",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/defense[-quick])")
    p.add_argument("--quick", action="store_true", help="smoke run: n 20, fast schedule, fewer steps")
    add_points_arg(p, _default("n"))
    p.add_argument("--schedule", choices=SCHEDULES, default=None, help="projection schedule (default fast)")
    p.add_argument("--figures", type=_parse_figures, default=FIGURES, help=f"subset of {','.join(FIGURES)}")
    p.add_argument(
        "--batch", type=int, default=None, help=f"points per attack call ({_default('batch_size')})"
    )
    p.add_argument(
        "--pgd-eps", type=float, default=0.3, help="Linf budget of the undefended figure (default 0.3)"
    )
    p.add_argument(
        "--l2-eps", type=float, nargs="+", default=None, help="l2 budgets of naive and BPDA (default 2 4)"
    )
    p.add_argument(
        "--bpda-steps", type=int, default=None, help=f"BPDA + EOT PGD steps ({_default('bpda.steps')})"
    )
    p.add_argument(
        "--eot", type=int, default=None, help=f"EOT samples per BPDA step ({_default('bpda.eot_samples')})"
    )
    p.add_argument("--draws", type=int, default=None, help=f"fresh passes per verdict ({_default('draws')})")
    p.add_argument(
        "--op-steps",
        type=int,
        default=None,
        help=f"overpowered attack steps ({_default('overpowered.steps')})",
    )
    p.add_argument(
        "--latent-steps",
        type=int,
        default=None,
        help=f"on-manifold attack steps ({_default('onmanifold.steps')})",
    )
    p.add_argument(
        "--latent-eps",
        type=float,
        default=None,
        help=f"on-manifold pixel l2 budget ({_default('onmanifold.eps')})",
    )
    p.add_argument(
        "--op-eps",
        type=float,
        default=None,
        help=f"overpowered pair l2 budget ({_default('overpowered.eps')})",
    )
    temperature = RobustnessSettings().overpowered.temperature
    p.add_argument("--op-temperature", type=float, default=None,
                   help=f"the overpowered attack's loss is on logits / T (default {temperature:g}, the harness's: it "
                   "does not saturate on a confident classifier)")  # fmt: skip
    p.add_argument("--threats", default=None, help="required for images of another shape than MNIST's")
    p.add_argument("--fresh", action="store_true", help="discard the saved state in --out and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice of the run")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--write", action="store_true",
                   help="merge the on-manifold and overpowered figures into the --classifier's zoo record")  # fmt: skip
    add_model_args(p)
    p.set_defaults(func=run_command)


def _parse_figures(text: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in parts if p not in FIGURES]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated subset of {list(FIGURES)}, got {text!r}"
        )
    return parts


def record_classifier_figures(
    classifier: str, record: dict[str, Any], weights_dir: Path | None
) -> dict[str, Any]:
    """Merge the on-manifold and overpowered figures of the ``undefended`` defense of a harness ``record`` (a
    ``python -m eval defense`` run) into the zoo record of ``classifier``, keeping its other figures; the weights'
    SHA-256 must match (:func:`manifold_defense.zoo.verify`). Returns the new record.

    Keys: ``onmanifold_l2_<eps>`` (``success_rate``, ``eligible``, ``successes``) and ``overpowered_l2_<eps>``
    (``consistency`` = share of starts without a class-changing pair; ``accuracy`` = consistent and the start
    ``G(z)`` labeled correctly; both against steps); an OP figure at a temperature other than 1 is
    recorded beside the temperature-1 one as ``overpowered_l2_<eps>_t<T>``. Raises ``ValueError`` for a quick
    record or one without either figure.
    """
    if record.get("quick"):
        raise ValueError("--write records measured figures: expected a full run, got a --quick smoke run")
    und = record.get("defenses", {}).get("undefended", {}).get("attacks", {})
    found: dict[str, dict[str, Any]] = {}
    for attack in CLASSIFIER_FIGURES:
        for entry in und.get(attack, {}).values():
            if entry.get("status") != "ran" or ("eligible" not in entry and "consistency" not in entry):
                continue
            cfg = entry["settings"]
            budget = cfg["budget_l2"]
            if attack == "onmanifold":
                key = f"onmanifold_l2_{budget:g}"
                head = {
                    "success_rate": entry["success_rate"],
                    "eligible": entry["eligible"],
                    "successes": entry["successes"],
                }
                if "success_at_steps" in entry:
                    head["success_at_steps"] = entry["success_at_steps"]
                threat = {"norm": "l2 (pixel, on G's range)", "eps": budget}
                attack_cfg = {"name": "LatentAttack", "steps": cfg["steps"], "step_size": cfg["step_size"]}
            else:
                t = cfg.get("temperature", 1.0)
                key = f"overpowered_l2_{budget:g}" + ("" if t == 1.0 else f"_t{t:g}")
                head = {
                    "consistency": entry["consistency"],
                    "consistency_at_steps": entry["consistency_at_steps"],
                }
                if "op_accuracy_at_steps" in entry:
                    head |= {
                        "accuracy": entry["op_accuracy"],
                        "accuracy_at_steps": entry["op_accuracy_at_steps"],
                        "accuracy_meaning": "start G(z) labeled correctly and no class-changing pair found",
                    }
                else:
                    head["accuracy"] = entry["consistency"]
                threat = {"norm": "l2 (pair distance on G's range)", "eps": budget}
                attack_cfg = {
                    "name": "OverpoweredAttack",
                    "steps": cfg["steps"],
                    "step_size": cfg["step_size"],
                    "temperature": t,
                }
            found[key] = head | {
                "n": entry["attacked"],
                "threat": threat,
                "attack": attack_cfg,
                "data": record.get("data"),
                "command": record.get("command"),
                "device": record.get("device"),
                "threads": record.get("threads"),
                "seconds": entry["seconds"],
            }
            break  # one threat is enough: the budget is fixed (--latent-eps / --op-eps)
    if not found:
        raise ValueError(
            f"--write records the {' and '.join(CLASSIFIER_FIGURES)} figures: expected --figures to include one of them"
        )
    zoo.verify(classifier, weights_dir)
    figures = dict(zoo.record(classifier, weights_dir).get("figures", {}))
    figures.update(found)
    return zoo.update_record(classifier, {"figures": figures}, weights_dir)


def run_command(args: argparse.Namespace) -> int:
    """Handler of ``python -m eval defense``."""
    settings, defenses = preset(args)
    if args.write:  # refuse before the long run, not after it
        if settings.quick:
            raise ValueError("--write records measured figures: it cannot be used with --quick")
        if not set(CLASSIFIER_FIGURES) & set(args.figures):
            raise ValueError(
                f"--write records the {' and '.join(CLASSIFIER_FIGURES)} figures: expected --figures to include "
                f"one of them, got {','.join(args.figures)}"
            )
        if args.classifier not in CLASSIFIERS:
            raise ValueError(
                f"--write records into a zoo record: expected a zoo --classifier, got {args.classifier}"
            )
        zoo.verify(args.classifier, args.classifier_dir or args.weights_dir)
    out = (
        args.out if args.out is not None else Path("runs/defense-quick" if settings.quick else "runs/defense")
    )
    claim_run_folder(out, "defense")  # refuse before the long run
    if settings.quick:
        log.info("QUICK smoke run: n=%d, fast schedule, fewer steps; not the reported figures", settings.n)
    record = run_evaluation(evaluation_from_args(args, settings, defenses, out, "defense"))
    print("\n".join(summary_lines(record)))
    log.info("wrote %s", out / "report.md")
    if args.write:
        record_classifier_figures(args.classifier, record, args.classifier_dir or args.weights_dir)
        log.info("wrote the %s figures into the %s record", "/".join(CLASSIFIER_FIGURES), args.classifier)
    return 0
