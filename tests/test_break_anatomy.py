"""Break anatomy (``eval.break_anatomy``): the categories of a break on hand-made purifiers whose answer is known,
the first-break bookkeeping of a state, and the command end to end on a user's tiny models (the run's defenses
rebuilt from its recorded command and checked against its fingerprint)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from eval.break_anatomy import anatomy, broken_examples, categorize, markdown_summary, rebuild_run, summary
from eval.cli import main, run
from eval.harness.defenses import purifier_defense
from manifold_defense.integrity import checked_json
from tests.test_eval_harness import _user_files

CPU = torch.device("cpu")


class MeanRule(nn.Module):
    """Class 1 when the mean pixel exceeds ``threshold`` (logits scaled by ``scale``: same rule, other weights)."""

    def __init__(self, threshold: float = 0.5, scale: float = 1.0) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([threshold, scale]))

    def forward(self, x: Tensor) -> Tensor:
        m = x.flatten(1).mean(1)
        return torch.stack([self.w[0] - m, m - self.w[0]], 1) * self.w[1]


class FirstPixelRule(nn.Module):
    """Class 1 when the first pixel exceeds 0.5: a classifier a one-pixel perturbation fools."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: Tensor) -> Tensor:
        p = x.flatten(1)[:, 0]
        return torch.stack([self.w - p, p - self.w], 1)


class NearestPrototype(nn.Module):
    """A projection onto two prototypes (all zeros, all ones), by the mean pixel."""

    def forward(self, x: Tensor) -> Tensor:
        return (x.flatten(1).mean(1) > 0.5).float().reshape(-1, 1, 1, 1).expand_as(x).clone()


