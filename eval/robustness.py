"""``python -m eval robustness --out DIR [--quick]``: the robustness report of projection defenses, on the zoo's
models or your own.

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

The attack cascade, curves, red-flag checks, surrogates, resume and sharding: :mod:`eval.harness`; the output
files: :mod:`eval.robustness_report`; documentation with commands: ``docs/robustness.md``.

Your own purifier: ``--purifier FILE.py:factory`` (images in [0, 1] -> images in [0, 1]) evaluates defense
``purified`` = the classifier behind it, next to ``undefended``; ``--purifier-surrogate NAME=FILE.py:factory``
(repeatable), ``--purifier-randomized`` / ``--purifier-deterministic`` (default: detected) and ``--purifier-exact``
(its autograd gradient is exact: ``unrolled-pgd`` runs): :mod:`eval.harness.purifiers`.

``--quick``: a smoke run of a few minutes on one CPU thread: 10 images, ``undefended`` and ``projection-fast`` (or
``projection-defense-gan`` on 2 images without an encoder), few steps; every reduced setting is listed.

Scale-out: ``torchrun --nproc_per_node=N -m eval robustness --points N ...`` (``--points``: ``--n``'s spelling that
torchrun's own parser lets through) shards every stage's points across the processes
(gloo on CPU, NCCL on CUDA) and gives the same table as one process with the same seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from eval.cli import command_line
from eval.harness import (
    ATTACKS,
    DEFAULT_THREATS,
    Defense,
    RobustnessSettings,
    projection_defense,
    projection_surrogates,
    run_robustness,
    undefended_defense,
)
from eval.harness.models import check_data_fits_models, load_data, load_model
from eval.harness.purifiers import add_purifier_args, purifier_defense_from_args
from eval.harness.settings import MNIST_SHAPE, default_curve_eps
from eval.run_folder import claim_run_folder
from manifold_defense import zoo

__all__ = [
    "CLASSIFIERS",
    "DEFENSES",
    "QUICK_DEFENSES",
    "DefenseModels",
    "Models",
    "add_model_args",
    "add_parsers",
    "build_defenses",
    "load_zoo_models",
    "run_command",
    "run_evaluation",
    "summary_lines",
    "zoo_defenses",
]

log = logging.getLogger(__name__)

#: The defenses by name.
DEFENSES: tuple[str, ...] = ("undefended", "projection-defense-gan", "projection-fast")
QUICK_DEFENSES: tuple[str, ...] = ("undefended", "projection-fast")
#: Zoo classifiers (any other classifier: ``module:factory`` or ``path.py:factory``).
CLASSIFIERS: tuple[str, ...] = zoo.CLASSIFIERS
_SCHEDULE = {"projection-defense-gan": "defense-gan", "projection-fast": "fast"}


class DefenseModels(NamedTuple):
    """The zoo models the MNIST evaluations need: classifier ([0, 1] images -> logits), generator (``latent_dim``)
    and the generator's encoder (images -> latents, for warm starts)."""

    classifier: nn.Module
    generator: nn.Module
    encoder: nn.Module


class Models(NamedTuple):
    """Models named on the command line: the classifier, and the generator and encoder if any."""

    classifier: nn.Module
    generator: nn.Module | None
    encoder: nn.Module | None
    description: str


def load_zoo_models(
    device: torch.device,
    weights_dir: Path | None = None,
    *,
    classifier: str = "mnist-classifier",
    classifier_dir: Path | None = None,
) -> DefenseModels:
    """The zoo classifier ``classifier``, ``mnist-gan`` and ``mnist-encoder``, in eval mode on ``device``.

    Args:
        device: where the models go.
        weights_dir: zoo folder of the generator and encoder (and of the classifier unless ``classifier_dir``).
        classifier: :data:`CLASSIFIERS` name (``mnist-pgd-at``, ``mnist-l2-at`` and ``mnist-rmd`` are the robustly trained ones).
        classifier_dir: folder of the classifier's weights if not ``weights_dir`` (e.g. a training run's ``--out``).
    """
    if classifier not in CLASSIFIERS:
        raise ValueError(f"unknown classifier {classifier!r}: expected one of {list(CLASSIFIERS)}")
    return DefenseModels(
        zoo.load(classifier, device, weights_dir=classifier_dir or weights_dir).eval(),
        zoo.load("mnist-gan", device, weights_dir=weights_dir).eval(),
        zoo.load("mnist-encoder", device, weights_dir=weights_dir).eval(),
    )


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


