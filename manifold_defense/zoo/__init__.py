"""The model zoo: small MNIST models shipped with the package as safetensors, each with a JSON record.

A record (``weights/<name>.json``) says how the weights were made and what they measure: the exact training
command, seed, data split, device and time, the SHA-256 of the ``.safetensors`` file (checked on every load: a
mismatch is an error) and the figures measured by a named command. Loading executes no code.

Example:
    >>> from manifold_defense import zoo
    >>> G = zoo.load("mnist-gan", device="cpu")  # doctest: +SKIP
    >>> G(torch.randn(4, G.latent_dim)).shape     # doctest: +SKIP
    torch.Size([4, 1, 28, 28])
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from manifold_defense.causal import CausalController, ConditionalGenerator, DigitWorld
from manifold_defense.devices import resolve_device
from manifold_defense.diffusion import DiffusionModel
from manifold_defense.integrity import atomic_write_bytes, atomic_write_text
from manifold_defense.models import VAE, CompactMNISTClassifier, Encoder, Generator, MNISTClassifier

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
"""The folder of the shipped weights and their JSON records (``<name>.safetensors``, ``<name>.json``)."""


@dataclass(frozen=True)
class ZooEntry:
    """How to build one zoo model before its weights are loaded."""

    name: str
    build: Callable[..., nn.Module]
    kwargs: dict[str, Any] = field(default_factory=dict)
    description: str = ""


REGISTRY: dict[str, ZooEntry] = {
    entry.name: entry
    for entry in (
        ZooEntry("mnist-classifier", MNISTClassifier, {}, "CNN in the style of Defense-GAN's model A"),
        ZooEntry(
            "mnist-gan",
            Generator,
            {"latent_dim": 64, "width": 32},
            "DCGAN generator, non-saturating loss, weights averaged (EMA)",
        ),
        ZooEntry(
            "mnist-vae", VAE, {"latent_dim": 20, "hidden": 500}, "CSGM's 784-500-500-20 VAE (forward decodes)"
        ),
        ZooEntry(
            "mnist-encoder", Encoder, {"latent_dim": 64, "width": 32}, "encoder of mnist-gan (warm starts), trained after it"
        ),
        ZooEntry(
            "mnist-pgd-at",
            CompactMNISTClassifier,
            {"channels": (32, 64), "hidden": 512},
            "compact classifier, Madry PGD adversarial training (Linf 0.3)",
        ),
        ZooEntry(
            "mnist-l2-at",
            CompactMNISTClassifier,
            {"channels": (32, 64), "hidden": 512},
            "compact classifier, l2 PGD adversarial training (eps 1.5; Jalal et al.'s baseline)",
        ),
        ZooEntry(
            "mnist-rmd",
            CompactMNISTClassifier,
            {"channels": (32, 64), "hidden": 512},
            "compact classifier, robust manifold training (Jalal et al.) fine-tuned from mnist-l2-at",
        ),
        ZooEntry(
            "mnist-ambient-gan",
            Generator,
            {"latent_dim": 64, "width": 32},
            "AmbientGAN: mnist-gan's architecture learned from block-pixels p=0.9 measurements only",
        ),
        ZooEntry(
            "mnist-ddpm",
            DiffusionModel,
            {"channels": (32, 64, 128), "blocks": 1, "timesteps": 1000},
            "DDPM noise-prediction UNet (linear betas, T = 1000), weights averaged (EMA); DDIM sampling",
        ),
        ZooEntry(
            "causal-digit-gan",
            ConditionalGenerator,
            {"latent_dim": 64, "label_dim": 9, "width": 32},
            "CausalGAN image generator of the digit world (conditioned on one-hot D, T, S)",
        ),
        ZooEntry(
            "causal-digit-controller",
            CausalController,
            {"graph": DigitWorld.graph.spec(), "hidden": 32},
            "CausalGAN causal controller of the digit world (D -> T, D -> S, T -> S)",
        ),
    )
}
"""Every zoo model by name: how to build it before its weights are loaded (:func:`available` lists the
names, :func:`load` builds one and loads its weights)."""


CLASSIFIER_TYPES: tuple[type[nn.Module], ...] = (MNISTClassifier, CompactMNISTClassifier)
"""Architectures of the zoo's MNIST classifiers."""

CLASSIFIERS: tuple[str, ...] = tuple(n for n, e in REGISTRY.items() if e.build in CLASSIFIER_TYPES)
"""Zoo entries that are MNIST classifiers (the standard one and the robustly trained ones)."""


class ZooIntegrityError(ValueError):
    """The weights on disk do not match the SHA-256 recorded for them."""


class ZooRecordError(ValueError):
    """A zoo record or weights file is unreadable, or does not describe the entry's architecture."""


def registered() -> list[str]:
    """Names of every zoo architecture, shipped with weights or not yet."""
    return sorted(REGISTRY)


