"""``python -m eval ambient --out DIR [--quick]``: AmbientGAN against its baselines on MNIST (Bora, Price, Dimakis,
ICLR 2018).

For each grid point (block-pixels p in {0.5, 0.8, 0.9, 0.95}, convolve+noise sigma in {0.1, 0.2}) and each method
(``ambient``: the measurement between generator and discriminator; ``ignore``: the measurements trained on as if
clean; ``unmeasure``: biharmonic inpainting (``--inpaint normalized-convolution``: a blur restoration like the
paper's code) / Wiener deconvolution first, then a GAN), trains the ``gan``
architecture of ``python -m eval train`` (zoo ``mnist-gan`` generator, ``Critic(32)``) on a measured copy of the
training split (:func:`manifold_defense.ambient.training_data`, one seed for all methods) and measures its samples
with :func:`manifold_defense.metrics.sample_quality` on the zoo classifier against test images, next to the real-data
floor (validation images against the same test images).

Writes into ``--out``: ``results.json`` and ``results.md`` (per point and method: MNIST score, Fréchet distances,
confident fraction, class histogram; the checks of the issue), ``mnist_score_vs_p.png`` (score against p and
sigma), ``samples_<point>.png`` (measured data, restored data and each method's samples side by side), ``generators/<method>-<point>/``
(each generator as a ``mnist-gan`` zoo folder with its record). Resumable: each (method, point) trains in
``checkpoints/<method>-<point>/`` and its figures are kept in ``cache/<method>-<point>.pt``; a rerun reuses them.

``--quick``: 3 points (p 0.5, 0.9, sigma 0.2), 30 steps of batch 32 on 1000 training images, 500 samples, the cheap
normalized-convolution inpainting: a smoke test of the pipeline in about a minute, not the paper's protocol.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import torch

from eval.cli import command_line
from eval.inputs import positive_int_arg
from eval.run_folder import claim_run_folder, run_folder_session, write_record
from eval.train_cli import GAN_DISCRIMINATOR_WIDTH
from manifold_defense import ambient, zoo
from manifold_defense.data import load_mnist
from manifold_defense.devices import resolve_device
from manifold_defense.integrity import atomic_write_text, load_checked, save_checked
from manifold_defense.metrics import sample_quality
from manifold_defense.models import Critic, latent_dim_of
from manifold_defense.training import GANTrainConfig

__all__ = ["AmbientProtocol", "add_parsers", "full_protocol", "main", "quick_protocol", "run_grid"]

log = logging.getLogger(__name__)

#: Shown samples per method in the side-by-side grids.
SHOWN = 16


@dataclass(frozen=True)
class AmbientProtocol:
    """Settings of one ``eval ambient`` run (all but ``methods`` decide its figures).

    Attributes:
        points: ``(measurement name, setting)`` grid points: ``("block-pixels", p)`` or ``("convolve-noise", sigma)``.
        methods: of :data:`manifold_defense.ambient.METHODS`.
        steps, batch_size, objective, bn_batches: the GAN schedule (:class:`GANTrainConfig`, other fields default).
        train_limit: training images used (``None``: the whole 50k split).
        n_samples: generated samples and test images per figure.
        inpaint: the unmeasure baseline's inpainting of dropped pixels.
        seed: training seed (initial weights, batches, latents, fresh measurement draws).
        measure_seed: seed of the measured copy of the training split.
        quick: a reduced smoke-test protocol.
    """

    points: tuple[tuple[str, float], ...] = (
        ("block-pixels", 0.5), ("block-pixels", 0.8), ("block-pixels", 0.9), ("block-pixels", 0.95),
        ("convolve-noise", 0.1), ("convolve-noise", 0.2),
    )  # fmt: skip
    methods: tuple[str, ...] = ambient.METHODS
    steps: int = 30000
    batch_size: int = 64
    objective: str = "ns"
    bn_batches: int = 40
    train_limit: int | None = None
    n_samples: int = 10000
    inpaint: str = "biharmonic"
    seed: int = 0
    measure_seed: int = 0
    quick: bool = False

    def settings(self) -> dict[str, Any]:
        """Every setting as JSON-ready values (``methods`` left out)."""
        out = dataclasses.asdict(self)
        out.pop("methods")
        out["points"] = [list(p) for p in self.points]
        return out

    def item_settings(self) -> dict[str, Any]:
        """What decides each (method, point) item's figures (the run folder's protocol and the cache fingerprint):
        all but ``methods`` and ``points``, which only choose the items; so a run can be grown or cut to other
        points and methods in the same folder, reusing the items it already has."""
        out = self.settings()
        out.pop("points")
        return out

    def config(self) -> GANTrainConfig:
        """The GAN schedule; ``wgan-gp`` takes the AmbientGAN MNIST settings (5 critic steps, Adam 2e-4, betas
        0.5 / 0.9), ``ns`` the DCGAN ones of :class:`GANTrainConfig`."""
        wgan = {"n_critic": 5, "beta2": 0.9} if self.objective == "wgan-gp" else {}
        return GANTrainConfig(
            steps=self.steps, batch_size=self.batch_size, objective=self.objective, bn_batches=self.bn_batches,
            seed=self.seed, checkpoint_every=min(500, self.steps), **wgan,  # type: ignore[arg-type]
        )  # fmt: skip


def full_protocol(**overrides: Any) -> AmbientProtocol:
    """The issue's grid: 6 points x 3 methods, 30k steps (the ``gan`` trainer's default; the paper ran 27k)."""
    return dataclasses.replace(AmbientProtocol(), **overrides)


def quick_protocol(**overrides: Any) -> AmbientProtocol:
    """A smoke test: 3 points, 30 steps, 1000 training images, 500 samples, cheap inpainting."""
    base = AmbientProtocol(
        points=(("block-pixels", 0.5), ("block-pixels", 0.9), ("convolve-noise", 0.2)),
        steps=30, batch_size=32, bn_batches=2, train_limit=1000, n_samples=500, inpaint="normalized-convolution",
        quick=True,
    )  # fmt: skip
    return dataclasses.replace(base, **overrides)


def _measurement(point: tuple[str, float]) -> ambient.RandomMeasurement:
    name, value = point
    key = {"block-pixels": "p", "convolve-noise": "sigma"}.get(name)
    if key is None:
        raise ValueError(f"expected grid points of block-pixels or convolve-noise, got {name!r}")
    return ambient.build_measurement(name, **{key: value})


class _Cache:
    """Per-(method, point) figures in ``folder``, fingerprinted by the protocol's settings and the device type."""

    def __init__(self, folder: Path, protocol: AmbientProtocol, device: torch.device) -> None:
        self.folder = folder
        self.fingerprint = json.dumps({"protocol": protocol.item_settings(), "device": device.type}, sort_keys=True)
        folder.mkdir(parents=True, exist_ok=True)

    def load(self, item: str) -> tuple[dict[str, Any], torch.Tensor] | None:
        path = self.folder / f"{item}.pt"
        if not path.is_file():
            return None
        entry = load_checked(
            path, what="ambient result cache entry", recover="delete it to recompute that item (or use a new --out)"
        )
        if not isinstance(entry, dict) or entry.get("fingerprint") != self.fingerprint:
            raise ValueError(f"{path}: expected a result of this run's protocol, found another run's: use a new --out")
        return json.loads(entry["figures"]), entry["shown"]

    def save(self, item: str, figures: dict[str, Any], shown: torch.Tensor) -> None:
        entry = {"fingerprint": self.fingerprint, "figures": json.dumps(figures), "shown": shown.cpu().clone()}
        save_checked(entry, self.folder / f"{item}.pt")  # SHA-256 header, unique temporary file, atomic rename


