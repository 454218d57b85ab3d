"""Plot a GAN run's sample-quality curve from its ``history.json`` (the trainer's validation entries).

Usage: ``python scripts/plot_gan_history.py HISTORY.json OUT.png [--reference VALUE LABEL] [--mark STEP LABEL]
[--compare HISTORY.json LABEL]``

Left panel: the Fréchet feature distance of the validation samples against steps (log scale); right panel: the class
histogram's min/max ratio. ``--reference`` draws a horizontal line on the left panel (e.g. a previous generator's
figure), ``--mark`` a vertical line on both (e.g. the step a shipped version stopped at), ``--compare`` overlays
another run's curves (e.g. a recipe change against the shipped run). Used for ``docs/figures/gan_training_curve.png``
and ``docs/figures/gan_recipe_pacgan.png`` (docs/prior.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("history", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--reference", nargs=2, metavar=("VALUE", "LABEL"))
    parser.add_argument("--mark", nargs=2, action="append", default=[], metavar=("STEP", "LABEL"))
    parser.add_argument("--compare", nargs=2, action="append", default=[], metavar=("HISTORY", "LABEL"))
    parser.add_argument("--label", default="mnist-gan (non-saturating, EMA)")
    args = parser.parse_args(argv)
    runs = [(args.history, args.label)] + [(Path(h), label) for h, label in args.compare]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4))
    for path, label in runs:
        rows = [e for e in json.loads(path.read_text()) if "val_frechet" in e]
        if not rows:
            parser.error(f"{path} has no validation entries (val_frechet): was the run trained with --val-every?")
        steps = [e["step"] for e in rows]
        left.plot(steps, [e["val_frechet"] for e in rows], "o-", ms=4, label=label)
        right.plot(steps, [e["val_hist_ratio"] for e in rows], "o-", ms=4)
    left.set_yscale("log")
    left.set_ylabel("Fréchet feature distance (2000 samples)")
    right.set_ylabel("class histogram min/max (2000 samples)")
    if args.reference:
        left.axhline(float(args.reference[0]), color="gray", ls="--", label=args.reference[1])
    for step, label in args.mark:
        for ax in (left, right):
            ax.axvline(float(step), color="tab:red", ls=":", label=label if ax is left else None)
    for ax in (left, right):
        ax.set_xlabel("generator steps")
    left.legend(fontsize=7)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out} ({len(runs)} run(s))")


if __name__ == "__main__":
    main()
