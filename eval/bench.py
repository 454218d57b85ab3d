"""``python -m eval bench``: the projection's cost, Defense-GAN's schedule versus the fast one, side by side.

Paper: Samangouei, Kabkab, Chellappa, "Defense-GAN" (ICLR 2018), whose projection spends L x R = 200 x 10 generator
passes per image; Athalye, Carlini, Wagner (ICML 2018) for the BPDA + EOT attack that evaluates it.

Everything runs in one process, on the same MNIST test images and the zoo's ``mnist-gan`` / ``mnist-encoder`` /
``mnist-classifier``:

1. **Reference vs fast** on the first ``n`` test images. ``reference`` = Defense-GAN (SGD momentum 0.7, lr 10,
   L = 200, R = 10, lr x0.1 at 0.8 L, z ~ N(0, 1/k)); ``fast`` = Adam lr 0.05, 50 steps, R = 2 from the encoder's
   E(x) (restart 1 at E(x) + N(0, 1/k) noise), the losing restart pruned after 5 steps. Per configuration:
   generator evaluations per image (``Inversion.generator_evals``; the encoder's one forward pass per image is
   counted as one more evaluation, although it costs fewer FLOPs, see ``encoder_flops``), seconds per image,
   median / 90th-percentile per-pixel MSE of G(z*) vs x, the classifier's accuracy on the projected clean images
   and the BPDA + EOT robust accuracy (l2 PGD through the randomized defended model, identity backward through the
   projection, gradients averaged over ``eot`` projections, the final images scored in ``draws`` fresh projections,
   a point counts only if every draw and its clean projection are correct) on the first ``bpda_n`` images, with the
   same attack settings for both. Both run ``rows`` (image, restart) rows per generator call.
2. **Batched vs loop**: the reference schedule on ``loop_n`` images, all restarts of ``rows // R`` images per call
   versus one (image, restart) per call (the one-image-at-a-time design of CS-DIP); same starts, same results.
3. **FLOP rate** of the batched inner step (generator forward + backward w.r.t. z, counted by ``FlopCounterMode``)
   versus a measured float32 ``torch.mm`` peak with the same threads, over batch sizes and memory formats.
4. **Growth**: seconds per image as images per call, restarts and steps vary (fast schedule without pruning).

Writes ``DIR/results.json`` (``evals_ratio``, ``time_ratio``, ``batched_over_loop``, ``fraction_of_peak``, per
configuration blocks, settings, device, threads, torch version), ``DIR/results.md`` and ``DIR/growth.png``; prints
the four ratios last. ``--quick``: a smoke run of about two minutes on one thread (few images, tiny BPDA), marked
as such in the outputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from attacks import Norm, PGDConfig, ThreatModel
from attacks.base import predict
from eval.bench_core import (
    MEMORY_FORMATS,
    FlopRate,
    Projection,
    count_encoder_flops,
    flop_rate_sweep,
    growth_table,
    images_per_call,
    plot_growth,
    project,
    project_loop,
)
from eval.cli import command_line
from eval.harness.command import DefenseModels, load_zoo_models
from eval.inputs import check_labeled_images
from eval.run_folder import claim_run_folder, run_folder_session, write_record
from manifold_defense.evaluation import evaluate_pgd
from manifold_defense.integrity import atomic_write_text
from manifold_defense.inversion import InversionConfig
from manifold_defense.presets import defended_model, schedule_config

log = logging.getLogger(__name__)

__all__ = [
    "RATIOS",
    "BenchSettings",
    "add_parsers",
    "fast_config",
    "reference_config",
    "run_bench",
    "run_command",
    "write_markdown",
]

#: The headline ratios, in the order they are printed (last) on stdout.
RATIOS: tuple[str, ...] = ("evals_ratio", "time_ratio", "batched_over_loop", "fraction_of_peak")


def reference_config(seed: int = 0) -> InversionConfig:
    """Defense-GAN's projection schedule (``schedule_config("defense-gan")``)."""
    return schedule_config("defense-gan", seed)


def fast_config(seed: int = 0) -> InversionConfig:
    """The ``"fast"`` schedule of :mod:`manifold_defense.presets` with the losing restart pruned after 5 steps.

    Measured on 60 test images: pruning leaves the median MSE unchanged (restart 0 at E(x) almost always wins)
    and cuts the generator passes from 102 to 57 per image; early stopping (tol 3e-6, patience 5) saved under 1
    pass and is left off.
    """
    return schedule_config("fast", seed).replace(prune_after=5, prune_keep=1)


