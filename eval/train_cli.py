"""``python -m eval train <model> --out DIR``: train a zoo model and write its safetensors + JSON record into DIR.

Models: ``classifier``, ``gan`` (generator trained against a discriminator, weights averaged), ``encoder`` (a new
encoder for the generator found in DIR, trained on real images and on the generator's samples), ``vae``, ``zoo`` (those four in that order), ``pgd-at`` (Madry PGD adversarial
training of a new classifier, Linf 0.3), ``l2-at`` (l2 PGD adversarial training at eps 1.5, the baseline of Jalal et al.'s
Robust Manifold Defense), ``rmd`` (robust manifold training with the zoo's GAN and encoder) or ``ddpm`` (the
diffusion prior ``mnist-ddpm``: noise prediction, EMA weights; its step target may grow on resume). Checkpoints go to
``DIR/checkpoints/<model>/``; running the same command again after an interruption resumes from there. Each
checkpoint records its trainer and the settings that define its run (config fields, the attack, the measurement and
measured data of ``ambient``): a resume with other ones is refused, naming them (``docs/refusals.md``); only
``--steps`` of the GAN trainers (and ``ddpm``) and the checkpoint/logging intervals may change. A checkpoint of the
older format converts with ``scripts/upgrade_checkpoint.py``.

``--init MODEL [--init-dir DIR]`` (pgd-at, l2-at, rmd): start from a zoo classifier's weights instead of a random
initialization, e.g. robust manifold fine-tuning of ``mnist-l2-at``; the record names the starting weights by SHA-256.
``--set FIELD=VALUE`` overrides a scalar field of the training config (bools as true/false, optional fields as none).
"""

from __future__ import annotations

import argparse
import logging
import platform
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attacks import PGD, Norm, PGDConfig, ThreatModel
from eval.cli import command_line
from eval.run_folder import claim_run_folder
from manifold_defense import ambient, zoo
from manifold_defense.data import load_mnist
from manifold_defense.devices import resolve_device
from manifold_defense.metrics import features, frechet_distance, predict
from manifold_defense.models import Critic, latent_dim_of
from manifold_defense.training import (
    AdversarialTrainConfig,
    ClassifierTrainConfig,
    EncoderTrainConfig,
    GANTrainConfig,
    RobustManifoldConfig,
    VAETrainConfig,
    adversarial_train,
    robust_manifold_train,
    train_classifier,
    train_encoder,
    train_gan,
    train_vae,
)
from manifold_defense.training.diffusion import DDPMTrainConfig, train_ddpm
from manifold_defense.training.loop import training_time