class Identity(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.clone()


class Jitter(nn.Module):
    """A randomized purifier: adds uniform noise in [-0.5, 0.5) to the first pixel (clamped to [0, 1])."""

    randomize = True

    def forward(self, x: Tensor) -> Tensor:
        out = x.clone()
        out.view(len(x), -1)[:, 0] += torch.rand(len(x)) - 0.5
        return out.clamp(0, 1)


def _points() -> tuple[Tensor, Tensor]:
    return torch.zeros(3, 1, 2, 2), torch.zeros(3, dtype=torch.long)


def test_categories_follow_the_judges() -> None:
    assert categorize(0, 0, {"a": 1}) == "not reproduced"
    assert categorize(0, 1, {"a": 1, "b": 1}) == "steered"
    assert categorize(0, 1, {"a": 0, "b": 0}) == "survived"
    assert categorize(0, 1, {"a": 0, "b": 1}) == "ambiguous"
    assert categorize(0, 1, {"a": 2}) == "ambiguous"
    with pytest.raises(ValueError, match="at least one judge"):
        categorize(0, 1, {})


def test_a_projection_moved_to_the_other_prototype_is_steered() -> None:
    x, y = _points()
    d = purifier_defense("proto", MeanRule(), NearestPrototype(), randomized=False)
    x_adv = torch.full((1, 2, 2), 0.6)
    before = x.clone()
    (p,) = anatomy(d, x, y, [(1, "bpda-pgd", x_adv)], {"judge": MeanRule(scale=3.0)}, threat="l2-2", draws=2)
    assert torch.equal(x, before)
    assert (p.index, p.stage, p.category, p.alone, p.defended) == (1, "bpda-pgd", "steered", 1, 1)
    assert p.judges == {"judge": 1} and p.clean_judges == {"judge": 0} and p.input_judges == {"judge": 1}
    assert p.input_move == pytest.approx(1.2) and p.purified_move == pytest.approx(2.0)
    assert (p.wrong_draws, p.draws) == (2, 2)


def test_a_perturbation_that_survives_the_purifier_is_survived_and_a_correct_one_not_reproduced() -> None:
    x, y = _points()
    d = purifier_defense("id", FirstPixelRule(), Identity(), randomized=False)
    fooling = torch.zeros(1, 2, 2)
    fooling[0, 0, 0] = 0.9
    harmless = torch.full((1, 2, 2), 0.1)
    pts = anatomy(d, x, y, [(0, "apgd", fooling), (2, "square", harmless)], {"a": MeanRule(), "b": MeanRule(scale=2.0)},
                  threat="linf-0.9", draws=3)  # fmt: skip
    assert [p.category for p in pts] == ["survived", "not reproduced"]
    assert pts[0].judges == {"a": 0, "b": 0} and pts[0].purified_move == pytest.approx(0.9)
    assert pts[1].wrong_draws == 0 and pts[1].judges == {} and pts[1].defended == 0
    s = summary(pts)
    assert s["broken"] == 2 and s["categories"] == {"steered": 0, "survived": 1, "ambiguous": 0, "not reproduced": 1}
    assert s["alone_correct"] == 1 and s["judges_clean_correct"] == {"a": 1, "b": 1} and s["steered_input_read_wrong"] == 0
    assert pts[0].input_judges == {"a": 0, "b": 0}
    assert s["median_purified_move"]["survived"] == pytest.approx(0.9) and s["wrong_draw_rate"] == pytest.approx(0.5)


def test_a_randomized_purifier_is_drawn_again_deterministically() -> None:
    x, y = _points()
    d = purifier_defense("jitter", FirstPixelRule(), Jitter(), randomized=True, seed=3)
    x_adv = torch.zeros(2, 1, 2, 2)
    x_adv[:, 0, 0, 0] = 0.45  # wrong on the draws whose noise exceeds 0.05: about 45%
    broken = [(0, "bpda-eot-pgd", x_adv[0]), (1, "bpda-eot-pgd", x_adv[1])]
    first = anatomy(d, x, y, broken, {"j": MeanRule()}, threat="linf-0.45", draws=16, seed=3)
    again = anatomy(d, x, y, broken, {"j": MeanRule()}, threat="linf-0.45", draws=16, seed=3)
    assert first == again
    assert all(0 < p.wrong_draws < 16 for p in first)
    assert {p.category for p in first} == {"survived"}


def test_bad_arguments_are_refused() -> None:
    x, y = _points()
    d = purifier_defense("id", FirstPixelRule(), Identity(), randomized=False)
    with pytest.raises(ValueError, match="draws as an int >= 1"):
        anatomy(d, x, y, [], {"j": MeanRule()}, threat="l2-1", draws=0)
    with pytest.raises(ValueError, match="at least one judge"):
        anatomy(d, x, y, [], {}, threat="l2-1")
    from eval.harness.defenses import undefended_defense

    with pytest.raises(ValueError, match="has no purifier"):
        anatomy(undefended_defense(MeanRule()), x, y, [], {"j": MeanRule()}, threat="l2-1")


def test_the_first_stage_that_broke_a_point_gives_its_example() -> None:
    a, b = torch.full((1, 2, 2), 0.1), torch.full((1, 2, 2), 0.2)
    state: dict[str, Any] = {"stages": {
        "p|l2-1|pgd": {"status": "ran", "indices": torch.tensor([0, 1, 2, 3]),
                       "robust": torch.tensor([True, False, True, True]), "broken_x_adv": a.unsqueeze(0)},
        "p|l2-1|bpda-pgd": {"status": "ran", "indices": torch.tensor([0, 2, 3]),
                            "robust": torch.tensor([False, True, True]), "broken_x_adv": b.unsqueeze(0)},
        "p|l2-1|square": {"status": "skipped"},
        "p|l2-1|convergence": {"status": "ran", "indices": torch.tensor([2, 3]), "robust": torch.tensor([False, True]),
                               "broken_x_adv": a.unsqueeze(0)},
        # the second rerun of a convergence ladder (convergence_rounds > 1) counts too
        "p|l2-1|convergence-2": {"status": "ran", "indices": torch.tensor([3]), "robust": torch.tensor([False]),
                                 "broken_x_adv": b.unsqueeze(0)},
        "p|l2-1|convergence-4": {"status": "ran", "indices": torch.tensor([4]), "robust": torch.tensor([False]),
                                 "broken_x_adv": b.unsqueeze(0)},  # no rerun 3: not part of the ladder
    }}  # fmt: skip
    found = broken_examples(state, "p", "l2-1", ["clean", "pgd", "bpda-pgd", "square"])
    assert [(i, s) for i, s, _ in found] == [(0, "bpda-pgd"), (1, "pgd"), (2, "convergence"), (3, "convergence-2")]
    assert torch.equal(found[0][2], b) and torch.equal(found[1][2], a) and torch.equal(found[3][2], b)
    with pytest.raises(ValueError, match="no stage of defense 'q'"):
        broken_examples(state, "q", "l2-1", ["pgd"])


JUDGE = '''
import torch
from torch import nn


class Judge(nn.Module):
    """Nearest class mean of the user's data (the same rule as the weights the run's classifier loads)."""

    def __init__(self, means):
        super().__init__()
        self.register_buffer("mu", means)

    def forward(self, x):
        return -torch.cdist(x.flatten(1), self.mu)


def judge():
    import importlib.util, pathlib
    spec = importlib.util.spec_from_file_location("user_models", pathlib.Path(__file__).with_name("my_models.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    x, y = mod.data()
    flat = x.reshape(len(x), -1)
    return Judge(torch.stack([flat[y == k].mean(0) for k in range(3)]))
'''


def test_the_command_rebuilds_the_run_checks_it_and_writes_its_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, weights = _user_files(tmp_path)
    (tmp_path / "judge.py").write_text(JUDGE)
    out = tmp_path / "run"
    assert main([
        "robustness", "--quick", "--n", "6", "--dgan-n", "6", "--threats", "l2-8", "--classifier", f"{path}:classifier",
        "--classifier-weights", str(weights), "--generator", f"{path}:decoder", "--data", f"{path}:data",
        "--defenses", "projection-defense-gan", "--attacks", "clean,pgd,bpda-pgd", "--out", str(out), "--device",
        "cpu", "--threads", "1", "--no-progress",
    ]) == 0  # fmt: skip
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir())
    record_path = tmp_path / "anatomy.json"
    judge = f"{tmp_path / 'judge.py'}:judge"
    assert main(["break-anatomy", str(out), "--judges", judge, "--draws", "2", "--json", str(record_path)]) == 0
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir()) == before  # nothing written into the run
    record = json.loads(record_path.read_text())
    assert checked_json({k: v for k, v in record.items() if k != "sha256"}) == record
    (row,) = record["rows"]
    results = json.loads((out / "results.json").read_text())
    broken = round(6 * (1 - results["defenses"]["projection-defense-gan"]["worst_case"]["l2-8"]))
    assert row["defense"] == "projection-defense-gan" and row["threat"] == "l2-8" and row["judges"] == [judge]
    assert row["summary"]["broken"] == len(row["points"]) == broken > 0
    assert sum(row["summary"]["categories"].values()) == broken
    assert "| projection-defense-gan + `" in capsys.readouterr().out and "| L2 8 |" in markdown_summary(record)
    # --reuse: the unchanged run's rows come from the previous record; other draws read it again
    again = tmp_path / "again.json"
    argv = ["break-anatomy", str(out), "--judges", judge, "--draws", "2", "--json", str(again), "--reuse"]
    assert main([*argv, str(record_path)]) == 0
    second = json.loads(again.read_text())
    assert second["rows"] == record["rows"] and second["reused"] == [str(out)]
    assert main([*argv[:5], "3", *argv[6:], str(record_path)]) == 0
    third = json.loads(again.read_text())
    assert third["reused"] == [] and third["draws"] == 3 and len(third["rows"][0]["points"]) == broken
    with pytest.raises(ValueError, match="expected a break-anatomy record"):
        main([*argv, str(out / "results.json")])
    # the classifier's weights changed since the run: refused, naming the defense
    torch.manual_seed(0)
    from safetensors.torch import save_file

    save_file({"1.weight": torch.randn(3, 64), "1.bias": torch.zeros(3)}, str(weights))
    with pytest.raises(ValueError, match="'projection-defense-gan' rebuilt from the recorded command differs"):
        rebuild_run(out, CPU)


def test_a_folder_that_is_no_harness_run_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["break-anatomy", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "expected a harness run folder holding results.json" in err
    assert run(["break-anatomy", str(tmp_path), "--draws", "0"]) == 2
    assert "--draws as an int >= 1" in capsys.readouterr().err


def test_batches_give_the_same_points_on_a_deterministic_purifier() -> None:
    x, y = torch.zeros(5, 1, 2, 2), torch.zeros(5, dtype=torch.long)
    d = purifier_defense("proto", MeanRule(), NearestPrototype(), randomized=False)
    broken = [(i, "pgd", torch.full((1, 2, 2), 0.4 + 0.05 * i)) for i in range(5)]
    judges = {"j": MeanRule(scale=2.0)}
    whole = anatomy(d, x, y, broken, judges, threat="l2-2", draws=1)
    assert anatomy(d, x, y, broken, judges, threat="l2-2", draws=1, batch=2) == whole
    assert [p.category for p in whole] == ["not reproduced"] * 3 + ["steered"] * 2
    with pytest.raises(ValueError, match="batch as an int >= 1"):
        anatomy(d, x, y, broken, judges, threat="l2-2", batch=0)
