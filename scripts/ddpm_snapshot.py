"""Write the EMA weights of the DDPM run's latest checkpoint into a copy of the zoo's weights folder, without stopping
the run, so a later checkpoint can be screened with ``measure-zoo --weights-dir`` before it is shipped.

    python scripts/ddpm_snapshot.py OUT_DIR [--checkpoint training-state/mnist-ddpm/checkpoints/ddpm/checkpoint.pt]
    manifold-defense measure-zoo --models mnist-ddpm --samples 2000 --ddim-steps 50 --weights-dir OUT_DIR --write

``OUT_DIR`` gets every zoo weights file and ``mnist-ddpm.{safetensors,json}`` from the checkpoint (its record keeps
the shipped one's architecture and training fields, with a note naming the step). ``OUT_DIR`` must not exist.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from manifold_defense import zoo
from manifold_defense.training.gan import WeightAverage
from manifold_defense.training.loop import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--checkpoint", type=Path,
                   default=ROOT / "training-state/mnist-ddpm/checkpoints/ddpm/checkpoint.pt")  # fmt: skip
    args = p.parse_args()
    if args.out.exists():
        p.error(f"expected OUT_DIR to be a new folder, got existing {args.out}")
    ckpt = load_checkpoint(args.checkpoint)
    decay = float(ckpt["settings"]["ema_decay"]) if "ema_decay" in (ckpt.get("settings") or {}) else 0.999
    ema = WeightAverage(zoo.build("mnist-ddpm"), decay)
    ema.load_state_dict(ckpt["state"]["ema"])
    shutil.copytree(zoo.WEIGHTS_DIR, args.out)
    info = {k: v for k, v in zoo.record("mnist-ddpm").items() if k not in ("sha256", "figures", "name")}
    info["note"] = f"EMA weights of the DDPM run at step {int(ckpt['step'])}, screened, not shipped"
    zoo.save(ema.module.eval(), "mnist-ddpm", args.out, info)
    print(f"wrote {args.out} (mnist-ddpm at step {int(ckpt['step'])})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
