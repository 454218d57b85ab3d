"""``python -m eval deepinv-crosscheck --out DIR``: this library's CSGM and DIP against deepinv's own, on the same
measurements and images (MSE, deepinv's PSNR, seconds per image, restart-to-restart spread), and deepinv's two
diffusion samplers (DiffPIR, DPS) with ``mnist-ddpm`` (their cost per image).

Purpose: interop measured, both ways (issue 36). One ``deepinv.physics.CompressedSensing`` (``N(0, 1/m)`` entries,
seeded) measures the first ``--n`` MNIST test images once: ``y = A x + (0.1 / sqrt(m)) N(0, I)``, CSGM's noise
(0.1 on the unscaled matrix) on deepinv's scale. Every method gets this same ``y``: deepinv's through the physics
itself, this library's through :func:`~manifold_defense.inversion.deepinv_adapter.from_deepinv` (its ``A`` and
``A_adjoint``, batched). Rows (``--methods``):

- ``csgm-ours``: :func:`~manifold_defense.inversion.invert` on ``mnist-gan`` with the CS benchmark's ``csgm-gan``
  schedule (Adam lr 0.03, 500 steps, 20 restarts pruned to the best after 50, z-prior 0.1 / m: the benchmark's 0.1
  on the unscaled matrix), all images and restarts in one batch;
- ``csgm-ours-shared`` / ``csgm-deepinv-shared``: the SHARED settings, the implementations' comparison: from the
  same initial latent ``z0 ~ N(0, I)`` per (seed, image), Adam lr ``--csgm-lr``, ``--csgm-steps`` steps on the
  mean squared measurement error, one restart, no z-prior; ours batched, deepinv's
  ``deepinv.models.CSGMGenerator.optimize_z`` (tolerance 0: every step runs) one image per call;
- ``csgm-deepinv``: ``CSGMGenerator`` as deepinv ships it (``inf_lr`` 1e-2, up to 2500 steps, stop when the loss
  changes by less than 1e-4 relatively, one latent from Unif[-1, 1] drawn from torch's global generator, seeded per
  image); one image per call, because it optimizes ONE latent per call (``random_latent`` is ``(1, nz, 1, 1)``): a
  batch of measurements would get one shared image;
- ``dip-ours``: :func:`~manifold_defense.baselines.dip_recover` with the benchmark's settings (CS-DIP's network,
  ngf 8, 300 iterations of RMSprop lr 1e-3, CS-DIP's TV weight 5e-3 on this normalized matrix, best-loss iterate of
  the last 51, 4 restarts averaged); ``dip-ours-single``: the same with one network;
- ``dip-deepinv``: ``deepinv.models.DeepImagePrior`` at matched iterations (300) driving the SAME network (CS-DIP's,
  ngf 8, initialized by the same seeded rule), with its own loop: Adam at its default lr 1e-2, no TV, the last
  iterate, one network per call;
- ``diffpir-ddpm`` / ``dps-ddpm``: one posterior sample per image from deepinv's DiffPIR (the CS benchmark's
  ``diffpir-ddpm`` settings, 100 UNet passes, but one sample instead of its four) and from deepinv's DPS
  (``--dps-steps`` steps, each a UNet forward and backward pass), both with
  :class:`~manifold_defense.inversion.diffusion_posterior.DDPMDenoiser` on ``mnist-ddpm``, on the first
  ``--dps-n`` images: what each costs per image is why the benchmark runs DiffPIR.

Each row runs ``--seeds`` times (seed ``s`` seeds every restart, network and latent of image ``i`` as
``1000 * s + i``). Per row: MSE and PSNR (``deepinv.loss.metric.PSNR``, max pixel 1) per seed (mean over images),
seconds per image per seed, ``seed_spread`` (std over seeds of the mean MSE) and ``restart_spread`` (mean over
images of the std over seeds of that image's MSE: how far one restart's answer moves). Two implementations
*agree* when their mean MSEs differ by at most the larger restart spread. Writes ``DIR/crosscheck.json`` (checked
record) and ``DIR/crosscheck.md``; each (row, seed) is kept in ``DIR/cache/`` (checked files), so a rerun resumes.
Exit status 0 when ``csgm-ours-shared`` and ``csgm-deepinv-shared`` agree (or did not both run), else 1.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from eval.cli import command_line, console_spelling
from eval.inputs import positive_int_arg
from eval.run_folder import claim_run_folder, write_record
from manifold_defense.integrity import atomic_write_text, load_checked, save_checked

__all__ = [
    "CROSSCHECK_JSON",
    "CS_DIFFPIR_JSON",
    "METHODS",
    "PAIRS",
    "RENDERERS",
    "add_parsers",
    "cs_diffusion_table",
    "markdown_table",
    "run_crosscheck",
    "summarize",
]

METHODS: tuple[str, ...] = (
    "csgm-ours", "csgm-ours-shared", "csgm-deepinv-shared", "csgm-deepinv", "dip-ours", "dip-ours-single",
    "dip-deepinv", "diffpir-ddpm", "dps-ddpm",
)  # fmt: skip
#: Compared pairs (this library's row first, or DiffPIR first): (a, b, what the pair measures).
PAIRS: tuple[tuple[str, str, str], ...] = (
    ("csgm-ours-shared", "csgm-deepinv-shared", "CSGM, shared settings (same z0, lr, steps, loss)"),
    ("csgm-ours", "csgm-deepinv", "CSGM, each library's own schedule"),
    ("dip-ours", "dip-deepinv", "DIP, each library's own loop (same network and iterations)"),
    ("dip-ours-single", "dip-deepinv", "DIP, one network each"),
    ("diffpir-ddpm", "dps-ddpm", "diffusion prior, one posterior sample each: DiffPIR vs DPS (mnist-ddpm)"),
)
SHAPE = (1, 28, 28)
LIBRARY = {
    m: ("deepinv" if "deepinv" in m or m.startswith(("diffpir", "dps")) else "manifold-defense")
    for m in METHODS
}


def _latent_dim(generator: nn.Module) -> int:
    k = getattr(generator, "latent_dim", None)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise TypeError(f"expected a generator with an int latent_dim, got {k!r}")
    return k


class _LatentImage(nn.Module):
    """A generator ``(B, k) -> images`` as deepinv's CSGM backbone: latents ``(B, nz, 1, 1)``, attribute ``nz``."""

    def __init__(self, generator: nn.Module) -> None:
        super().__init__()
        self.generator = generator
        self.nz = _latent_dim(generator)

    def forward(self, z: Tensor) -> Tensor:
        out: Tensor = self.generator(z.reshape(z.shape[0], -1))
        return out


