"""``eval.defense_eval`` / ``eval.defense_figures``: the defense evaluation on tiny settings, reusable pieces, errors."""

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
from eval.defense_eval import (
    FIGURES,
    DefenseEvalSettings,
    load_zoo_models,
    run_defense_eval,
    settings_from_args,
)
from eval.defense_figures import (
    correct_in_every_draw,
    evaluate_onmanifold,
    evaluate_pgd,
    plot_pairs,
    schedule_config,
)
from manifold_defense.data import load_mnist


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


def test_schedules_and_bad_settings() -> None:
    fast = schedule_config("fast", seed=2)
    assert (fast.optimizer, fast.lr, fast.steps, fast.restarts, fast.init, fast.seed) == (
        "adam",
        0.05,
        50,
        2,
        "encoder",
        2,
    )
    dgan = schedule_config("defense-gan")
    assert dgan.restarts * dgan.steps == 2000 and dgan.optimizer == "sgd"
    with pytest.raises(ValueError, match="expected schedule to be one of"):
        schedule_config("slow")
    with pytest.raises(ValueError, match="expected n to be an int >= 1, got 0"):
        DefenseEvalSettings(n=0)
    with pytest.raises(ValueError, match="expected n to be an int >= 1, got -3"):
        DefenseEvalSettings(n=-3)
    with pytest.raises(ValueError, match="expected schedule to be one of"):
        DefenseEvalSettings(schedule="slow")
    with pytest.raises(ValueError, match="expected figures to be a non-empty subset"):
        DefenseEvalSettings(figures=("bpda", "magic"))
    with pytest.raises(ValueError, match="expected l2_eps"):
        DefenseEvalSettings(l2_eps=(0.0,))
    with pytest.raises(SystemExit):  # argparse: invalid choice
        build_parser().parse_args(["defense", "--schedule", "slow"])
    with pytest.raises(ValueError, match="expected n to be an int >= 1, got 0"):
        main(["defense", "--n", "0"])
    with pytest.raises(ValueError, match="expected op_multiplier_init to be a finite float > 0"):
        DefenseEvalSettings(op_multiplier_init=0.0)
    parsed = settings_from_args(build_parser().parse_args(["defense", "--l2-eps", "4", "--n", "7"]))
    assert parsed.l2_eps == (4.0,) and parsed.n == 7 and not parsed.quick
    budgets = ["defense", "--latent-eps", "1.5", "--op-eps", "2", "--classifier", "mnist-rmd"]
    parsed = settings_from_args(build_parser().parse_args(budgets))
    assert (parsed.latent_eps, parsed.op_eps) == (1.5, 2.0)
    with pytest.raises(ValueError, match="latent_eps"):
        settings_from_args(build_parser().parse_args(["defense", "--latent-eps", "-1"]))
    args = build_parser().parse_args(["defense", "--quick", "--schedule", "defense-gan"])
    with pytest.raises(ValueError, match="expected --quick with the fast schedule"):
        settings_from_args(args)


def test_quick_preset_is_marked() -> None:
    args = build_parser().parse_args(["defense", "--quick"])
    assert isinstance(args, argparse.Namespace)
    s = settings_from_args(args)
    assert s.quick and s.n == 20 and s.schedule == "fast" and s.figures == FIGURES


def test_plot_pairs(tmp_path: Path) -> None:
    imgs = torch.rand(3, 1, 28, 28)
    plot_pairs(tmp_path / "g.png", imgs, imgs.flip(0), [("a", "b")] * 3, "title")
    plot_pairs(tmp_path / "empty.png", imgs[:0], imgs[:0], [], "title")
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "empty.png").stat().st_size > 0
    with pytest.raises(ValueError, match="expected as many right images and captions"):
        plot_pairs(tmp_path / "bad.png", imgs, imgs[:2], [("a", "b")] * 3, "t")


