"""``python -m eval measure-zoo`` and ``python -m eval zoo``: measure the zoo's figures; print them.

``measure-zoo`` computes, on the MNIST test split, every figure the zoo's JSON records carry and writes them
into the records (``--write``) together with the exact command, ``n`` and the device:

- classifier: clean accuracy on the 10k test images;
- each generator (``mnist-gan``, ``mnist-vae``, ``mnist-ambient-gan``): projection with the Defense-GAN schedule (SGD momentum 0.7, lr 10,
  L = 200, R = 10, lr x0.1 at 0.8 L, z ~ N(0, 1/k)) on ``--n`` test images: per-pixel MSE (mean, median, 90th
  percentile) and the classifier's accuracy on the projections (the GAN also with the fast schedule from the
  encoder's E(x)); sample quality of ``--samples`` samples against as many test images
  (:func:`manifold_defense.metrics.sample_quality`: Fréchet distances on the classifier's features and on its
  logits, TF-GAN's MNIST score, the share of confident samples, the class histogram), each next to the same figure
  for as many training images (the real-data floor at that sample count); a sample grid PNG next to the weights;
- the VAE also with CSGM's schedule (Adam lr 0.01, 1000 steps, 10 restarts) on ``--csgm-n`` images, without CSGM's
  z-prior (its weight 0.1 is scaled for unnormalized Gaussian measurements and dominates a per-pixel loss);
- encoder: per-pixel MSE of G(E(x)), and the inversion steps an encoder warm start needs to reach the median MSE of
  the Defense-GAN schedule from random starts;
- the diffusion prior (``mnist-ddpm``): the same sample-quality figures, its samples drawn by DDIM with
  ``--ddim-steps`` network passes each (seed 0), with the time per sample.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.utils import save_image

from eval.autoattack import BUDGET_LABELS, budget_of
from eval.cli import command_line
from manifold_defense import zoo
from manifold_defense.data import load_mnist
from manifold_defense.devices import resolve_device
from manifold_defense.diffusion import DiffusionModel, sample
from manifold_defense.inversion import InversionConfig, invert
from manifold_defense.metrics import accuracy, sample_quality
from manifold_defense.models import latent_dim_of
from manifold_defense.presets import schedule_config

log = logging.getLogger(__name__)

#: Generators ``measure-zoo`` measures (projection schedules and sample quality), each when its weights are present.
GENERATORS: tuple[str, ...] = ("mnist-gan", "mnist-vae", "mnist-ambient-gan")
#: Every model ``measure-zoo`` measures, in its order (``--models`` chooses among them).
MEASURED: tuple[str, ...] = ("mnist-classifier", *GENERATORS, "mnist-encoder", "mnist-ddpm")


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "measure-zoo",
        help="measure the zoo's figures (optionally writing them into the records)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--weights-dir", type=Path, default=None, help="default: the package's zoo")
    p.add_argument(
        "--n", type=int, default=1000, help="test images for the projection figures (default 1000)"
    )
    p.add_argument("--samples", type=int, default=10_000, help="generator samples for the Fréchet distance")
    p.add_argument(
        "--csgm-n",
        type=int,
        default=200,
        help="test images for the VAE's CSGM-schedule projection (10k generator passes per image; default 200)",
    )
    p.add_argument("--batch", type=int, default=500, help="images per inversion batch")
    p.add_argument(
        "--ddim-steps", type=int, default=50, help="network passes per mnist-ddpm sample (DDIM, eta 0; default 50)"
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--write", action="store_true", help="write the figures into the JSON records and sample grids"
    )
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument(
        "--models", nargs="+", choices=MEASURED, default=None,
        help="measure only these (default: every one whose weights are in the zoo)",
    )  # fmt: skip
    p.set_defaults(func=measure)
    s = sub.add_parser("zoo", help="print the zoo's recorded figures")
    s.add_argument("--weights-dir", type=Path, default=None)
    s.add_argument(
        "--markdown", action="store_true", help="print the figures as the Markdown table of docs/zoo.md"
    )
    s.set_defaults(func=show)


def _project(
    generator: nn.Module,
    images: torch.Tensor,
    config: InversionConfig,
    batch: int,
    device: torch.device,
    encoder: nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    outs, losses = [], []
    for i in range(0, len(images), batch):
        inv = invert(generator, images[i : i + batch].to(device), config=config, encoder=encoder)
        outs.append(inv.x_hat.detach().cpu())
        losses.append(inv.loss.detach().cpu())
    return torch.cat(outs), torch.cat(losses)


def _mse_stats(mse: torch.Tensor) -> dict[str, float]:
    return {
        "mean": round(float(mse.mean()), 6),
        "median": round(float(mse.median()), 6),
        "p90": round(float(mse.quantile(0.9)), 6),
    }


def measure(args: argparse.Namespace) -> int:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.n <= 0 or args.samples < 2 or args.batch <= 0:
        raise ValueError(
            f"expected --n > 0, --samples >= 2, --batch > 0; got {args.n}, {args.samples}, {args.batch}"
        )
    dev = resolve_device(args.device)
    wd = args.weights_dir
    folder = Path(wd) if wd is not None else zoo.WEIGHTS_DIR
    command = command_line(args)
    device_name = str(dev) if dev.type == "cpu" else f"{dev} ({torch.cuda.get_device_name(dev)})"
    test = load_mnist("test", args.data_dir)
    x, y = test.images[: args.n], test.labels[: args.n]
    clf = zoo.load("mnist-classifier", dev, weights_dir=wd)
    common = {
        "command": command,
        "device": device_name,
        "torch": torch.__version__,
        "data": "MNIST test split",
    }
    present = set(zoo.available(wd))
    models = [m for m in MEASURED if m in present and (args.models is None or m in args.models)]
    missing = sorted(set(args.models or ()) - present)
    if missing:
        raise ValueError(f"--models: expected models with weights in {folder}, got {missing} without")
    results: dict[str, Any] = {}
    if "mnist-classifier" in models:
        results["mnist-classifier"] = {
            **common,
            "n": len(test),
            "clean_accuracy": accuracy(clf, test.images, test.labels),
        }
        if args.write:
            _merge_figures("mnist-classifier", results["mnist-classifier"], folder)
    n_samples = min(args.samples, len(test))
    reference = test.images[:n_samples]
    real_floor = sample_quality(clf, load_mnist("train", args.data_dir, limit=n_samples).images, reference)
    dgan = InversionConfig.defense_gan()
    reference_median = None
    for name in (m for m in models if m in GENERATORS):
        gen = zoo.load(name, dev, weights_dir=wd)
        start = time.perf_counter()
        x_hat, mse = _project(gen, x, dgan, args.batch, dev)
        seconds = time.perf_counter() - start
        fig: dict[str, Any] = {
            **common,
            "n": args.n,
            "defense_gan_projection": {
                "schedule": "InversionConfig.defense_gan() (L=200, R=10)",
                "mse": _mse_stats(mse),
                "accuracy_on_projections": accuracy(clf, x_hat, y),
                "seconds_per_image": round(seconds / args.n, 4),
            },
        }
        if name == "mnist-gan":
            reference_median = float(mse.median())
            enc = zoo.load("mnist-encoder", dev, weights_dir=wd)
            x_f, mse_f = _project(gen, x, schedule_config("fast"), args.batch, dev, encoder=enc)
            fig["fast_projection"] = {
                "schedule": "fast: Adam lr 0.05, 50 steps, 2 restarts from E(x) (mnist-encoder)",
                "mse": _mse_stats(mse_f),
                "accuracy_on_projections": accuracy(clf, x_f, y),
            }
        if name == "mnist-vae":
            n_c = min(args.csgm_n, args.n)
            x_c, mse_c = _project(gen, x[:n_c], InversionConfig.csgm(z_prior_weight=0.0), args.batch, dev)
            fig["csgm_projection"] = {
                "n": n_c,
                "schedule": "InversionConfig.csgm(z_prior_weight=0) (Adam 0.01, 1000 steps, R=10; CSGM's z-prior 0.1 is scaled for unnormalized Gaussian measurements, far too strong for A = I)",
                "mse": _mse_stats(mse_c),
                "accuracy_on_projections": accuracy(clf, x_c, y[:n_c]),
            }
        gen_seed = torch.Generator().manual_seed(0)
        with torch.no_grad():
            samples = torch.cat(
                [
                    gen(
                        torch.randn(min(1000, n_samples - i), latent_dim_of(gen), generator=gen_seed).to(dev)
                    ).cpu()
                    for i in range(0, n_samples, 1000)
                ]
            )
        fig["samples"] = {
            **sample_quality(clf, samples, reference),
            "reference": f"the first {n_samples} test images",
            "floor_train_vs_test": real_floor,
            "grid": f"{name}-samples.png",
        }
        if args.write:
            save_image(samples[:100], folder / f"{name}-samples.png", nrow=10, padding=1)
        results[name] = fig
        log.info("%s: %s", name, json.dumps(fig))
        if args.write:  # as each model is done, so an interrupted run keeps what it measured
            _merge_figures(name, fig, folder)
    if "mnist-encoder" in models:
        results["mnist-encoder"] = _measure_encoder(args, x, y, clf, reference_median, common, folder)
    if "mnist-ddpm" in models:
        fig = _measure_ddpm(args, dev, clf, reference, real_floor, common, folder)
        results["mnist-ddpm"] = fig
        if args.write:
            _merge_figures("mnist-ddpm", fig, folder)
    print(json.dumps(results, indent=1))
    return 0


def _measure_ddpm(
    args: argparse.Namespace,
    dev: torch.device,
    clf: nn.Module,
    reference: torch.Tensor,
    real_floor: dict[str, Any],
    common: dict[str, Any],
    folder: Path,
) -> dict[str, Any]:
    """Sample quality of the diffusion prior (DDIM samples, seed 0) against ``reference``, with the time per sample."""
    if args.ddim_steps <= 0:
        raise ValueError(f"expected --ddim-steps > 0, got {args.ddim_steps}")
    model = zoo.load("mnist-ddpm", dev, weights_dir=args.weights_dir)
    if not isinstance(model, DiffusionModel):
        raise TypeError(f"expected mnist-ddpm to load as a DiffusionModel, got {type(model).__name__}")
    start = time.perf_counter()
    samples = sample(model, len(reference), steps=args.ddim_steps, seed=0, batch_size=args.batch, device=dev)
    seconds = time.perf_counter() - start
    if args.write:
        save_image(samples[:100], folder / "mnist-ddpm-samples.png", nrow=10, padding=1)
    return {
        **common,
        "samples": {
            **sample_quality(clf, samples, reference),
            "sampler": f"DDIM, eta 0, {args.ddim_steps} network passes per sample, seed 0",
            "ddim_steps": args.ddim_steps,
            "seconds_per_sample": round(seconds / len(reference), 4),
            "reference": f"the first {len(reference)} test images",
            "floor_train_vs_test": real_floor,
            "grid": "mnist-ddpm-samples.png",
        },
    }


def _measure_encoder(
    args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor, clf: nn.Module, reference_median: float | None,
    common: dict[str, Any], folder: Path,
) -> dict[str, Any]:  # fmt: skip
    """The encoder's figures; the reference median is the GAN's Defense-GAN projection of this run, else its
    record's when it was measured on as many images."""
    dev, wd = resolve_device(args.device), args.weights_dir
    if reference_median is None:
        proj = zoo.record("mnist-gan", wd).get("figures", {}).get("defense_gan_projection")
        if proj and zoo.record("mnist-gan", wd)["figures"].get("n") == args.n:
            reference_median = float(proj["mse"]["median"])
    gen = zoo.load("mnist-gan", dev, weights_dir=wd)
    enc = zoo.load("mnist-encoder", dev, weights_dir=wd)
    with torch.no_grad():
        x_enc = torch.cat(
            [gen(enc(x[i : i + args.batch].to(dev))).cpu() for i in range(0, len(x), args.batch)]
        )
    enc_fig: dict[str, Any] = {
        **common,
        "n": args.n,
        "mse_G_of_E": _mse_stats((x_enc - x).pow(2).flatten(1).mean(1)),
        "accuracy_on_G_of_E": accuracy(clf, x_enc, y),
    }
    steps_needed = None
    for steps in (0, 5, 10, 20, 50, 100, 200):
        cfg = InversionConfig(optimizer="adam", lr=0.01, steps=steps, restarts=1, init="encoder")
        _, mse_w = _project(gen, x, cfg, args.batch, dev, encoder=enc)
        enc_fig.setdefault("warm_start_median_mse_by_steps", {})[str(steps)] = round(float(mse_w.median()), 6)
        if (
            steps_needed is None
            and reference_median is not None
            and float(mse_w.median()) <= reference_median
        ):
            steps_needed = steps
    enc_fig["warm_start"] = {
        "schedule": "Adam lr 0.01, 1 restart, from E(x)",
        "reference": "Defense-GAN schedule from random starts: 2010 generator evaluations per image (201 x 10)",
        "reference_median_mse": reference_median,
        "steps_to_reach_reference": steps_needed,
        "generator_evaluations_saved_per_image": None if steps_needed is None else 2010 - (steps_needed + 1),
    }
    log.info("mnist-encoder: %s", json.dumps(enc_fig))
    if args.write:
        _merge_figures("mnist-encoder", enc_fig, folder)
    return enc_fig


