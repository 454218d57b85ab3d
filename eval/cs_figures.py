"""Reports of ``python -m eval cs``: the Markdown table, the error-vs-measurements plot and the reconstruction
grids (compressed sensing, inpainting, super-resolution, 1-bit compressed sensing).

Purpose: show what the numbers of ``results.json`` look like. The grids reuse the benchmark's settings
(:class:`eval.cs_core.CSProtocol`); for the pixel-domain operators (masks, blur + downsample) the Lasso alpha is
chosen on validation images for that operator; their squared error is on a per-pixel scale, about ``n = 784``
times smaller than Gaussian CS's, so CSGM's z-prior weight is divided by ``n``, DIP uses CS-DIP's TV weight on
its normalized scale (``grid_dip_tv_weight``) and sparse-gen a fixed DCT deviation weight
(``grid_sparse_weight``). 1-bit CS (``SignMeasurements``) is shown for the generative methods only: the Lasso
needs linear measurements and DIP's loss is a squared error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from eval.cs_core import (
    GENERATORS,
    IMAGE_SHAPE,
    CSProtocol,
    noisy_measurements,
    operator_matrix,
    recover_csgm,
    recover_dip,
    recover_lasso,
    recover_sparse_gen,
)
from manifold_defense.inversion import (
    BlurDownsample,
    GaussianMatrix,
    LinearOperator,
    Mask,
    SignMeasurements,
)
from manifold_defense.inversion.operators import MeasurementOperator

__all__ = ["draw_panels", "operator_grids", "plot_mse", "write_markdown"]

Rows = list[tuple[str, torch.Tensor]]


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}f}"


def write_markdown(results: dict[str, Any], path: Path) -> None:
    """``results.md``: per-pixel MSE (mean +- std over images) and seconds per image, one row per ``m``."""
    proto = results["protocol"]
    methods = list(results["methods"])
    lines = ["# Compressed sensing on MNIST (CSGM protocol)", ""]
    if proto["quick"]:
        lines += [
            "**QUICK protocol** (reduced settings; not comparable with the paper's numbers): "
            + ", ".join(
                f"{k} {v['quick']} (full: {v['full']})" for k, v in proto["quick_reductions"].items()
            ),
            "",
        ]
    lines += [
        f"{proto['n_images']} test images, {proto['n_val']} validation images, Gaussian A with N(0, 1) entries, "
        f"noise sigma {proto['noise_std']}. csgm-vae: Adam lr {proto['csgm_lr']}, {proto['csgm_steps']} steps, "
        f"{proto['csgm_restarts']} restarts (CSGM's schedule); csgm-gan: Adam lr {proto['gan_lr']}, "
        f"{proto['gan_steps']} steps, {proto['gan_restarts']} restarts pruned to 1 after "
        f"{proto['gan_prune_after']} steps (chosen on validation images). DIP: ngf {proto['dip_ngf']}, "
        f"{proto['dip_iters']} iterations, {proto['dip_restarts']} restarts ({proto['dip_aggregate']}), on "
        f"{proto['dip_images']} test images. Per-pixel MSE, mean +- std over test images.",
        "",
        "| m | " + " | ".join(methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for i, m in enumerate(results["m"]):
        cells = [
            f"{_fmt(results['methods'][k]['mse'][i])} +- {_fmt(results['methods'][k]['mse_std'][i])}"
            for k in methods
        ]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "Seconds per image (test-time recovery, batched):", ""]
    lines += ["| m | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for i, m in enumerate(results["m"]):
        cells = [_fmt(results["methods"][k]["seconds_per_image"][i], 3) for k in methods]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    ratio = results["lasso_over_csgm_measurements_at_m50"]
    info = proto["ratio"]
    lines += ["", "## Measurements the best Lasso needs, relative to CSGM at m = 50", ""]
    if info.get("csgm_reference") is None:
        lines.append(f"Not computed: {info['reason']}.")
    else:
        needed = info["lasso_m_needed"]
        lines.append(
            f"Reference: {info['csgm_reference']} (the better CSGM at m = 50), MSE {_fmt(info['csgm_mse_at_m50'])}. "
            + (
                f"The best Lasso at each m (envelope over bases) reaches it at m = {needed:.1f} "
                f"(interpolated in log m): ratio **{ratio:.2f}**."
                if needed is not None
                else f"The best Lasso never reaches it on the grid (ratio {info['never_reached_flag']} / 50): ratio "
                "null."
            )
        )
    checks = results.get("checks", {})
    if checks:
        lines += ["", "## The issue's figures", ""]
        lines.append(f"- Lasso needs >= 5x CSGM's measurements at m = 50: {checks['ratio_at_least_5']}")
        sg = checks.get("sparse_gen_within_10pct")
        if sg is not None:
            lines.append(
                f"- sparse-gen within 10% of min(CSGM, best Lasso) at every m: {sg['ok']} (ratio per m: "
                + ", ".join(f"{m}: {r}" for m, r in sg["sparse_gen_over_min_csgm_lasso"].items())
                + ")"
            )
        dp = checks.get("dip_beats_lasso_m_le_200")
        if dp is not None:
            lines.append(
                f"- DIP beats the best Lasso at every m <= 200: {dp['ok']} (DIP / best Lasso: "
                + ", ".join(f"{m}: {r}" for m, r in dp["dip_over_best_lasso"].items())
                + ")"
            )
    sel = proto.get("selected", {})
    if sel.get("lasso_alpha"):
        lines += ["", "## Lasso alphas chosen on validation images", ""]
        lines += [
            "| m | " + " | ".join(sel["lasso_alpha"]) + " |",
            "|---|" + "---|" * len(sel["lasso_alpha"]),
        ]
        for m in results["m"]:
            lines.append(
                f"| {m} | "
                + " | ".join(f"{sel['lasso_alpha'][b][str(m)]['alpha']:g}" for b in sel["lasso_alpha"])
                + " |"
            )
    if sel.get("sparse_gen"):
        lines += ["", "## Sparse-gen deviation chosen on validation images", ""]
        lines += ["| m | generator | basis | weight |", "|---|---|---|---|"]
        for m in results["m"]:
            s = sel["sparse_gen"][str(m)]
            weight = "-" if s["weight"] is None else f"{s['weight']:g}"
            lines.append(f"| {m} | {s['generator']} | {s['basis']} | {weight} |")
    path.write_text("\n".join(lines) + "\n")


def plot_mse(results: dict[str, Any], path: Path) -> None:
    """``mse_vs_m.png``: per-pixel MSE against m (log-log), error bars = standard error over images."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    n = max(1, int(results["protocol"]["n_images"]))
    for name, res in results["methods"].items():
        mse = np.asarray(res["mse"], dtype=float)
        sem = np.asarray(res["mse_std"], dtype=float) / math.sqrt(n)
        ax.errorbar(results["m"], mse, yerr=sem, marker="o", ms=3, capsize=2, label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("number of measurements m")
    ax.set_ylabel("per-pixel MSE")
    title = "MNIST compressed sensing" + (" (QUICK protocol)" if results["protocol"]["quick"] else "")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _strip(images: torch.Tensor) -> np.ndarray:
    """Images ``(k, 1, H, W)`` side by side with a 1-pixel white gap, as an ``(H, k*(W+1)-1)`` array."""
    imgs = images.detach().cpu().float().clamp(0, 1)[:, 0]
    k, h, w = imgs.shape
    out = np.ones((h, k * (w + 1) - 1), dtype=np.float32)
    for i in range(k):
        out[:, i * (w + 1) : i * (w + 1) + w] = imgs[i].numpy()
    return out


def draw_panels(path: Path, title: str, panels: Sequence[tuple[str, Rows]]) -> None:
    """A figure with one column per panel and one row per label (original, measurement, methods...)."""
    labels: list[str] = []
    for _, rows in panels:
        for label, _ in rows:
            if label not in labels:
                labels.append(label)
    fig, axes = plt.subplots(
        len(labels),
        len(panels),
        figsize=(max(6.0, 2.6 * len(panels) + 1.2), 0.75 * len(labels) + 0.6),
        squeeze=False,
    )
    for j, (panel_title, rows) in enumerate(panels):
        lookup = dict(rows)
        for i, label in enumerate(labels):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if label in lookup:
                ax.imshow(_strip(lookup[label]), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            else:
                ax.axis("off")
            if j == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
            if i == 0:
                ax.set_title(panel_title, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _shown_measurement(operator: MeasurementOperator, y: torch.Tensor) -> torch.Tensor | None:
    """The measurement as an image where that is meaningful: masked pixels grey, low-resolution upsampled."""
    if isinstance(operator, Mask):
        observed = operator.adjoint(y).cpu()
        missing = ~operator.mask.cpu().unsqueeze(0)
        return torch.where(missing, torch.full_like(observed, 0.5), observed).clamp(0, 1)
    if isinstance(operator, BlurDownsample):
        return F.interpolate(y.cpu(), size=IMAGE_SHAPE[1:], mode="nearest").clamp(0, 1)
    return None


def _grid_rows(
    operator: MeasurementOperator,
    x: torch.Tensor,
    x_val: torch.Tensor,
    methods: Sequence[str],
    generators: dict[str, nn.Module],
    protocol: CSProtocol,
    device: torch.device,
    seed: int,
) -> Rows:
    """Original, measurement (if meaningful) and each applicable method's reconstruction of ``x``."""
    y = noisy_measurements(operator, x.to(device), protocol.noise_std, seed)
    seeds = [protocol.seed + i for i in range(x.shape[0])]
    rows: Rows = [("original", x)]
    shown = _shown_measurement(operator, y)
    if shown is not None:
        rows.append(("measurement", shown))
    linear = isinstance(operator, LinearOperator)
    bases: dict[str, Any] = {}
    pixel_domain = isinstance(operator, (Mask, BlurDownsample))
    # Per-pixel loss: about n times smaller than Gaussian CS's, so the z-prior is divided by n.
    prior_scale = 1.0 / math.prod(IMAGE_SHAPE) if pixel_domain else 1.0
    for method in ("csgm-vae", "csgm-gan"):
        needed = (
            method in methods
            or (method == "csgm-gan" and "sparse-gen" in methods and protocol.sparse_generator == "mnist-gan")
            or (method == "csgm-vae" and "sparse-gen" in methods and protocol.sparse_generator == "mnist-vae")
        )
        if needed:
            config = protocol.csgm_config(method)
            config = config.replace(z_prior_weight=config.z_prior_weight * prior_scale)
            out = recover_csgm(generators[GENERATORS[method]], y, operator, config, seeds, protocol.batch)
            bases[GENERATORS[method]] = out
            if method in methods:
                rows.append((method, out.x_hat))
    if not linear:
        return rows
    if "sparse-gen" in methods:
        gen = protocol.sparse_generator
        prior = protocol.z_prior_gan if gen == "mnist-gan" else protocol.z_prior_vae
        out = recover_sparse_gen(
            generators[gen], y, operator, bases[gen], "dct", protocol.grid_sparse_weight, protocol, seeds,
            z_prior_weight=prior * prior_scale, generator_name=gen,
        )  # fmt: skip
        rows.append(("sparse-gen", out.x_hat))
    if "dip" in methods:
        rows.append(
            ("dip", recover_dip(y, operator, protocol, protocol.grid_dip_tv_weight, seeds, device).x_hat)
        )
    lasso = [name for name in methods if name.startswith("lasso-")]
    if lasso and isinstance(operator, LinearOperator):
        A = operator_matrix(operator)
        y_val = noisy_measurements(operator, x_val.to(device), protocol.noise_std, seed + 1)
        for name in lasso:
            rows.append((name, recover_lasso(A, y, name.split("-", 1)[1], y_val, x_val, protocol).x_hat))
    return rows


def operator_grids(
    out_dir: Path,
    x: torch.Tensor,
    x_val: torch.Tensor,
    methods: Sequence[str],
    generators: dict[str, nn.Module],
    protocol: CSProtocol,
    device: torch.device,
    tick: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Write ``grid_inpainting.png``, ``grid_superres.png`` and ``grid_nonlinear.png``; return their settings.

    ``tick(name)`` is called after each operator (progress bar).
    """
    shape = IMAGE_SHAPE
    figures: dict[str, tuple[str, list[tuple[str, MeasurementOperator]]]] = {
        "grid_inpainting.png": (
            "Inpainting",
            [
                (
                    "random mask, 30% of pixels kept",
                    Mask.random(shape, keep_fraction=0.3, seed=protocol.seed),
                ),
                ("centred 12x12 block missing", Mask.block(shape, 12)),
            ],
        ),
        "grid_superres.png": (
            "Super-resolution (average blur + downsample)",
            [("factor 2 (14x14)", BlurDownsample(shape, 2)), ("factor 4 (7x7)", BlurDownsample(shape, 4))],
        ),
        "grid_nonlinear.png": (
            "1-bit compressed sensing: y = sign(A x + noise)",
            [
                (
                    f"1-bit, m = {protocol.grid_1bit_m}",
                    SignMeasurements(GaussianMatrix(protocol.grid_1bit_m, shape, seed=protocol.seed + 7)),
                )
            ],
        ),
    }
    settings: dict[str, Any] = {
        "noise_std": protocol.noise_std,
        "pixel_domain_z_prior": "z_prior_vae / 784, z_prior_gan / 784 (masks, blur + downsample)",
        "pixel_domain_dip_tv_weight": protocol.grid_dip_tv_weight,
        "pixel_domain_sparse_gen": f"dct deviation, weight {protocol.grid_sparse_weight:g}",
        "lasso_alpha": "select_alpha on the first grid_images validation images, per operator",
        "1bit_methods": "CSGM only (logistic loss on the signs)",
    }
    for k, (filename, (title, ops)) in enumerate(figures.items()):
        panels = []
        for j, (label, op) in enumerate(ops):
            rows = _grid_rows(
                op.to(device),
                x,
                x_val,
                methods,
                generators,
                protocol,
                device,
                protocol.seed + 30_000 + 10 * k + j,
            )
            panels.append((label, rows))
            tick(f"{filename}:{label}")
        draw_panels(out_dir / filename, title, panels)
        settings[filename] = [label for label, _ in ops]
    return settings
