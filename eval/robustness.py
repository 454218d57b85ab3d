"""``python -m eval robustness --out DIR [--quick]``: the robustness report of the zoo's defenses on MNIST.

Defenses (``--defenses``, default all): ``undefended`` (the zoo classifier), ``projection-defense-gan`` (the
projection defense with Defense-GAN's schedule: SGD momentum 0.7, lr 10, L = 200, R = 10, 2000 generator passes per
projection) and ``projection-fast`` (Adam lr 0.05, 50 steps, 2 restarts from the encoder's E(x): 102 passes). Both
projection defenses draw fresh restart noise on every call (randomized; verdicts are worst case over ``--draws``).

The attack cascade, threat models (Linf 0.3, l2 2 and 4), accuracy-vs-eps curves, red-flag checks, resume and
sharding are described in :mod:`eval.robustness_core`; the output files in :mod:`eval.robustness_report`.

``--quick``: a smoke run of a few minutes on one CPU thread: 10 images, ``undefended`` and ``projection-fast`` only
(``projection-defense-gan`` on 2 images if named), few steps; every reduced setting is listed in the outputs.

Scale-out: ``torchrun --nproc_per_node=N -m eval robustness ...`` shards every stage's points across the processes
(gloo on CPU, NCCL on CUDA) and gives the same table as one process with the same seed.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from eval.cli import command_line
from eval.defense_eval import add_classifier_args, load_zoo_models
from eval.robustness_core import (
    ATTACKS,
    DEFAULT_THREATS,
    Defense,
    RobustnessSettings,
    projection_defense,
    run_robustness,
    undefended_defense,
)
from eval.run_folder import claim_run_folder

__all__ = ["DEFENSES", "QUICK_DEFENSES", "add_parsers", "run_command", "zoo_defenses"]

log = logging.getLogger(__name__)

#: The zoo defenses by name.
DEFENSES: tuple[str, ...] = ("undefended", "projection-defense-gan", "projection-fast")
QUICK_DEFENSES: tuple[str, ...] = ("undefended", "projection-fast")
_SCHEDULE = {"projection-defense-gan": "defense-gan", "projection-fast": "fast"}


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


def zoo_defenses(
    names: tuple[str, ...],
    device: torch.device,
    seed: int = 0,
    weights_dir: Path | None = None,
    *,
    classifier: str = "mnist-classifier",
    classifier_dir: Path | None = None,
) -> tuple[list[Defense], Any]:
    """The named zoo defenses (:data:`DEFENSES`) and the zoo models (classifier, generator, encoder).

    Every defense wraps the zoo classifier ``classifier`` (:data:`eval.defense_eval.CLASSIFIERS`, weights from
    ``classifier_dir`` or ``weights_dir``): ``undefended`` is that classifier alone.
    """
    from eval.defense_figures import schedule_config

    unknown = [n for n in names if n not in DEFENSES]
    if unknown:
        raise ValueError(f"unknown defense {unknown}: expected a subset of {list(DEFENSES)}")
    models = load_zoo_models(device, weights_dir, classifier=classifier, classifier_dir=classifier_dir)
    out: list[Defense] = []
    for name in names:
        if name == "undefended":
            out.append(undefended_defense(models.classifier))
        else:
            cfg = schedule_config(_SCHEDULE[name], seed)
            out.append(
                projection_defense(
                    name, models.classifier, models.generator, cfg, encoder=models.encoder, seed=seed
                )
            )
    return out, models


def add_parsers(sub: Any) -> None:
    """Register ``robustness`` on the ``python -m eval`` sub-parsers."""
    p = sub.add_parser(
        "robustness",
        help="attack cascade, red flags and report over the zoo's defenses",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/robustness[-quick])")
    p.add_argument("--quick", action="store_true", help="smoke run: 10 images, fast schedule, few steps")
    p.add_argument("--n", type=int, default=None, help="first N MNIST test images (full 200, quick 10)")
    p.add_argument(
        "--dgan-n", type=int, default=None, help="images for projection-defense-gan (full 50, quick 2)"
    )
    p.add_argument(
        "--defenses", type=_names("defense", DEFENSES), default=None, help=f"subset of {','.join(DEFENSES)}"
    )
    p.add_argument(
        "--attacks", type=_names("attack", ATTACKS), default=ATTACKS, help=f"subset of {','.join(ATTACKS)}"
    )
    p.add_argument(
        "--threats",
        default=",".join(DEFAULT_THREATS),
        help="comma-separated NORM-EPS (default linf-0.3,l2-2,l2-4)",
    )
    p.add_argument("--batch", type=int, default=None, help="points per attack call (full 50, quick 10)")
    for flag, field_name in (
        ("--draws", "draws"),
        ("--pgd-steps", "pgd_steps"),
        ("--bpda-steps", "bpda_steps"),
        ("--eot", "eot_samples"),
        ("--unrolled-steps", "unrolled_steps"),
        ("--unrolled-n", "unrolled_n"),
        ("--apgd-steps", "apgd_steps"),
        ("--square-queries", "square_queries"),
        ("--latent-steps", "latent_steps"),
        ("--op-steps", "op_steps"),
        ("--curve-steps", "curve_steps"),
    ):
        p.add_argument(flag, dest=field_name, type=int, default=None, help=f"override {field_name}")
    p.add_argument(
        "--op-temperature",
        type=float,
        default=None,
        help="overpowered attack loss on logits / T (default 10; runs saved before the option existed used 1)",
    )
    p.add_argument(
        "--fresh", action="store_true", help="discard this harness's saved state in --out and start over"
    )
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--weights-dir", type=Path, default=None, help="zoo folder (default: the package's)")
    add_classifier_args(p)
    p.set_defaults(func=run_command)


_FIELDS = ("draws", "pgd_steps", "bpda_steps", "eot_samples", "unrolled_steps", "unrolled_n", "apgd_steps",
           "square_queries", "latent_steps", "op_steps", "curve_steps")  # fmt: skip


def settings_from_args(args: argparse.Namespace) -> RobustnessSettings:
    """:class:`RobustnessSettings` from the parsed command line (validated)."""
    overrides: dict[str, Any] = {
        "seed": args.seed,
        "attacks": tuple(args.attacks),
        "threats": tuple(t.strip() for t in args.threats.split(",") if t.strip()),
    }
    for name in _FIELDS:
        if getattr(args, name, None) is not None:
            overrides[name] = getattr(args, name)
    if getattr(args, "op_temperature", None) is not None:
        overrides["op_temperature"] = args.op_temperature
    if args.n is not None:
        overrides["n"] = args.n
    if args.batch is not None:
        overrides["batch_size"] = args.batch
    if args.dgan_n is not None:
        overrides["n_per_defense"] = {"projection-defense-gan": args.dgan_n}
    return RobustnessSettings.quick_preset(**overrides) if args.quick else RobustnessSettings(**overrides)


def run_evaluation(
    args: argparse.Namespace,
    settings: RobustnessSettings,
    defenses: tuple[str, ...],
    out: Path,
    progress: bool = True,
) -> dict[str, Any]:
    """Load data and zoo models, run :func:`eval.robustness_core.run_robustness` (distributed under torchrun)."""
    from eval.defense_figures import schedule_config
    from manifold_defense.data import load_mnist
    from manifold_defense.training.distributed import setup_distributed

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    ctx = setup_distributed(args.device)
    test = load_mnist("test", limit=settings.n)
    if len(test) < settings.n:
        raise ValueError(f"expected --n <= {len(test)} test images, got {settings.n}")
    classifier = getattr(args, "classifier", "mnist-classifier")
    models_list, models = zoo_defenses(
        defenses,
        ctx.device,
        settings.seed,
        args.weights_dir,
        classifier=classifier,
        classifier_dir=getattr(args, "classifier_dir", None),
    )
    meta = {
        "command": command_line(args),
        "device": str(ctx.device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "data": f"MNIST test split, first {settings.n} images",
        "models": f"zoo {classifier}, mnist-gan, mnist-encoder",
        "latent_start": "fast schedule (encoder warm start) inversion of each test image",
    }
    return run_robustness(
        settings,
        models_list,
        test.images.to(ctx.device),
        test.labels.to(ctx.device),
        out,
        generator=models.generator,
        encoder=models.encoder,
        latent_config=schedule_config("fast", settings.seed),
        ctx=ctx,
        progress=progress,
        fresh=getattr(args, "fresh", False),
        meta=meta,
    )


def summary_lines(record: dict[str, Any]) -> list[str]:
    """Plain-text table (defense x threat: clean, each attack, worst case) and the flags."""
    lines = []
    for tk in record["threat_models"]:
        lines.append(f"== {tk} (robust accuracy after each attack of the cascade; '-' skipped)")
        attacks = list(record["attack_definitions"])
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
        flags = [f"{f['flag']} ({f['where']})" for f in d["flags"]]
        lines.append(f"flags {name}: {', '.join(flags) if flags else 'none'}")
    return lines


def run_command(args: argparse.Namespace) -> int:
    """Handler of ``python -m eval robustness``."""
    settings = settings_from_args(args)
    defenses = (
        args.defenses if args.defenses is not None else (QUICK_DEFENSES if settings.quick else DEFENSES)
    )
    out = (
        args.out
        if args.out is not None
        else Path("runs/robustness-quick" if settings.quick else "runs/robustness")
    )
    if int(os.environ.get("RANK", "0")) == 0:  # refuse before loading data and models (torchrun: rank 0)
        claim_run_folder(out, "robustness")
    start = time.perf_counter()
    record = run_evaluation(args, settings, tuple(defenses), out, progress=not args.no_progress)
    if record.get("world_size", 1) == 1 or _is_rank0():
        if settings.quick:
            print(
                "QUICK smoke run; reduced vs the full protocol: "
                + "; ".join(
                    f"{k} {v['this_run']} (full {v['full']})" for k, v in record["reduced_vs_full"].items()
                )
            )
        print("\n".join(summary_lines(record)))
        print(
            f"wrote {out}/report.md, results.json, accuracy_vs_eps.png, grid_*.png in {time.perf_counter() - start:.1f} s"
        )
    return 0


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