def _merge_figures(name: str, figures: dict[str, Any], folder: Path) -> None:
    """Write ``figures`` into the record of ``name``, keeping figures other commands recorded there (e.g. the
    on-manifold ones of ``eval defense --write`` or AutoAttack's)."""
    zoo.update_record(name, {"figures": {**zoo.record(name, folder).get("figures", {}), **figures}}, folder)


def markdown_table(weights_dir: Path | None = None) -> str:
    """The zoo's recorded figures as a Markdown table (what docs/zoo.md shows)."""
    rows = ["| model | figure | value | n | measured on |", "|---|---|---|---|---|"]
    for name in zoo.available(weights_dir):
        fig = zoo.record(name, weights_dir).get("figures", {})
        if not fig:
            rows.append(f"| `{name}` | (not measured) | | | |")
            continue
        where = fig.get("device", "")
        n = fig.get("n", "")

        def add(label: str, value: Any, count: Any = n, name: str = name, where: str = where) -> None:
            rows.append(f"| `{name}` | {label} | {value} | {count} | {where} |")

        if "clean_accuracy" in fig:
            add("clean test accuracy", f"{fig['clean_accuracy']:.4f}")
        for key, label in (
            ("defense_gan_projection", "Defense-GAN schedule"),
            ("csgm_projection", "CSGM schedule"),
        ):
            proj = fig.get(key)
            if proj:
                mse = proj["mse"]
                add(
                    f"{label}: per-pixel MSE mean / median / p90",
                    f"{mse['mean']:.4f} / {mse['median']:.4f} / {mse['p90']:.4f}",
                    proj.get("n", n),
                )
                add(
                    f"{label}: classifier accuracy on projections",
                    f"{proj['accuracy_on_projections']:.4f}",
                    proj.get("n", n),
                )
        if "fast_projection" in fig:
            fast = fig["fast_projection"]
            add(
                "fast schedule (E(x) start, 50 Adam steps): MSE mean / median; accuracy on projections",
                f"{fast['mse']['mean']:.4f} / {fast['mse']['median']:.4f}; {fast['accuracy_on_projections']:.4f}",
            )
        samples = fig.get("samples")
        if samples and "frechet_features" in samples:
            floor = samples["floor_train_vs_test"]
            for key, label in (
                ("frechet_features", "Fréchet distance, classifier features (train-vs-test floor)"),
                ("frechet_logits", "Fréchet distance, classifier logits (TF-GAN; floor)"),
                ("mnist_score", "MNIST score (TF-GAN; train images)"),
                ("confident_fraction", "share of samples classified with confidence >= 0.9 (train images)"),
                ("histogram_min_max", "class histogram min/max (train images)"),
                ("histogram_tv", "class histogram, total variation from the test images' (train images)"),
            ):
                if key in samples:  # records measured before a figure existed lack it
                    add(label, f"{samples[key]} ({floor.get(key, '-')})", samples["n"])
            add(
                "class histogram of samples",
                " ".join(str(c) for c in samples["class_histogram"]),
                samples["n"],
            )
        elif samples:
            add(
                "Fréchet feature distance of samples (train-vs-test floor)",
                f"{samples['frechet_distance']} ({samples['frechet_floor_train_vs_test']})",
                samples["n"],
            )
            add(
                "class histogram of samples",
                " ".join(str(c) for c in samples["class_histogram"]),
                samples["n"],
            )
        for key in sorted(k for k in fig if k.startswith("autoattack_")):
            aa = fig[key]
            budget = BUDGET_LABELS[budget_of(aa)]
            add(
                f"AutoAttack ({aa['version']}, {budget}) {key.removeprefix('autoattack_').replace('_', ' ')}: "
                "clean / robust accuracy",
                f"{aa['clean_accuracy']:.4f} / {aa['robust_accuracy']:.4f}",
                aa["n"],
            )
        for key in sorted(k for k in fig if re.match(r"pgd\d+_", k)):
            pg = fig[key]
            steps, norm, eps = key.removeprefix("pgd").split("_")
            add(
                f"PGD-{steps} ({pg['version']}) {norm} {eps}: clean / robust accuracy",
                f"{pg['clean_accuracy']:.4f} / {pg['robust_accuracy']:.4f}",
                pg["n"],
            )
        for key in sorted(k for k in fig if k.startswith("onmanifold_")):
            onm = fig[key]
            add(
                f"on-manifold attack success rate, pixel l2 <= {onm['threat']['eps']:g} "
                f"({onm['attack']['steps']} steps; of the images G(z) it labels correctly)",
                "-"
                if onm["success_rate"] is None
                else f"{onm['success_rate']:.4f} ({onm['successes']} of {onm['eligible']})",
                onm["n"],
            )
        for key in sorted(k for k in fig if k.startswith("overpowered_")):
            op = fig[key]
            add(
                "overpowered attack accuracy ("
                + ("start correct and " if "accuracy_meaning" in op else "")
                + f"pairs consistent), pair l2 <= {op['threat']['eps']:g} "
                f"({op['attack']['steps']} steps"
                + (
                    f", logits / {op['attack']['temperature']:g}"
                    if op["attack"].get("temperature", 1.0) != 1.0
                    else ""
                )
                + ")",
                f"{op['accuracy']:.4f}"
                + (f" (consistency {op['consistency']:.4f})" if "accuracy_meaning" in op else ""),
                op["n"],
            )
        if "mse_G_of_E" in fig:
            add(
                "per-pixel MSE of G(E(x)) mean / median",
                f"{fig['mse_G_of_E']['mean']:.4f} / {fig['mse_G_of_E']['median']:.4f}",
            )
            add("classifier accuracy on G(E(x))", f"{fig['accuracy_on_G_of_E']:.4f}")
            warm = fig.get("warm_start", {})
            needed = warm.get("steps_to_reach_reference")
            if needed is None and warm:  # not reached on the step grid: say so, with how close the last step came
                by_steps = fig.get("warm_start_median_mse_by_steps", {})
                last = max(by_steps, key=int) if by_steps else None
                value = (
                    f"not within {last} (median MSE {by_steps[last]:.5f} there, target {warm['reference_median_mse']:.5f})"
                    if last is not None and warm.get("reference_median_mse") is not None
                    else "not reached"
                )
            else:
                value = f"{needed} ({warm.get('generator_evaluations_saved_per_image')})"
            add("Adam steps from E(x) to the Defense-GAN median MSE (evaluations saved of 2010)", value)
    return "\n".join(rows)


def show(args: argparse.Namespace) -> int:
    """Print each zoo model's recorded figures."""
    if args.markdown:
        print(markdown_table(args.weights_dir))
        return 0
    for name in zoo.available(args.weights_dir):
        try:
            rec = zoo.record(name, args.weights_dir)
        except FileNotFoundError as err:
            print(f"{name}: {err}")
            continue
        train = rec.get("training") or rec.get("joint_training") or {}
        print(
            f"== {name}: {rec['architecture']}  trained in {train.get('seconds')} s on {train.get('device')}"
        )
        print(json.dumps(rec.get("figures", {}), indent=1))
    return 0
