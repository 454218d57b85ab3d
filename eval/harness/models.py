"""Models and data named on the command line: a zoo name, ``package.module:factory`` or ``path.py:factory``,
with optional safetensors weights (never a pickle), and the evaluation data (MNIST, a safetensors file or a
factory).

A *factory* is a callable that takes no arguments and returns the ``nn.Module`` (for data: a tuple ``(images,
labels)``). Contracts (checked here, before any attack runs):

- classifier: ``(B, C, H, W)`` images in [0, 1] -> ``(B, K)`` logits (normalization inside the model);
- generator: ``(B, k)`` latents -> ``(B, C, H, W)`` images in [0, 1], with an int attribute ``latent_dim = k``;
- encoder: ``(B, C, H, W)`` -> ``(B, k)`` latents of that generator;
- data: images ``(N, C, H, W)`` float in [0, 1] and labels ``(N,)`` int64.

Loading a ``.py`` file or a module runs its code (it is the user's own model definition); weights are read with
``safetensors.torch.load_file``, which runs no code, and loaded with ``strict=True``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from manifold_defense import zoo
from manifold_defense.models import latent_dim_of

__all__ = ["KINDS", "ModelSpec", "load_data", "load_factory", "load_model", "parse_spec"]

#: Roles of a model on the command line.
KINDS: tuple[str, ...] = ("classifier", "generator", "encoder")


class ModelSpec(NamedTuple):
    """A parsed ``--classifier`` / ``--generator`` / ``--encoder`` value.

    Attributes:
        kind: ``"zoo"``, ``"module"`` or ``"file"``; target: the zoo name, module name or ``.py`` path;
        factory: the callable's name (``None`` for a zoo name).
    """

    kind: str
    target: str
    factory: str | None


def parse_spec(text: str) -> ModelSpec:
    """``"mnist-gan"`` (zoo), ``"pkg.mod:make"`` (module) or ``"models/mine.py:make"`` (file).

    Raises:
        ValueError: neither a zoo name nor ``TARGET:FACTORY`` with a Python identifier as FACTORY.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(
            f"expected a model as a zoo name, package.module:factory or path.py:factory, got {text!r}"
        )
    text = text.strip()
    if text in zoo.registered():
        return ModelSpec("zoo", text, None)
    target, sep, factory = text.rpartition(":")
    if not sep or not target or not factory.isidentifier():
        raise ValueError(
            f"expected a model as a zoo name (one of {zoo.registered()}), package.module:factory or "
            f"path.py:factory, got {text!r}"
        )
    return ModelSpec("file" if target.endswith(".py") else "module", target, factory)


def load_factory(text: str) -> Callable[[], Any]:
    """The callable named by ``package.module:factory`` or ``path.py:factory`` (imports the module)."""
    spec = parse_spec(text)
    if spec.kind == "zoo":
        raise ValueError(f"expected package.module:factory or path.py:factory, got the zoo name {text!r}")
    if spec.kind == "file":
        path = Path(spec.target)
        if not path.is_file():
            raise FileNotFoundError(
                f"expected {path} to be a Python file defining {spec.factory}, got no such file"
            )
        name = f"_manifold_defense_user_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise ValueError(f"expected {path} to be an importable Python file")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(spec.target)
    fn = getattr(module, str(spec.factory), None)
    if not callable(fn):
        raise ValueError(
            f"expected {spec.target} to define a callable {spec.factory}, got {type(fn).__name__}"
        )
    return fn


def _load_weights(model: nn.Module, weights: Path, label: str) -> None:
    from safetensors.torch import load_file

    weights = Path(weights)
    if weights.suffix != ".safetensors":
        raise ValueError(
            f"expected the {label} weights as a .safetensors file (pickled checkpoints are not loaded), got {weights}"
        )
    if not weights.is_file():
        raise FileNotFoundError(f"expected the {label} weights at {weights}, got no such file")
    try:
        model.load_state_dict(load_file(str(weights)), strict=True)
    except Exception as err:  # safetensors header errors, missing / unexpected keys, shape mismatches
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"expected {weights} to hold the weights of the {label} {type(model).__name__}, got: {first}"
        ) from err


def load_model(
    text: str,
    kind: str,
    device: torch.device,
    *,
    weights: Path | None = None,
    zoo_dir: Path | None = None,
) -> nn.Module:
    """Build and load one model named on the command line, in eval mode on ``device``.

    Args:
        text: a zoo name, ``package.module:factory`` or ``path.py:factory`` (:func:`parse_spec`).
        kind: its role, one of :data:`KINDS` (a generator must carry an int ``latent_dim``).
        device: where the model goes.
        weights: optional ``.safetensors`` file loaded into it (``strict=True``); for a zoo name it replaces
            the zoo's weights (same architecture).
        zoo_dir: folder of zoo weights (default: the package's).

    Raises:
        ValueError / TypeError / FileNotFoundError: unknown name, missing file, a factory that does not return an
        ``nn.Module``, weights that are not safetensors or do not fit, a generator without ``latent_dim``.
    """
    if kind not in KINDS:
        raise ValueError(f"expected kind to be one of {list(KINDS)}, got {kind!r}")
    spec = parse_spec(text)
    if spec.kind == "zoo":
        if weights is None:
            model = zoo.load(spec.target, device, weights_dir=zoo_dir)
        else:
            model = zoo.build(spec.target)
            _load_weights(model, weights, kind)
    else:
        model = load_factory(text)()
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected {text} to return an nn.Module ({kind}), got {type(model).__name__}")
        if weights is not None:
            _load_weights(model, weights, kind)
    if kind == "generator":
        latent_dim_of(model)
    return model.to(device).eval()


def load_data(text: str, n: int, device: torch.device) -> tuple[Tensor, Tensor, str]:
    """The first ``n`` evaluation points: ``(images, labels, description)`` on ``device``.

    Args:
        text: ``"mnist"`` (the MNIST test split), a ``.safetensors`` file with tensors ``images`` ``(N, C, H, W)``
            and ``labels`` ``(N,)``, or ``package.module:factory`` / ``path.py:factory`` returning ``(images,
            labels)``.
        n: points wanted (>= 1; the source must hold as many).
        device: where the tensors go.
    """
    if text == "mnist":
        from manifold_defense.data import load_mnist

        test = load_mnist("test", limit=n)
        x, y, what = test.images, test.labels, f"MNIST test split, first {n} images"
    elif text.endswith(".safetensors"):
        from safetensors.torch import load_file

        path = Path(text)
        if not path.is_file():
            raise FileNotFoundError(f"expected --data {path} to be a safetensors file, got no such file")
        tensors = load_file(str(path))
        if "images" not in tensors or "labels" not in tensors:
            raise ValueError(
                f"expected --data {path} to hold tensors 'images' and 'labels', got {sorted(tensors)}"
            )
        x, y, what = tensors["images"], tensors["labels"], f"{path}, first {n} points"
    else:
        data = load_factory(text)()
        if not isinstance(data, (tuple, list)) or len(data) != 2:
            raise TypeError(f"expected --data {text} to return (images, labels), got {type(data).__name__}")
        x, y = data
        what = f"{text}, first {n} points"
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(
            f"expected images and labels as tensors, got {type(x).__name__} and {type(y).__name__}"
        )
    if len(x) < n:
        raise ValueError(f"expected --n <= {len(x)} (the points the data holds), got {n}")
    return x[:n].to(device), y[:n].to(device), what