def build_defenses(
    names: tuple[str, ...], models: Models, seed: int = 0, *, surrogates: bool = True
) -> list[Defense]:
    """The named defenses (:data:`DEFENSES`) over the given models.

    ``projection-defense-gan`` attacks through the fast schedule (its inner loops) and ``G(E(x))`` (the
    ``surrogate-pgd`` stage) when an encoder is given and ``surrogates``; ``projection-fast`` is cheap enough to
    be attacked directly (no surrogates: on the demo's 10 points ``G(E(x))``'s successes did not transfer to it). Raises ``ValueError`` for a defense the models do not allow (no generator / encoder).
    """
    from manifold_defense.presets import schedule_config

    unknown = [n for n in names if n not in DEFENSES]
    if unknown:
        raise ValueError(f"unknown defense {unknown}: expected a subset of {list(DEFENSES)}")
    clf, gen, enc = models.classifier, models.generator, models.encoder
    out: list[Defense] = []
    for name in names:
        if name == "undefended":
            out.append(undefended_defense(clf))
            continue
        if gen is None:
            raise ValueError(f"defense {name} projects onto a generator: expected --generator, got none")
        if name == "projection-fast" and enc is None:
            raise ValueError(
                "defense projection-fast starts from the encoder's E(x): expected --encoder, got none"
            )
        cfg = schedule_config(_SCHEDULE[name], seed)
        sur: dict[str, nn.Module] = {}
        inner = None
        if surrogates and enc is not None and name == "projection-defense-gan":
            sur = projection_surrogates(clf, gen, enc, schedule_config("fast", seed), seed=seed)
            inner = "fast"
        # Defense-GAN's schedule unrolls 2010 generator passes per image: with surrogates, the unrolled attack
        # differentiates through the fast schedule instead (verdicts stay the real defense's)
        unrolled = schedule_config("fast", seed) if inner == "fast" else None
        out.append(
            projection_defense(
                name,
                clf,
                gen,
                cfg,
                encoder=enc,
                seed=seed,
                surrogates=sur,
                surrogate=inner,
                unrolled_config=unrolled,
            )
        )
    return out


def zoo_defenses(
    names: tuple[str, ...],
    device: torch.device,
    seed: int = 0,
    weights_dir: Path | None = None,
    *,
    classifier: str = "mnist-classifier",
    classifier_dir: Path | None = None,
    surrogates: bool = True,
) -> tuple[list[Defense], DefenseModels]:
    """The named defenses over the zoo models (classifier ``classifier``, ``mnist-gan``, ``mnist-encoder``)."""
    m = load_zoo_models(device, weights_dir, classifier=classifier, classifier_dir=classifier_dir)
    return build_defenses(
        names, Models(m.classifier, m.generator, m.encoder, "zoo"), seed, surrogates=surrogates
    ), m


def add_points_arg(p: argparse.ArgumentParser, defaults: str) -> None:
    """``--n`` (alias ``--points``, the spelling torchrun's own parser lets through: it reads ``--n`` as an
    ambiguous abbreviation of its options), stored as ``n``; ``defaults`` names the default counts in the help."""
    p.add_argument(
        "--n",
        "--points",
        dest="n",
        type=int,
        default=None,
        help=f"first N evaluation points ({defaults}); under torchrun spell it --points",
    )


def add_model_args(p: argparse.ArgumentParser) -> None:
    """``--classifier/--generator/--encoder`` (zoo name, module:factory or path.py:factory), their
    ``--*-weights FILE.safetensors``, ``--classifier-dir``, ``--weights-dir`` and ``--data``."""
    p.add_argument(
        "--classifier",
        default="mnist-classifier",
        help=f"zoo name ({', '.join(CLASSIFIERS)}), package.module:factory or path.py:factory",
    )
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
    p.add_argument(
        "--classifier-dir",
        type=Path,
        default=None,
        help="folder of a zoo --classifier's weights and record if not --weights-dir (e.g. a training run's --out)",
    )
    p.add_argument("--weights-dir", type=Path, default=None, help="zoo folder (default: the package's)")
    p.add_argument(
        "--data",
        default="mnist",
        help="mnist (test split), FILE.safetensors (tensors images, labels) or a factory returning (images, labels)",
    )