log = logging.getLogger(__name__)
MODELS = ("classifier", "gan", "encoder", "vae", "zoo", "pgd-at", "l2-at", "rmd", "ambient", "ddpm")
#: The robustly trained classifiers (``mnist-<name>`` in the zoo).
ROBUST_MODELS = ("pgd-at", "l2-at", "rmd")
#: Jalal et al.'s l2 training budget on MNIST (the ``l2-at`` baseline and ``rmd``'s pixel term).
L2_AT_EPS = 1.5
#: Zoo classifiers a robust training run may start from (``--init``).
INIT_MODELS = zoo.CLASSIFIERS
#: The GAN's discriminator: three strided convolutions of 32-64-128 channels and a linear logit.
GAN_DISCRIMINATOR_WIDTH = 32


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train a zoo model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", choices=MODELS)
    p.add_argument("--out", required=True, type=Path, help="output directory (weights, records, checkpoints)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="override the number of training steps")
    p.add_argument(
        "--data-dir", type=Path, default=None, help="torchvision MNIST folder (default: offline bundle)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a field of the model's training config, e.g. --set adv_weight=5 (repeatable)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--val-every",
        type=int,
        default=1000,
        help="gan: steps between sample-quality checks (Fréchet distance of 2000 samples; 0 disables)",
    )
    p.add_argument(
        "--limit", type=int, default=None, help="use only the first N training images (pgd-at, l2-at, rmd)"
    )
    p.add_argument(
        "--val-n", type=int, default=1000, help="validation images checked each epoch (pgd-at, l2-at, rmd)"
    )
    p.add_argument(
        "--attack-steps",
        type=int,
        default=None,
        help="pgd-at, l2-at: PGD steps of the training attack (default 40, Madry's and Jalal et al.'s; fewer fit a "
        "CPU budget)",
    )
    p.add_argument(
        "--attack-step-size",
        type=float,
        default=None,
        help="pgd-at, l2-at: step of the training attack (pgd-at default 0.01, use about 2.5 * 0.3 / steps with "
        "fewer steps; l2-at default 2 * 1.5 / steps, Jalal et al.'s)",
    )
    p.add_argument(
        "--init",
        default=None,
        choices=INIT_MODELS,
        help="pgd-at, l2-at, rmd: start from this zoo classifier's weights instead of a random initialization "
        "(fine-tuning; e.g. rmd from mnist-l2-at)",
    )
    p.add_argument(
        "--init-dir",
        type=Path,
        default=None,
        help="folder holding the --init weights and record (default: the package's zoo)",
    )
    add_measurement_arguments(p, "ambient: ")
    p.add_argument(
        "--baseline",
        default=None,
        choices=("ignore", "unmeasure"),
        help="ambient: train the paper's baseline instead of AmbientGAN (ignore: the measurements read as images; "
        "unmeasure: restored measurements)",
    )
    p.set_defaults(func=run)


def add_measurement_arguments(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """``--measurement`` and its settings (shared by ``train ambient`` and ``python -m eval ambient``)."""
    p.add_argument("--measurement", default=None, choices=sorted(ambient.MEASUREMENTS),
                   help=f"{prefix}the random measurement model (AmbientGAN's)")  # fmt: skip
    p.add_argument(
        "--p", type=float, default=None, help=f"{prefix}block-pixels drop probability (default 0.9)"
    )
    p.add_argument(
        "--sigma", type=float, default=None, help=f"{prefix}convolve-noise noise std (default 0.1)"
    )
    p.add_argument(
        "--patch-size", type=int, default=None, help=f"{prefix}block-/keep-patch size (default 14)"
    )
    p.add_argument("--projections", type=int, default=None,
                   help=f"{prefix}gaussian-projection: projections per image (default 1, the paper's)")  # fmt: skip
    p.add_argument(
        "--measure-seed", type=int, default=None, help=f"{prefix}seed of the measured copy (default 0)"
    )
    p.add_argument("--inpaint", default=None, choices=("biharmonic", "normalized-convolution"),
                   help=f"{prefix}unmeasure baseline's inpainting of masks (default biharmonic)")  # fmt: skip


_SETTINGS = {"p": ("block-pixels", 0.9), "sigma": ("convolve-noise", 0.1), "patch_size": (None, 14),
             "projections": ("gaussian-projection", 1)}  # fmt: skip


def measurement_from_args(args: argparse.Namespace) -> ambient.RandomMeasurement:
    """The ``--measurement`` model with its settings; a setting of another model is refused."""
    name = args.measurement
    if name is None:
        raise ValueError(
            f"--measurement is required for ambient training: expected one of {sorted(ambient.MEASUREMENTS)}"
        )
    for key, (owner, _) in _SETTINGS.items():
        fits = name in ("block-patch", "keep-patch") if owner is None else name == owner
        if getattr(args, key) is not None and not fits:
            raise ValueError(f"--{key.replace('_', '-')} does not apply to --measurement {name}")
    if args.inpaint is not None and name not in ("block-pixels", "block-patch", "keep-patch"):
        raise ValueError(f"--inpaint applies to the masking measurements, got --measurement {name}")

    def value(key: str) -> Any:
        got = getattr(args, key)
        return _SETTINGS[key][1] if got is None else got

    if name == "block-pixels":
        return ambient.BlockPixels(value("p"))
    if name == "convolve-noise":
        return ambient.ConvolveNoise(value("sigma"))
    if name == "gaussian-projection":
        return ambient.GaussianProjection(value("projections"))
    return ambient.build_measurement(name, size=value("patch_size"))


def ambient_discriminator(
    measurement: ambient.RandomMeasurement, method: str, image_shape: tuple[int, ...]
) -> nn.Module:
    """The discriminator of ``train ambient``: the ``gan`` branch's ``Critic(width=GAN_DISCRIMINATOR_WIDTH)`` on
    images (baselines, image measurements), a :class:`~manifold_defense.ambient.MeasurementDiscriminator` on
    vector measurements."""
    if method != "ambient" or measurement.image_like:
        return Critic(width=GAN_DISCRIMINATOR_WIDTH)
    with torch.no_grad():
        shape = measurement(torch.zeros(1, *image_shape), torch.Generator().manual_seed(0)).shape
    return ambient.MeasurementDiscriminator(int(torch.Size(shape[1:]).numel()))


def _check_ambient_flags(args: argparse.Namespace) -> None:
    used = [f for f in ("measurement", "p", "sigma", "patch_size", "projections", "measure_seed", "inpaint", "baseline")
            if getattr(args, f, None) is not None]  # fmt: skip
    if args.model != "ambient" and used:
        flags = ", ".join("--" + f.replace("_", "-") for f in used)
        raise ValueError(f"{flags} apply to model ambient only, got model {args.model!r}")
    if args.model == "ambient" and args.inpaint is not None and args.baseline != "unmeasure":
        raise ValueError(
            "--inpaint sets the unmeasure baseline's restoration: pass --baseline unmeasure with it"
        )
    if args.model == "ambient":
        measurement_from_args(args)  # its settings are checked before any folder or data is touched
        _check_ambient_folder(args)


def _check_ambient_folder(args: argparse.Namespace) -> None:
    """Refuse an ``--out`` whose ``mnist-gan`` is another model's (a clean GAN, or another measurement, method or
    measurement seed): ``train ambient`` would replace it. The same settings (a resume, a rerun) are accepted."""
    path = args.out / "mnist-gan.json"
    if not path.is_file():
        return
    previous = zoo.record("mnist-gan", args.out).get("training", {}).get("ambient")
    wanted = {"method": args.baseline or "ambient", "measurement": measurement_from_args(args).spec(),
              "measure_seed": 0 if args.measure_seed is None else args.measure_seed}  # fmt: skip
    got = None if not isinstance(previous, dict) else {k: previous.get(k) for k in wanted}
    if got != wanted:
        raise ValueError(
            f"{args.out} holds a mnist-gan of another run ({'not ambient' if got is None else got}), expected "
            f"{wanted} or none: choose another --out for each ambient model"
        )


def _train_ambient(
    args: argparse.Namespace, sets: dict[str, str], device: torch.device, ckpt: Path, progress: bool
) -> tuple[nn.Module, Any, list[dict[str, float]], dict[str, Any]]:
    """AmbientGAN or a baseline on a measured copy of the training split (the clean images only make it)."""
    measurement = measurement_from_args(args)
    method = args.baseline or "ambient"
    seed = 0 if args.measure_seed is None else args.measure_seed
    clean = load_mnist("train", args.data_dir).images
    extra = {"inpaint": args.inpaint} if args.inpaint is not None else {}
    data = ambient.training_data(clean, measurement, method, seed, **extra)  # type: ignore[arg-type]
    del clean
    config = _override(GANTrainConfig(seed=args.seed), args.steps, sets)
    gen = zoo.build("mnist-gan")
    disc = ambient_discriminator(measurement, method, (1, 28, 28))
    masks = ("block-pixels", "block-patch", "keep-patch")  # restored by inpainting (the --inpaint setting)
    restoration = {"inpaint": args.inpaint or "biharmonic"} if method == "unmeasure" and measurement.name in masks else {}
    hist = ambient.train_ambient(
        gen, disc, data, measurement, method, config, device=device, checkpoint_dir=ckpt, progress=progress,  # type: ignore[arg-type]
        validate=_sample_quality_monitor(args.data_dir, device) if args.val_every else None,
        validate_every=args.val_every or None, data_settings={"measure_seed": seed, **restoration},
    )  # fmt: skip
    record = {
        "paper": "AmbientGAN (Bora, Price, Dimakis, ICLR 2018)",
        "method": method,
        "measurement": measurement.spec(),
        "measure_seed": seed,
        "unmeasure": ({"inpaint": args.inpaint or "biharmonic"} if method == "unmeasure" and measurement.name != "convolve-noise"
                      else {"wiener_balance": "max(2.5 sigma^2, 1e-3)"} if method == "unmeasure" else None),
        "discriminator": f"{type(disc).__name__}",
        "data": "measured copy of the MNIST train split (first 50k), made once; clean images unused after measuring"
        + ("" if method == "ambient" else f"; then {method} (baseline)"),
    }  # fmt: skip
    return gen, config, hist, record


def _info(
    command: str, config: Any, seconds: float, device: torch.device, history: list[dict[str, float]],
    checkpoint_dir: Path | None = None,
) -> dict[str, Any]:
    """The zoo record's ``training`` entry. With the run's ``checkpoint_dir``, ``seconds`` is the run's wall time
    over every process that trained it (``None`` when an older checkpoint did not record a segment's time) and
    ``segments`` lists those processes; without it, this process's ``seconds``."""
    timing = training_time(checkpoint_dir) if checkpoint_dir is not None else None
    info: dict[str, Any] = {
        "training": {
            "command": command,
            "config": asdict(config),
            "seed": config.seed,
            "data": "MNIST train split (first 50k of the 60k training images), images in [0, 1]",
            "device": str(device)
            if device.type == "cpu"
            else f"{device} ({torch.cuda.get_device_name(device)})",
            "seconds": round(seconds, 1) if timing is None else timing["seconds"],
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "final_metrics": history[-1] if history else {},
        }
    }
    if timing is not None:
        info["training"]["segments"] = timing["segments"]
    return info


def run(args: argparse.Namespace) -> int:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.model not in ("pgd-at", "l2-at") and (
        args.attack_steps is not None or args.attack_step_size is not None
    ):
        raise ValueError(
            f"--attack-steps/--attack-step-size apply to pgd-at and l2-at only, got model {args.model!r}"
        )
    if args.model not in ROBUST_MODELS and (args.init is not None or args.init_dir is not None):
        raise ValueError(f"--init/--init-dir apply to pgd-at, l2-at and rmd only, got model {args.model!r}")
    _check_ambient_flags(args)
    if args.init_dir is not None and args.init is None:
        raise ValueError("--init-dir names where the --init weights live: pass --init MODEL with it")
    if args.init is not None and args.model in ROBUST_MODELS:
        _check_init_architecture(f"mnist-{args.model}", args.init)
    device = resolve_device(args.device)
    # --seed also fixes the initial weights (the training loop seeds its own RNG only after they exist)
    torch.manual_seed(args.seed)
    out: Path = args.out
    claim_run_folder(
        out, "train"
    )  # one folder may hold several models; each checkpoint checks its own config
    command = command_line(args)
    train = load_mnist("train", args.data_dir).dataset()
    progress = not args.no_progress
    models = ("classifier", "gan", "encoder", "vae") if args.model == "zoo" else (args.model,)
    sets = _parse_sets(args.set)
    if sets and len(models) > 1:
        raise ValueError("--set applies to one model's config: train the models one at a time to use it")
    for name in models:
        ckpt = out / "checkpoints" / name
        start = time.perf_counter()
        config: Any
        if name == "classifier":
            config = _override(ClassifierTrainConfig(seed=args.seed), args.steps, sets)
            model = zoo.build("mnist-classifier")
            hist = train_classifier(
                model, train, config, device=device, checkpoint_dir=ckpt, progress=progress
            )
            zoo.save(
                model,
                "mnist-classifier",
                out,
                _info(command, config, time.perf_counter() - start, device, hist, ckpt),
            )
        elif name == "gan":
            config = _override(GANTrainConfig(seed=args.seed), args.steps, sets)
            gen = zoo.build("mnist-gan")
            hist = train_gan(
                gen,
                Critic(width=GAN_DISCRIMINATOR_WIDTH, in_channels=config.pack),
                train,
                config,
                device=device,
                checkpoint_dir=ckpt,
                progress=progress,
                validate=_sample_quality_monitor(args.data_dir, device) if args.val_every else None,
                validate_every=args.val_every or None,
                encoder=zoo.build("mnist-encoder") if config.rec_weight > 0 else None,
            )
            info = _info(command, config, time.perf_counter() - start, device, hist, ckpt)
            info["training"]["discriminator"] = (
                f"Critic(width={GAN_DISCRIMINATOR_WIDTH}"
                + (f", in_channels={config.pack}: PacGAN{config.pack})" if config.pack > 1 else ")")
            )
            zoo.save(gen, "mnist-gan", out, info)
        elif name == "encoder":
            config = _override(EncoderTrainConfig(seed=args.seed), args.steps, sets)
            gen = zoo.load("mnist-gan", device, weights_dir=out)
            enc = zoo.build("mnist-encoder").to(device)
            hist = train_encoder(
                enc, gen, train, config, device=device, checkpoint_dir=ckpt, progress=progress
            )
            zoo.save(
                enc, "mnist-encoder", out, _info(command, config, time.perf_counter() - start, device, hist, ckpt)
            )
        elif name == "ambient":
            tag = f"ambient-{args.baseline or 'ambient'}-{measurement_from_args(args).tag()}"
            gen, config, hist, record = _train_ambient(args, sets, device, ckpt.with_name(tag), progress)
            info = _info(command, config, time.perf_counter() - start, device, hist, ckpt.with_name(tag))
            info["training"]["ambient"] = record
            info["training"]["data"] = record["data"]
            info["training"]["discriminator"] = record["discriminator"]
            zoo.save(gen, "mnist-gan", out, info)
        elif name == "ddpm":
            config = _override(DDPMTrainConfig(seed=args.seed), args.steps, sets)
            ema, hist = train_ddpm(
                zoo.build("mnist-ddpm"), train, config, device=device, checkpoint_dir=ckpt, progress=progress  # type: ignore[arg-type]
            )
            zoo.save(ema.module, "mnist-ddpm", out, _info(command, config, time.perf_counter() - start, device, hist, ckpt))
        elif name in ROBUST_MODELS:
            trained, hist = _train_robust(name, args, sets, device, ckpt, progress)
            config = trained.config
            info = _info(command, config, time.perf_counter() - start, device, hist, ckpt)
            if trained.init is not None:
                info["training"]["init"] = trained.init
            zoo.save(trained.model, f"mnist-{name}", out, info)
        else:
            config = _override(VAETrainConfig(seed=args.seed), args.steps, sets)
            vae = zoo.build("mnist-vae")
            hist = train_vae(vae, train, config, device=device, checkpoint_dir=ckpt, progress=progress)  # type: ignore[arg-type]
            zoo.save(vae, "mnist-vae", out, _info(command, config, time.perf_counter() - start, device, hist, ckpt))
        log.info("%s: trained in %.1f s on %s; written to %s", name, time.perf_counter() - start, device, out)
    return 0


def _sample_quality_monitor(data_dir: Path | None, device: torch.device) -> Any:
    """A GAN validation hook: the Fréchet feature distance of 2000 samples to 2000 validation images, and the
    histogram's min/max ratio, both on the zoo classifier (a progress curve in the history, not a reported figure)."""
    clf = zoo.load("mnist-classifier", device)
    real = features(clf, load_mnist("val", data_dir, limit=2000).images)

    def monitor(generator: nn.Module, step: int) -> dict[str, float]:
        z = torch.randn(2000, latent_dim_of(generator), generator=torch.Generator().manual_seed(step))
        with torch.no_grad():
            samples = torch.cat([generator(c.to(device)).cpu() for c in z.split(500)])
        counts = torch.bincount(predict(clf, samples), minlength=10).float()
        return {
            "val_frechet": frechet_distance(features(clf, samples), real),
            "val_hist_ratio": float(counts.min() / counts.max()),
        }

    return monitor


@dataclass(frozen=True)
class _Trained:
    model: nn.Module
    config: Any
    init: dict[str, Any] | None = None


def _check_init_architecture(name: str, init: str) -> None:
    """Refuse an ``--init`` whose architecture is not zoo entry ``name``'s (its weights could not be saved as it)."""
    target, source = zoo.REGISTRY[name], zoo.REGISTRY[init]
    if source.build is not target.build or source.kwargs != target.kwargs:
        raise ValueError(
            f"--init {init} is a {getattr(source.build, '__name__', source.build)}{source.kwargs or ''}, but {name} "
            f"is a {getattr(target.build, '__name__', target.build)}{target.kwargs or ''}: pick an --init of the "
            "same architecture"
        )


def _initial_classifier(name: str, args: argparse.Namespace) -> tuple[nn.Module, dict[str, Any] | None]:
    """A fresh network of zoo entry ``name``'s architecture, or the zoo classifier ``--init`` (checked against its
    record; :func:`run` has already refused an ``--init`` of another architecture)."""
    if args.init is None:
        return zoo.build(name), None
    model = zoo.load(args.init, "cpu", weights_dir=args.init_dir)
    rec = zoo.record(args.init, args.init_dir)
    return model, {
        "model": args.init,
        "weights_dir": str(args.init_dir) if args.init_dir is not None else "package zoo",
        "sha256": rec.get("sha256"),
    }


def _train_robust(
    name: str,
    args: argparse.Namespace,
    sets: dict[str, str],
    device: torch.device,
    ckpt: Path,
    progress: bool,
) -> tuple[_Trained, list[dict[str, float]]]:
    """PGD adversarial training (Madry's Linf 0.3, 40 x 0.01 attack; or l2 1.5, 40 x 2 eps / 40, Jalal et al.'s
    baseline) or robust manifold training of a new classifier.

    Validation each epoch: the first ``--val-n`` validation images, clean and under a 10-step version of the attack.
    """
    train = load_mnist("train", args.data_dir, limit=args.limit).dataset()
    val = load_mnist("val", args.data_dir, limit=args.val_n).dataset()
    model, init = _initial_classifier(f"mnist-{name}", args)
    config: Any
    if name in ("pgd-at", "l2-at"):
        config = _override(AdversarialTrainConfig(seed=args.seed), args.steps, sets)
        overrides: dict[str, Any] = {}
        if args.attack_steps is not None:
            overrides["steps"] = args.attack_steps
        if args.attack_step_size is not None:
            overrides["step_size"] = args.attack_step_size
        if name == "pgd-at":
            val_attack = PGD.madry_mnist(seed=args.seed, steps=10, step_size=0.05)
            attack = PGD.madry_mnist(seed=args.seed, **overrides)
        else:
            val_attack = l2_pgd(L2_AT_EPS, 10, seed=args.seed)
            steps = overrides.get("steps", 40)
            attack = l2_pgd(L2_AT_EPS, steps, overrides.get("step_size"), seed=args.seed)
        hist = adversarial_train(
            model,
            train,
            attack,
            config,
            val_data=val,
            val_attack=val_attack,
            device=device,
            checkpoint_dir=ckpt,
            progress=progress,
        )
    else:
        config = _override(RobustManifoldConfig(seed=args.seed), args.steps, sets)
        gen, enc = zoo.load("mnist-gan", device), zoo.load("mnist-encoder", device)
        hist = robust_manifold_train(
            model,
            gen,
            train,
            config,
            encoder=enc,
            val_data=val,
            val_attack=config.pixel_attack(),
            device=device,
            checkpoint_dir=ckpt,
            progress=progress,
        )
    return _Trained(model, config, init), hist


def l2_pgd(eps: float, steps: int, step_size: float | None = None, seed: int = 0) -> PGD:
    """l2 PGD with random start at total-norm budget ``eps``; ``step_size`` defaults to ``2 * eps / steps``, the step
    of Jalal et al.'s training attack (ajiljalal/manifold-defense)."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"l2 PGD steps: expected an int >= 1, got {steps!r}")
    size = 2 * eps / steps if step_size is None else step_size
    return PGD(
        ThreatModel(Norm.L2, eps), PGDConfig(steps=steps, step_size=size, random_start=True, seed=seed)
    )


def _parse_sets(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects FIELD=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def _override(config: Any, steps: int | None, sets: dict[str, str] | None = None) -> Any:
    """``config`` with ``steps`` and the ``--set`` fields replaced (values parsed with the field's current type)."""
    changes: dict[str, Any] = {} if steps is None else {"steps": steps}
    valid = {f.name: f for f in fields(config)}
    for key, value in (sets or {}).items():
        if key not in valid:
            raise ValueError(
                f"unknown field {key!r} of {type(config).__name__}: expected one of {sorted(valid)}"
            )
        optional = "None" in str(valid[key].type)
        changes[key] = _parse_value(key, value, getattr(config, key), optional)
    return replace(config, **changes)


def _parse_value(key: str, value: str, current: Any, optional: bool) -> Any:
    """``value`` parsed as the type of the field's current value; ``none`` for an optional field (``optional``),
    an int or a float for a field that is ``None`` now."""
    if optional and value.lower() == "none":
        return None
    if isinstance(current, bool):
        if value.lower() in ("true", "1", "yes"):
            return True
        if value.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"--set {key}={value!r}: expected true or false")
    if current is None:
        for parse in (int, float):
            try:
                return parse(value)
            except ValueError:
                pass
        raise ValueError(f"--set {key}={value!r}: expected none or a number")
    if not isinstance(current, (int, float, str)):
        raise ValueError(
            f"--set {key}: the field holds a {type(current).__name__}, which --set cannot parse; "
            "use the Python API to change it"
        )
    try:
        return type(current)(value)
    except ValueError as err:
        raise ValueError(f"--set {key}={value!r}: expected a {type(current).__name__}") from err
