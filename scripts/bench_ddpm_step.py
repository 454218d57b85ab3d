"""Seconds per DDPM training step of ``mnist-ddpm``'s UNet, float32 against bfloat16 autocast, side by side.

Usage: ``python scripts/bench_ddpm_step.py [--batch 128] [--rounds 3] [--steps 3] [--threads 1]``

Each round times ``--steps`` optimizer steps (after one warm-up step) of each mode in turn, the order alternating
between rounds; the median per mode is printed as one JSON line with the ratio and the load average, so a load
change during the run touches both alike. A benchmark, not a test: quote the load beside its figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from manifold_defense.diffusion import DiffusionModel


def step_seconds(model: DiffusionModel, opt: torch.optim.Optimizer, x: torch.Tensor, bf16: bool, steps: int) -> float:
    """Mean seconds of ``steps`` training steps (loss, backward, Adam) of ``model`` on the batch ``x``."""
    start = time.perf_counter()
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model.loss(x)
        opt.zero_grad(set_to_none=True)
        loss.float().backward()
        opt.step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if min(args.batch, args.rounds, args.steps, args.threads) <= 0:
        parser.error("expected positive --batch, --rounds, --steps and --threads")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.rand(args.batch, 1, 28, 28)
    models = {mode: DiffusionModel() for mode in ("float32", "bf16")}
    opts = {mode: torch.optim.Adam(m.parameters(), lr=2e-4) for mode, m in models.items()}
    load = os.getloadavg()[0]
    times: dict[str, list[float]] = {mode: [] for mode in models}
    for mode in models:  # warm-up
        step_seconds(models[mode], opts[mode], x, mode == "bf16", 1)
    for r in range(args.rounds):
        for mode in (("float32", "bf16") if r % 2 == 0 else ("bf16", "float32")):
            times[mode].append(step_seconds(models[mode], opts[mode], x, mode == "bf16", args.steps))
    med = {mode: statistics.median(t) for mode, t in times.items()}
    print(json.dumps({"batch": args.batch, "threads": args.threads, "seconds_per_step": {k: round(v, 3) for k, v in med.items()},
                      "float32_over_bf16": round(med["float32"] / med["bf16"], 2), "load_average_before": round(load, 2),
                      "load_average_after": round(os.getloadavg()[0], 2)}))  # fmt: skip


if __name__ == "__main__":
    main()