def _positive_int(name: str, value: Any, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"expected {name} to be an int >= {low}, got {value!r}")


def _int_tuple(name: str, values: Any) -> tuple[int, ...]:
    out = tuple(values)
    if not out or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in out):
        raise ValueError(f"expected {name} as a non-empty tuple of ints >= 1, got {values!r}")
    return out


@dataclass(frozen=True)
class BenchSettings:
    """Every setting of :func:`run_bench` (defaults: the full protocol of issue 5).

    Args:
        n: test images for the reference / fast projections (the first ``n`` of the split).
        bpda_n: images (the first ``bpda_n`` of those) for the BPDA + EOT robust accuracy, ``<= n``; 0 skips it.
        l2_eps: l2 budget of the BPDA + EOT attack (total over the image).
        bpda_steps: PGD steps (step ``2.5 eps / steps``, random start).
        eot_samples: projections averaged per PGD step.
        draws: fresh projections the final adversarial images are scored in (worst case).
        rows: (image, restart) rows per generator call; images per call = ``max(1, rows // R)``.
        loop_n: images of the batched-vs-loop comparison (reference schedule), ``<= n``.
        flop_batches: rows per step tried in the FLOP-rate sweep.
        memory_formats: generator weight formats tried in the sweep (subset of ``MEMORY_FORMATS``).
        growth_n: images of the growth table.
        growth_batches, growth_restarts, growth_steps: the values each growth sweep takes.
        seed: projection restart noise and attack random starts.
        quick: a smoke run (recorded in the outputs).
    """

    n: int = 500
    bpda_n: int = 100
    l2_eps: float = 2.0
    bpda_steps: int = 10
    eot_samples: int = 2
    draws: int = 3
    rows: int = 128
    loop_n: int = 10
    flop_batches: tuple[int, ...] = (16, 32, 64, 128, 256)
    memory_formats: tuple[str, ...] = MEMORY_FORMATS
    growth_n: int = 16
    growth_batches: tuple[int, ...] = (1, 4, 16)
    growth_restarts: tuple[int, ...] = (1, 2, 5, 10)
    growth_steps: tuple[int, ...] = (10, 25, 50, 100)
    seed: int = 0
    quick: bool = False

    def __post_init__(self) -> None:
        for name in ("n", "bpda_steps", "eot_samples", "draws", "rows", "loop_n", "growth_n"):
            _positive_int(name, getattr(self, name))
        _positive_int("bpda_n", self.bpda_n, 0)
        _positive_int("seed", self.seed, 0)
        if self.bpda_n > self.n or self.loop_n > self.n or self.growth_n > self.n:
            raise ValueError(
                f"expected bpda_n, loop_n and growth_n <= n={self.n}, "
                f"got {self.bpda_n}, {self.loop_n} and {self.growth_n}"
            )
        eps = self.l2_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
            raise ValueError(f"expected l2_eps to be a finite float > 0, got {eps!r}")
        object.__setattr__(self, "l2_eps", float(eps))
        for name in ("flop_batches", "growth_batches", "growth_restarts", "growth_steps"):
            object.__setattr__(self, name, _int_tuple(name, getattr(self, name)))
        formats = tuple(self.memory_formats)
        if not formats or any(f not in MEMORY_FORMATS for f in formats):
            raise ValueError(f"expected memory_formats from {list(MEMORY_FORMATS)}, got {list(formats)}")
        object.__setattr__(self, "memory_formats", formats)
        if not isinstance(self.quick, bool):
            raise TypeError(f"expected quick as a bool, got {type(self.quick).__name__}")

    @classmethod
    def quick_preset(cls, **overrides: Any) -> BenchSettings:
        """About two minutes on one CPU thread: 16 images, BPDA on 4 with 2 steps, small sweeps."""
        base: dict[str, Any] = {
            "n": 16,
            "bpda_n": 4,
            "bpda_steps": 2,
            "eot_samples": 1,
            "draws": 1,
            "loop_n": 2,
            "flop_batches": (32, 64, 128),
            "growth_n": 8,
            "growth_batches": (1, 8),
            "growth_restarts": (1, 4),
            "growth_steps": (10, 50),
            "quick": True,
        }
        base.update(overrides)
        return cls(**base)