def _seeded(seed: int, device: torch.device, fn: Callable[[], Tensor]) -> Tensor:
    """``fn()`` under torch's global generator seeded ``seed`` (the caller's RNG state restored after)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        return fn()


def _z0(seed: int, n: int, k: int, device: torch.device) -> Tensor:
    """The shared initial latents ``(n, k)``: image ``i`` from a CPU generator seeded ``1000 * seed + i``."""
    return torch.stack(
        [torch.randn(k, generator=torch.Generator().manual_seed(1000 * seed + i)) for i in range(n)]
    ).to(device)


def _run(
    method: str,
    seed: int,
    x: Tensor,
    y: Tensor,
    physics: Any,
    settings: dict[str, Any],
    models: dict[str, nn.Module],
) -> Tensor:
    """One row's reconstructions ``(n, 1, 28, 28)`` in [0, 1] for replicate ``seed``."""
    import deepinv as dinv

    from manifold_defense.baselines import DIPConfig, dip_recover
    from manifold_defense.baselines.dip_network import DIPGenerator, init_dip_parameters
    from manifold_defense.inversion import InversionConfig, invert
    from manifold_defense.inversion.deepinv_adapter import DeepinvLinearOperator
    from manifold_defense.inversion.diffusion_posterior import DiffPIRConfig, diffpir_recover, dps_recover

    n, m, dev = y.shape[0], settings["m"], y.device
    op = DeepinvLinearOperator(physics, SHAPE)
    seeds = [1000 * seed + i for i in range(n)]
    sigma = settings["noise_std"] / math.sqrt(m)
    outs: list[Tensor] = []
    if method.startswith("csgm"):
        gan = models["mnist-gan"]
        z0 = _z0(seed, n, _latent_dim(gan), dev)
    if method == "csgm-ours":
        cfg = InversionConfig.csgm(
            lr=0.03, steps=500, restarts=20, prune_after=50, prune_keep=1, z_prior_weight=0.1 / m
        )
        return invert(gan, y, op, cfg, seeds=seeds).x_hat.detach()
    if method == "csgm-ours-shared":
        cfg = InversionConfig(lr=settings["csgm_lr"], steps=settings["csgm_steps"], restarts=1)
        return invert(gan, y, op, cfg, z_init=z0, seeds=seeds).x_hat.detach()
    if method.startswith("csgm-deepinv"):
        shared = method == "csgm-deepinv-shared"
        backbone = _LatentImage(gan)
        kw = (
            {"inf_lr": settings["csgm_lr"], "inf_max_iter": settings["csgm_steps"], "inf_tol": 0.0}
            if shared
            else {}
        )
        csgm = dinv.models.CSGMGenerator(backbone, **kw).eval()
        for i in range(n):
            yi = y[i : i + 1]
            if shared:
                outs.append(backbone(csgm.optimize_z(z0[i].view(1, -1, 1, 1), yi, physics)).detach())
            else:
                outs.append(_seeded(seeds[i], dev, functools.partial(csgm, yi, physics)).detach())
        return torch.cat(outs)
    if method in ("dip-ours", "dip-ours-single"):
        single = method == "dip-ours-single"
        dip_cfg = DIPConfig(ngf=settings["dip_ngf"], num_iter=settings["dip_iters"], lr=1e-3, num_restarts=1 if single else 4,
                        restart_aggregate="best" if single else "mean", tv_weight=5e-3)  # fmt: skip
        chunk = min(40, n * dip_cfg.num_restarts)  # the CS benchmark's: padding to a larger chunk costs time
        return dip_recover(y, op, SHAPE, dip_cfg, device=dev, seeds=seeds, chunk_size=chunk).x_hat.detach()
    if method == "dip-deepinv":
        for i in range(n):
            net = DIPGenerator(128, SHAPE, settings["dip_ngf"])
            init_dip_parameters(net, torch.Generator().manual_seed(seeds[i]))
            dip = dinv.models.DeepImagePrior(net.to(dev), img_size=(128,), iterations=settings["dip_iters"])
            yi = y[i : i + 1]
            outs.append(_seeded(seeds[i], dev, functools.partial(dip, yi, physics)).detach())
        return torch.cat(outs)
    ddpm, k = models["mnist-ddpm"], min(settings["dps_n"], n)
    if method == "diffpir-ddpm":
        return diffpir_recover(ddpm, y[:k], op, sigma, DiffPIRConfig(samples=1), seeds=seeds[:k])
    return dps_recover(ddpm, y[:k], op, sigma, steps=settings["dps_steps"], seeds=seeds[:k])


