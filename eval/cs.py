"""``python -m eval cs --out DIR [--quick]``: CSGM's MNIST compressed-sensing benchmark.

Reproduces the MNIST protocol of Bora et al. 2017 ("Compressed Sensing using Generative Models"): ``m`` Gaussian
measurements (``A`` with N(0, 1) entries, unscaled), noise sigma 0.1, images in [0, 1], per-pixel MSE, 300 test
images, for CSGM with the zoo's VAE and GAN, Lasso in the pixel / DCT / wavelet bases (alpha chosen per basis and
per m on validation images), CS-DIP and sparse-gen (``x = G(z) + v``). Settings, seeds and method details:
:mod:`eval.cs_core`.

Writes into ``--out``:

- ``results.json``: ``{"protocol": {...}, "m": [...], "methods": {name: {"mse", "mse_std",
  "seconds_per_image"}}, "lasso_over_csgm_measurements_at_m50": ratio or null}``; ``protocol`` holds every
  setting, the seeds, the chosen alphas / deviations (``selected``) and how the ratio was obtained (``ratio``);
- ``results.md`` (tables), ``mse_vs_m.png`` (error against m, log axes);
- ``grid_cs.png``, ``grid_inpainting.png``, ``grid_superres.png``, ``grid_nonlinear.png`` (reconstructions).

``--quick`` runs a reduced protocol on a CPU (10 test and 10 validation images, m in {50, 200}, fewer CSGM steps
and restarts, fewer Lasso alphas and sparse-gen bases, smaller grids: :data:`eval.cs_core.QUICK_CHANGES`), every
method unless ``--methods`` is given; its outputs list every reduction. The demo's compressed-sensing part
(``manifold-defense demo``) is this quick protocol with :data:`QUICK_METHODS` only (about half a minute on one
thread).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import math
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eval.cli import command_line
from eval.cs_core import (
    EXTRA_METHODS,
    GENERATORS,
    METHODS,
    CSProtocol,
    MethodOutput,
    check_m_grid,
    check_methods,
    full_protocol,
    gaussian_operator,
    measurements_to_reach,
    noisy_measurements,
    per_image_mse,
    quick_protocol,
    quick_reductions,
    recover_csgm,
    recover_dip,
    recover_lasso,
    recover_sparse_gen,
    select_sparse_gen,
)
from eval.cs_figures import draw_panels, operator_grids, plot_mse, write_markdown
from eval.inputs import positive_int_arg
from eval.run_folder import claim_run_folder, run_folder_session, write_record
from manifold_defense import zoo
from manifold_defense.data import load_mnist
from manifold_defense.devices import resolve_device
from manifold_defense.integrity import load_checked, save_checked
from manifold_defense.inversion.diffusion_posterior import diffpir_recover, select_diffpir_aggregate
from manifold_defense.progress import progress as progress_display

__all__ = [
    "QUICK_METHODS",
    "add_parsers",
    "figure_checks",
    "lasso_ratio",
    "main",
    "run_benchmark",
    "run_reductions",
]

log = logging.getLogger(__name__)

RATIO_M = 50

QUICK_METHODS: tuple[str, ...] = ("csgm-gan", "lasso-pixel", "lasso-dct", "lasso-wavelet")
"""The methods of the demo's quick compressed-sensing part: CSGM with the zoo's GAN and the Lasso in the three
bases (no VAE, AmbientGAN, DIP or sparse-gen: the full run, ``manifold-defense cs``, has them all)."""


def run_reductions(methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{setting: {"full": value, "quick": value}}``: every reduction of a quick run versus the full protocol.

    The settings :func:`eval.cs_core.quick_reductions` lists whose quick value differs from the full one, plus
    ``"methods"`` when ``methods`` leaves out some of :data:`eval.cs_core.METHODS` (which the full protocol runs).
    """
    reductions = {k: v for k, v in quick_reductions().items() if v["quick"] != v["full"]}
    chosen = check_methods(methods)
    if chosen != METHODS:
        reductions["methods"] = {"full": list(METHODS), "quick": list(chosen)}
    return reductions


