"""``python -m eval demo``: the main job (``make demo``).

Current stage (foundation): prints the zoo's measured figures from its JSON records, writes a grid of samples of
each generator and a grid of test digits next to their Defense-GAN projections onto the GAN's range, all to
``results/demo/`` (or ``--out``). Later stages (the robustness harness) extend it into the full quick report.
Runs offline on a CPU in well under a minute.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from torchvision.utils import save_image

from manifold_defense import zoo
from manifold_defense.data import load_mnist
from manifold_defense.devices import resolve_device
from manifold_defense.inversion import InversionConfig, invert
from manifold_defense.metrics import predict
from manifold_defense.models import latent_dim_of


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="the main job: zoo figures, samples and projections",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("results/demo"))
    p.add_argument("--device", default="auto")
    p.add_argument("--n", type=int, default=8, help="test digits to project (default 8)")
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
    if samples:
        lines.append(
            f"  samples: Fréchet feature distance {samples['frechet_distance']} (train-vs-test floor "
            f"{samples['frechet_floor_train_vs_test']}), class histogram {samples['class_histogram']}"
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


def run(args: argparse.Namespace) -> int:
    if args.n <= 0:
        raise ValueError(f"expected --n > 0, got {args.n}")
    start = time.perf_counter()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(args.device)
    print("manifold-defense demo (foundation stage): the zoo's measured figures, from its JSON records")
    for name in zoo.available():
        print("\n".join(_figure_lines(name, zoo.record(name))))
    gen_seed = torch.Generator().manual_seed(0)
    for name in ("mnist-gan", "mnist-vae"):
        gen = zoo.load(name, dev)
        with torch.no_grad():
            samples = gen(torch.randn(64, latent_dim_of(gen), generator=gen_seed).to(dev)).cpu()
        save_image(samples, out / f"{name}-samples.png", nrow=8, padding=1)
    test = load_mnist("test", limit=args.n)
    gen, clf = zoo.load("mnist-gan", dev), zoo.load("mnist-classifier", dev)
    inv = invert(gen, test.images.to(dev), config=InversionConfig.defense_gan())
    x_hat = inv.x_hat.detach().cpu()
    save_image(torch.cat([test.images, x_hat]), out / "projections.png", nrow=args.n, padding=1)
    summary = {
        "labels": test.labels.tolist(),
        "predicted_on_images": predict(clf, test.images).tolist(),
        "predicted_on_projections": predict(clf, x_hat).tolist(),
        "projection_mse": [round(v, 5) for v in inv.loss.tolist()],
        "schedule": "InversionConfig.defense_gan()",
    }
    (out / "projections.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(
        f"\nprojected {args.n} test digits with the Defense-GAN schedule: per-pixel MSE "
        f"{sum(summary['projection_mse']) / args.n:.4f}; labels {summary['labels']}, "
        f"predictions on projections {summary['predicted_on_projections']}"
    )
    print(
        f"wrote {out}/mnist-gan-samples.png, {out}/mnist-vae-samples.png, {out}/projections.png "
        f"(top row: test digits; bottom row: projections) in {time.perf_counter() - start:.1f} s"
    )
    return 0
