"""The lean cascade (issue 35): PGD's early exit, Square through a defense's query stand-in, APGD-T toward fewer
target classes, and the preset that combines them; the measured claim (the same worst case on the same points as the
full cascade) is the comparison of ``manifold-defense cascade-profile``, not a test."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from attacks import PGD, Norm, PGDConfig, ThreatModel
from eval.cli import build_parser
from eval.harness import APGDTConfig, RobustnessSettings, SquareConfig, purifier_defense, run_robustness
from eval.harness.defenses import Defense
from eval.harness.settings import LEAN_CHANGES
from tests.test_eval_robustness import tiny_settings
from tests.test_harness_autoattack import BUDGETS, Clamp, saturated


class Counting(nn.Module):
    """``inner`` counting the rows of every forward pass."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.rows = inner, 0

    def forward(self, x: Tensor) -> Tensor:
        self.rows += int(x.shape[0])
        return self.inner(x)


class Mean(nn.Module):
    """A 2-class model whose label flips from 0 to 1 once ``x.mean()`` passes 0.5."""

    def forward(self, x: Tensor) -> Tensor:
        m = x.reshape(x.shape[0], -1).mean(1) - 0.5
        return torch.stack([-m, m], dim=1) * 50


# -------------------------------------------------------------------------------------------------- early exit
def test_early_exit_drops_fooled_points_and_keeps_their_fooling_iterate() -> None:
    t = torch.tensor([0.015, 0.055, 0.125, 0.5])  # the last one is out of reach of Linf 0.2
    x = (0.5 - t).view(4, 1, 1, 1).expand(4, 1, 4, 4).clone()
    y = torch.zeros(4, dtype=torch.long)
    threat = ThreatModel(Norm.LINF, 0.2)
    cfg = PGDConfig(steps=20, step_size=0.01, random_start=False)
    full, lean = Counting(Mean()).eval(), Counting(Mean()).eval()
    a = PGD(threat, cfg)(full, x, y)
    b = PGD(threat, PGDConfig(steps=20, step_size=0.01, random_start=False, stop_when_fooled=2))(lean, x, y)
    assert a.success.tolist() == b.success.tolist() == [True, True, True, False]
    assert full.rows == 4 * 21 + 8  # every point every step, the final evaluation; the input check and the verdict
    # point k is first fooled at step s_k (x.mean() = 0.5 - t + 0.01 s > 0.5) and leaves after 2 fooled steps
    first = [2, 6, 13]
    assert lean.rows == sum(s + 2 for s in first) + 21 + 8
    assert bool((lean.inner(b.x_adv).argmax(1) != y)[:3].all())
    assert float((b.x_adv - x).abs().max()) <= 0.2 + 1e-6
    x0 = x.clone()
    PGD(threat, PGDConfig(steps=5, stop_when_fooled=1))(Mean().eval(), x, y)
    assert torch.equal(x, x0)  # the caller's tensor is untouched


def test_early_exit_with_every_point_fooled_stops_at_once() -> None:
    x, y = torch.full((3, 1, 4, 4), 0.7), torch.zeros(3, dtype=torch.long)
    model = Counting(Mean()).eval()  # fooled without any step
    res = PGD(ThreatModel(Norm.L2, 1.0), PGDConfig(steps=30, random_start=False, stop_when_fooled=1))(model, x, y)
    assert bool(res.success.all()) and model.rows == 3 + 6  # one loop step; the input check and the verdict


def test_early_exit_setting_is_checked() -> None:
    with pytest.raises(ValueError, match=r"expected stop_when_fooled to be an int >= 0, got -1"):
        PGDConfig(stop_when_fooled=-1)