def load_models(args: argparse.Namespace, device: torch.device, mnist: bool) -> Models:
    """The models the command line names (zoo defaults on MNIST data; see :func:`add_model_args`)."""
    clf_name = getattr(args, "classifier", "mnist-classifier")
    gen_name = getattr(args, "generator", None)
    enc_name = getattr(args, "encoder", None)
    if gen_name is None:
        gen_name = "mnist-gan" if mnist else "none"
    if enc_name is None:
        enc_name = "mnist-encoder" if gen_name == "mnist-gan" else "none"
    zoo_dir = getattr(args, "weights_dir", None)
    clf_dir = getattr(args, "classifier_dir", None) or zoo_dir
    classifier = load_model(
        clf_name, "classifier", device, weights=getattr(args, "classifier_weights", None), zoo_dir=clf_dir
    )
    generator = encoder = None
    if gen_name != "none":
        generator = load_model(
            gen_name, "generator", device, weights=getattr(args, "generator_weights", None), zoo_dir=zoo_dir
        )
    if enc_name != "none":
        if generator is None:
            raise ValueError(
                "--encoder maps images to a generator's latents: expected --generator too, got none"
            )
        encoder = load_model(
            enc_name, "encoder", device, weights=getattr(args, "encoder_weights", None), zoo_dir=zoo_dir
        )
    return Models(
        classifier, generator, encoder, f"classifier {clf_name}, generator {gen_name}, encoder {enc_name}"
    )


