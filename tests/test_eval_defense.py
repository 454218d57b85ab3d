"""``eval.defense_eval`` (a preset of the robustness harness) / ``manifold_defense.evaluation``: reusable pieces, the preset's
settings, the command on tiny settings, ``--write``, errors."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from attacks import LatentAttackConfig, Norm, PGDConfig, ThreatModel
from eval.cli import build_parser, main
from eval.defense_eval import FIGURES, preset
from eval.defense_figures import plot_pairs
from eval.harness.command import load_zoo_models
from manifold_defense.evaluation import (
    correct_in_every_draw,
    correct_per_draw,
    evaluate_onmanifold,
    evaluate_pgd,
)
from manifold_defense.presets import schedule_config


class _Alternating(nn.Module):
    """Correct on even calls, wrong on odd ones: a caricature of a randomized defense."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        label = 0 if self.calls % 2 == 0 else 1
        self.calls += 1
        logits = torch.zeros(x.shape[0], 10)
        logits[:, label] = 5.0
        return logits


class _Constant(nn.Module):
    def __init__(self, label: int) -> None:
        super().__init__()
        self.label = label
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: Tensor) -> Tensor:
        logits = x.flatten(1)[:, :10] * 0.0 * self.scale
        return logits + nn.functional.one_hot(torch.full((x.shape[0],), self.label), 10).float() * 5


class _TinyGenerator(nn.Module):
    latent_dim = 4

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 784)

    def forward(self, z: Tensor) -> Tensor:
        return torch.sigmoid(self.lin(z)).view(-1, 1, 28, 28)


def test_worst_case_over_draws_counts_one_bad_draw() -> None:
    x = torch.rand(3, 1, 28, 28)
    y = torch.zeros(3, dtype=torch.long)
    assert correct_in_every_draw(_Alternating(), x, y, draws=1).tolist() == [True, True, True]
    assert correct_in_every_draw(_Alternating(), x, y, draws=2).tolist() == [False, False, False]
    with pytest.raises(ValueError, match="expected draws to be an int >= 1"):
        correct_in_every_draw(_Alternating(), x, y, draws=0)
    per = correct_per_draw(_Alternating(), x, y, draws=4, batch_size=2)  # right, wrong, right, wrong per batch
    assert per.shape == (4, 3) and per.tolist() == [[True] * 3, [False] * 3, [True] * 3, [False] * 3]
    assert float(per.float().mean()) == 0.5 and not bool(per.all(dim=0).any())


def test_evaluate_pgd_per_point_mask_and_transfer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).eval()
    x = torch.rand(6, 1, 28, 28)
    with torch.no_grad():
        pred = model(x).argmax(1)
    y = pred.clone()
    y[:2] = (pred[:2] + 1) % 10  # two points misclassified from the start
    # eps = 0: the attack cannot move; robust == clean correctness exactly.
    res = evaluate_pgd(model, x, y, ThreatModel(Norm.L2, 0.0), PGDConfig(steps=2), batch_size=4)
    assert res.robust.tolist() == [False, False, True, True, True, True]
    assert res.accuracy == pytest.approx(4 / 6) and res.x_adv.shape == x.shape
    # clean_correct masks points out; a transfer target that is always right keeps the rest robust.
    clean = torch.tensor([True, True, True, False, True, True])
    right = _Constant(0)
    res2 = evaluate_pgd(
        model,
        x,
        torch.zeros(6, dtype=torch.long),
        ThreatModel(Norm.LINF, 0.5),
        PGDConfig(steps=3, step_size=0.2),
        eval_model=right,
        draws=2,
        clean_correct=clean,
    )
    assert res2.robust.tolist() == clean.tolist()
    assert res2.attacked_model_accuracy < 0.5  # the bare model itself is broken at Linf 0.5
    with pytest.raises(ValueError, match="expected clean_correct of shape"):
        evaluate_pgd(model, x, y, ThreatModel(Norm.L2, 1.0), PGDConfig(steps=1), clean_correct=clean[:2])


def test_onmanifold_counts_only_eligible_points() -> None:
    gen = _TinyGenerator().eval()
    z = torch.randn(5, 4)
    cfg = LatentAttackConfig(eps=1.0, constraint="pixel", steps=2)
    none_eligible = evaluate_onmanifold(_Constant(3).eval(), gen, z, torch.ones(5, dtype=torch.long), cfg)
    assert int(none_eligible.eligible.sum()) == 0 and math.isnan(none_eligible.success_rate)
    all_eligible = evaluate_onmanifold(_Constant(3).eval(), gen, z, torch.full((5,), 3), cfg)
    assert all_eligible.eligible.all() and all_eligible.success_rate == 0.0  # a constant cannot be fooled
    assert all_eligible.x0.shape == (5, 1, 28, 28) and all_eligible.pixel_distance.max() <= 1.0 + 1e-5


