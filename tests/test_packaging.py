"""Packaging: the wheel ships the libraries, their weights and py.typed, never tests; import is light."""

from __future__ import annotations

import argparse
import re
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


# ------------------------------------------------------------------------------------------ console command


def _console_script() -> Path:
    """The ``manifold-defense`` script pip wrote beside this interpreter (``make setup``'s editable install)."""
    script = Path(sys.executable).parent / "manifold-defense"
    if not script.exists():
        pytest.fail(
            f"expected the console script {script} (pyproject's [project.scripts]); "
            "reinstall the project: .venv/bin/pip install -e . --no-deps"
        )
    return script


def test_console_script_is_declared() -> None:
    from importlib.metadata import entry_points

    found = {
        ep.name: ep.value for ep in entry_points(group="console_scripts") if ep.name == "manifold-defense"
    }
    assert found == {"manifold-defense": "eval.cli:run"}, found


def test_console_command_lists_every_command() -> None:
    from eval.cli import build_parser

    proc = subprocess.run([str(_console_script()), "--help"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    commands = list(sub.choices)
    assert len(commands) >= 10 and {"demo", "cs", "robustness", "train"} <= set(commands)
    missing = [
        name for name in commands if not re.search(rf"^ {{4}}{re.escape(name)}(\s|$)", proc.stdout, re.M)
    ]
    assert not missing, f"manifold-defense --help does not list {missing}:\n{proc.stdout}"


def test_console_command_reports_bad_input_as_python_m_eval_does(tmp_path: Path) -> None:
    """Same handler as ``python -m eval`` (eval.cli.run): a bad value is one line on stderr, exit status 2."""
    argv = ["demo", "--n", "0", "--out", str(tmp_path / "demo")]
    proc = subprocess.run([str(_console_script()), *argv], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == "python -m eval demo: error: expected --n > 0, got 0\n"
    assert not (tmp_path / "demo").exists()
