"""AmbientGAN against the unmeasure baseline at equal training length (docs/ambient.md, "Against a baseline of equal
length"): sample quality of two generators measured as ``python -m eval measure-zoo`` does (10k samples from seed-0
latents against the first 10k test images, on the zoo classifier).

Prepare the two folders, then run ``python scripts/ambient_equal_length.py [THREADS]``::

    mkdir -p runs/ambient14k-zoo
    git show 875f76d:manifold_defense/zoo/weights/mnist-ambient-gan.safetensors > runs/ambient14k-zoo/mnist-ambient-gan.safetensors
    git show 875f76d:manifold_defense/zoo/weights/mnist-ambient-gan.json > runs/ambient14k-zoo/mnist-ambient-gan.json
    python -m eval train ambient --measurement block-pixels --p 0.9 --baseline unmeasure \\
        --inpaint normalized-convolution --out runs/unmeasure-nc-p09-long --steps 14000 --threads 1 --val-every 2000

Writes ``runs/compare_equal_length.json``.
"""

import json
import sys
from pathlib import Path

import torch

from manifold_defense import zoo
from manifold_defense.data import load_mnist
from manifold_defense.metrics import sample_quality

RUNS = (
    ("ambient 14k (git 875f76d)", "mnist-ambient-gan", "runs/ambient14k-zoo"),
    ("unmeasure normalized-convolution 14k", "mnist-gan", "runs/unmeasure-nc-p09-long"),
)


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    clf = zoo.load("mnist-classifier")
    reference = load_mnist("test", None, limit=10000).images
    out = {}
    for label, name, folder in RUNS:
        gen = zoo.load(name, weights_dir=folder)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            samples = torch.cat([gen(torch.randn(1000, gen.latent_dim, generator=g)) for _ in range(10)])
        out[label] = sample_quality(clf, samples, reference)
        print(label, json.dumps({k: v for k, v in out[label].items() if k != "class_histogram"}), flush=True)
    Path("runs/compare_equal_length.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