def add_parsers(sub: Any) -> None:
    """Register the ``cs`` command."""
    p = sub.add_parser(
        "cs",
        help="CSGM's MNIST compressed-sensing benchmark (CSGM, Lasso, DIP, sparse-gen)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, required=True, help="output folder (created)")
    p.add_argument("--quick", action="store_true", help="reduced protocol for a CPU check (a few minutes)")
    p.add_argument("--n", type=positive_int_arg, default=None, help="test images (full 300, quick 10)")
    p.add_argument("--m", type=positive_int_arg, nargs="+", default=None, help="numbers of measurements")
    p.add_argument(
        "--methods", nargs="+", choices=METHODS + EXTRA_METHODS, default=list(METHODS), metavar="METHOD",
        help=f"subset of {', '.join(METHODS + EXTRA_METHODS)} (default: all but {', '.join(EXTRA_METHODS)}, "
        "which needs the deepinv extra)",
    )  # fmt: skip
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--seed", type=int, default=0, help="base seed (A, noise, restarts; default 0)")
    p.add_argument("--threads", type=positive_int_arg, default=None, help="torch / Lasso threads")
    p.add_argument("--batch", type=positive_int_arg, default=None, help="images per inversion call")
    p.add_argument(
        "--dip-ngf",
        type=positive_int_arg,
        default=None,
        help="DIP base filters (default 8, chosen on validation images; CS-DIP uses 64)",
    )
    p.add_argument(
        "--dip-iters",
        type=positive_int_arg,
        default=None,
        help="DIP iterations (default 300; CS-DIP uses 1000)",
    )
    p.add_argument(
        "--dip-n", type=positive_int_arg, default=None,
        help="DIP on the first N test images only (CPU budget; recorded in results.json)",
    )  # fmt: skip
    p.add_argument("--no-grids", action="store_true", help="skip the reconstruction grids")
    p.add_argument(
        "--no-resume", action="store_true",
        help="do not keep or reuse per-(method, m) results in OUT/cache/ (default: resume an interrupted run)",
    )  # fmt: skip
    p.add_argument("--data-dir", type=Path, default=None, help="torchvision MNIST folder (default: bundle)")
    p.set_defaults(func=main)


def lasso_ratio(results: dict[str, Any]) -> tuple[float | None, dict[str, Any]]:
    """The ratio (m the best Lasso needs to reach CSGM's MSE at m = 50) / 50 and how it was obtained.

    CSGM reference: the better of ``csgm-vae`` / ``csgm-gan`` at m = 50. Best Lasso: at each m the lowest MSE over
    the Lasso bases that ran. The crossing is interpolated linearly in log m (:func:`measurements_to_reach`).
    """
    m_grid = results["m"]
    methods = results["methods"]
    csgm = [k for k in ("csgm-vae", "csgm-gan") if k in methods]
    lasso = [k for k in methods if k.startswith("lasso-")]
    if RATIO_M not in m_grid or not csgm or not lasso:
        reason = f"needs m = {RATIO_M} in the grid, a CSGM method and a Lasso method"
        return None, {"csgm_reference": None, "reason": reason}
    j = m_grid.index(RATIO_M)
    ref = min(csgm, key=lambda k: methods[k]["mse"][j])
    target = methods[ref]["mse"][j]
    envelope = [min(methods[k]["mse"][i] for k in lasso) for i in range(len(m_grid))]
    best_basis = [lasso[int(np.argmin([methods[k]["mse"][i] for k in lasso]))] for i in range(len(m_grid))]
    needed = measurements_to_reach(m_grid, envelope, target)
    info = {
        "definition": "m at which the best Lasso (lowest MSE over bases at each m) reaches the MSE of the better "
        "CSGM at m = 50, interpolated linearly in log m, divided by 50",
        "csgm_reference": ref,
        "csgm_mse_at_m50": target,
        "best_lasso_per_m": dict(zip([str(m) for m in m_grid], best_basis, strict=True)),
        "lasso_m_needed": needed,
        "never_reached_flag": None if needed is not None else f">{m_grid[-1]}",
        "lower_bound_only": needed is not None and needed == m_grid[0],
    }
    return (None if needed is None else needed / RATIO_M), info


def figure_checks(results: dict[str, Any]) -> dict[str, Any]:
    """The issue's three figures, checked on ``results`` (``None`` where the needed methods did not run).

    - ``ratio_at_least_5``: ``lasso_over_csgm_measurements_at_m50 >= 5`` (``None`` when the ratio is missing);
    - ``sparse_gen_within_10pct``: per m, sparse-gen's MSE / min(better CSGM, best Lasso), and whether every
      ratio is <= 1.1;
    - ``dip_beats_lasso_m_le_200``: per m <= 200, DIP's MSE / best Lasso's, and whether every one is < 1.
      When DIP ran on fewer images (``dip_n``), the Lasso is compared on all test images (noted).
    """
    m_grid = results["m"]
    methods = results["methods"]
    lasso = [k for k in methods if k.startswith("lasso-")]
    csgm = [k for k in ("csgm-vae", "csgm-gan") if k in methods]
    out: dict[str, Any] = {}
    ratio = results.get("lasso_over_csgm_measurements_at_m50")
    out["ratio_at_least_5"] = None if ratio is None else bool(ratio >= 5)
    best_lasso = [min(methods[k]["mse"][i] for k in lasso) for i in range(len(m_grid))] if lasso else None
    if "sparse-gen" in methods and csgm and best_lasso is not None:
        ref = [min([methods[k]["mse"][i] for k in csgm] + [best_lasso[i]]) for i in range(len(m_grid))]
        rel = [
            methods["sparse-gen"]["mse"][i] / ref[i] if ref[i] > 0 else math.inf for i in range(len(m_grid))
        ]
        out["sparse_gen_within_10pct"] = {
            "ok": all(r <= 1.1 for r in rel),
            "sparse_gen_over_min_csgm_lasso": {str(m): round(r, 3) for m, r in zip(m_grid, rel, strict=True)},
        }
    else:
        out["sparse_gen_within_10pct"] = None
    if "dip" in methods and best_lasso is not None:
        dip_rel = {
            str(m): round(methods["dip"]["mse"][i] / best_lasso[i], 3)
            for i, m in enumerate(m_grid)
            if m <= 200 and best_lasso[i] > 0
        }
        out["dip_beats_lasso_m_le_200"] = {"ok": bool(dip_rel) and all(r < 1 for r in dip_rel.values()),
                                           "dip_over_best_lasso": dip_rel}  # fmt: skip
    else:
        out["dip_beats_lasso_m_le_200"] = None
    return out


def _method_of(generator: str) -> str:
    return next(k for k, v in GENERATORS.items() if v == generator)


def _stats(mse: torch.Tensor) -> tuple[float, float]:
    return float(mse.mean()), float(mse.std(unbiased=False))


def _record(
    row: dict[str, list[float]],
    selected: dict[str, Any],
    method: str,
    m: int,
    mse_images: torch.Tensor,
    seconds: float,
    selection: dict[str, Any],
) -> None:
    """Append one (method, m) result to ``row`` and its validation choice to ``selected``."""
    mean, std = _stats(mse_images)
    row["mse"].append(mean)
    row["mse_std"].append(std)
    row["seconds_per_image"].append(seconds / mse_images.shape[0])
    if method.startswith("lasso-"):
        selected.setdefault("lasso_alpha", {}).setdefault(method.split("-", 1)[1], {})[str(m)] = selection
    elif method == "sparse-gen":
        selected.setdefault("sparse_gen", {})[str(m)] = selection
    elif method == "diffpir-ddpm":
        selected.setdefault("diffpir", {})[str(m)] = selection


class ResultCache:
    """Per-(method, m) results of one protocol in ``folder`` (``None``: keep nothing).

    Each entry is ``<method>-m<m>.pt`` (behind a SHA-256 header, :func:`manifold_defense.integrity.save_checked`;
    loaded with ``weights_only=True``): per-image MSE, wall seconds, the validation choice (JSON text), the grid
    images and a fingerprint of the protocol (all settings but the m grid) and device type. An entry with another
    fingerprint raises ``ValueError`` (a folder holds one protocol's run); a cut or altered entry raises
    :class:`~manifold_defense.integrity.IntegrityError` naming it.
    """

    def __init__(self, folder: Path | None, protocol: CSProtocol, device: torch.device) -> None:
        self.folder = folder
        settings = {k: v for k, v in protocol.to_json().items() if k != "m_grid"}
        self.fingerprint = json.dumps({"protocol": settings, "device": device.type}, sort_keys=True)
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)

    def _path(self, method: str, m: int) -> Path:
        assert self.folder is not None
        return self.folder / f"{method}-m{m}.pt"

    def load(self, method: str, m: int) -> tuple[torch.Tensor, float, dict[str, Any], torch.Tensor] | None:
        """``(mse per image, seconds, selection, shown images)`` or ``None`` when this result is not kept."""
        if self.folder is None or not self._path(method, m).exists():
            return None
        entry = load_checked(
            self._path(method, m),
            what="cs result cache entry",
            recover="delete it to recompute that result (or use a new --out folder or --no-resume)",
        )
        if not isinstance(entry, dict) or entry.get("fingerprint") != self.fingerprint:
            raise ValueError(
                f"{self._path(method, m)}: expected a result of this run's protocol, found one of another run "
                f"(settings or device differ); use a new --out folder or --no-resume"
            )
        return entry["mse"], float(entry["seconds"]), json.loads(entry["selection"]), entry["shown"]

    def save(
        self,
        method: str,
        m: int,
        mse: torch.Tensor,
        seconds: float,
        selection: dict[str, Any],
        shown: torch.Tensor,
    ) -> None:
        """Keep one result behind its SHA-256 (written to a temporary file unique to this writer, then renamed, so
        a kill never leaves half a file)."""
        if self.folder is None:
            return
        save_checked(
            {
                "fingerprint": self.fingerprint,
                "mse": mse.detach().cpu(),
                "seconds": float(seconds),
                "selection": json.dumps(selection),
                "shown": shown.detach().cpu().clone(),  # a copy: a saved view would carry its whole storage
            },
            self._path(method, m),
        )