@torch.no_grad()
def _samples(generator: torch.nn.Module, n: int, seed: int, device: torch.device) -> torch.Tensor:
    z = torch.randn(n, latent_dim_of(generator), generator=torch.Generator().manual_seed(seed))
    return torch.cat([generator(c.to(device)).cpu() for c in z.split(500)])


def _train_item(
    protocol: AmbientProtocol, point: tuple[str, float], method: str, clean: torch.Tensor, out: Path,
    device: torch.device, progress: bool,
) -> torch.nn.Module:  # fmt: skip
    f = _measurement(point)
    item = f"{method}-{f.tag()}"
    ckpt = out / "checkpoints" / item
    extra = {"inpaint": protocol.inpaint} if method == "unmeasure" and isinstance(f, ambient.BlockPixels) else {}
    data_file = ckpt / "training_data.pt"  # the unmeasure restoration is the slow part: kept until trained
    if data_file.is_file():
        data = load_checked(data_file, what="ambient training data cache", recover="delete it to recompute it")
    else:
        data = ambient.training_data(clean, f, method, protocol.measure_seed, **extra)  # type: ignore[arg-type]
        if method == "unmeasure":
            ckpt.mkdir(parents=True, exist_ok=True)
            save_checked(data, data_file)
    with torch.random.fork_rng():
        torch.manual_seed(protocol.seed)  # the initial weights, as `train --seed`
        gen, disc = zoo.build("mnist-gan"), Critic(width=GAN_DISCRIMINATOR_WIDTH)
    start = time.perf_counter()
    hist = ambient.train_ambient(
        gen, disc, data, f, method, protocol.config(), device=device, checkpoint_dir=ckpt, progress=progress,  # type: ignore[arg-type]
        data_settings={"measure_seed": protocol.measure_seed, **extra},
    )
    data_file.unlink(missing_ok=True)
    zoo.save(gen, "mnist-gan", out / "generators" / item, {"training": {
        "command": "python -m eval ambient (see the run folder's results.json)",
        "ambient": {"method": method, "measurement": f.spec(), "measure_seed": protocol.measure_seed, **extra},
        "config": dataclasses.asdict(protocol.config()), "seconds": round(time.perf_counter() - start, 1),
        "final_metrics": hist[-1] if hist else {}, "device": str(device),
    }})  # fmt: skip
    return gen