def test_schedules_and_preset_settings() -> None:
    fast = schedule_config("fast", seed=2)
    assert (fast.optimizer, fast.lr, fast.steps, fast.restarts, fast.init, fast.seed) == (
        "adam", 0.05, 50, 2, "encoder", 2,
    )  # fmt: skip
    dgan = schedule_config("defense-gan")
    assert dgan.restarts * dgan.steps == 2000 and dgan.optimizer == "sgd"
    with pytest.raises(ValueError, match="expected schedule to be one of"):
        schedule_config("slow")
    with pytest.raises(SystemExit):  # argparse: invalid choice
        build_parser().parse_args(["defense", "--schedule", "slow"])
    with pytest.raises(ValueError, match="expected n to be an int >= 1, got 0"):
        main(["defense", "--n", "0"])
    settings, defenses = preset(build_parser().parse_args(["defense", "--l2-eps", "4", "--n", "7"]))
    assert settings.threats == ("linf-0.3", "l2-4") and settings.n == 7 and not settings.quick
    assert defenses == ("undefended", "projection-fast") and not settings.cascade
    assert settings.attacks == ("clean", "pgd", "bpda-eot-pgd", "onmanifold", "overpowered")
    budgets = ["defense", "--latent-eps", "1.5", "--op-eps", "2", "--figures", "onmanifold,overpowered"]
    settings, defenses = preset(build_parser().parse_args(budgets))
    assert (settings.onmanifold.eps, settings.overpowered.eps, settings.threats) == (1.5, 2.0, ("l2-1.5",))
    assert not settings.latent_budget_from_threat and settings.overpowered.temperature == 10.0
    assert defenses == ("undefended",) and settings.curve_eps_l2 == ()
    with pytest.raises(ValueError, match=r"onmanifold: expected eps to be finite and >= 0, got -1\.0"):
        preset(build_parser().parse_args(["defense", "--latent-eps", "-1"]))
    with pytest.raises(ValueError, match="expected --quick with the fast schedule"):
        preset(build_parser().parse_args(["defense", "--quick", "--schedule", "defense-gan"]))
    settings, defenses = preset(
        build_parser().parse_args(["defense", "--schedule", "defense-gan", "--figures", "bpda"])
    )
    assert defenses == ("projection-defense-gan",) and settings.threats == ("l2-2", "l2-4")


def test_quick_preset_is_marked() -> None:
    args = build_parser().parse_args(["defense", "--quick"])
    assert isinstance(args, argparse.Namespace) and tuple(args.figures) == FIGURES
    s, defenses = preset(args)
    assert s.quick and s.n == 20 and defenses == ("undefended", "projection-fast")


def test_plot_pairs(tmp_path: Path) -> None:
    imgs = torch.rand(3, 1, 28, 28)
    plot_pairs(tmp_path / "g.png", imgs, imgs.flip(0), [("a", "b")] * 3, "title")
    plot_pairs(tmp_path / "empty.png", imgs[:0], imgs[:0], [], "title")
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "empty.png").stat().st_size > 0
    with pytest.raises(ValueError, match="expected as many right images and captions"):
        plot_pairs(tmp_path / "bad.png", imgs, imgs[:2], [("a", "b")] * 3, "t")


