"""The scripts in examples/ run as a user runs them (a subprocess, ``--tiny`` settings) and print real figures,
so an API change that breaks one fails here."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(name: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--tiny"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=EXAMPLES.parent,
    )
    assert run.returncode == 0, f"{name} --tiny failed:\n{run.stdout}\n{run.stderr[-3000:]}"
    assert "\r" not in run.stderr, "progress bars belong on a terminal only"
    return run.stdout


def _figure(output: str, label: str) -> float:
    match = re.search(re.escape(label) + r"[^\n]*?(\d+\.\d+)\s*$", output, flags=re.M)
    assert match, f"expected a line {label!r} in:\n{output}"
    return float(match.group(1))


def test_every_example_is_tested() -> None:
    tested = {"defend_your_model.py", "compressed_sensing_your_operator.py", "adversarial_training.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


def test_defend_your_model() -> None:
    out = _run("defend_your_model.py")
    rows = {
        label: _figure(out, label)
        for label in (
            "clean, undefended",
            "clean, defended",
            "PGD l2 1.5, undefended",
            "PGD l2 1.5 transferred to the defense (naive)",
            "BPDA + EOT l2 1.5 through the defense",
            "worst case of the two pixel attacks",
            "on-manifold, pixel l2 <= 1.5",
        )
    }
    assert all(0.0 <= v <= 1.0 for v in rows.values()), rows
    assert rows["clean, undefended"] >= 0.75, "the tiny classifier should learn left from right"
    assert rows["PGD l2 1.5, undefended"] < rows["clean, undefended"], "PGD should hurt the bare classifier"
    worst = rows["worst case of the two pixel attacks"]
    assert worst <= rows["BPDA + EOT l2 1.5 through the defense"]
    assert worst <= rows["PGD l2 1.5 transferred to the defense (naive)"]
    largest = re.search(r"largest BPDA perturbation \(l2\): (\d+\.\d+) <= 1.5", out)
    assert largest and float(largest.group(1)) <= 1.5 + 1e-3, out


def test_compressed_sensing_your_operator() -> None:
    out = _run("compressed_sensing_your_operator.py")
    assert "100 single-pixel measurements" in out
    csgm = _figure(out, "per-pixel MSE, CSGM with mnist-gan")
    lstsq = _figure(out, "per-pixel MSE, least squares")
    assert 0 < csgm < 0.2 and 0 < lstsq < 0.2
    assert csgm < lstsq, "the generative prior should beat least squares from 100 of 784 measurements"


@pytest.mark.filterwarnings("ignore")
def test_adversarial_training() -> None:
    out = _run("adversarial_training.py")
    for name in ("standard training", "PGD adversarial training"):
        assert re.search(rf"^{name}: last logged training loss \d+\.\d+ after 8 steps$", out, flags=re.M), out
        assert re.search(rf"^  {name}\s+clean \d\.\d+  robust \d\.\d+$", out, flags=re.M), out