def test_run_defense_eval_end_to_end_tiny(tmp_path: Path) -> None:
    torch.manual_seed(0)
    test = load_mnist("test", limit=4)
    settings = DefenseEvalSettings(
        n=4,
        batch_size=3,
        pgd_steps=2,
        naive_steps=2,
        bpda_steps=1,
        eot_samples=2,
        draws=2,
        l2_eps=(4.0,),
        latent_steps=3,
        op_steps=3,
        op_check_pairs=2,
    )
    record = run_defense_eval(
        settings, test.images, test.labels, load_zoo_models(torch.device("cpu")), tmp_path, progress=False
    )
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(record)) and saved["complete"] and not saved["quick"]
    assert saved["n"] == 4 and saved["schedule"]["name"] == "fast"
    assert saved["schedule"]["generator_passes_per_image"] == 102
    expected = {
        "undefended_pgd_linf_0.3",
        "defended_clean",
        "naive_transfer_l2_4",
        "bpda_eot_l2_4",
        "onmanifold_l2_3",
        "overpowered_l2_4",
    }
    assert set(saved["figures"]) == expected
    for key, fig in saved["figures"].items():
        assert fig["n"] == 4 and fig["seconds"] >= 0 and "target" in fig, key
        value = fig.get("accuracy", fig.get("success_rate"))
        assert value is None or 0.0 <= value <= 1.0, key
    assert saved["figures"]["undefended_pgd_linf_0.3"]["threat"] == {"norm": "linf", "eps": 0.3}
    assert saved["figures"]["undefended_pgd_linf_0.3"]["attack"]["steps"] == 2
    bpda = saved["figures"]["bpda_eot_l2_4"]
    assert bpda["attack"]["eot_samples"] == 2 and bpda["attack"]["draws"] == 2
    assert bpda["threat"] == {"norm": "l2", "eps": 4.0}
    assert saved["figures"]["defended_clean"]["accuracy"] == 1.0  # the zoo models on 4 easy digits
    op = saved["figures"]["overpowered_l2_4"]
    steps = op["attack"]["steps"]
    assert (
        list(op["accuracy_at_steps"])[-1] == str(steps)
        and op["accuracy_at_steps"][str(steps)] == op["accuracy"]
    )
    md = (tmp_path / "results.md").read_text()
    assert "| bpda_eot_l2_4 |" in md and "QUICK" not in md
    assert (tmp_path / "onmanifold_grid.png").read_bytes()[:4] == b"\x89PNG"


def test_command_quick_subset(tmp_path: Path) -> None:
    code = main(
        [
            "defense",
            "--quick",
            "--n",
            "2",
            "--figures",
            "undefended,onmanifold",
            "--latent-steps",
            "2",
            "--out",
            str(tmp_path),
            "--device",
            "cpu",
            "--threads",
            "1",
        ]
    )
    assert code == 0
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["quick"] is True and "QUICK" in record["note"]
    assert record["command"].startswith("python -m eval") and record["n"] == 2
    assert set(record["figures"]) == {"undefended_pgd_linf_0.3", "onmanifold_l2_3"}
    assert "QUICK" in (tmp_path / "results.md").read_text()


def test_load_zoo_models_picks_the_named_classifier(tmp_path: Path) -> None:
    """``classifier`` / ``classifier_dir`` choose the defended classifier; the generator stays the zoo's."""
    from manifold_defense import zoo

    torch.manual_seed(0)
    other = zoo.build("mnist-classifier")
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

    zoo.save(zoo.load("mnist-classifier"), "mnist-rmd", tmp_path, {"training": {"note": "test weights"}})
    base = ["defense", "--n", "2", "--latent-steps", "2", "--op-steps", "2", "--classifier", "mnist-rmd",
            "--classifier-dir", str(tmp_path), "--device", "cpu", "--threads", "1", "--write"]  # fmt: skip
    out = tmp_path / "run"
    assert main([*base, "--figures", "onmanifold,overpowered", "--latent-eps", "1.5", "--out", str(out)]) == 0
    written = json.loads((out / "results.json").read_text())
    result = written["figures"]
    rec = zoo.record("mnist-rmd", tmp_path)
    onm, op = rec["figures"]["onmanifold_l2_1.5"], rec["figures"]["overpowered_l2_4"]
    assert onm["success_rate"] == result["onmanifold_l2_1.5"]["success_rate"]
    assert onm["eligible"] == result["onmanifold_l2_1.5"]["eligible"] == 2 and onm["n"] == 2
    assert op["accuracy"] == result["overpowered_l2_4"]["accuracy"] and op["attack"]["steps"] == 2
    assert onm["command"] == written["command"] and rec["training"] == {"note": "test weights"}
    table = markdown_table(tmp_path)
    assert "| `mnist-rmd` | on-manifold attack success rate, pixel l2 <= 1.5 (2 steps;" in table
    assert "| `mnist-rmd` | overpowered attack accuracy (pairs consistent), pair l2 <= 4 (2 steps) |" in table
    assert (
        main([*base, "--figures", "overpowered", "--op-temperature", "10", "--out", str(tmp_path / "t10")])
        == 0
    )
    rec = zoo.record("mnist-rmd", tmp_path)
    assert rec["figures"]["overpowered_l2_4_t10"]["attack"]["temperature"] == 10.0
    assert rec["figures"]["overpowered_l2_4"] == op  # the temperature-1 figure is kept beside it
    assert "pair l2 <= 4 (2 steps, logits / 10) |" in markdown_table(tmp_path)
    with pytest.raises(ValueError, match="cannot be used with --quick"):
        main([*base, "--quick", "--out", str(tmp_path / "q")])
    with pytest.raises(ValueError, match="expected --figures to include one of them, got undefended"):
        main([*base, "--figures", "undefended", "--out", str(tmp_path / "u")])
    (tmp_path / "mnist-rmd.safetensors").write_bytes(b"tampered")
    with pytest.raises(zoo.ZooIntegrityError):
        main([*base, "--out", str(tmp_path / "t")])
    assert not (tmp_path / "t").exists()