@run_folder_session()  # --out stays locked against other writers until the call returns
def run_benchmark(
    protocol: CSProtocol,
    out_dir: Path,
    methods: Sequence[str] = METHODS,
    device: torch.device | str = "cpu",
    *,
    grids: bool = True,
    threads: int = 1,
    data_dir: Path | None = None,
    progress: bool = True,
    command: str | None = None,
    resume: bool = True,
) -> dict[str, Any]:
    """Run the benchmark, write ``results.json``, ``results.md``, ``mse_vs_m.png`` and the grids; return the
    results.

    Args:
        protocol: the settings (:func:`eval.cs_core.full_protocol` / :func:`~eval.cs_core.quick_protocol`).
        out_dir: output folder (created).
        methods: subset of :data:`eval.cs_core.METHODS`.
        device: where generators, inversions and DIP run (the Lasso runs on CPU).
        grids: also write the four reconstruction grids.
        threads: Lasso threads (``n_jobs``).
        data_dir: torchvision MNIST folder, or ``None`` for the offline bundle.
        progress: show a tqdm bar on stderr.
        command: the command line to record.
        resume: keep each (method, m) result in ``out_dir/cache/`` and reuse the ones a previous run with the same
            protocol and device left there (an interrupted run resumes; runs of disjoint ``methods`` into the same
            folder, one process each, can be merged by a final run with all methods). A cache written under
            another protocol is refused with a ``ValueError``, never mixed in.
    """
    chosen = check_methods(methods)
    dev = resolve_device(device) if isinstance(device, str) else device
    # the m grid may grow between runs: (method, m) results are cached per m (see ResultCache)
    settings = {k: v for k, v in protocol.to_json().items() if k != "m_grid"}
    out_dir = claim_run_folder(out_dir, "cs", settings)
    started = time.perf_counter()
    x_test = load_mnist("test", data_dir, limit=protocol.n_images).images
    x_val = load_mnist("val", data_dir, limit=protocol.n_val).images
    if x_test.shape[0] < protocol.n_images:
        raise ValueError(f"expected {protocol.n_images} test images, got {x_test.shape[0]}")
    needed = {GENERATORS[k] for k in chosen if k in GENERATORS}
    if "sparse-gen" in chosen:
        needed |= set(protocol.sparse_generators)
    if grids:
        needed |= {GENERATORS[k] for k in GENERATORS}
    if "diffpir-ddpm" in chosen:
        needed.add("mnist-ddpm")
    generators = {name: zoo.load(name, dev) for name in sorted(needed)}
    test_seeds = [protocol.seed + i for i in range(protocol.n_images)]
    val_seeds = [protocol.seed + 100_000 + i for i in range(protocol.n_val)]
    m_grid = list(protocol.m_grid)
    grid_m = protocol.grid_m or min(m_grid, key=lambda m: abs(math.log(m / 100)))
    k_show = min(protocol.grid_images, protocol.n_images)
    shown: dict[str, torch.Tensor] = {}

    per_method: dict[str, dict[str, list[float]]] = {
        k: {"mse": [], "mse_std": [], "seconds_per_image": []} for k in chosen
    }
    selected: dict[str, Any] = {}
    cache = ResultCache(out_dir / "cache", protocol, dev) if resume else ResultCache(None, protocol, dev)
    reused: list[str] = []
    total = len(m_grid) * len(chosen) + (6 if grids else 0)
    bar = progress_display(total=total, desc="cs", unit="task", disable=not progress)
    for m in m_grid:
        A = gaussian_operator(m, protocol, dev)
        y = noisy_measurements(A, x_test.to(dev), protocol.noise_std, protocol.seed + 10_000 + m)
        y_val = noisy_measurements(A, x_val.to(dev), protocol.noise_std, protocol.seed + 20_000 + m)
        A_np = A.numpy()
        csgm_test: dict[str, MethodOutput] = {}

        def csgm_for(
            gen_name: str, y: torch.Tensor = y, A: Any = A, cache: dict[str, MethodOutput] = csgm_test
        ) -> MethodOutput:
            """CSGM on the test measurements with ``gen_name``, computed once per m (shared with sparse-gen)."""
            if gen_name not in cache:
                method = next(k for k, v in GENERATORS.items() if v == gen_name)
                cache[gen_name] = recover_csgm(
                    generators[gen_name], y, A, protocol.csgm_config(method), test_seeds, protocol.batch
                )
            return cache[gen_name]

        for method in chosen:
            bar.set_postfix_str(f"m={m} {method}")
            cached = cache.load(method, m)
            if cached is not None:
                mse_images, seconds, selection, x_shown = cached
                reused.append(f"{method}-m{m}")
                _record(per_method[method], selected, method, m, mse_images, seconds, selection)
                if m == grid_m:
                    shown[method] = x_shown
                bar.update(1)
                continue
            if method in GENERATORS:
                out = csgm_for(GENERATORS[method])
            elif method.startswith("lasso-"):
                basis = method.split("-", 1)[1]
                out = recover_lasso(A_np, y, basis, y_val, x_val, protocol, n_jobs=threads)
            elif method == "dip":
                k = protocol.dip_images
                out = recover_dip(y[:k], A, protocol, protocol.dip_tv_weight * m, test_seeds[:k], dev)
            elif method == "diffpir-ddpm":
                # the aggregate is chosen on validation images, then the test images are timed
                ddpm, sigma = generators["mnist-ddpm"], protocol.noise_std
                cfg, scores = select_diffpir_aggregate(
                    ddpm, y_val, x_val, A, sigma, protocol.diffpir, seeds=val_seeds, batch=protocol.batch
                )
                start = time.perf_counter()
                x_hat = diffpir_recover(ddpm, y, A, sigma, cfg, seeds=test_seeds, batch=protocol.batch).cpu()
                picked = {"aggregate": cfg.aggregate, "val_mse": scores}
                out = MethodOutput(x_hat, time.perf_counter() - start, picked)
            else:  # sparse-gen
                base_val = {
                    gen: recover_csgm(
                        generators[gen], y_val, A, protocol.csgm_config(_method_of(gen)), val_seeds,
                        protocol.batch,
                    )
                    for gen in protocol.sparse_generators
                }  # fmt: skip
                choice = select_sparse_gen(generators, y_val, x_val, A, base_val, protocol, val_seeds)
                gen_name = choice["generator"]
                out = recover_sparse_gen(
                    generators[gen_name], y, A, csgm_for(gen_name), choice["basis"], choice["weight"], protocol,
                    test_seeds, generator_name=gen_name,
                )  # fmt: skip
                out = dataclasses.replace(out, selection=choice)
            n_done = out.x_hat.shape[0]
            mse_images = per_image_mse(out.x_hat, x_test[:n_done])
            cache.save(method, m, mse_images, out.seconds, out.selection, out.x_hat[:k_show])
            _record(per_method[method], selected, method, m, mse_images, out.seconds, out.selection)
            if m == grid_m:
                shown[method] = out.x_hat[:k_show]
            log.debug("m=%d %s: mse %.5f", m, method, float(mse_images.mean()))
            bar.update(1)

    grid_settings: dict[str, Any] = {}
    if grids:

        def tick(name: str) -> None:
            bar.set_postfix_str(name)
            bar.update(1)

        bar.set_postfix_str("grid_cs.png")
        rows = [("original", x_test[:k_show])] + [(k, shown[k]) for k in chosen]
        draw_panels(
            out_dir / "grid_cs.png",
            f"Compressed sensing, m = {grid_m} Gaussian measurements, noise {protocol.noise_std}",
            [(f"m = {grid_m}", rows)],
        )
        bar.update(1)
        grid_settings = operator_grids(
            out_dir,
            x_test[:k_show],
            x_val[:k_show],
            chosen,
            generators,
            protocol,
            dev,
            tick=tick,
        )
        grid_settings["grid_cs.png"] = {"m": grid_m}
    bar.close()

    results: dict[str, Any] = {"protocol": {}, "m": m_grid, "methods": per_method}
    ratio, ratio_info = lasso_ratio(results)
    device_name = str(dev) if dev.type == "cpu" else f"{dev} ({torch.cuda.get_device_name(dev)})"
    results["protocol"] = {
        **protocol.to_json(),
        "name": "CSGM MNIST (Bora et al. 2017) "
        + ("QUICK reduced protocol" if protocol.quick else "full protocol"),
        "quick_reductions": run_reductions(chosen) if protocol.quick else {},
        "methods_run": list(chosen),
        "weights_sha256": {name: zoo.record(name).get("sha256") for name in generators},
        "measurement_matrix": "GaussianMatrix(m, (1, 28, 28), scaling='csgm'): N(0, 1) entries, unscaled",
        "seeds": {
            "A": "seed + m",
            "test_noise": "seed + 10000 + m",
            "val_noise": "seed + 20000 + m",
            "test_image_i": "seed + i (invert restarts, DIP networks)",
            "val_image_i": "seed + 100000 + i",
            "grids_noise": "seed + 30000 + 10 * figure + panel",
            "A_per_m": {str(m): protocol.seed + m for m in m_grid},
        },
        "data": "MNIST: first n_images of the test split; first n_val of the val split (selection only)",
        "metric": "per-pixel MSE per image; mse = mean over images, mse_std = std over images (ddof 0)",
        "seconds_per_image": "test-time recovery wall seconds / n_images (batched; selection on validation "
        "excluded; sparse-gen includes its CSGM start)",
        "dip_tv_weight_used": "dip_tv_weight * m (CSGM's unscaled A makes the summed squared error m times "
        "CS-DIP's)",
        "dip_images": protocol.dip_images,
        "images_per_method": {k: (protocol.dip_images if k == "dip" else protocol.n_images) for k in chosen},
        "csgm_schedules": {k: dataclasses.asdict(protocol.csgm_config(k)) for k in GENERATORS},
        "sparse_gen": f"CSGM start from one of {list(protocol.sparse_generators)}, then sparse_steps joint (z, v) "
        "steps (FISTA step 1/L on v with G(z) + v kept in [0, 1] for pixel deviations, Adam on z); generator, basis and weight (or 'off' = the CSGM start) chosen per m on validation images; "
        "output clipped to [0, 1]",
        "selected": selected,
        "ratio": ratio_info,
        "grids": grid_settings,
        "device": device_name,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "command": command,
        "reused_from_cache": reused,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    results["lasso_over_csgm_measurements_at_m50"] = ratio
    results["checks"] = figure_checks(results)
    _check_finite(results)
    write_record(out_dir / "results.json", results)
    write_markdown(results, out_dir / "results.md")
    plot_mse(results, out_dir / "mse_vs_m.png")
    return results


def _check_finite(results: dict[str, Any]) -> None:
    for name, res in results["methods"].items():
        for key, values in res.items():
            if not all(math.isfinite(v) and v >= 0 for v in values):
                raise RuntimeError(f"{name}.{key}: expected finite non-negative numbers, got {values}")


def main(args: argparse.Namespace) -> int:
    """Handler of ``python -m eval cs``."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    overrides: dict[str, Any] = {"seed": args.seed}
    if args.n is not None:
        overrides["n_images"] = args.n
    if args.m is not None:
        overrides["m_grid"] = check_m_grid(sorted(args.m))
    if args.batch is not None:
        overrides["batch"] = args.batch
    if args.dip_ngf is not None:
        overrides["dip_ngf"] = args.dip_ngf
    if args.dip_iters is not None:
        overrides["dip_iters"] = args.dip_iters
    if args.dip_n is not None:
        overrides["dip_n"] = args.dip_n
    protocol = quick_protocol(**overrides) if args.quick else full_protocol(**overrides)
    methods = check_methods(args.methods)
    if "diffpir-ddpm" in methods:  # refused before any work, as one line
        try:
            importlib.import_module("deepinv")
        except ImportError as err:
            msg = "--methods diffpir-ddpm needs deepinv: pip install 'manifold-defense[deepinv]'"
            raise ValueError(msg) from err
    command = command_line(args)
    if protocol.quick:
        reduced = "; ".join(
            f"{k}: {v['quick']} (full {v['full']})" for k, v in run_reductions(methods).items()
        )
        print(f"QUICK protocol (reduced settings, not the paper's protocol): {reduced}", flush=True)
    else:
        print(
            f"Full CSGM MNIST protocol: {protocol.n_images} test images, m = {list(protocol.m_grid)}, "
            f"DIP on {protocol.dip_images} images; docs/compressed-sensing.md gives its CPU wall time",
            flush=True,
        )
    results = run_benchmark(
        protocol,
        args.out,
        methods,
        args.device,
        grids=not args.no_grids,
        threads=args.threads or 1,
        data_dir=args.data_dir,
        command=command,
        resume=not args.no_resume,
    )
    header = "m      " + " ".join(f"{k:>14}" for k in results["methods"])
    print(header)
    for i, m in enumerate(results["m"]):
        print(f"{m:<6} " + " ".join(f"{results['methods'][k]['mse'][i]:>14.5f}" for k in results["methods"]))
    ratio = results["lasso_over_csgm_measurements_at_m50"]
    info = results["protocol"]["ratio"]
    if info.get("csgm_reference") is not None:
        shown = f"{ratio:.2f}" if ratio is not None else f"null (never reached, {info['never_reached_flag']})"
        print(f"lasso_over_csgm_measurements_at_m50 = {shown} (reference {info['csgm_reference']})")
    checks = results["checks"]
    if checks["sparse_gen_within_10pct"] is not None:
        sg = checks["sparse_gen_within_10pct"]
        print(f"sparse-gen / min(CSGM, best Lasso) per m: {sg['sparse_gen_over_min_csgm_lasso']} "
              f"(all <= 1.1: {sg['ok']})")  # fmt: skip
    if checks["dip_beats_lasso_m_le_200"] is not None:
        dp = checks["dip_beats_lasso_m_le_200"]
        print(f"DIP / best Lasso at m <= 200: {dp['dip_over_best_lasso']} (all < 1: {dp['ok']})")
    print(f"{'QUICK protocol: ' if protocol.quick else ''}wrote {args.out}/results.json, results.md, mse_vs_m.png"
          + ("" if args.no_grids else ", grid_*.png"))  # fmt: skip
    return 0
