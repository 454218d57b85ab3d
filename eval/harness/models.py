"""Models and data named on the command line: a zoo name, ``package.module:factory`` or ``path.py:factory``,
with optional safetensors weights (never a pickle), and the evaluation data (MNIST, a safetensors file or a
factory).

A *factory* is a callable that takes no arguments and returns the ``nn.Module`` (for data: a tuple ``(images,
labels)``). Contracts (checked here, before any attack runs):

- classifier: ``(B, C, H, W)`` images in [0, 1] -> ``(B, K)`` logits (normalization inside the model);
- generator: ``(B, k)`` latents -> ``(B, C, H, W)`` images in [0, 1], with an int attribute ``latent_dim = k``;
- encoder: ``(B, C, H, W)`` -> ``(B, k)`` latents of that generator;
- data: images ``(N, C, H, W)`` float, finite, in [0, 1] and labels ``(N,)`` of an integer dtype, one per image;
  :func:`check_data_fits_models` then checks the images have the models' shape and the labels the classifier's
  classes.

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

__all__ = [
    "KINDS",
    "ModelSpec",
    "check_data_fits_models",
    "load_data",
    "load_factory",
    "load_model",
    "parse_spec",
]

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


def _some(items: list[str], limit: int = 5, quote: bool = True) -> str:
    """``items`` for a message: the first ``limit`` (quoted keys), then how many more."""
    shown = ", ".join(repr(k) if quote else k for k in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _weights_mismatch(model: nn.Module, state: dict[str, Tensor]) -> list[str]:
    """What keeps ``state`` from loading into ``model`` with ``strict=True``: missing keys, unexpected keys,
    wrong shapes (each naming the keys); empty when they match."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k!r} {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model"
        for k in own
        if k in state and not nn.parameter.is_lazy(own[k]) and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_some(missing)} (in the model, not in the file)")
    if unexpected:
        problems.append(f"unexpected keys {_some(unexpected)} (in the file, not in the model)")
    if shapes:
        problems.append(f"wrong shapes: {_some(shapes, 3, quote=False)}")
    return problems