def _std(values: Sequence[float]) -> float:
    return statistics.pstdev(values) if len(values) > 1 else 0.0


def summarize(per_seed: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Rows and pairs of the record from ``{row: [per seed {"mse": (n,), "psnr": (n,), "seconds": s}]}``."""
    rows: dict[str, Any] = {}
    for name, runs in per_seed.items():
        mse = torch.stack([torch.as_tensor(r["mse"], dtype=torch.float64) for r in runs])  # (seeds, n)
        psnr = torch.stack([torch.as_tensor(r["psnr"], dtype=torch.float64) for r in runs])
        secs = [r["seconds"] / mse.shape[1] for r in runs]
        means = mse.mean(1).tolist()
        rows[name] = {
            "library": LIBRARY[name], "images": int(mse.shape[1]), "seeds": len(runs),
            "mse": statistics.fmean(means), "psnr": float(psnr.mean()), "seconds_per_image": statistics.fmean(secs),
            "mse_per_seed": means, "psnr_per_seed": psnr.mean(1).tolist(), "seconds_per_image_per_seed": secs,
            "seed_spread": _std(means),
            "restart_spread": float(mse.std(0, unbiased=False).mean()) if mse.shape[0] > 1 else 0.0,
        }  # fmt: skip
    pairs = []
    for a, b, what in PAIRS:
        if a in rows and b in rows:
            ra, rb = rows[a], rows[b]
            diff = ra["mse"] - rb["mse"]
            spread = max(ra["restart_spread"], rb["restart_spread"])
            faster = a if ra["seconds_per_image"] <= rb["seconds_per_image"] else b
            slow, fast = sorted((ra["seconds_per_image"], rb["seconds_per_image"]), reverse=True)
            pairs.append({
                "rows": [a, b], "what": what, "mse_difference": diff, "larger_restart_spread": spread,
                "agree": abs(diff) <= spread, "lower_mse": a if diff <= 0 else b, "faster": faster,
                "speedup": slow / fast if fast > 0 else None, "same_images": ra["images"] == rb["images"],
            })  # fmt: skip
    return {"rows": rows, "pairs": pairs}


def markdown_table(record: dict[str, Any]) -> str:
    """The record's rows and pairs as Markdown (the docs' ``deepinv-crosscheck`` table)."""
    s = record["settings"]
    lines = ["| row | library | MSE | PSNR (dB) | seconds / image | restart spread (MSE) | images x seeds |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in record["rows"].items():
        lines.append(f"| {name} | {r['library']} | {r['mse']:.4f} | {r['psnr']:.2f} | {r['seconds_per_image']:.3f} | "
                     f"{r['restart_spread']:.4f} | {r['images']} x {r['seeds']} |")  # fmt: skip
    lines += [
        "",
        "| compared | MSE difference | larger restart spread | agree | lower MSE | faster (x) |",
        "|---|---|---|---|---|---|",
    ]
    for p in record["pairs"]:
        speed = f"{p['faster']} ({p['speedup']:.1f}x)" if p["speedup"] else p["faster"]
        note = "" if p["same_images"] else " (different image counts)"
        lines.append(f"| {p['rows'][0]} vs {p['rows'][1]}: {p['what']}{note} | {p['mse_difference']:+.4f} | "
                     f"{p['larger_restart_spread']:.4f} | {'yes' if p['agree'] else 'no'} | {p['lower_mse']} | {speed} |")  # fmt: skip
    lines += ["", f"First {s['n']} MNIST test images, m = {s['m']} (deepinv CompressedSensing, noise "
              f"{s['noise_std']}/sqrt(m)), {s['seeds']} seeds; {record['device']}, {record['threads']} thread(s), "
              f"deepinv {record['deepinv']}, load average {record['load_average_before'][0]} before, "
              f"{record['load_average_after'][0]} after."]  # fmt: skip
    return "\n".join(lines)


FIGURES = Path(__file__).resolve().parent.parent / "docs" / "figures"
#: The committed records behind the docs' tables (``docs/compressed-sensing.md``).
CROSSCHECK_JSON = FIGURES / "deepinv_crosscheck.json"
CS_DIFFPIR_JSON = FIGURES / "cs_diffpir_n100_results.json"
CROSSCHECK_COMMAND = "manifold-defense deepinv-crosscheck --out runs/deepinv-crosscheck --threads 1"
CS_DIFFPIR_COMMAND = (
    "manifold-defense cs --out runs/cs-diffpir --n 100 --m 25 50 100 200 --methods csgm-gan lasso-pixel lasso-dct "
    "lasso-wavelet diffpir-ddpm --no-grids --threads 1"
)


def cs_diffusion_table(results: dict[str, Any]) -> str:
    """The diffusion-prior rows of a ``manifold-defense cs`` ``results.json``: per m, ``csgm-gan``, the best Lasso
    (lowest MSE over the bases that ran) and ``diffpir-ddpm``: MSE and seconds per image, and DiffPIR / CSGM."""
    meth, proto = results["methods"], results["protocol"]
    for name in ("csgm-gan", "diffpir-ddpm"):
        if name not in meth:
            raise ValueError(f"expected a cs results record with {name}, got methods {sorted(meth)}")
    lasso = [k for k in meth if k.startswith("lasso-")]
    lines = ["| m | csgm-gan MSE (s / image) | best Lasso MSE (s / image) | diffpir-ddpm MSE (s / image) | "
             "DiffPIR / CSGM |", "|---|---|---|---|---|"]  # fmt: skip
    chosen = proto.get("selected", {}).get("diffpir", {})
    for i, m in enumerate(results["m"]):
        cells = [str(m)]

        def cell(name: str, extra: str = "", i: int = i) -> str:
            return f"{meth[name]['mse'][i]:.4f} ({meth[name]['seconds_per_image'][i]:.2f}{extra})"

        cells.append(cell("csgm-gan"))
        best = min(lasso, key=lambda k: meth[k]["mse"][i]) if lasso else None
        cells.append(cell(best, f", {best.split('-', 1)[1]}") if best else "not run")
        how = chosen.get(str(m), {}).get("aggregate")
        cells.append(cell("diffpir-ddpm", f", {how} of {proto['diffpir']['samples']}" if how else ""))
        cells.append(f"{meth['diffpir-ddpm']['mse'][i] / meth['csgm-gan']['mse'][i]:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    shas = proto.get("weights_sha256")
    weights = (", weights " + ", ".join(f"`{k}` {v[:12]}" for k, v in sorted(shas.items())) if shas
               else ", the zoo's weights at the commit that added this file")  # fmt: skip
    lines += ["", f"First {proto['n_images']} MNIST test images, {proto['n_val']} validation images (the DiffPIR "
              f"aggregate and the Lasso alphas chosen there per m); {proto['device']}, {proto['threads']} thread(s), "
              f"{proto['wall_seconds']:.0f} s in all{weights}; `{console_spelling(proto['command'])}`."]  # fmt: skip
    return "\n".join(lines)


def _docs_table(path: Path, render: Callable[[dict[str, Any]], str], command: str) -> Callable[[], str]:
    """A docs renderer: ``render`` of the checked record at ``path``, or what to run while it is absent."""

    def table() -> str:
        if not path.exists():
            return f"Not measured yet: `{command}`, then copy its JSON to `docs/figures/{path.name}`."
        from eval.run_folder import read_record

        return render(read_record(path))

    return table


#: The docs' generated tables of this module (``eval.docs_tables`` merges them).
RENDERERS: dict[str, Callable[[], str]] = {
    "deepinv-crosscheck": _docs_table(CROSSCHECK_JSON, markdown_table, CROSSCHECK_COMMAND),
    "cs-diffpir": _docs_table(CS_DIFFPIR_JSON, cs_diffusion_table, CS_DIFFPIR_COMMAND),
}


def run_crosscheck(out: Path, settings: dict[str, Any], methods: Sequence[str], device: torch.device, *,
                   command: str | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:  # fmt: skip
    """Run ``methods`` (of :data:`METHODS`) with ``settings`` (the ``--`` options), cache each (row, seed) in
    ``out/cache``, write ``out/crosscheck.json`` (checked) and ``out/crosscheck.md``; the record."""
    unknown = [k for k in methods if k not in METHODS]
    if unknown or not methods:
        raise ValueError(f"expected methods from {list(METHODS)}, got {list(methods)}")
    import deepinv as dinv

    from manifold_defense import zoo
    from manifold_defense.data import load_mnist
    from manifold_defense.inversion import measure
    from manifold_defense.inversion.deepinv_adapter import from_deepinv

    out = claim_run_folder(out, "deepinv-crosscheck", settings)
    load_before = os.getloadavg()
    n, m = settings["n"], settings["m"]
    x = load_mnist("test", limit=n).images
    if x.shape[0] < n:
        raise ValueError(f"expected --n <= {x.shape[0]} test images, got {n}")
    x = x.to(device)
    rng = torch.Generator(device=device).manual_seed(settings["seed"])
    physics = dinv.physics.CompressedSensing(m=m, img_size=SHAPE, device=device, rng=rng)
    noise = torch.Generator().manual_seed(settings["seed"] + 10_000)
    y = measure(from_deepinv(physics, SHAPE), x, settings["noise_std"] / math.sqrt(m), generator=noise)
    assert isinstance(y, Tensor)  # a linear operator measures one tensor
    needed = {"mnist-gan"} if any(k.startswith("csgm") for k in methods) else set()
    needed |= {"mnist-ddpm"} if any(k.endswith("ddpm") for k in methods) else set()
    models = {name: zoo.load(name, device) for name in sorted(needed)}
    psnr = dinv.loss.metric.PSNR(max_pixel=1.0)
    cache = out / "cache"
    cache.mkdir(exist_ok=True)
    per_seed: dict[str, list[dict[str, Any]]] = {}
    chosen = [k for k in METHODS if k in methods]
    for name in chosen:
        for seed in range(settings["seeds"]):
            path = cache / f"{name}-s{seed}.pt"
            if path.exists():
                entry = load_checked(
                    path, what="deepinv-crosscheck cache entry", recover="delete it to recompute"
                )
            else:
                start = time.perf_counter()
                x_hat = _run(name, seed, x, y.detach(), physics, settings, models).clamp(0, 1)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds = time.perf_counter() - start
                truth = x[: x_hat.shape[0]]
                entry = {"mse": (x_hat - truth).double().pow(2).flatten(1).mean(1).cpu(),
                         "psnr": psnr(x_hat.float(), truth.float()).double().cpu(), "seconds": seconds}  # fmt: skip
                save_checked(entry, path)
            per_seed.setdefault(name, []).append(entry)
            log(
                f"{name} seed {seed}: mse {float(entry['mse'].mean()):.5f}, {entry['seconds'] / entry['mse'].numel():.3f} s/image"
            )
    record = {
        "command": command, "settings": settings, "methods": chosen,
        "data": f"MNIST test split, first {n} images", "device": str(device), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "deepinv": dinv.__version__,
        "measurement": f"deepinv.physics.CompressedSensing(m={m}, img_size={SHAPE}, rng seeded {settings['seed']}): "
        f"N(0, 1/m) entries; y = A x + {settings['noise_std']}/sqrt(m) N(0, I) (seed {settings['seed'] + 10_000}), "
        "one y shared by every row",
        "definitions": {
            "restart_spread": "mean over images of the std over seeds of the image's MSE",
            "seed_spread": "std over seeds of the mean MSE over images",
            "agree": "|MSE difference| <= the larger restart spread of the two rows",
            "seconds_per_image": "wall seconds of the row's reconstructions / images, mean over seeds (ours: one "
            "batch; deepinv's CSGM and DIP: one image per call)",
        },
        **summarize(per_seed),
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
    }  # fmt: skip
    write_record(out / "crosscheck.json", record)
    atomic_write_text(out / "crosscheck.md", markdown_table(record) + "\n")
    return record


def add_parsers(sub: Any) -> None:
    """Register ``deepinv-crosscheck`` on the ``python -m eval`` sub-parsers."""
    p = sub.add_parser(
        "deepinv-crosscheck",
        help="this library's CSGM and DIP vs deepinv's on the same measurements; DiffPIR vs DPS (needs deepinv)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, required=True, help="output folder (resumable)")
    p.add_argument("--n", type=positive_int_arg, default=20, help="first N MNIST test images (default 20)")
    p.add_argument("--m", type=positive_int_arg, default=50, help="Gaussian measurements (default 50)")
    p.add_argument("--seeds", type=positive_int_arg, default=3, help="replicates of every row (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the matrix (the noise: seed + 10000)")
    p.add_argument(
        "--noise-std", type=float, default=0.1, help="noise on the unscaled-matrix scale (CSGM: 0.1)"
    )
    p.add_argument("--csgm-lr", type=float, default=0.03, help="shared CSGM Adam lr (default 0.03)")
    p.add_argument("--csgm-steps", type=positive_int_arg, default=500, help="shared CSGM steps (default 500)")
    p.add_argument(
        "--dip-iters", type=positive_int_arg, default=300, help="DIP iterations, both (default 300)"
    )
    p.add_argument("--dip-ngf", type=positive_int_arg, default=8, help="DIP network base filters (default 8)")
    p.add_argument("--dps-steps", type=positive_int_arg, default=1000, help="DPS steps (default 1000)")
    p.add_argument("--dps-n", type=positive_int_arg, default=5, help="DPS on the first N images (default 5)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), metavar="ROW",
                   help=f"rows to run: {', '.join(METHODS)} (default all)")  # fmt: skip
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--threads", type=positive_int_arg, default=None, help="torch CPU threads")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Handler of ``python -m eval deepinv-crosscheck``: 0 when the shared-settings CSGM rows agree, else 1."""
    from manifold_defense.devices import resolve_device

    if not (math.isfinite(args.noise_std) and args.noise_std > 0):
        raise ValueError(f"expected --noise-std as a finite float > 0, got {args.noise_std}")
    if not (math.isfinite(args.csgm_lr) and args.csgm_lr > 0):
        raise ValueError(f"expected --csgm-lr as a finite float > 0, got {args.csgm_lr}")
    if not 0 <= args.seed < 2**31:
        raise ValueError(f"expected --seed in [0, 2**31), got {args.seed}")
    try:
        import deepinv  # noqa: F401
    except ImportError as err:
        raise ValueError("deepinv-crosscheck needs deepinv: pip install 'manifold-defense[deepinv]'") from err
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    keys = (
        "n",
        "m",
        "seeds",
        "seed",
        "noise_std",
        "csgm_lr",
        "csgm_steps",
        "dip_iters",
        "dip_ngf",
        "dps_steps",
        "dps_n",
    )
    settings = {k: getattr(args, k) for k in keys}
    record = run_crosscheck(
        args.out, settings, args.methods, resolve_device(args.device), command=command_line(args)
    )
    print(markdown_table(record))
    shared = [p for p in record["pairs"] if p["rows"][0] == "csgm-ours-shared"]
    return 0 if all(p["agree"] for p in shared) else 1