# -------------------------------------------------------------------------------------------------- settings
def test_the_lean_preset_and_its_flag() -> None:
    s = RobustnessSettings.lean_preset()
    assert s.lean and s.square.queries_to == "stand-in" and s.apgd_t.targets == 3
    assert (s.pgd.stop_when_fooled, s.bpda.stop_when_fooled, s.final.stop_when_fooled) == (3, 3, 3)
    assert s.unrolled.stop_when_fooled == 0 and s.n == RobustnessSettings().n and s.convergence
    red = s.reductions()
    assert set(red) == {k for k in LEAN_CHANGES if k != "lean"}
    assert red["square.queries_to"] == {"this_run": "stand-in", "full": "defense"}
    from eval.robustness import settings_from_args

    args = build_parser().parse_args(["robustness", "--lean", "--n", "7", "--square-queries", "40"])
    t = settings_from_args(args)
    assert t.lean and t.n == 7 and t.square.queries == 40 and t.apgd_t.targets == 3
    assert not settings_from_args(build_parser().parse_args(["robustness"])).lean
    with pytest.raises(ValueError, match=r"expected square\.queries_to 'defense' or 'stand-in', got 'surrogate'"):
        SquareConfig(queries_to="surrogate")
    with pytest.raises(ValueError, match=r"expected apgd_t\.targets to be an int >= 3 or None, got 2"):
        APGDTConfig(targets=2)
    assert APGDTConfig(targets=3).kwargs()["n_classes"] == 4 and "n_classes" not in APGDTConfig().kwargs()


def test_a_query_stand_in_must_be_a_named_module() -> None:
    model, _, _ = saturated()
    with pytest.raises(TypeError, match=r"expected query_stand_in of defense 'd' as \(name, nn.Module\) or None"):
        Defense(name="d", model=model, query_stand_in=("", model))


# ---------------------------------------------------------------------------------------------- a lean run
@pytest.fixture(scope="module")
def lean_record(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Counting, Counting]:
    """The saturated 10-class classifier behind a deterministic purifier, with a counting query stand-in."""
    model, x, y = saturated()
    real, stand_in = Counting(model).eval(), Counting(model).eval()
    d = purifier_defense("purified", real, Clamp(), randomized=False, query_stand_in=("cheap", stand_in))
    settings = tiny_settings({**BUDGETS, **LEAN_CHANGES, "square.queries": 40}, n=20, threats=("l2-1",),
                             attacks=("clean", "bpda-pgd", "apgd-t", "square"), curve_eps_linf=(),
                             curve_eps_l2=())  # fmt: skip
    rec = run_robustness(settings, [d], x, y, tmp_path_factory.mktemp("lean"), progress=False)
    return rec, real, stand_in


def test_the_lean_run_records_its_cuts(lean_record: tuple[dict[str, Any], Counting, Counting]) -> None:
    rec, _, stand_in = lean_record
    assert rec["lean"] is True and "square.queries_to" in rec["reduced_vs_full"]
    e = rec["defenses"]["purified"]["attacks"]
    assert e["bpda-pgd"]["l2-1"]["settings"]["early_exit"] == "after 3 fooled steps"
    apgdt = e["apgd-t"]["l2-1"]["settings"]
    assert apgdt["targets"] == "the 3 most likely other classes" and "n_classes" not in apgdt
    sq = e["square"]["l2-1"]
    assert sq["settings"]["queries_to"] == "stand-in 'cheap'"
    if sq["attacked"]:  # Square ran on survivors: the stand-in took its queries
        assert stand_in.rows >= sq["attacked"]
    else:
        assert stand_in.rows == 0


def test_square_queries_the_stand_in_not_the_defense(tmp_path: Path) -> None:
    model, x, y = saturated()
    rows = {}
    for to in ("defense", "stand-in"):
        real, stand_in = Counting(model).eval(), Counting(model).eval()
        d = purifier_defense("purified", real, Clamp(), randomized=False, query_stand_in=("cheap", stand_in))
        settings = tiny_settings({"square.queries": 30, "square.queries_to": to}, n=10, threats=("l2-0.5",),
                                 attacks=("clean", "square"), curve_eps_linf=(), curve_eps_l2=(),
                                 convergence=False, quick=True)  # fmt: skip
        rec = run_robustness(settings, [d], x[:10], y[:10], tmp_path / to, progress=False)
        sq = rec["defenses"]["purified"]["attacks"]["square"]["l2-0.5"]
        assert (sq["status"], sq["attacked"], sq["broken"]) == ("ran", 10, 0)
        rows[to] = (real.rows, stand_in.rows)
        if to == "stand-in":
            assert sq["settings"]["queries_to"] == "stand-in 'cheap'" and sq["transfer"]["attacked"] == 10
    assert rows["defense"][1] == 0 and rows["stand-in"][1] >= 10 * 30  # every query of a point: 30 and more
    # the same queries moved from the defense to the stand-in; the defense kept its clean and verdict passes
    assert rows["defense"][0] - rows["stand-in"][0] == rows["stand-in"][1]
