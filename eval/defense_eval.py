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
from eval.robustness import (
    CLASSIFIERS,
    DefenseModels,
    add_model_args,
    add_points_arg,
    load_zoo_models,
    run_evaluation,
    summary_lines,
)
from eval.run_folder import claim_run_folder
from manifold_defense import zoo
from manifold_defense.presets import SCHEDULES

log = logging.getLogger(__name__)

__all__ = [
    "CLASSIFIERS",
    "CLASSIFIER_FIGURES",
    "FIGURES",
    "DefenseModels",
    "add_classifier_args",
    "add_parsers",
    "load_zoo_models",
    "preset",
    "record_classifier_figures",
    "run_command",
]

#: Figure groups (``--figures`` selects a subset).
FIGURES: tuple[str, ...] = ("undefended", "defended-clean", "naive", "bpda", "onmanifold", "overpowered")
#: Figures that measure the classifier alone (no projection): ``--write`` records them.
CLASSIFIER_FIGURES = ("onmanifold", "overpowered")


def add_classifier_args(p: argparse.ArgumentParser) -> None:
    """The model options of the evaluation commands (:func:`eval.robustness.add_model_args`)."""
    add_model_args(p)


def preset(args: argparse.Namespace) -> tuple[RobustnessSettings, tuple[str, ...]]:
    """The harness settings and defenses of a ``python -m eval defense`` command line.

    Raises:
        ValueError: bad values (named as the harness names them), ``--quick`` with the Defense-GAN schedule.
    """
    figs = set(args.figures)
    schedule = args.schedule or "fast"
    if args.quick and schedule != "fast":
        raise ValueError(f"expected --quick with the fast schedule, got --schedule {schedule}")
    l2_eps = tuple(args.l2_eps) if args.l2_eps is not None else (2.0, 4.0)
    latent_eps = args.latent_eps if args.latent_eps is not None else 3.0
    op_eps = args.op_eps if args.op_eps is not None else 4.0
    defenses = []
    if figs & {"undefended", "onmanifold", "overpowered"}:
        defenses.append("undefended")
    if figs & {"defended-clean", "naive", "bpda"}:
        defenses.append(f"projection-{schedule}")
    threats = [f"linf-{args.pgd_eps:g}"] if "undefended" in figs else []
    if figs & {"naive", "bpda"}:
        threats += [f"l2-{e:g}" for e in l2_eps]
    if not threats:
        threats = [f"l2-{latent_eps if 'onmanifold' in figs else op_eps:g}"]
    if args.threats is not None:  # images of another shape than MNIST's: the user's budgets
        threats = [t.strip() for t in args.threats.split(",") if t.strip()]
    attacks = ["clean"]
    attacks += ["pgd"] if figs & {"undefended", "naive"} else []
    attacks += ["bpda-eot-pgd"] if "bpda" in figs else []
    attacks += [f for f in ("onmanifold", "overpowered") if f in figs]
    values: dict[str, Any] = {
        "n": args.n if args.n is not None else (20 if args.quick else 100),
        "n_per_defense": {},
        "threats": tuple(threats),
        "attacks": tuple(attacks),
        "cascade": False,
        "seed": args.seed,
        "batch_size": args.batch,
        "draws": args.draws if args.draws is not None else (2 if args.quick else 3),
        "pgd_steps": (40 if args.quick else 100) if "naive" in figs else 40,
        "bpda_steps": args.bpda_steps if args.bpda_steps is not None else (10 if args.quick else 20),
        "eot_samples": args.eot if args.eot is not None else 2,
        "latent_steps": args.latent_steps if args.latent_steps is not None else (100 if args.quick else 200),
        "op_steps": args.op_steps if args.op_steps is not None else (150 if args.quick else 300),
        "op_temperature": args.op_temperature if args.op_temperature is not None else 1.0,
        "latent_budget": latent_eps,
        "op_budget": op_eps,
        "curve_eps_linf": (),
        "curve_eps_l2": (),
        "quick": bool(args.quick),
    }
    return RobustnessSettings(**values), tuple(defenses)


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
    add_points_arg(p, "default 100; quick 20")
    p.add_argument("--schedule", choices=SCHEDULES, default=None, help="projection schedule (default fast)")
    p.add_argument("--figures", type=_parse_figures, default=FIGURES, help=f"subset of {','.join(FIGURES)}")
    p.add_argument("--batch", type=int, default=100, help="points per attack call")
    p.add_argument(
        "--pgd-eps", type=float, default=0.3, help="Linf budget of the undefended figure (default 0.3)"
    )
    p.add_argument(
        "--l2-eps", type=float, nargs="+", default=None, help="l2 budgets of naive and BPDA (default 2 4)"
    )
    p.add_argument("--bpda-steps", type=int, default=None, help="BPDA+EOT PGD steps (default 20; quick 10)")
    p.add_argument("--eot", type=int, default=None, help="EOT samples per BPDA step (default 2)")
    p.add_argument("--draws", type=int, default=None, help="verdict draws (default 3; quick 2)")
    p.add_argument("--op-steps", type=int, default=None, help="overpowered attack steps (default 300)")
    p.add_argument("--latent-steps", type=int, default=None, help="on-manifold attack steps (default 200)")
    p.add_argument("--latent-eps", type=float, default=None, help="on-manifold pixel l2 budget (default 3)")
    p.add_argument("--op-eps", type=float, default=None, help="overpowered pair l2 budget (default 4)")
    p.add_argument(
        "--op-temperature",
        type=float,
        default=None,
        help="OP loss on logits / T (default 1; > 1 on saturated softmax)",
    )
    p.add_argument("--threats", default=None, help="required for images of another shape than MNIST's")
    p.add_argument("--fresh", action="store_true", help="discard the saved state in --out and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--write",
        action="store_true",
        help="merge the on-manifold and overpowered figures into the --classifier's zoo record",
    )
    add_classifier_args(p)
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
    record = run_evaluation(args, settings, defenses, out, progress=not args.no_progress, command="defense")
    print("\n".join(summary_lines(record)))
    log.info("wrote %s", out / "report.md")
    if args.write:
        record_classifier_figures(args.classifier, record, args.classifier_dir or args.weights_dir)
        log.info("wrote the %s figures into the %s record", "/".join(CLASSIFIER_FIGURES), args.classifier)
    return 0