def available(weights_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """Names of the zoo models whose weights and record are present (shipped in the package by default)."""
    folder = Path(weights_dir or WEIGHTS_DIR)
    return [
        n
        for n in registered()
        if (folder / f"{n}.safetensors").is_file() and (folder / f"{n}.json").is_file()
    ]


def _entry(name: str) -> ZooEntry:
    if not isinstance(name, str) or name not in REGISTRY:
        raise ValueError(f"unknown zoo model {name!r}: expected one of {registered()}")
    return REGISTRY[name]


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def record(name: str, weights_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The JSON record of a zoo model (training command, seed, data, SHA-256, measured figures)."""
    _entry(name)
    path = Path(weights_dir or WEIGHTS_DIR) / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no record for zoo model {name!r} at {path}")
    return _read_record(name, path)


def _read_record(name: str, path: Path) -> dict[str, Any]:
    """The record at ``path`` as a dict; :class:`ZooRecordError` naming the file and the model otherwise."""
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ZooRecordError(
            f"record of zoo model {name!r} at {path} is not valid JSON ({err}): restore the file"
        ) from err
    if not isinstance(data, dict):
        raise ZooRecordError(
            f"record of zoo model {name!r} at {path}: expected a JSON object, got {type(data).__name__}"
        )
    return data


def _check_architecture(name: str, rec: dict[str, Any], path: Path) -> None:
    """Raise :class:`ZooRecordError` when the record names another architecture than the zoo entry's."""
    entry = _entry(name)
    recorded = rec.get("architecture")
    expected = {"class": getattr(entry.build, "__name__", str(entry.build)), **entry.kwargs}
    if recorded is None:
        return  # records written before the field existed
    recorded_cmp = (
        {k: list(v) if isinstance(v, tuple) else v for k, v in recorded.items()}
        if isinstance(recorded, dict)
        else recorded
    )
    expected_cmp = {k: list(v) if isinstance(v, tuple) else v for k, v in expected.items()}
    if recorded_cmp != expected_cmp:
        raise ZooRecordError(
            f"record of zoo model {name!r} at {path} describes architecture {recorded}, expected {expected} "
            "(the zoo entry's): the weights cannot be loaded into this model"
        )


def build(name: str) -> nn.Module:
    """An untrained model of the zoo entry's architecture."""
    entry = _entry(name)
    return entry.build(**entry.kwargs)


def verify(name: str, weights_dir: str | os.PathLike[str] | None = None) -> Path:
    """Path of a zoo model's weights after checking their SHA-256 against the model's record.

    Raises:
        ValueError: unknown name. FileNotFoundError: the weights or record are missing.
        ZooIntegrityError: the weights' SHA-256 differs from the record's.
    """
    _entry(name)
    folder = Path(weights_dir or WEIGHTS_DIR)
    weights = folder / f"{name}.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(
            f"no weights for zoo model {name!r} at {weights} (present: {available(folder)}); "
            "train them with `python -m eval train ... --out DIR` and pass weights_dir=DIR"
        )
    rec = record(name, folder)
    actual = sha256_file(weights)
    if rec.get("sha256") != actual:
        raise ZooIntegrityError(
            f"weights of {name!r} at {weights} have SHA-256 {actual}, expected {rec.get('sha256')} from its record: "
            "the file was modified or replaced"
        )
    return weights


def load(
    name: str, device: str | torch.device = "cpu", *, weights_dir: str | os.PathLike[str] | None = None
) -> nn.Module:
    """A ready zoo model in eval mode on ``device``.

    Args:
        name: one of :func:`available`.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``.
        weights_dir: where ``<name>.safetensors`` and ``<name>.json`` live; default: the package's own.

    Raises:
        ValueError: unknown name or device. ZooIntegrityError: the weights' SHA-256 differs from the record's.
        ZooRecordError: the record is not valid JSON, names another architecture, or the weights do not fit
            the architecture (each message names the file and the model).
        FileNotFoundError: the weights or record are missing.
    """
    dev = resolve_device(device)
    entry = _entry(name)
    weights = verify(name, weights_dir)
    _check_architecture(name, record(name, weights.parent), weights.with_suffix(".json"))
    model = entry.build(**entry.kwargs)
    try:
        state = load_file(str(weights))
        model.load_state_dict(state, strict=True)
    except Exception as err:  # safetensors' header errors, load_state_dict's key / shape errors
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ZooRecordError(
            f"weights of zoo model {name!r} at {weights} do not fit its architecture "
            f"{type(model).__name__}({', '.join(f'{k}={v}' for k, v in entry.kwargs.items())}): {first}"
        ) from err
    return model.to(dev).eval()


def save(model: nn.Module, name: str, folder: str | os.PathLike[str], info: dict[str, Any]) -> Path:
    """Write ``<name>.safetensors`` and ``<name>.json`` (``info`` plus the SHA-256) into ``folder``; return the weights path.

    Raises:
        ValueError: unknown name. TypeError: ``model`` is not of the entry's architecture (then :func:`load`
            could not read the weights back).
    """
    entry = _entry(name)
    if isinstance(entry.build, type) and type(model) is not entry.build:
        raise TypeError(
            f"zoo model {name!r} is a {entry.build.__name__}, got a {type(model).__name__}: "
            "save it under an entry of its own architecture"
        )
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / f"{name}.safetensors"
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(weights, safetensors_bytes(state))  # a temporary file unique to this writer, then renamed
    rec_path = out / f"{name}.json"
    previous: dict[str, Any] = _read_record(name, rec_path) if rec_path.is_file() else {}
    rec = {
        **previous,
        **info,
        "name": name,
        "architecture": {"class": type(model).__name__, **_entry(name).kwargs},
        "sha256": sha256_file(weights),
    }
    atomic_write_text(rec_path, json.dumps(rec, indent=2, sort_keys=True) + "\n")
    return weights


def update_record(
    name: str, updates: dict[str, Any], folder: str | os.PathLike[str] | None = None
) -> dict[str, Any]:
    """Merge ``updates`` into a model's JSON record (e.g. measured figures) and return the new record."""
    path = Path(folder or WEIGHTS_DIR) / f"{name}.json"
    rec = record(name, path.parent)
    rec.update(updates)
    atomic_write_text(path, json.dumps(rec, indent=2, sort_keys=True) + "\n")
    return rec


__all__ = [
    "CLASSIFIERS",
    "CLASSIFIER_TYPES",
    "REGISTRY",
    "WEIGHTS_DIR",
    "ZooEntry",
    "ZooIntegrityError",
    "ZooRecordError",
    "available",
    "build",
    "load",
    "record",
    "registered",
    "save",
    "sha256_file",
    "update_record",
    "verify",
]
