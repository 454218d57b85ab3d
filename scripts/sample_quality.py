"""Sample quality of candidate ``mnist-gan`` weights, the protocol of ``python -m eval measure-zoo``'s samples.

Usage: ``python scripts/sample_quality.py WEIGHTS_DIR [WEIGHTS_DIR ...] [--samples N] [--threads T]``

Each folder holds ``mnist-gan.safetensors`` and its record (a training run's ``--out``). For each, ``N`` samples
(latents from seed 0, as ``measure-zoo`` draws them) are compared with the first ``N`` test images on the zoo
classifier (:func:`manifold_defense.metrics.sample_quality`); one JSON line per folder. No projection figures, so a
candidate is screened in about two minutes before the full ``measure-zoo`` run (an hour at ``--n 1000``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from manifold_defense import zoo
from manifold_defense.data import load_mnist
from manifold_defense.metrics import sample_quality
from manifold_defense.models import latent_dim_of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weights_dirs", nargs="+", type=Path)
    parser.add_argument("--samples", type=int, default=10000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.samples < 2:
        parser.error(f"--samples must be >= 2, got {args.samples}")
    torch.set_num_threads(args.threads)
    clf = zoo.load("mnist-classifier", "cpu")
    test = load_mnist("test", limit=args.samples).images
    for folder in args.weights_dirs:
        gen = zoo.load("mnist-gan", "cpu", weights_dir=folder)
        z = torch.randn(args.samples, latent_dim_of(gen), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            samples = torch.cat([gen(chunk) for chunk in z.split(500)])
        print(json.dumps({"weights_dir": str(folder), **sample_quality(clf, samples, test)}))


if __name__ == "__main__":
    main()
