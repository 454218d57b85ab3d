"""``python -m eval demo``: the main job (``make demo``).

On the shipped zoo and the offline MNIST bundle it writes, into ``results/demo/`` (or ``--out``):

- ``robustness/``: the QUICK robustness report (:mod:`eval.robustness`): the undefended classifier and the projection
  defense (fast schedule) under the attack cascade (clean, naive PGD, BPDA, BPDA+EOT, unrolled, APGD, Square,
  on-manifold, overpowered) at Linf 0.3 and l2 2 and 4, accuracy-vs-eps curves, red flags and audit:
  ``report.md``, ``results.json``, ``accuracy_vs_eps.png``, ``grid_*.png``;
- ``cs/``: the QUICK compressed-sensing benchmark (:mod:`eval.cs`; m in {50, 200}, CSGM with ``mnist-gan`` and
  the Lasso in three bases, :data:`eval.cs.QUICK_METHODS`): ``results.md``, ``results.json``, ``mse_vs_m.png``
  and reconstruction grids;
- ``mnist-gan-samples.png``, ``mnist-vae-samples.png``: samples of the zoo generators.

It prints the zoo's recorded figures, the robustness table and flags, the compressed-sensing errors, where the
reports are and every setting that is reduced versus the full protocols (``python -m eval robustness`` and
``python -m eval cs`` without ``--quick``). ``make demo`` (``--threads 1``) took 196-250 s on the shared 2-core CPU,
the compressed-sensing part 25-29 s (README); each run starts afresh.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torchvision.utils import save_image

from eval.cli import command_line
from eval.run_folder import claim_run_folder
from manifold_defense import zoo
from manifold_defense.devices import resolve_device
from manifold_defense.models import latent_dim_of


def add_parsers(sub: Any) -> None:
    """Register ``demo`` on the ``python -m eval`` sub-parsers."""
    p = sub.add_parser(
        "demo",
        help="the main job: quick robustness report and quick compressed-sensing figure into results/demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("results/demo"))
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--n", type=int, default=10, help="test images of the robustness report (default 10)")
    p.add_argument(
        "--parts",
        default="robustness,cs",
        help="comma-separated subset of robustness,cs (default both)",
    )
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.set_defaults(func=run)


def _figure_lines(name: str, rec: dict[str, Any]) -> list[str]:
    fig = rec.get("figures", {})
    train = rec.get("training") or rec.get("joint_training") or {}
    lines = [f"{name}: trained in {train.get('seconds')} s on {train.get('device')} ({train.get('command')})"]
    if "clean_accuracy" in fig:
        lines.append(f"  clean test accuracy {fig['clean_accuracy']:.4f} (n={fig['n']})")
    proj = fig.get("defense_gan_projection")
    if proj:
        lines.append(
            f"  Defense-GAN projection (L=200, R=10), n={fig['n']}: per-pixel MSE mean {proj['mse']['mean']:.4f} "
            f"median {proj['mse']['median']:.4f}; classifier accuracy on projections {proj['accuracy_on_projections']:.4f}"
        )
    samples = fig.get("samples")
    if samples and "frechet_features" in samples:
        floor = samples["floor_train_vs_test"]
        lines.append(
            f"  samples (n={samples['n']}; real-data floor in parentheses): Fréchet feature distance "
            f"{samples['frechet_features']} ({floor['frechet_features']}), MNIST score {samples['mnist_score']} "
            f"({floor['mnist_score']}), confident {samples['confident_fraction']} ({floor['confident_fraction']}), "
            f"class histogram {samples['class_histogram']}"
        )
    if "mse_G_of_E" in fig:
        warm = fig.get("warm_start", {})
        lines.append(
            f"  G(E(x)) per-pixel MSE mean {fig['mse_G_of_E']['mean']:.4f}; warm start reaches the Defense-GAN "
            f"median MSE after {warm.get('steps_to_reach_reference')} Adam steps "
            f"({warm.get('generator_evaluations_saved_per_image')} generator evaluations saved per image)"
        )
    if not fig:
        lines.append("  (no measured figures recorded yet: run `python -m eval measure-zoo --write`)")
    return lines


def _robustness(out: Path, args: argparse.Namespace) -> list[str]:
    from eval.harness import ATTACKS, RobustnessSettings
    from eval.harness.command import QUICK_DEFENSES, Evaluation, run_evaluation
    from eval.robustness import summary_lines

    settings = RobustnessSettings.quick_preset(n=args.n)
    claim_run_folder(out, "robustness")
    request = Evaluation(
        settings, out, QUICK_DEFENSES, device=args.device, fresh=True, progress=not args.no_progress,
        command_line=command_line(args),
    )  # fmt: skip
    record = run_evaluation(request)
    print("\n".join(summary_lines(record)))
    reduced = "; ".join(
        f"{k} {v['this_run']} (full {v['full']})" for k, v in record["reduced_vs_full"].items()
    )
    return [
        f"robustness report: {out}/report.md (results.json, accuracy_vs_eps.png, grid_*.png)",
        f"  reduced vs the full protocol: defenses {list(QUICK_DEFENSES)} (full adds projection-defense-gan); "
        f"{reduced}; attacks: all of {list(ATTACKS)}",
        "  full protocol: python -m eval robustness --out runs/robustness (docs/defense.md: runtime)",
    ]


def _cs(out: Path, args: argparse.Namespace) -> list[str]:
    from eval.cs import QUICK_METHODS, run_benchmark, run_reductions
    from eval.cs_core import quick_protocol

    protocol = quick_protocol()
    threads = torch.get_num_threads()
    if args.threads is None:
        # One torch thread unless --threads says otherwise: on the shared 2-core CPU, torch's default (2) took this
        # part 125 s of wall time and 84 s of CPU, one thread 42 s and 33 s (load average 4).
        torch.set_num_threads(1)
    try:
        results = run_benchmark(
            protocol,
            out,
            QUICK_METHODS,  # CSGM (GAN) and Lasso; the VAE, AmbientGAN, DIP and sparse-gen are in the full run
            args.device,
            grids=True,
            threads=1,
            progress=not args.no_progress,
            command="python -m eval demo (quick cs)",
        )
    finally:
        torch.set_num_threads(threads)
    print("compressed sensing (QUICK), per-pixel MSE:")
    print("m      " + " ".join(f"{k:>14}" for k in results["methods"]))
    for i, m in enumerate(results["m"]):
        print(f"{m:<6} " + " ".join(f"{results['methods'][k]['mse'][i]:>14.5f}" for k in results["methods"]))
    reduced = "; ".join(
        f"{k} {v['quick']} (full {v['full']})" for k, v in run_reductions(QUICK_METHODS).items()
    )
    return [
        f"compressed-sensing figure: {out}/mse_vs_m.png (results.md, results.json, grid_*.png)",
        f"  reduced vs the full protocol: {reduced}",
        "  full protocol: manifold-defense cs --out runs/cs (hours on a CPU)",
    ]


def run(args: argparse.Namespace) -> int:
    """Handler of ``python -m eval demo``."""
    if args.n <= 0:
        raise ValueError(f"expected --n > 0, got {args.n}")
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    unknown = [p for p in parts if p not in ("robustness", "cs")]
    if unknown or not parts:
        raise ValueError(
            f"unknown demo part {unknown}: expected a subset of ['robustness', 'cs'], got {args.parts!r}"
        )
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    out: Path = claim_run_folder(args.out, "demo")
    dev = resolve_device(args.device)
    print("manifold-defense demo: the zoo's recorded figures")
    for name in zoo.available():
        print("\n".join(_figure_lines(name, zoo.record(name))))
    gen_seed = torch.Generator().manual_seed(0)
    for name in ("mnist-gan", "mnist-vae"):
        gen = zoo.load(name, dev)
        with torch.no_grad():
            samples = gen(torch.randn(64, latent_dim_of(gen), generator=gen_seed).to(dev)).cpu()
        save_image(samples, out / f"{name}-samples.png", nrow=8, padding=1)
    notes = [f"generator samples: {out}/mnist-gan-samples.png, {out}/mnist-vae-samples.png"]
    if "robustness" in parts:
        print(
            "\nQUICK robustness report (reduced settings; the table is a smoke run, not the reported figures)"
        )
        notes += _robustness(out / "robustness", args)
    if "cs" in parts:
        if (out / "cs").exists():
            shutil.rmtree(out / "cs")  # a fresh quick benchmark every run
        print("\nQUICK compressed-sensing benchmark (reduced protocol)")
        notes += _cs(out / "cs", args)
    print("\n" + "\n".join(notes))
    print(f"demo finished in {time.perf_counter() - start:.1f} s; main report: {out}/robustness/report.md")
    return 0
