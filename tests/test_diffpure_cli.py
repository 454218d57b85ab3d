"""The DiffPure commands end to end on a barely trained prior: ``train ddpm``, ``diffpure-tstar``, ``diffpure-exact``.

The figures of a two-step prior mean nothing; what is checked is the protocol: rows per setting, the choice rule,
the worst-case verdicts (robust <= clean), resume without recomputation, and one-line refusals.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.cli import main, run
from eval.diffpure import choose
from eval.run_folder import read_record


@pytest.fixture(scope="module")
def prior_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddpm")
    argv = ["train", "ddpm", "--out", str(out), "--steps", "2", "--set", "batch_size=4", "--threads", "1"]
    assert main([*argv, "--no-progress"]) == 0
    record = json.loads((out / "mnist-ddpm.json").read_text())
    assert record["training"]["config"]["steps"] == 2 and record["architecture"]["class"] == "DiffusionModel"
    return out


def test_choose_takes_the_most_robust_t_star_that_keeps_clean_accuracy() -> None:
    rows = [
        {"t_star": 100, "clean_accuracy": 0.99, "probe_accuracy": 0.2},
        {"t_star": 200, "clean_accuracy": 0.99, "probe_accuracy": 0.4},
        {"t_star": 300, "clean_accuracy": 0.99, "probe_accuracy": 0.4},
        {"t_star": 400, "clean_accuracy": 0.90, "probe_accuracy": 0.9},
    ]
    assert choose(rows, 0.985) == rows[1]  # 400 is too inaccurate; the tie goes to the smaller t*
    assert choose(rows, 0.995) is None


def test_tstar_sweep_writes_rows_resumes_and_refuses_bad_values(
    prior_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "tstar"
    argv = ["diffpure-tstar", "--out", str(out), "--weights-dir", str(prior_dir), "--t-stars", "20,60",
            "--steps", "2", "--n", "8", "--probe-n", "4", "--probe-steps", "2", "--probe-eot", "1",
            "--draws", "2", "--test-n", "6", "--min-clean", "0", "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    record = read_record(out / "tstar.json")
    assert [r["t_star"] for r in record["rows"]] == [20, 60]
    for row in record["rows"]:
        assert 0 <= row["probe_accuracy"] <= row["clean_accuracy"] <= 1
        assert row["network_passes_per_image"] == 2 and row["n"] == 8 and row["probe_n"] == 4
    assert record["chosen"] == choose(record["rows"], 0.0)["t_star"]  # type: ignore[index]
    assert record["test"]["t_star"] == record["chosen"] and record["test"]["n"] == 6
    test = record["test"]
    assert 0 <= test["clean_accuracy"] <= min(test["clean_accuracy_per_draw"])  # worst case <= every draw
    assert len(test["clean_accuracy_per_draw"]) == 2
    assert test["clean_accuracy_mean_of_draws"] == round(sum(test["clean_accuracy_per_draw"]) / 2, 4)
    assert (out / "tstar.png").is_file()
    before = (out / "tstar.json").read_text()
    capsys.readouterr()
    assert main(argv) == 0  # resumed: every row was there, nothing recomputed
    assert read_record(out / "tstar.json")["rows"] == record["rows"]
    assert (out / "tstar.json").read_text() == before
    assert run([*argv[:-2], "--probe-n", "9", "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--probe-n <= --n" in err[0]


def test_exact_gradient_rows_are_worst_case_and_resume(prior_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "exact"
    argv = ["diffpure-exact", "--out", str(out), "--weights-dir", str(prior_dir), "--t-star", "40",
            "--steps", "2", "--n", "3", "--batch", "3", "--pgd-steps", "1,3", "--eot", "1", "--draws", "2",
            "--threats", "linf-0.3", "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    rows = read_record(out / "exact.json")["rows"]
    assert [(r["threat"], r["pgd_steps"]) for r in rows] == [("linf-0.3", 1), ("linf-0.3", 3)]
    for row in rows:
        assert row["accuracy"] <= row["clean_accuracy"]
        assert len(row["robust"]) == round(row["accuracy"] * row["n"])
    assert main(argv) == 0
    assert read_record(out / "exact.json")["rows"] == rows
    # --cumulative: each count attacks only what the shorter ones left; rows never rise, attacked = survivors
    cum = tmp_path / "cumulative"
    assert main([*argv[:2], str(cum), *argv[3:], "--cumulative"]) == 0
    first, second = read_record(cum / "exact.json")["rows"]
    assert first["cumulative"] and first["attacked"] == round(first["clean_accuracy"] * first["n"])
    assert second["attacked"] == len(first["robust"]) and set(second["robust"]) <= set(first["robust"])


def test_diffpure_through_the_harness_runs_every_stage_and_refuses_a_missing_t_star(
    prior_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "harness"
    argv = ["robustness", "--quick", "--defenses", "diffpure", "--diffpure-t-star", "60", "--diffpure-steps", "2",
            "--diffpure-weights-dir", str(prior_dir), "--n", "2", "--threats", "l2-2", "--no-curves",
            "--attacks", "clean,bpda-pgd,surrogate-pgd,unrolled-pgd,real-bpda-eot", "--out", str(out),
            "--threads", "1", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    record = read_record(out / "results.json")["defenses"]["diffpure"]
    assert record["randomized"] is True and record["surrogates"]["names"] == ["ddim-2"]
    attacks = record["attacks"]
    for stage in ("bpda-pgd", "surrogate-pgd", "unrolled-pgd", "real-bpda-eot"):
        assert attacks[stage]["l2-2"]["status"] == "ran", stage
    assert record["worst_case"]["l2-2"] <= attacks["clean"]["l2-2"]["accuracy"]
    # the docs' tables render from this file and restate its figures (eval/diffpure_tables.py)
    from eval import diffpure_tables

    figures = tmp_path / "figures"
    figures.mkdir()
    (figures / diffpure_tables.CASCADE).write_text((out / "results.json").read_text())
    monkeypatch.setattr(diffpure_tables, "FIGURES", figures)
    table = diffpure_tables.cascade_table()
    row = next(line for line in table.splitlines() if line.startswith("| l2-2 | diffpure |"))
    assert f"**{record['worst_case']['l2-2']:.2f}**" in row and "not measured" in diffpure_tables.exact_table()
    assert "| l2-2 | diffpure | surrogate-pgd (ddim-2) |" in diffpure_tables.transfer_table()
    assert run(argv[:4] + argv[6:]) == 2  # --defenses diffpure without --diffpure-t-star
    assert "--diffpure-t-star" in capsys.readouterr().err.strip().splitlines()[-1]