def test_command_runs_every_figure_through_the_harness(tmp_path: Path) -> None:
    """Every figure of the old command is a stage or report section of one harness run: defended clean (clean
    stage and projection section), naive transfer (pgd with the bare classifier's transfer counts), BPDA + EOT,
    on-manifold (classifier-alone success rate and pair grid) and overpowered (accuracy after each step count)."""
    out = tmp_path / "run"
    code = main([
        "defense", "--n", "3", "--batch", "2", "--l2-eps", "4", "--bpda-steps", "1", "--eot", "2", "--draws", "2",
        "--latent-steps", "3", "--op-steps", "3", "--out", str(out), "--device", "cpu", "--threads", "1",
        "--no-progress",
    ])  # fmt: skip
    assert code == 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["command"].startswith("python -m eval defense") and saved["n"] == 3
    assert saved["threat_models"] == ["linf-0.3", "l2-4"] and saved["settings"]["cascade"] is False
    und, proj = saved["defenses"]["undefended"], saved["defenses"]["projection-fast"]
    assert proj["clean"] == 1.0 and proj["projection"]["accuracy_on_projections"] == 1.0
    assert proj["projection"]["generator_passes_per_image"] > 50
    naive = proj["attacks"]["pgd"]["l2-4"]
    assert naive["settings"]["gradient"] == "bare classifier (transfer)"
    assert naive["transfer"]["attacked"] == 3 and "accuracy_alone" in naive
    assert proj["attacks"]["bpda-eot-pgd"]["l2-4"]["settings"]["eot_samples"] == 2
    onm = und["attacks"]["onmanifold"]["l2-4"]
    assert onm["eligible"] == 3 and 0 <= onm["successes"] <= 3 and onm["settings"]["budget_l2"] == 3.0
    op = und["attacks"]["overpowered"]["l2-4"]
    assert list(op["consistency_at_steps"]) == ["3"] and op["consistency_at_steps"]["3"] == op["consistency"]
    assert op["op_accuracy_at_steps"]["3"] == op["op_accuracy"] <= op["consistency"]
    # the stage's own accuracy (robust after this attack of the cascade) is not overwritten by the OP figures
    assert op["accuracy"] <= onm["accuracy"] and "op_accuracy" not in onm
    assert onm["success_at_steps"]["3"] == onm["success_rate"]
    report = (out / "report.md").read_text()
    assert "## Projection (defended clean)" in report and "## Surrogate transfer" in report
    assert (out / "onmanifold_undefended_l2-4.png").read_bytes()[:4] == b"\x89PNG"


def test_command_quick_subset(tmp_path: Path) -> None:
    code = main(["defense", "--quick", "--n", "2", "--figures", "undefended,onmanifold", "--latent-steps", "2",
                 "--out", str(tmp_path), "--device", "cpu", "--threads", "1", "--no-progress"])  # fmt: skip
    assert code == 0
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["quick"] is True and record["n"] == 2
    assert list(record["defenses"]) == ["undefended"]
    assert record["settings"]["attacks"] == ["clean", "pgd", "onmanifold"]
    assert "QUICK" in (tmp_path / "report.md").read_text()


def test_load_zoo_models_picks_the_named_classifier(tmp_path: Path) -> None:
    """``classifier`` / ``classifier_dir`` choose the defended classifier; the generator stays the zoo's."""
    from manifold_defense import zoo

    torch.manual_seed(0)
    other = zoo.build("mnist-rmd")
    zoo.save(other, "mnist-rmd", tmp_path, {"training": {"note": "test weights"}})
    models = load_zoo_models(torch.device("cpu"), classifier="mnist-rmd", classifier_dir=tmp_path)
    for key, value in other.state_dict().items():
        torch.testing.assert_close(models.classifier.state_dict()[key], value)
    default = load_zoo_models(torch.device("cpu"))
    x = torch.rand(2, 1, 28, 28)
    assert not torch.allclose(models.classifier(x), default.classifier(x))
    with pytest.raises(
        ValueError, match=r"unknown classifier 'resnet': expected one of \['mnist-classifier'"
    ):
        load_zoo_models(torch.device("cpu"), classifier="resnet")
    with pytest.raises(FileNotFoundError, match="no weights for zoo model 'mnist-pgd-at'"):
        load_zoo_models(torch.device("cpu"), classifier="mnist-pgd-at", classifier_dir=tmp_path)


