"""``python -m eval robustness --out DIR [--quick]``: the robustness report of projection defenses and of your own
purifier, on the zoo's models or your own.

Defenses (``--defenses``, default every one the models allow): ``undefended`` (the classifier alone),
``projection-defense-gan`` (Defense-GAN's schedule: SGD momentum 0.7, lr 10, L = 200, R = 10: 2010 generator passes
per projection) and ``projection-fast`` (Adam lr 0.05, 50 steps, 2 restarts from the encoder's E(x): 102 passes;
needs an encoder). Both projection defenses draw fresh restart noise on every call (randomized; verdicts are
worst case over ``--draws``). With an encoder, ``projection-defense-gan`` attacks through its surrogates (the fast
schedule and the differentiable G(E(x))) and every verdict is the real defense's; ``--verbatim`` attacks the real
defense only.

Models: ``--classifier`` / ``--generator`` / ``--encoder`` take a zoo name, ``package.module:factory`` or
``path.py:factory`` (a callable with no arguments returning the ``nn.Module``), each with an optional
``--classifier-weights`` / ``--generator-weights`` / ``--encoder-weights FILE.safetensors`` (never a pickle).
Data: ``--data mnist`` (default: the MNIST test split), a ``.safetensors`` file with ``images`` and ``labels``, or
a factory returning ``(images, labels)``. The default threat models (Linf 0.3, l2 2 and 4) are MNIST's: images of
another shape than (1, 28, 28) need ``--threats``.

Your own purifier: ``--purifier FILE.py:factory`` (images in [0, 1] -> images in [0, 1]) evaluates defense
``purified`` = the classifier behind it, next to ``undefended``; ``--purifier-surrogate NAME=FILE.py:factory``
(repeatable), ``--purifier-randomized`` / ``--purifier-deterministic`` (default: detected) and ``--purifier-exact``
(its autograd gradient is exact: ``unrolled-pgd`` runs): :mod:`eval.harness.purifiers`.

The cascade holds AutoAttack standard's attacks, ``apgd`` (CE), ``apgd-t`` (targeted DLR), ``fab`` (FAB-T,
deterministic defenses) and ``square``: at AutoAttack's budgets on a plain classifier (100 iterations per target
class, 5000 queries) and at smaller ones through a preprocessing defense, where every pass runs the purifier
(``--apgd-t-steps``, ``--fab-steps`` and ``--square-queries`` set both budgets of their stage).

After the cascade of each threat, its strongest white-box stage runs again on the survivors with twice its steps
(the convergence check: what it breaks counts in the worst case; more than one percentage point raises
``not-converged``). ``--no-convergence`` turns it off in a ``--quick`` run only.

The attack cascade, curves, red-flag checks, surrogates, resume and sharding: :mod:`eval.harness`; the output
files: :mod:`eval.robustness_report`; documentation with commands: ``docs/robustness.md``.

``--quick``: a smoke run of a few minutes on one CPU thread: 10 images, ``undefended`` and ``projection-fast`` (or
``projection-defense-gan`` on 2 images without an encoder), few steps; every reduced setting is listed.

Scale-out: ``torchrun --nproc_per_node=N -m eval robustness --points N ...`` (``--points``: ``--n``'s spelling that
torchrun's own parser lets through) shards every stage's points across the processes
(gloo on CPU, NCCL on CUDA) and gives the same table as one process with the same seed.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eval.cli import command_line
from eval.harness import ATTACKS, DEFAULT_THREATS, RobustnessSettings
from eval.harness.command import CLASSIFIERS, DEFENSES, DiffPureSpec, Evaluation, ModelSpecs, run_evaluation
from eval.harness.purifiers import PurifierSpec, add_purifier_args
from eval.harness.settings import LEAN_CHANGES
from eval.run_folder import claim_run_folder

__all__ = [
    "add_model_args",
    "add_parsers",
    "add_points_arg",
    "evaluation_from_args",
    "model_specs",
    "run_command",
    "settings_from_args",
    "summary_lines",
]


def _names(kind: str, valid: tuple[str, ...]) -> Any:
    def parse(text: str) -> tuple[str, ...]:
        parts = tuple(p.strip() for p in text.split(",") if p.strip())
        unknown = [p for p in parts if p not in valid]
        if unknown or not parts:
            raise argparse.ArgumentTypeError(
                f"unknown {kind} {unknown}: expected a comma-separated subset of {list(valid)}, got {text!r}"
            )
        return parts

    return parse


def add_points_arg(p: argparse.ArgumentParser, defaults: str) -> None:
    """``--n`` (alias ``--points``, the spelling torchrun's own parser lets through: it reads ``--n`` as an
    ambiguous abbreviation of its options), stored as ``n``; ``defaults`` names the default counts in the help."""
    p.add_argument("--n", "--points", dest="n", type=int, default=None,
                   help=f"first N evaluation points ({defaults}); under torchrun spell it --points")  # fmt: skip


def add_model_args(p: argparse.ArgumentParser) -> None:
    """``--classifier/--generator/--encoder`` (zoo name, module:factory or path.py:factory), their
    ``--*-weights FILE.safetensors``, ``--classifier-dir``, ``--weights-dir`` and ``--data``."""
    p.add_argument("--classifier", default="mnist-classifier",
                   help=f"zoo name ({', '.join(CLASSIFIERS)}), package.module:factory or path.py:factory")  # fmt: skip
    p.add_argument(
        "--generator", default=None, help="as --classifier; default mnist-gan on MNIST, 'none': no generator"
    )
    p.add_argument(
        "--encoder", default=None, help="as --classifier; default mnist-encoder with mnist-gan, 'none'"
    )
    for kind in ("classifier", "generator", "encoder"):
        p.add_argument(
            f"--{kind}-weights", type=Path, default=None, help=f"FILE.safetensors loaded into the {kind}"
        )
    p.add_argument("--classifier-dir", type=Path, default=None,
                   help="folder of a zoo --classifier's weights and record if not --weights-dir (e.g. a training "
                   "run's --out)")  # fmt: skip
    p.add_argument("--weights-dir", type=Path, default=None, help="zoo folder (default: the package's)")
    p.add_argument("--data", default="mnist",
                   help="mnist (test split), FILE.safetensors (tensors images, labels) or a factory returning (images, "
                   "labels)")  # fmt: skip


def model_specs(args: argparse.Namespace) -> ModelSpecs:
    """The :class:`~eval.harness.command.ModelSpecs` of the options :func:`add_model_args` registers."""
    return ModelSpecs(
        classifier=args.classifier, generator=args.generator, encoder=args.encoder,
        classifier_weights=args.classifier_weights, generator_weights=args.generator_weights,
        encoder_weights=args.encoder_weights, classifier_dir=args.classifier_dir, weights_dir=args.weights_dir,
    )  # fmt: skip


#: ``--flag`` -> (the settings it sets, its type, what it does); defaults are read from the settings themselves.
SETTING_FLAGS: dict[str, tuple[tuple[str, ...], type, str]] = {
    "--draws": (("draws",), int, "fresh forward passes per verdict of a randomized defense (worst case)"),
    "--pgd-steps": (("pgd.steps",), int, "steps of the naive pgd"),
    "--bpda-steps": (("bpda.steps",), int, "steps of bpda-pgd, bpda-eot-pgd and surrogate-pgd"),
    "--eot": (
        ("bpda.eot_samples", "apgd.eot_samples", "apgd_t.eot_samples", "final.eot_samples"),
        int,
        "EOT samples per step of every EOT stage on a randomized defense",
    ),
    "--unrolled-steps": (("unrolled.steps",), int, "steps of unrolled-pgd"),
    "--unrolled-n": (("unrolled_n",), int, "points of unrolled-pgd (the first that survived pgd)"),
    "--unrolled-batch": (("unrolled_batch",), int, "points per chunk of unrolled-pgd (bounds its memory)"),
    "--apgd-steps": (("apgd.steps",), int, "APGD iterations"),
    "--apgd-t-steps": (
        ("apgd_t.steps", "apgd_t.plain_steps"),
        int,
        "APGD-T iterations per target class (apgd-t; on a plain model and through preprocessing alike)",
    ),
    "--fab-steps": (
        ("fab.steps", "fab.plain_steps"),
        int,
        "FAB-T iterations per target class (fab; on a plain model and through preprocessing alike)",
    ),
    "--square-queries": (
        ("square.queries", "square.plain_queries"),
        int,
        "Square queries per point (on a plain model and through preprocessing alike)",
    ),
    "--latent-steps": (("onmanifold.steps",), int, "steps of the on-manifold attack"),
    "--op-steps": (("overpowered.steps",), int, "steps of the overpowered attack"),
    "--op-temperature": (
        ("overpowered.temperature",),
        float,
        "the overpowered attack's loss is on logits / T",
    ),
    "--latent-linf-budget": (
        ("onmanifold.eps", "overpowered.eps"),
        float,
        "pixel l2 budget of the latent attacks under a Linf threat",
    ),
    "--curve-steps": (("curve.steps",), int, "steps of the accuracy-vs-eps curve attack"),
    "--final-steps": (("final.steps",), int, "steps of real-bpda-eot, the final real-forward round"),
    "--final-eot": (("final.eot_samples",), int, "EOT samples per step of real-bpda-eot (after --eot)"),
}


def _defaults_of(paths: Sequence[str]) -> str:
    """The defaults of a flag's settings: ``"full F, quick Q"`` when they agree, else per group of settings that
    agree, e.g. ``"apgd_t.steps: full 10, quick 1; plain model: full 100, quick 5"`` (``plain_*``: a plain model's
    budget)."""
    groups: dict[str, list[str]] = {}
    for p in paths:
        groups.setdefault(_defaults(p), []).append(p)
    if len(groups) == 1:
        return next(iter(groups))
    parts = []
    for text, group in groups.items():
        plain = all(p.rpartition(".")[2].startswith("plain_") for p in group)
        parts.append(f"{'plain model' if plain else ', '.join(group)}: {text}")
    return "; ".join(parts)


def _defaults(path: str) -> str:
    """``"full F, quick Q"`` for a setting (its one default, and the quick preset's)."""
    values = []
    for s in (RobustnessSettings(), RobustnessSettings.quick_preset()):
        head, _, rest = path.partition(".")
        value = getattr(getattr(s, head), rest) if rest else getattr(s, head)
        values.append("all" if value is None else f"{value:g}" if isinstance(value, float) else str(value))
    return f"default {values[0]}" if values[0] == values[1] else f"full {values[0]}, quick {values[1]}"


def add_parsers(sub: Any) -> None:
    """Register ``robustness`` on the ``python -m eval`` sub-parsers."""
    p = sub.add_parser(
        "robustness",
        help="attack cascade, convergence check, red flags and report over projection defenses and your purifier",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/robustness[-quick])")
    p.add_argument("--quick", action="store_true", help="smoke run: 10 images, fast schedule, few steps")
    add_points_arg(p, "full 200, quick 10")
    p.add_argument(
        "--dgan-n", type=int, default=None, help="points for projection-defense-gan (full 100, quick 2)"
    )
    p.add_argument(
        "--defenses", type=_names("defense", DEFENSES), default=None, help=f"subset of {','.join(DEFENSES)}"
    )
    p.add_argument(
        "--attacks", type=_names("attack", ATTACKS), default=ATTACKS, help=f"subset of {','.join(ATTACKS)}"
    )
    p.add_argument("--threats", default=None,
                   help="comma-separated NORM-EPS (default linf-0.3,l2-2,l2-4: MNIST's; required for other image shapes)")  # fmt: skip
    p.add_argument(
        "--batch", type=int, default=None, help=f"points per attack call ({_defaults('batch_size')})"
    )
    for flag, (paths, kind, what) in SETTING_FLAGS.items():
        p.add_argument(flag, dest=paths[0].replace(".", "_"), type=kind, default=None, metavar="N" if kind is int else "X",
                       help=f"{what} ({_defaults_of(paths)})")  # fmt: skip
    p.add_argument(
        "--no-curves", action="store_true", help="skip the accuracy-vs-eps curves (and their checks)"
    )
    p.add_argument("--no-convergence", action="store_true",
                   help="skip the convergence rerun of the strongest white-box stage (with --quick only; the report "
                   "says so)")  # fmt: skip
    p.add_argument("--convergence-rounds", type=int, default=None, metavar="K",
                   help="the convergence ladder: while a rerun newly breaks more than one point of the figure, rerun "
                   "the same stage with twice the steps again, up to K reruns (default 1); a finished run resumed "
                   "with a larger K adds the missing reruns")  # fmt: skip
    p.add_argument("--report-partial", action="store_true",
                   help="run nothing: write the report of a stopped run from its saved state (stages not reached "
                   "are listed as not run; flag incomplete); the same command without it resumes")  # fmt: skip
    p.add_argument("--lean", action="store_true",
                   help="the lean cascade (RobustnessSettings.lean_preset): Square queries the defense's cheap stand-in, "
                   "early exits in the PGD loops through the real defense, APGD-T toward 3 target classes; a screening "
                   "cascade: on the fast projection at Linf 0.3 it missed 5 of 100 points the full cascade broke; "
                   "compare it with a full run on the same points by cascade-profile --compare")  # fmt: skip
    p.add_argument("--majority", action="store_true",
                   help="randomized defenses: pass every draw on every verdict and report the majority-vote figure "
                   "beside the worst case")  # fmt: skip
    p.add_argument(
        "--verbatim",
        action="store_true",
        help="no surrogates: every attack's inner loop runs on the real defense",
    )
    p.add_argument(
        "--fresh", action="store_true", help="discard this harness's saved state in --out and start over"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice of the run")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    add_model_args(p)
    add_purifier_args(p)
    add_diffpure_args(p)
    p.set_defaults(func=run_command)


def add_diffpure_args(p: argparse.ArgumentParser) -> None:
    """The ``diffpure`` defense's options (it runs when ``--defenses`` names it)."""
    p.add_argument("--diffpure-t-star", type=int, default=None,
                   help="diffpure: the diffusion timestep inputs are noised to (chosen by diffpure-tstar)")  # fmt: skip
    p.add_argument("--diffpure-steps", type=int, default=10, help="diffpure: DDIM reverse steps (default 10)")
    p.add_argument("--diffpure-eta", type=float, default=0.0, help="diffpure: DDIM noise of the reverse steps")
    p.add_argument("--diffpure-weights-dir", type=Path, default=None,
                   help="diffpure: folder of mnist-ddpm's weights (default: the zoo)")  # fmt: skip


def diffpure_spec(args: argparse.Namespace) -> DiffPureSpec | None:
    """The :class:`DiffPureSpec` of ``--diffpure-*`` (``None`` without ``--diffpure-t-star``)."""
    if getattr(args, "diffpure_t_star", None) is None:
        return None
    return DiffPureSpec(
        args.diffpure_t_star, args.diffpure_steps, args.diffpure_eta, weights_dir=args.diffpure_weights_dir
    )


def settings_from_args(args: argparse.Namespace) -> RobustnessSettings:
    """:class:`RobustnessSettings` from the parsed command line (validated)."""
    threats = args.threats if args.threats is not None else ",".join(DEFAULT_THREATS)
    changes: dict[str, Any] = {
        "seed": args.seed,
        "attacks": tuple(args.attacks),
        "threats": tuple(t.strip() for t in threats.split(",") if t.strip()),
    }
    for paths, _, _ in SETTING_FLAGS.values():
        value = getattr(args, paths[0].replace(".", "_"), None)
        if value is not None:
            changes |= dict.fromkeys(paths, value)
    if args.n is not None:
        changes["n"] = args.n
    if args.batch is not None:
        changes["batch_size"] = args.batch
    if args.dgan_n is not None:
        changes["n_per_defense"] = {"projection-defense-gan": args.dgan_n}
    if args.no_curves:
        changes |= {"curve_eps_linf": (), "curve_eps_l2": ()}
    if getattr(args, "majority", False):
        changes["majority"] = True
    if getattr(args, "lean", False):
        changes = {**LEAN_CHANGES, **changes}
    if args.convergence_rounds is not None:
        changes["convergence_rounds"] = args.convergence_rounds
    if args.no_convergence:
        if not args.quick:
            raise ValueError(
                "--no-convergence turns the convergence check off in a --quick run only: expected --quick"
            )
        changes["convergence"] = False
    return RobustnessSettings.quick_preset(changes) if args.quick else RobustnessSettings().updated(changes)


def evaluation_from_args(
    args: argparse.Namespace,
    settings: RobustnessSettings,
    defenses: tuple[str, ...] | None,
    out: Path,
    command: str,
) -> Evaluation:
    """The typed :class:`~eval.harness.command.Evaluation` of a ``robustness`` or ``defense`` command line."""
    return Evaluation(
        settings=settings, out=out, defenses=defenses, models=model_specs(args), data=args.data,
        threats_chosen=args.threats is not None, purifier=PurifierSpec.from_args(args), diffpure=diffpure_spec(args),
        verbatim=getattr(args, "verbatim", False), device=args.device, threads=args.threads, fresh=args.fresh,
        progress=not args.no_progress, report_partial=getattr(args, "report_partial", False), command=command,
        command_line=command_line(args),
    )  # fmt: skip


def summary_lines(record: dict[str, Any]) -> list[str]:
    """Plain-text table (defense x threat: clean, each attack, the convergence rerun, worst case) and the flags."""
    lines = []
    attacks: Sequence[str] = list(record["attack_definitions"])
    for tk in record["threat_models"]:
        lines.append(f"== {tk} (robust accuracy after each attack of the cascade; '-' skipped)")
        lines.append(
            f"{'defense':<24} {'n':>4} " + " ".join(f"{a[:12]:>12}" for a in attacks) + f" {'WORST':>8}"
        )
        for name, d in record["defenses"].items():
            cells = []
            for a in attacks:
                e = d["attacks"][a][tk]
                cells.append("-" if e["status"] == "skipped" else f"{100 * e['accuracy']:.1f}%")
            lines.append(
                f"{name:<24} {d['n']:>4} "
                + " ".join(f"{c:>12}" for c in cells)
                + f" {100 * d['worst_case'][tk]:>7.1f}%"
            )
    for name, d in record["defenses"].items():
        for tk, e in d["attacks"].get("convergence", {}).items():
            if e["status"] == "ran":
                rounds = len(e.get("ladder") or [None])
                how = "twice its steps" if rounds == 1 else f"a ladder of {rounds} reruns (x{2 ** rounds} steps last)"
                lines.append(f"convergence {name} {tk}: {e['rerun_of']} with {how} on {e['attacked']} "
                             f"survivors broke {e['broken']} more ({100 * e['figure_before']:.1f}% -> "
                             f"{100 * e['accuracy']:.1f}%)")  # fmt: skip
            else:
                lines.append(f"convergence {name} {tk}: not run ({e['reason']})")
    for name, d in record["defenses"].items():
        flags = [f"{f['flag']} ({f['where']})" for f in d["flags"]]
        lines.append(f"flags {name}: {', '.join(flags) if flags else 'none'}")
    return lines


def run_command(args: argparse.Namespace) -> int:
    """Handler of ``python -m eval robustness``."""
    settings = settings_from_args(args)
    out = (
        args.out
        if args.out is not None
        else Path("runs/robustness-quick" if settings.quick else "runs/robustness")
    )
    request = evaluation_from_args(args, settings, args.defenses, out, "robustness")
    if int(os.environ.get("RANK", "0")) == 0:  # refuse before loading data and models (torchrun: rank 0)
        claim_run_folder(out, "robustness")
    start = time.perf_counter()
    record = run_evaluation(request)
    if record.get("world_size", 1) == 1 or _is_rank0():
        if settings.quick:
            reduced = "; ".join(
                f"{k} {v['this_run']} (full {v['full']})" for k, v in record["reduced_vs_full"].items()
            )
            print(f"QUICK smoke run; reduced vs the full protocol: {reduced}")
        print("\n".join(summary_lines(record)))
        print(
            f"wrote {out}/report.md, results.json, accuracy_vs_eps.png, grid_*.png in {time.perf_counter() - start:.1f} s"
        )
    return 0


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
