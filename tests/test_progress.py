"""Progress display: a tqdm bar on a terminal only; plain log lines (no carriage returns) otherwise."""

from __future__ import annotations

import io
import logging
import subprocess
import sys

import pytest
from tqdm import tqdm

from manifold_defense import progress as progress_module
from manifold_defense.progress import LineProgress, progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "manifold_defense.progress"]


def test_bar_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert isinstance(progress(range(3), desc="x"), LineProgress)
    monkeypatch.setattr(sys, "stderr", _Terminal())
    bar = progress(range(3), desc="x")
    assert isinstance(bar, tqdm)
    bar.close()
    assert isinstance(progress(range(3), desc="x", disable=True), LineProgress)


def test_short_task_logs_a_line_per_unit(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="manifold_defense.progress")
    bar = LineProgress(total=3, desc="robustness", unit="stage")
    for key in ("clean", "pgd", "bpda"):
        bar.set_postfix_str(key)
        bar.update(1)
    bar.close()
    lines = _messages(caplog)
    assert [line.split(",")[0] for line in lines[:3]] == [
        "robustness: 1/3 stages",
        "robustness: 2/3 stages",
        "robustness: 3/3 stages",
    ]
    assert lines[2].endswith("(bpda)")
    assert lines[3].startswith("robustness: finished 3 stages in ")
    assert len(lines) == 4


def test_long_task_logs_a_line_per_tenth_and_resumes(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="manifold_defense.progress")
    seen = list(LineProgress(range(200, 1000), total=1000, initial=200, desc="train", unit="step"))
    assert seen == list(range(200, 1000))
    lines = _messages(caplog)
    counts = [line.split(" ")[1] for line in lines[:-1]]
    assert counts == [f"{k}/1000" for k in range(300, 1001, 100)]
    assert lines[-1].startswith("train: finished 800 steps in ")


def test_disabled_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="manifold_defense.progress")
    assert list(LineProgress(range(5), disable=True)) == [0, 1, 2, 3, 4]
    assert _messages(caplog) == []


def test_seconds_read_well() -> None:
    fmt = progress_module._fmt_seconds
    assert (fmt(3.21), fmt(125), fmt(7384)) == ("3.2 s", "2 min 05 s", "2 h 03 min")
    assert [progress_module._plural(u) for u in ("step", "batch", "it")] == ["steps", "batches", "it"]


def test_a_training_run_into_a_file_has_no_carriage_returns(tmp_path: object) -> None:
    """The command line's logging set-up plus a training loop, stderr redirected to a pipe (as ``make demo > log
    2>&1``): plain lines, no tqdm frames."""
    code = (
        "import logging, torch\n"
        "from torch import nn\n"
        "from attacks import PGD, Norm, PGDConfig, ThreatModel\n"
        "from manifold_defense.training import AdversarialTrainConfig, adversarial_train\n"
        "logging.basicConfig(level=logging.INFO, format='%(message)s')\n"
        "torch.manual_seed(0)\n"
        "model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))\n"
        "x, y = torch.rand(32, 1, 4, 4), torch.arange(32) % 3\n"
        "attack = PGD(ThreatModel(Norm.LINF, 0.1), PGDConfig(steps=1))\n"
        "adversarial_train(model, (x, y), attack, AdversarialTrainConfig(steps=200, batch_size=8, log_every=20))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "\r" not in run.stderr
    lines = [line for line in run.stderr.splitlines() if line.startswith("pgd-at: ")]
    assert lines[0].startswith("pgd-at: 20/200 steps, ")
    assert "loss=" in lines[-2] and lines[-2].startswith("pgd-at: 200/200 steps")
    assert lines[-1].startswith("pgd-at: finished 200 steps in ")
    assert len(lines) == 11