def test_write_records_the_classifier_figures(tmp_path: Path) -> None:
    """``--write`` merges the on-manifold and overpowered figures into the classifier's record (other fields kept,
    README table shows them); a smoke run, a run without those figures and modified weights are refused before
    any attack runs."""
    from eval.zoo_cli import markdown_table
    from manifold_defense import zoo

    zoo.save(zoo.load("mnist-pgd-at"), "mnist-rmd", tmp_path, {"training": {"note": "test weights"}})
    base = ["defense", "--n", "2", "--latent-steps", "2", "--op-steps", "2", "--classifier", "mnist-rmd",
            "--classifier-dir", str(tmp_path), "--device", "cpu", "--threads", "1", "--write", "--no-progress"]  # fmt: skip
    out = tmp_path / "run"
    assert main([*base, "--figures", "onmanifold,overpowered", "--latent-eps", "1.5", "--out", str(out)]) == 0
    written = json.loads((out / "results.json").read_text())
    result = written["defenses"]["undefended"]["attacks"]
    rec = zoo.record("mnist-rmd", tmp_path)
    onm, op = (
        rec["figures"]["onmanifold_l2_1.5"],
        rec["figures"]["overpowered_l2_4_t10"],
    )  # the default: logits / 10
    assert onm["success_rate"] == result["onmanifold"]["l2-1.5"]["success_rate"]
    assert onm["eligible"] == result["onmanifold"]["l2-1.5"]["eligible"] == 2 and onm["n"] == 2
    entry = result["overpowered"]["l2-1.5"]
    assert op["consistency"] == entry["consistency"] and op["attack"]["steps"] == 2
    assert op["accuracy"] == entry["op_accuracy"] <= op["consistency"]
    assert op["accuracy_at_steps"] == entry["op_accuracy_at_steps"] and list(op["accuracy_at_steps"]) == ["2"]
    assert onm["success_at_steps"] == result["onmanifold"]["l2-1.5"]["success_at_steps"]
    assert onm["command"] == written["command"] and rec["training"] == {"note": "test weights"}
    table = markdown_table(tmp_path)
    assert "| `mnist-rmd` | on-manifold attack success rate, pixel l2 <= 1.5 (2 steps;" in table
    assert "pair l2 <= 4 (2 steps, logits / 10) |" in table
    assert (
        main([*base, "--figures", "overpowered", "--op-temperature", "1", "--out", str(tmp_path / "t1")]) == 0
    )
    rec = zoo.record("mnist-rmd", tmp_path)
    assert rec["figures"]["overpowered_l2_4"]["attack"]["temperature"] == 1.0  # Jalal et al.'s loss, by name
    assert rec["figures"]["overpowered_l2_4_t10"] == op  # the default's figure is kept beside it
    assert (
        "| `mnist-rmd` | overpowered attack accuracy (start correct and pairs consistent), pair l2 <= 4 (2 steps) |"
        in markdown_table(tmp_path)
    )
    with pytest.raises(ValueError, match="cannot be used with --quick"):
        main([*base, "--quick", "--out", str(tmp_path / "q")])
    with pytest.raises(ValueError, match="expected --figures to include one of them, got undefended"):
        main([*base, "--figures", "undefended", "--out", str(tmp_path / "u")])
    (tmp_path / "mnist-rmd.safetensors").write_bytes(b"tampered")
    with pytest.raises(zoo.ZooIntegrityError):
        main([*base, "--out", str(tmp_path / "t")])
    assert not (tmp_path / "t").exists()


def test_attack_strength_curves_from_found_steps() -> None:
    """One long run's first-success steps give the success (on-manifold), consistency and accuracy (overpowered)
    of every shorter run: values checked by hand."""
    from manifold_defense.evaluation import (
        accuracy_at_steps,
        consistency_at_steps,
        found_at_steps,
        step_marks,
    )

    found = torch.tensor([-1, 0, 5, 12, 40, 250])
    assert step_marks(300) == [10, 30, 100, 300] and step_marks(30) == [10, 30]
    assert found_at_steps(found, 300) == {
        10: round(2 / 6, 4),
        30: 0.5,
        100: round(4 / 6, 4),
        300: round(5 / 6, 4),
    }
    among = torch.tensor([True, True, False, True, False, False])  # eligible: -1, 0, 12
    assert found_at_steps(found, 30, among=among) == {10: round(1 / 3, 4), 30: round(2 / 3, 4)}
    assert consistency_at_steps(found, 30) == {10: round(1 - 2 / 6, 4), 30: 0.5}
    correct = torch.tensor([True, False, True, True, True, True])
    # correct and not yet found: t=10 -> -1, 12, 40, 250 ; t=30 -> -1, 40, 250 ; t=300 -> -1
    assert accuracy_at_steps(found, 300, correct) == {
        10: round(4 / 6, 4),
        30: 0.5,
        100: round(2 / 6, 4),
        300: round(1 / 6, 4),
    }
    assert math.isnan(found_at_steps(found, 10, among=torch.zeros(6, dtype=torch.bool))[10])
    with pytest.raises(ValueError, match="non-empty 1-D integer"):
        found_at_steps(torch.tensor([0.5]), 10)
    with pytest.raises(ValueError, match="start_correct"):
        accuracy_at_steps(found, 10, correct[:3])