def _round(value: float, digits: int = 6) -> float | None:
    return float(f"{value:.{digits}g}") if math.isfinite(value) else None


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, float):
        return _round(value)
    return value


class _Bench:
    """State of one :func:`run_bench` call."""

    def __init__(self, settings: BenchSettings, models: DefenseModels, x: Tensor, y: Tensor) -> None:
        self.s = settings
        self.m = models
        self.x, self.y = x, y
        self.configs = {"reference": reference_config(settings.seed), "fast": fast_config(settings.seed)}
        self.image_shape = tuple(x.shape[1:])
        self.encoder_flops = count_encoder_flops(models.encoder, self.image_shape)

    def config_block(self, name: str, progress: Callable[[str], None]) -> dict[str, Any]:
        s, m, cfg = self.s, self.m, self.configs[name]
        per_call = images_per_call(cfg, s.rows)
        progress(f"{name}: projecting {s.n} images ({per_call} per call)")
        res: Projection = project(m.generator, self.x, cfg, encoder=m.encoder, images_per_call=per_call)
        with torch.no_grad():
            preds = torch.cat(
                [
                    predict(
                        m.classifier, res.x_hat[i : i + 256].to(self.x.device), "classifier", f"batch {i}"
                    ).cpu()
                    for i in range(0, s.n, 256)
                ]
            )
        correct = preds == self.y.cpu()
        gen_evals = float(res.generator_evals.float().mean())
        block: dict[str, Any] = {
            "config": _jsonable(cfg),
            "images_per_call": per_call,
            "rows_per_call": per_call * cfg.restarts,
            "generator_evals_per_image": gen_evals,
            "encoder_passes_per_image": res.encoder_passes,
            "evals_per_image": gen_evals + res.encoder_passes,
            "evals_note": "generator forward passes (each but the last with a backward w.r.t. z), every restart; "
            "the encoder's forward pass is counted as one more evaluation",
            "seconds_per_image": res.seconds_per_image,
            "seconds": res.seconds,
            "mse_per_pixel": {
                "median": float(res.mse.median()),
                "p90": float(res.mse.quantile(0.9)),
                "mean": float(res.mse.mean()),
            },
            "clean_projected_accuracy": float(correct.float().mean()),
        }
        if s.bpda_n:
            block["bpda_eot"] = self.bpda(name, cfg, correct[: s.bpda_n], progress)
        return block

    def bpda(
        self, name: str, cfg: InversionConfig, clean_correct: Tensor, progress: Callable[[str], None]
    ) -> dict[str, Any]:
        s, m = self.s, self.m
        progress(f"{name}: BPDA+EOT l2 {s.l2_eps:g} on {s.bpda_n} images")
        enc = m.encoder if cfg.init == "encoder" else None
        model = defended_model(m.classifier, m.generator, cfg, encoder=enc, randomize=True, seed=s.seed)
        attack = PGDConfig(steps=s.bpda_steps, random_start=True, eot_samples=s.eot_samples, seed=s.seed)
        res = evaluate_pgd(
            model,
            self.x[: s.bpda_n],
            self.y[: s.bpda_n],
            ThreatModel(Norm.L2, s.l2_eps),
            attack,
            draws=s.draws,
            clean_correct=clean_correct,
            batch_size=images_per_call(cfg, s.rows),
        )
        per_image = res.seconds / s.bpda_n
        return {
            "n": s.bpda_n,
            "threat": {"norm": "l2", "eps": s.l2_eps},
            "attack": {
                "name": "PGD + BPDA (identity backward) + EOT, randomized projection",
                "steps": s.bpda_steps,
                "step_size": 2.5 * s.l2_eps / s.bpda_steps,
                "eot_samples": s.eot_samples,
                "draws": s.draws,
                "seed": s.seed,
            },
            "robust_accuracy": res.accuracy,
            "projections_per_image": s.bpda_steps * s.eot_samples + 1 + s.draws,
            "seconds": res.seconds,
            "seconds_per_image": per_image,
            "minutes_for_1000_images_estimate": per_image * 1000 / 60,
        }

    def loop(self, progress: Callable[[str], None]) -> dict[str, Any]:
        s, m = self.s, self.m
        cfg = self.configs["reference"]
        x = self.x[: s.loop_n]
        per_call = images_per_call(cfg, s.rows)
        progress(f"batched vs loop on {s.loop_n} images (reference schedule)")
        batched = project(m.generator, x, cfg, encoder=m.encoder, images_per_call=per_call)
        looped = project_loop(m.generator, x, cfg, encoder=m.encoder)
        per_image = project_loop(m.generator, x, cfg, encoder=m.encoder, batch_restarts=True)
        return {
            "config": "reference",
            "n": s.loop_n,
            "batched_images_per_call": per_call,
            "batched_seconds_per_image": batched.seconds_per_image,
            "loop_seconds_per_image": looped.seconds_per_image,
            "loop_note": "one invert call per (image, restart): 1 row per generator call, as CS-DIP",
            "per_image_restarts_batched_seconds_per_image": per_image.seconds_per_image,
            "batched_over_loop": looped.seconds_per_image / batched.seconds_per_image,
            "batched_over_per_image_restarts_batched": per_image.seconds_per_image
            / batched.seconds_per_image,
            "max_abs_mse_difference_loop_vs_batched": float((looped.mse - batched.mse).abs().max()),
        }

    def flops(self, progress: Callable[[str], None]) -> FlopRate:
        progress("FLOP rate sweep")
        return flop_rate_sweep(self.m.generator, self.image_shape, self.s.flop_batches, self.s.memory_formats)

    def growth(self, out: Path, progress: Callable[[str], None]) -> list[dict[str, Any]]:
        s = self.s
        progress("growth with batch, restarts, steps")
        base = schedule_config("fast", s.seed)
        rows = growth_table(
            self.m.generator,
            self.x[: s.growth_n],
            base,
            encoder=self.m.encoder,
            batches=s.growth_batches,
            restarts=s.growth_restarts,
            steps=s.growth_steps,
        )
        plot_growth(
            out / "growth.png",
            rows,
            f"Projection cost (fast schedule, no pruning: Adam, encoder start), {s.growth_n} images, "
            f"{torch.get_num_threads()} thread(s), {self.x.device}",
        )
        return rows