def _load_weights(model: nn.Module, weights: Path, label: str) -> None:
    """Load a safetensors file into ``model`` (``strict=True``); every refusal names the file and what is wrong."""
    from safetensors.torch import load_file

    weights = Path(weights)
    if weights.suffix != ".safetensors":
        raise ValueError(
            f"expected the {label} weights as a .safetensors file (pickled checkpoints are not loaded), got {weights}"
        )
    if not weights.is_file():
        raise FileNotFoundError(f"expected the {label} weights at {weights}, got no such file")
    what = f"the weights of the {label} {type(model).__name__}"
    try:
        state = load_file(str(weights))
    except OSError:
        raise
    except (
        Exception
    ) as err:  # safetensors' header and format errors (a pickle renamed .safetensors, a cut file)
        first = " ".join(str(err).split()) or type(err).__name__
        raise ValueError(
            f"expected {weights} to be a safetensors file holding {what}, got a file safetensors cannot read "
            f"({first}); save weights with safetensors.torch.save_file(model.state_dict(), PATH)"
        ) from err
    problems = _weights_mismatch(model, state)
    if problems:
        raise ValueError(f"expected {weights} to hold {what}, got: {'; '.join(problems)}")
    bad = [k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"expected {weights} to hold finite {what}, got NaN or inf in {_some(bad)}")
    try:
        model.load_state_dict(state, strict=True)
    except Exception as err:  # anything the comparison above does not see (e.g. a module's own load hook)
        message = " ".join(str(err).split()) or type(err).__name__
        raise ValueError(f"expected {weights} to hold {what}, got: {message}") from err


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
    """The first ``n`` evaluation points: ``(images, labels, description)`` on ``device``, labels as int64.

    Args:
        text: ``"mnist"`` (the MNIST test split), a ``.safetensors`` file with tensors ``images`` ``(N, C, H, W)``
            and ``labels`` ``(N,)``, or ``package.module:factory`` / ``path.py:factory`` returning ``(images,
            labels)``.
        n: points wanted (>= 1; the source must hold as many).
        device: where the tensors go.

    Raises:
        TypeError: not two tensors, images not floating, labels not of an integer dtype.
        ValueError: not ``(N, C, H, W)`` and ``(N,)``, another number of labels than images, fewer than ``n``
            points, NaN or inf pixels, pixels outside [0, 1], negative labels (each message names ``--data``).
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
        try:
            tensors = load_file(str(path))
        except OSError:
            raise
        except Exception as err:  # safetensors' header and format errors
            raise ValueError(
                f"expected --data {path} to be a safetensors file, got one safetensors cannot read "
                f"({' '.join(str(err).split()) or type(err).__name__})"
            ) from err
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
    x, y = _check_data(x, y, n, f"--data {text}")
    return x.to(device), y.to(device), what


def _check_data(x: Any, y: Any, n: int, source: str) -> tuple[Tensor, Tensor]:
    """The first ``n`` points of ``(x, y)`` checked (see :func:`load_data`), labels as int64; ``source`` names
    where they came from in messages."""
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(
            f"expected {source} images and labels as tensors, got {type(x).__name__} and {type(y).__name__}"
        )
    if x.dim() != 4 or y.dim() != 1:
        raise ValueError(
            f"expected {source} images (N, C, H, W) and labels (N,), got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if len(x) != len(y):
        raise ValueError(
            f"expected {source} to hold one label per image, got {len(x)} images and {len(y)} labels"
        )
    if not x.is_floating_point():
        hint = " (divide 8-bit images by 255)" if x.dtype == torch.uint8 else ""
        raise TypeError(f"expected {source} images as floats in [0, 1], got dtype {x.dtype}{hint}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"expected {source} labels of an integer dtype (class indices), got dtype {y.dtype}")
    if len(x) < n:
        raise ValueError(f"expected --n <= {len(x)} (the points {source} holds), got {n}")
    x, y = x[:n], y[:n]
    finite = torch.isfinite(x).reshape(n, -1).all(dim=1)
    if not bool(finite.all()):
        first = int(torch.nonzero(~finite).reshape(-1)[0])
        raise ValueError(
            f"expected {source} images to be finite, got NaN or inf in {int((~finite).sum())} of the first {n} "
            f"images, the first at index {first}"
        )
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        raise ValueError(f"expected {source} images in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
    if int(y.min()) < 0:
        first = int(torch.nonzero(y < 0).reshape(-1)[0])
        raise ValueError(
            f"expected {source} labels >= 0 (class indices), got {int(y[first])} at index {first}"
        )
    return x, y.to(torch.int64)


def check_data_fits_models(
    x: Tensor,
    y: Tensor,
    what: str,
    classifier: nn.Module,
    generator: nn.Module | None = None,
    encoder: nn.Module | None = None,
) -> None:
    """Before any attack: refuse data the models cannot read, with one message naming ``--data``.

    One forward of each model on one image (or latent), under ``no_grad`` and with the RNG state restored: the
    generator's images must have the data's shape ``(C, H, W)``, the classifier must read the data's images and
    return logits ``(1, K)`` with ``K`` above every label, the encoder must read them.

    Args:
        x: images ``(N, C, H, W)``; y: labels ``(N,)`` (from :func:`load_data`); what: the data's description.
        classifier, generator, encoder: the loaded models (on ``x``'s device, eval mode).

    Raises:
        ValueError: another image shape than the models', labels outside the classifier's classes.
    """
    shape = tuple(int(s) for s in x.shape[1:])
    hint = "pass --data FILE.safetensors or path.py:factory with images and labels for your models"
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        if generator is not None:
            k = latent_dim_of(generator)
            made = generator(torch.zeros(1, k, device=x.device, dtype=_float_dtype(generator, x)))
            if isinstance(made, Tensor) and made.dim() == 4 and tuple(made.shape[1:]) != shape:
                raise ValueError(
                    f"the data ({what}) has images of shape {shape}, but the generator {type(generator).__name__} "
                    f"makes images of shape {tuple(made.shape[1:])}: {hint}"
                )
        logits = _probe(classifier, "classifier", x, what, hint)
        if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != 1:
            got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(
                f"expected the classifier {type(classifier).__name__} to return logits (B, K) for images of the "
                f"data's shape {shape}, got {got} for one image"
            )
        if int(y.max()) >= logits.shape[1]:
            first = int(torch.nonzero(y >= logits.shape[1]).reshape(-1)[0])
            raise ValueError(
                f"expected the data's labels ({what}) in [0, {logits.shape[1]}) (the classifier "
                f"{type(classifier).__name__}'s {logits.shape[1]} classes), got {int(y[first])} at index {first}"
            )
        if encoder is not None:
            _probe(encoder, "encoder", x, what, hint)


def _float_dtype(model: nn.Module, x: Tensor) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), x.dtype)


def _probe(model: nn.Module, role: str, x: Tensor, what: str, hint: str) -> Any:
    """``model`` on the first image of ``x`` (in the model's dtype); a shape error becomes a ValueError naming
    the data."""
    try:
        return model(x[:1].to(_float_dtype(model, x)))
    except RuntimeError as err:  # torch's shape errors (mat1 and mat2 shapes cannot be multiplied, ...)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(
            f"the {role} {type(model).__name__} cannot read the data's images of shape {tuple(x.shape[1:])} "
            f"({what}): {first}; {hint}"
        ) from err
