"""``python -m eval purifier-cost --out DIR``: what one purified image costs, for every generative purifier, side by side.

Purifiers: DiffPure (``mnist-ddpm``, ``--t-star``, ``--steps`` DDIM steps: UNet passes), the fast projection
(``mnist-gan`` from ``mnist-encoder``'s E(x): generator passes) and Defense-GAN's projection schedule (L = 200,
R = 10). Each purifies the first ``--n`` test images in batches of ``--batch``; the three are timed in turns, in
``--repeats`` rounds with the order rotated each round, and the median seconds per image is reported with the
network passes per image and the ratios to DiffPure, so a load change during the run touches all three alike.
A benchmark, not a test: state the machine's load beside the figures (the record holds the load average before
and after).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from eval.cli import command_line
from eval.diffpure import add_prior_args, check_positive, load_prior
from eval.run_folder import claim_run_folder, run_folder_session, write_record
from manifold_defense import zoo
from manifold_defense.data import load_mnist
from manifold_defense.diffpure import DiffusionPurifier
from manifold_defense.presets import projection_purifier


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "purifier-cost",
        help="seconds and network passes per purified image: DiffPure, fast projection, Defense-GAN (side by side)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--t-star", type=int, required=True)
    p.add_argument("--steps", type=int, default=10, help="DiffPure's DDIM reverse steps")
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    add_prior_args(p)
    p.set_defaults(func=run)


def _timed(purify: torch.nn.Module, x: torch.Tensor, batch: int) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(x), batch):
            purify(x[i : i + batch])
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    return (time.perf_counter() - start) / len(x)


def _passes(purifier: torch.nn.Module) -> float:
    """Network passes per image of the purifier's last call (UNet passes, or generator passes with restarts)."""
    if isinstance(purifier, DiffusionPurifier):
        return float(purifier.last_network_evals)
    evals = getattr(purifier, "last_generator_evals", None)
    if not isinstance(evals, torch.Tensor):
        raise TypeError(f"expected a purifier that counts its network passes, got {type(purifier).__name__}")
    return round(float(evals.float().mean()), 1)


@run_folder_session()
def run(args: argparse.Namespace) -> int:
    check_positive(args, ("steps", "n", "batch", "repeats"))
    prior, dev, _ = load_prior(args, args.t_star)
    gen, enc = zoo.load("mnist-gan", dev), zoo.load("mnist-encoder", dev)
    purifiers: dict[str, tuple[torch.nn.Module, str]] = {
        "diffpure": (DiffusionPurifier(prior, args.t_star, args.steps, randomize=True), "UNet"),
        "projection-fast": (projection_purifier(gen, "fast", encoder=enc), "generator"),
        "projection-defense-gan": (projection_purifier(gen, "defense-gan"), "generator"),
    }
    out = claim_run_folder(args.out, "purifier-cost", {k: getattr(args, k) for k in ("t_star", "steps", "n")})
    x = load_mnist("test", args.data_dir, limit=args.n).images.to(dev)
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {name: [] for name in purifiers}
    names = list(purifiers)
    for r in range(args.repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(_timed(purifiers[name][0], x, args.batch))
    rows: dict[str, dict[str, Any]] = {
        name: {"seconds_per_image": round(statistics.median(times[name]), 5), "passes_per_image": _passes(module),
               "network": network, "rounds": [round(t, 5) for t in times[name]]}
        for name, (module, network) in purifiers.items()
    }  # fmt: skip
    base = rows["diffpure"]["seconds_per_image"]
    for row in rows.values():
        row["time_over_diffpure"] = round(row["seconds_per_image"] / base, 2)
    record = {
        "command": command_line(args), "device": str(dev), "threads": torch.get_num_threads(), "n": args.n,
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()], "purifiers": rows,
    }  # fmt: skip
    write_record(out / "cost.json", record)
    print(json.dumps(record, indent=1))
    return 0