@run_folder_session()  # ``out`` stays locked against other writers until the call returns
def run_bench(
    settings: BenchSettings,
    x: Tensor,
    y: Tensor,
    models: DefenseModels,
    out: Path,
    *,
    meta: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the benchmark on the first ``settings.n`` images of ``(x, y)`` and write the outputs.

    Args:
        settings: :class:`BenchSettings`.
        x: ``(N, C, H, W)`` images in [0, 1], ``N >= settings.n``, on the models' device.
        y: ``(N,)`` int64 labels, same device.
        models: classifier, generator, encoder (eval mode).
        out: output folder (created): ``results.json``, ``results.md``, ``growth.png``.
        meta: extra top-level JSON fields (command, device, threads, torch version).
        progress: called with a line before each stage (default: logging).

    Returns:
        The JSON record (also written to ``out / "results.json"``).
    """
    if not isinstance(settings, BenchSettings):
        raise TypeError(f"expected settings as BenchSettings, got {type(settings).__name__}")
    check_labeled_images(x, y, settings.n)
    say = progress if progress is not None else log.info
    out = claim_run_folder(out, "bench", dataclasses.asdict(settings))
    start = time.perf_counter()
    bench = _Bench(settings, models, x[: settings.n], y[: settings.n])
    blocks = {name: bench.config_block(name, say) for name in ("reference", "fast")}
    loop = bench.loop(say)
    rate = bench.flops(say)
    growth = bench.growth(out, say)
    ref, fast = blocks["reference"], blocks["fast"]
    not_worse = fast["mse_per_pixel"]["median"] <= ref["mse_per_pixel"]["median"]
    record: dict[str, Any] = {
        **(meta or {}),
        "quick": settings.quick,
        "protocol": "QUICK smoke protocol (few images, tiny BPDA): not the reported figures"
        if settings.quick
        else "full protocol",
        "data": f"MNIST test split, first {settings.n} images",
        "settings": _jsonable(settings),
        "evals_ratio": _round(ref["evals_per_image"] / fast["evals_per_image"]),
        "fast_mse_not_worse": bool(not_worse),
        "time_ratio": _round(ref["seconds_per_image"] / fast["seconds_per_image"]),
        "batched_over_loop": _round(loop["batched_over_loop"]),
        "fraction_of_peak": _round(rate.fraction_of_peak),
        "configs": _jsonable(blocks),
        "differences_fast_minus_reference": {
            "clean_projected_accuracy": _round(
                fast["clean_projected_accuracy"] - ref["clean_projected_accuracy"]
            ),
            "bpda_robust_accuracy": _round(
                fast["bpda_eot"]["robust_accuracy"] - ref["bpda_eot"]["robust_accuracy"]
            )
            if settings.bpda_n
            else None,
        },
        "encoder_flops_per_image": _round(bench.encoder_flops),
        "batched_vs_loop": _jsonable(loop),
        "flop_rate": {
            "step": "generator forward + per-pixel MSE + backward w.r.t. z (frozen weights), one optimizer "
            "step's work; FLOPs counted by torch.utils.flop_counter.FlopCounterMode",
            "flops_per_row": _round(rate.flops_per_row),
            "matmul_peak_flops_per_second": _round(rate.peak_flops),
            "peak": "float32 torch.mm of 1024^2 and 2048^2 matrices, best of 5 each, measured before and after "
            "the sweep (the largest rate is used), same threads",
            "mkldnn_enabled": bool(torch.backends.mkldnn.enabled),
            "best": _jsonable(rate.best),
            "table": _jsonable(rate.table),
        },
        "growth": _jsonable(growth),
        "growth_plot": "growth.png",
        "seconds_total": _round(time.perf_counter() - start, 4),
    }
    write_record(out / "results.json", record)  # with its SHA-256, atomically
    atomic_write_text(out / "results.md", write_markdown(record))
    return record


def _f(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return "-" if value is None else str(value)


def write_markdown(record: dict[str, Any]) -> str:
    """A Markdown report of a :func:`run_bench` record."""
    quick = " (QUICK smoke protocol)" if record.get("quick") else ""
    lines = [
        f"# Projection benchmark{quick}",
        "",
        f"Command: `{record.get('command', '?')}`; device {record.get('device', '?')}, "
        f"{record.get('threads', '?')} thread(s), torch {record.get('torch', '?')}; {record['data']}; "
        f"total {_f(record['seconds_total'])} s.",
        "",
        "| ratio | value |",
        "|---|---|",
        *(f"| {name} | {_f(record[name])} |" for name in RATIOS),
        f"| fast_mse_not_worse | {record['fast_mse_not_worse']} |",
        "",
        "| config | evals / image | s / image | median MSE | p90 MSE | clean acc | BPDA+EOT acc | BPDA s / image |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, block in record["configs"].items():
        bpda = block.get("bpda_eot") or {}
        lines.append(
            f"| {name} | {_f(block['evals_per_image'])} | {_f(block['seconds_per_image'])} "
            f"| {_f(block['mse_per_pixel']['median'])} | {_f(block['mse_per_pixel']['p90'])} "
            f"| {_f(block['clean_projected_accuracy'])} | {_f(bpda.get('robust_accuracy'))} "
            f"| {_f(bpda.get('seconds_per_image'))} |"
        )
    loop = record["batched_vs_loop"]
    rate = record["flop_rate"]
    lines += [
        "",
        f"Evaluations count the encoder pass as one; BPDA: l2 eps {record['settings']['l2_eps']}, "
        f"{record['settings']['bpda_steps']} steps, EOT {record['settings']['eot_samples']}, "
        f"{record['settings']['draws']} draws, on {record['settings']['bpda_n']} images.",
        "",
        f"Batched vs loop ({loop['n']} images, reference schedule): batched {_f(loop['batched_seconds_per_image'])} "
        f"s/image, one (image, restart) per call {_f(loop['loop_seconds_per_image'])} s/image, one image per call "
        f"{_f(loop['per_image_restarts_batched_seconds_per_image'])} s/image.",
        "",
        f"FLOP rate: {_f(rate['flops_per_row'])} FLOPs per row per step; matmul peak "
        f"{_f(rate['matmul_peak_flops_per_second'] / 1e9)} GFLOP/s; best {_f(rate['best']['flops_per_second'] / 1e9)} "
        f"GFLOP/s at batch {rate['best']['batch']}, {rate['best']['memory_format']}.",
        "",
        "| batch | memory format | GFLOP/s | fraction of peak |",
        "|---|---|---|---|",
        *(
            f"| {r['batch']} | {r['memory_format']} | {_f(r['flops_per_second'] / 1e9)} | {_f(r['fraction_of_peak'])} |"
            for r in rate["table"]
        ),
        "",
        "Growth (fast schedule without pruning; plot: growth.png):",
        "",
        "| varied | images per call | restarts | steps | s / image | generator evals / image |",
        "|---|---|---|---|---|---|",
        *(
            f"| {r['vary']} | {r['batch']} | {r['restarts']} | {r['steps']} | {_f(r['seconds_per_image'])} "
            f"| {_f(r['generator_evals_per_image'])} |"
            for r in record["growth"]
        ),
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- command


def add_parsers(sub: Any) -> None:
    """Register ``bench`` on the ``python -m eval`` sub-parsers."""
    p = sub.add_parser(
        "bench",
        help="projection cost: Defense-GAN schedule vs fast settings, batching, FLOP rate, growth",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/bench[-quick])")
    p.add_argument("--quick", action="store_true", help="smoke run of about two minutes on one thread")
    p.add_argument("--n", type=int, default=None, help="test images projected (default 500; quick 16)")
    p.add_argument("--bpda-n", type=int, default=None, help="images attacked (default 100; quick 4; 0 skips)")
    p.add_argument("--l2-eps", type=float, default=None, help="BPDA+EOT l2 budget (default 2)")
    p.add_argument("--bpda-steps", type=int, default=None, help="BPDA+EOT PGD steps (default 10; quick 2)")
    p.add_argument("--eot", type=int, default=None, help="EOT samples per step (default 2; quick 1)")
    p.add_argument("--draws", type=int, default=None, help="final evaluation draws (default 3; quick 1)")
    p.add_argument("--rows", type=int, default=None, help="(image, restart) rows per generator call (128)")
    p.add_argument("--loop-n", type=int, default=None, help="images of batched vs loop (default 10; quick 2)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights-dir", type=Path, default=None, help="zoo folder (default: the package's)")
    p.set_defaults(func=run_command)


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    """:class:`BenchSettings` from the parsed command line (validated)."""
    overrides: dict[str, Any] = {"seed": args.seed}
    for arg, name in (
        ("n", "n"),
        ("bpda_n", "bpda_n"),
        ("l2_eps", "l2_eps"),
        ("bpda_steps", "bpda_steps"),
        ("eot", "eot_samples"),
        ("draws", "draws"),
        ("rows", "rows"),
        ("loop_n", "loop_n"),
    ):
        value = getattr(args, arg)
        if value is not None:
            overrides[name] = value
    if args.quick:
        return BenchSettings.quick_preset(**overrides)
    if "n" in overrides:  # a small --n shrinks the subsets that default above it
        for name in ("bpda_n", "loop_n", "growth_n"):
            if name not in overrides:
                overrides[name] = min(getattr(BenchSettings, name), overrides["n"])
    return BenchSettings(**overrides)


def load_models(device: torch.device, weights_dir: Path | None) -> DefenseModels:
    """The zoo's classifier, generator and encoder on ``device`` (a hook the tests replace)."""
    return load_zoo_models(device, weights_dir)


def run_command(args: argparse.Namespace) -> int:
    """Handler of ``python -m eval bench``."""
    from manifold_defense.data import load_mnist
    from manifold_defense.devices import resolve_device

    settings = settings_from_args(args)
    if args.threads is not None:
        if isinstance(args.threads, bool) or args.threads < 1:
            raise ValueError(f"expected --threads >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    out = args.out if args.out is not None else Path("runs/bench-quick" if settings.quick else "runs/bench")
    test = load_mnist("test", limit=settings.n)
    if len(test) < settings.n:
        raise ValueError(f"expected --n <= {len(test)} test images, got {settings.n}")
    if settings.quick:
        log.info(
            "QUICK smoke protocol: n=%d, BPDA on %d images; not the reported figures",
            settings.n,
            settings.bpda_n,
        )
    meta = {
        "command": command_line(args),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "models": "zoo mnist-classifier, mnist-gan, mnist-encoder",
    }
    models = load_models(device, args.weights_dir)
    record = run_bench(settings, test.images.to(device), test.labels.to(device), models, out, meta=meta)
    print(write_markdown(record))
    log.info("wrote %s", out / "results.json")
    if settings.quick:
        print("QUICK smoke protocol: not the reported figures")
    print(f"fast_mse_not_worse: {record['fast_mse_not_worse']}")
    for name in RATIOS:
        print(f"{name}: {_f(record[name])}")
    return 0
