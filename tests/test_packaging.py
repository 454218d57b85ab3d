"""Packaging: the wheel ships the libraries, their weights and py.typed, never tests; import is light."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_does_no_heavy_work() -> None:
    code = (
        "import sys, manifold_defense, attacks, eval; "
        "heavy = [m for m in ('manifold_defense.zoo', 'manifold_defense.data', 'manifold_defense.inversion', "
        "'torchvision', 'sklearn', 'foolbox', 'torchattacks') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_wheel_contents(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {proc.stderr[-300:]}")
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"manifold_defense", "attacks", "eval"}
    assert not any(n.startswith("tests/") for n in names)
    for pkg in ("manifold_defense", "attacks", "eval"):
        assert f"{pkg}/py.typed" in names
    for model in ("mnist-classifier", "mnist-gan", "mnist-vae", "mnist-encoder"):
        assert f"manifold_defense/zoo/weights/{model}.safetensors" in names
        assert f"manifold_defense/zoo/weights/{model}.json" in names