def add_parsers(sub: Any) -> None:
    """Register ``robustness`` on the ``python -m eval`` sub-parsers."""
    p = sub.add_parser(
        "robustness",
        help="attack cascade, red flags and report over projection defenses (zoo or your own models)",
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
    p.add_argument(
        "--threats",
        default=None,
        help="comma-separated NORM-EPS (default linf-0.3,l2-2,l2-4: MNIST's; required for other image shapes)",
    )
    p.add_argument("--batch", type=int, default=None, help="points per attack call (full 50, quick 10)")
    for flag, field_name in _INT_FLAGS:
        p.add_argument(flag, dest=field_name, type=int, default=None, help=f"override {field_name}")
    p.add_argument(
        "--op-temperature",
        type=float,
        default=None,
        help="overpowered attack loss on logits / T (default 10; runs saved before the option existed used 1)",
    )
    p.add_argument(
        "--latent-linf-budget",
        type=float,
        default=None,
        help="l2 budget of the latent attacks under Linf (default 4)",
    )
    p.add_argument(
        "--no-curves", action="store_true", help="skip the accuracy-vs-eps curves (and their checks)"
    )
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    add_model_args(p)
    add_purifier_args(p)
    p.set_defaults(func=run_command)


_INT_FLAGS = (
    ("--draws", "draws"),
    ("--pgd-steps", "pgd_steps"),
    ("--bpda-steps", "bpda_steps"),
    ("--eot", "eot_samples"),
    ("--unrolled-steps", "unrolled_steps"),
    ("--unrolled-n", "unrolled_n"),
    ("--unrolled-batch", "unrolled_batch"),
    ("--apgd-steps", "apgd_steps"),
    ("--square-queries", "square_queries"),
    ("--latent-steps", "latent_steps"),
    ("--op-steps", "op_steps"),
    ("--curve-steps", "curve_steps"),
    ("--final-steps", "final_steps"),
)


def settings_from_args(args: argparse.Namespace) -> RobustnessSettings:
    """:class:`RobustnessSettings` from the parsed command line (validated)."""
    threats = args.threats if args.threats is not None else ",".join(DEFAULT_THREATS)
    overrides: dict[str, Any] = {
        "seed": args.seed,
        "attacks": tuple(args.attacks),
        "threats": tuple(t.strip() for t in threats.split(",") if t.strip()),
    }
    for _, name in _INT_FLAGS:
        if getattr(args, name, None) is not None:
            overrides[name] = getattr(args, name)
    for name in ("op_temperature", "latent_linf_budget"):
        if getattr(args, name, None) is not None:
            overrides[name] = getattr(args, name)
    if args.n is not None:
        overrides["n"] = args.n
    if args.batch is not None:
        overrides["batch_size"] = args.batch
    if args.dgan_n is not None:
        overrides["n_per_defense"] = {"projection-defense-gan": args.dgan_n}
    if getattr(args, "no_curves", False):
        overrides |= {"curve_eps_linf": (), "curve_eps_l2": ()}
    return RobustnessSettings.quick_preset(**overrides) if args.quick else RobustnessSettings(**overrides)


def check_image_shape(shape: tuple[int, ...], threats_given: bool) -> None:
    """Refuse MNIST's default budgets on images of another shape (``ValueError`` naming ``--threats``)."""
    if shape != MNIST_SHAPE and not threats_given:
        raise ValueError(
            f"the images have shape {shape}, not MNIST's {MNIST_SHAPE}: the default threat models "
            f"{','.join(DEFAULT_THREATS)} are MNIST's budgets; pass --threats NORM-EPS[,...] chosen for your images"
        )


def run_evaluation(
    args: argparse.Namespace,
    settings: RobustnessSettings,
    defenses: tuple[str, ...] | None,
    out: Path,
    progress: bool = True,
    command: str = "robustness",
) -> dict[str, Any]:
    """Load data and models, run :func:`eval.harness.run_robustness` (distributed under torchrun).

    ``defenses=None``: every defense the models allow (quick: the classifier and one projection). Images of
    another shape than MNIST's need ``args.threats`` (:func:`check_image_shape`); their curve budgets are derived
    from the threats (:func:`eval.harness.settings.default_curve_eps`).
    """
    from manifold_defense.presets import schedule_config
    from manifold_defense.training.distributed import setup_distributed

    if getattr(args, "threads", None) is not None:
        torch.set_num_threads(args.threads)
    ctx = setup_distributed(getattr(args, "device", "auto"))
    data = getattr(args, "data", "mnist")
    x, y, what = load_data(data, settings.n, ctx.device)
    shape = tuple(int(s) for s in x.shape[1:])
    check_image_shape(shape, getattr(args, "threats", None) is not None or data == "mnist")
    if shape != MNIST_SHAPE and (settings.curve_eps_linf or settings.curve_eps_l2):
        curve: dict[str, Any] = dict(default_curve_eps(settings.threats, shape))
        settings = dataclasses.replace(settings, **curve)
    models = load_models(args, ctx.device, mnist=data == "mnist")
    check_data_fits_models(x, y, what, models.classifier, models.generator, models.encoder)
    purified = purifier_defense_from_args(args, models.classifier, x, settings.seed)
    if defenses is None and purified is not None:
        defenses = ("undefended",)  # the purifier next to the bare classifier; --defenses adds projections
    if defenses is None:
        full: list[str] = [
            d
            for d in DEFENSES
            if d == "undefended"
            or (models.generator is not None and (d != "projection-fast" or models.encoder is not None))
        ]
        if settings.quick:
            full = full[:1] + [str(d) for d in ("projection-fast", "projection-defense-gan") if d in full][:1]
        defenses = tuple(full)
    built = build_defenses(defenses, models, settings.seed, surrogates=not getattr(args, "verbatim", False))
    if purified is not None:
        built.append(purified)
    meta = {
        "command": command_line(args),
        "device": str(ctx.device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "data": what,
        "models": models.description,
        "latent_start": "fast schedule (encoder warm start) inversion of each point"
        if models.encoder is not None
        else "Defense-GAN schedule inversion of each point",
    }
    latent_cfg = schedule_config("fast" if models.encoder is not None else "defense-gan", settings.seed)
    return run_robustness(
        settings,
        built,
        x,
        y,
        out,
        generator=models.generator,
        encoder=models.encoder,
        latent_config=latent_cfg,
        ctx=ctx,
        progress=progress,
        fresh=getattr(args, "fresh", False),
        meta=meta,
        command=command,
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
    out = (
        args.out
        if args.out is not None
        else Path("runs/robustness-quick" if settings.quick else "runs/robustness")
    )
    if int(os.environ.get("RANK", "0")) == 0:  # refuse before loading data and models (torchrun: rank 0)
        claim_run_folder(out, "robustness")
    start = time.perf_counter()
    record = run_evaluation(args, settings, args.defenses, out, progress=not args.no_progress)
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