@run_folder_session()  # --out stays locked against other writers until the call returns
def run_grid(
    protocol: AmbientProtocol, out: Path, device: str | torch.device = "cpu", *, data_dir: Path | None = None,
    command: str = "", progress: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Train and measure every (method, point) of ``protocol`` (reusing cached ones); write the results into
    ``out`` and return them (the dict of ``results.json``)."""
    dev = resolve_device(device)
    claim_run_folder(out, "ambient", protocol.item_settings())
    cache = _Cache(out / "cache", protocol, dev)
    clf = zoo.load("mnist-classifier", dev)
    reference = load_mnist("test", data_dir, limit=protocol.n_samples).images
    real = sample_quality(clf, load_mnist("val", data_dir, limit=protocol.n_samples).images, reference)
    clean: torch.Tensor | None = None
    methods: dict[str, list[dict[str, Any]]] = {m: [] for m in protocol.methods}
    shown: dict[str, dict[str, torch.Tensor]] = {}
    reused = 0
    for point in protocol.points:
        f = _measurement(point)
        shown[f.tag()] = {}
        for method in protocol.methods:
            item = f"{method}-{f.tag()}"
            cached = cache.load(item)
            if cached is None:
                if clean is None:
                    clean = load_mnist("train", data_dir, limit=protocol.train_limit).images
                start = time.perf_counter()
                gen = _train_item(protocol, point, method, clean, out, dev, progress)
                samples = _samples(gen, protocol.n_samples, protocol.seed + 1, dev)
                figures = {**sample_quality(clf, samples, reference), "seconds": round(time.perf_counter() - start, 1)}
                cache.save(item, figures, samples[:SHOWN])
                cached = (figures, samples[:SHOWN])
                log.info("%s: MNIST score %.3f, Fréchet %.2f", item, figures["mnist_score"], figures["frechet_features"])
            else:
                reused += 1
            methods[method].append({"point": f.tag(), **cached[0]})
            shown[f.tag()][method] = cached[1]
    results = {
        "command": command,
        "paper": "AmbientGAN (Bora, Price, Dimakis, ICLR 2018)",
        "protocol": {**protocol.settings(), "methods": list(protocol.methods)},
        "points": [{"tag": _measurement(p).tag(), "measurement": _measurement(p).spec()} for p in protocol.points],
        "real": {**real, "what": "validation images against the same test images (the floor at this sample count)"},
        "methods": methods,
        "checks": figure_checks(protocol, methods),
        "reused_from_cache": reused,
    }
    write_record(out / "results.json", results)
    _write_markdown(results, out / "results.md")
    _plot_scores(results, out / "mnist_score_vs_p.png")
    _sample_grids(protocol, shown, data_dir, out)
    return results


def figure_checks(protocol: AmbientProtocol, methods: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The issue's figures: at every block-pixels point AmbientGAN beats both baselines on the MNIST score and the
    feature Fréchet distance; at p 0.9 its score is >= 2x the better baseline's. ``None`` without all methods."""
    if set(methods) != set(ambient.METHODS):
        return {"ambient_beats_baselines": None, "score_ratio_at_p0.9": None}
    beats = {}
    ratio = None
    for i, (name, value) in enumerate(protocol.points):
        amb, ign, unm = (methods[m][i] for m in ("ambient", "ignore", "unmeasure"))
        tag = methods["ambient"][i]["point"]
        beats[tag] = bool(
            amb["mnist_score"] > max(ign["mnist_score"], unm["mnist_score"])
            and amb["frechet_features"] < min(ign["frechet_features"], unm["frechet_features"])
        )
        if name == "block-pixels" and math.isclose(value, 0.9):
            ratio = round(amb["mnist_score"] / max(ign["mnist_score"], unm["mnist_score"]), 3)
    bp = [t for t, (n, _) in zip(beats, protocol.points, strict=True) if n == "block-pixels"]
    return {
        "ambient_beats_baselines": beats,
        "ambient_beats_baselines_block_pixels_all": all(beats[t] for t in bp) if bp else None,
        "score_ratio_at_p0.9": ratio,
        "score_ratio_at_p0.9_ge_2": None if ratio is None else ratio >= 2.0,
    }


def _write_markdown(results: dict[str, Any], path: Path) -> None:
    real = results["real"]
    lines = [
        "# AmbientGAN on MNIST (Bora, Price, Dimakis, ICLR 2018)",
        "",
        ("**QUICK protocol: a smoke test, not the paper's protocol.**\n" if results["protocol"]["quick"] else "")
        + f"Command: `{results['command']}`. Samples: {real['n']}; classifier: zoo mnist-classifier.",
        "",
        f"Real data (validation vs test): MNIST score {real['mnist_score']}, Fréchet (features) "
        f"{real['frechet_features']}, Fréchet (logits) {real['frechet_logits']}, histogram {real['class_histogram']}.",
        "",
        "| point | method | MNIST score | Fréchet (features) | Fréchet (logits) | confident | hist min/max | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, p in enumerate(results["points"]):
        for method, rows in results["methods"].items():
            r = rows[i]
            lines.append(
                f"| {p['tag']} | {method} | {r['mnist_score']} | {r['frechet_features']} | {r['frechet_logits']} | "
                f"{r['confident_fraction']} | {r['histogram_min_max']} | {r['seconds']} |"
            )
    lines += ["", "Class histograms:", ""]
    for i, p in enumerate(results["points"]):
        for method, rows in results["methods"].items():
            lines.append(f"- {p['tag']} {method}: {rows[i]['class_histogram']}")
    lines += ["", f"Checks: `{json.dumps(results['checks'])}`", ""]
    atomic_write_text(path, "\n".join(lines))


def _plot_scores(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (name, key, label) in zip(
        axes, (("block-pixels", "p", "drop probability p"), ("convolve-noise", "sigma", "noise sigma")), strict=True
    ):
        idx = [i for i, p in enumerate(results["points"]) if p["measurement"]["name"] == name]
        xs = [results["points"][i]["measurement"][key] for i in idx]
        for method, rows in results["methods"].items():
            if idx:
                ax.plot(xs, [rows[i]["mnist_score"] for i in idx], marker="o", label=method)
        ax.axhline(results["real"]["mnist_score"], color="gray", linestyle="--", label="real data")
        ax.set_xticks(xs)
        ax.set(xlabel=label, ylabel="MNIST score", title=name, ylim=(0, 10.5))
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _sample_grids(
    protocol: AmbientProtocol, shown: dict[str, dict[str, torch.Tensor]], data_dir: Path | None, out: Path
) -> None:
    """``samples_<point>.png``: measured training images (as images, clipped), their restorations (what the
    unmeasure baseline trains on) and each method's samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    clean = load_mnist("train", data_dir, limit=SHOWN).images
    for point in protocol.points:
        f = _measurement(point)
        extra = {"inpaint": protocol.inpaint} if isinstance(f, ambient.BlockPixels) else {}
        rows = {"measured data": ambient.training_data(clean, f, "ignore", protocol.measure_seed),
                "restored data (unmeasure)": ambient.training_data(clean, f, "unmeasure", protocol.measure_seed,
                                                                   **extra),  # type: ignore[arg-type]
                **shown[f.tag()]}  # fmt: skip
        fig, axes = plt.subplots(1, len(rows), figsize=(3 * len(rows), 3.4))
        for ax, (title, images) in zip(axes, rows.items(), strict=True):
            grid = make_grid(images[:SHOWN], nrow=4, padding=1, pad_value=1.0)
            ax.imshow(grid[0].numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_title(title)
            ax.axis("off")
        fig.suptitle(f.tag())
        fig.tight_layout()
        fig.savefig(out / f"samples_{f.tag()}.png", dpi=100)
        plt.close(fig)


def _point_arg(text: str) -> tuple[str, float]:
    """``NAME:VALUE`` of ``--points``: block-pixels:P or convolve-noise:SIGMA."""
    name, sep, value = text.partition(":")
    if not sep or name not in ("block-pixels", "convolve-noise"):
        raise argparse.ArgumentTypeError(f"expected block-pixels:P or convolve-noise:SIGMA, got {text!r}")
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number after {name}:, got {value!r}") from None
    if not math.isfinite(number) or not 0.0 <= number < 1.0:
        raise argparse.ArgumentTypeError(f"expected a value in [0, 1) after {name}:, got {value!r}")
    return name, number


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "ambient",
        help="AmbientGAN against its baselines over a grid of measurements",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, type=Path, help="output folder (results, figures, checkpoints, cache)")
    p.add_argument("--quick", action="store_true", help="reduced smoke-test protocol (about a minute on a CPU)")
    p.add_argument("--steps", type=positive_int_arg, default=None, help="GAN steps per (method, point)")
    p.add_argument("--methods", nargs="+", choices=ambient.METHODS, default=None,
                   help="train only these (split a run over processes; a final run with all merges the cache)")  # fmt: skip
    p.add_argument("--points", nargs="+", type=_point_arg, default=None, metavar="NAME:VALUE",
                   help="grid points instead of the issue's six, e.g. block-pixels:0.9 convolve-noise:0.2 "
                   "(a reduced grid for a CPU budget)")  # fmt: skip
    p.add_argument("--train-limit", type=positive_int_arg, default=None,
                   help="training images used by every method (default: the whole 50k split)")
    p.add_argument("--inpaint", choices=get_args(ambient.InpaintMethod), default=None,
                   help="the unmeasure baseline's inpainting of dropped pixels: biharmonic (scikit-image; the "
                   "default) or normalized-convolution (a Gaussian blur of the kept pixels over a blur of the mask, "
                   "close to the blur restoration of the paper's code; the --quick default)")  # fmt: skip
    p.add_argument("--objective", choices=("ns", "wgan-gp"), default="ns",
                   help="GAN loss: ns (DCGAN, the zoo trainer's default) or wgan-gp (AmbientGAN's MNIST setting: "
                   "5 critic steps, Adam 2e-4, betas 0.5/0.9)")  # fmt: skip
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--threads", type=positive_int_arg, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", type=Path, default=None, help="torchvision MNIST folder (default: offline bundle)")
    p.add_argument("--progress", action="store_true", help="show training progress bars")
    p.set_defaults(func=main)


def protocol_from_args(args: argparse.Namespace) -> AmbientProtocol:
    """The protocol ``python -m eval ambient`` runs for parsed ``args`` (the full or ``--quick`` one, overridden)."""
    overrides: dict[str, Any] = {"seed": args.seed, "objective": args.objective}
    if args.steps is not None:
        overrides["steps"] = args.steps
    if args.points is not None:
        overrides["points"] = tuple(dict.fromkeys(args.points))
    if args.train_limit is not None:
        overrides["train_limit"] = args.train_limit
    if args.methods is not None:
        overrides["methods"] = tuple(m for m in ambient.METHODS if m in args.methods)
    if args.inpaint is not None:
        overrides["inpaint"] = args.inpaint
    return quick_protocol(**overrides) if args.quick else full_protocol(**overrides)


def main(args: argparse.Namespace) -> int:
    """Handler of ``python -m eval ambient``."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    protocol = protocol_from_args(args)
    if protocol.quick:
        print("QUICK protocol (a smoke test, not the paper's): 3 points, "
              f"{protocol.steps} steps, {protocol.train_limit} training images, {protocol.n_samples} samples", flush=True)  # fmt: skip
    start = time.perf_counter()
    results = run_grid(protocol, args.out, args.device, data_dir=args.data_dir, command=command_line(args),
                       progress=args.progress)  # fmt: skip
    print(f"{'point':<26} " + " ".join(f"{m:>10}" for m in results["methods"]) + "   (MNIST score)")
    for i, p in enumerate(results["points"]):
        print(f"{p['tag']:<26} " + " ".join(f"{rows[i]['mnist_score']:>10.3f}" for rows in results["methods"].values()))
    print(f"real data: {results['real']['mnist_score']:.3f}; checks: {json.dumps(results['checks'])}")
    print(f"wrote {args.out}/results.json, results.md, mnist_score_vs_p.png, samples_*.png "
          f"in {time.perf_counter() - start:.1f} s")  # fmt: skip
    return 0
