"""The leaderboard (eval/leaderboard.py, eval/leaderboard_rows.py): rows read from harness results, never invented.

Rows are built from tiny synthetic results files (standard error, convergence verdict, not-measured threats and
rows, the majority-vote and AutoAttack columns), bad input is refused with a ValueError naming it, ``--collect`` on
the committed results reproduces ``docs/figures/leaderboard.json``, and the generated tables equal the committed
docs.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
from pathlib import Path
from typing import Any

import pytest

from eval import leaderboard as lb
from eval.docs_tables import QUOTES, ROOT, stale_blocks
from eval.leaderboard_rows import RowSpec, Source, collect_row, row_spec, standard_error
from eval.run_folder import write_record

V2 = "manifold-defense robustness v2"


def _entry(before: float, after: float, broken: int) -> dict[str, Any]:
    return {"status": "ran", "accuracy": after, "attacked": 90, "broken": broken, "rerun_of": "apgd",
            "figure_before": before}  # fmt: skip


def _results(
    classifier: str = "clf", defense: str = "undefended", schema: str = V2, majority: bool = False, **extra: Any
) -> dict[str, Any]:
    """A results record of the harness's schema with the fields the leaderboard reads: Linf 0.3 converged, L2 2
    with the not-converged flag, L2 4 in the file too."""
    d = {
        "n": 100, "clean": 0.99, "randomized": majority,
        "worst_case": {"linf-0.3": 0.9, "l2-2": 0.5, "l2-4": 0.1},
        "attacks": {"convergence": {"linf-0.3": _entry(0.9, 0.9, 0), "l2-2": _entry(0.55, 0.5, 5),
                                    "l2-4": {"status": "skipped", "reason": "no survivors"}}},
        "flags": [{"flag": "not-converged", "where": "l2-2", "status": "flag"},
                  {"flag": "randomized-defense", "where": "-", "status": "flag"}],
        "cost": {"stages": {"clean": {"real_passes": 100, "process_seconds": 1.0},
                            "linf-0.3|pgd": {"real_passes": 4000, "process_seconds": 20.0},
                            "linf-0.3|convergence": {"real_passes": 1000, "process_seconds": 5.0},
                            "l2-2|pgd": {"real_passes": 300, "process_seconds": 2.0}}},
        "majority_vote": {"draws": 3, "clean": 1.0, "accuracy": {"linf-0.3": 0.95, "l2-2": 0.6, "l2-4": 0.2}}
        if majority else None,
    }  # fmt: skip
    rec = {"schema": schema, "threat_models": ["linf-0.3", "l2-2", "l2-4"], "quick": False,
           "data": "MNIST test split, first 100 images", "models": f"classifier {classifier}, generator g",
           "command": "python -m eval robustness --out runs/x", "device": "cpu", "defenses": {defense: d}}  # fmt: skip
    return rec | extra


def _spec(**kw: Any) -> RowSpec:
    base: dict[str, Any] = dict(name="row", label="row", defense="undefended", classifier="clf",
                                args=("--defenses", "undefended", "--n", "100"),
                                sources=(Source("res.json", ("linf-0.3", "l2-2")),))  # fmt: skip
    return RowSpec(**(base | kw))


def _write(root: Path, name: str, rec: dict[str, Any], checked: bool = True) -> None:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if checked:
        write_record(path, rec)
    else:
        path.write_text(json.dumps(rec))


def test_standard_error() -> None:
    assert standard_error(0.9, 100) == pytest.approx(0.03)
    assert standard_error(0.5, 25) == pytest.approx(0.1)
    assert standard_error(0.0, 10) == 0.0
    with pytest.raises(ValueError, match=r"accuracy in \[0, 1\] and n >= 1, got 1.5 and 10"):
        standard_error(1.5, 10)
    with pytest.raises(ValueError, match="n >= 1"):
        standard_error(0.5, 0)


def test_row_from_synthetic_results(tmp_path: Path) -> None:
    _write(tmp_path, "res.json", _results())
    row = collect_row(_spec(), root=tmp_path)
    linf, l2, l4 = (row["threats"][t] for t in ("linf-0.3", "l2-2", "l2-4"))
    assert row["status"] == "partial" and row["clean"] == {"accuracy": 0.99, "n": 100, "source": "res.json"}
    assert linf["accuracy"] == 0.9 and linf["n"] == 100 and linf["se"] == pytest.approx(0.03)
    assert l2["se"] == pytest.approx(math.sqrt(0.25 / 100), abs=1e-4)
    assert linf["converged"] == "yes" and "broke 0: 0.9 -> 0.9" in linf["convergence"]
    assert l2["converged"] == "no" and l2["flags"] == ["not-converged"]  # randomized-defense is informational
    assert linf["real_passes_per_point"] == 50.0 and l2["real_passes_per_point"] == 3.0
    assert linf["process_seconds_per_point"] == 0.25
    # L2 4 is in the file, but the row's source does not supply it: not measured, with the command that measures it
    assert l4 == {"status": "not measured",
                  "command": "manifold-defense robustness --out DIR/row --defenses undefended --n 100 --threats l2-4"}  # fmt: skip
    assert row["cost"] == {"purifier": None, "passes_per_image": 0, "cpu_seconds_per_image": None}
    assert linf["majority_vote"] is None and "autoattack" not in linf


def test_unchecked_convergence_and_v1_runs(tmp_path: Path) -> None:
    _write(tmp_path, "res.json", _results())
    row = collect_row(_spec(sources=(Source("res.json"),)), root=tmp_path)
    assert row["status"] == "measured" and row["threats"]["l2-4"]["converged"] == "unchecked"
    assert "no survivors" in row["threats"]["l2-4"]["convergence"]
    _write(tmp_path, "v1.json", _results(schema="manifold-defense robustness v1"), checked=False)
    row = collect_row(_spec(sources=(Source("v1.json"),)), root=tmp_path)
    assert {c["converged"] for c in row["threats"].values()} == {"unchecked"}
    assert "v1 harness run: no convergence check, figures are upper bounds" in row["notes"]
    notes = "([notes](docs/leaderboard.md#sources-commands-weights))"
    assert f"| row {notes} |" in lb.readme_table({"n_target": 100, "rows": [row]})  # the README links them
    quiet = collect_row(_spec(sources=(Source("res.json"),)), root=tmp_path)
    assert quiet["notes"] == [] and notes not in lb.readme_table({"n_target": 100, "rows": [quiet]})


def test_a_run_without_todays_stages_says_its_figures_are_upper_bounds(tmp_path: Path) -> None:
    from eval.harness.cascade import ATTACKS

    older = tuple(a for a in ATTACKS if a not in ("apgd-t", "fab"))
    _write(tmp_path, "old.json", _results(settings={"attacks": list(older)}))
    _write(tmp_path, "new.json", _results(settings={"attacks": list(ATTACKS)}))
    old = collect_row(_spec(sources=(Source("old.json"),)), root=tmp_path)
    assert old["threats"]["l2-2"]["stages_missing"] == ["apgd-t", "fab"]
    assert any("without the stages apgd-t, fab" in n and "upper bounds" in n for n in old["notes"])
    stopped = _results(settings={"attacks": list(ATTACKS)}, incomplete=["undefended|l2-2|convergence"])
    _write(tmp_path, "stopped.json", stopped)
    row = collect_row(_spec(sources=(Source("stopped.json"),)), root=tmp_path)
    assert row["threats"]["l2-2"]["not_run"] == ["undefended|l2-2|convergence"] and not row["threats"]["linf-0.3"]["not_run"]
    assert any("stopped run" in n and "undefended|l2-2|convergence" in n for n in row["notes"])
    new = collect_row(_spec(sources=(Source("new.json"),)), root=tmp_path)
    assert new["threats"]["l2-2"]["stages_missing"] == [] and not any("without the stages" in n for n in new["notes"])


def test_majority_and_another_n(tmp_path: Path) -> None:
    rec = _results(defense="diffpure", majority=True)
    rec["defenses"]["diffpure"]["n"] = 50
    _write(tmp_path, "dp.json", rec)
    row = collect_row(_spec(defense="diffpure", sources=(Source("dp.json"),)), root=tmp_path)
    assert row["randomized"] is True
    assert [row["threats"][t]["majority_vote"] for t in ("linf-0.3", "l2-2", "l2-4")] == [0.95, 0.6, 0.2]
    assert row["threats"]["linf-0.3"]["se"] == pytest.approx(math.sqrt(0.09 / 50), abs=1e-4)
    assert "measured at n 50, not 100" in row["notes"]
    assert "| 0.95 |" in lb.figures_table({"rows": [row]})
    assert "0.90 ± 0.042 (maj. 0.95)" in lb.readme_table({"n_target": 100, "rows": [row]})


def test_not_measured_row_is_listed_with_its_command(tmp_path: Path) -> None:
    spec = _spec(sources=(Source("absent.json"),))
    row = collect_row(spec, root=tmp_path)
    assert row["status"] == "not measured" and row["clean"] is None
    full = "manifold-defense robustness --out DIR/row --defenses undefended --n 100"
    assert {c["command"] for c in row["threats"].values()} == {full}
    board = {"n_target": 100, "rows": [row]}
    assert lb.readme_table(board).count("not measured") == 3
    assert full in lb.sources_table(board)


def test_autoattack_column(tmp_path: Path) -> None:
    """The column reads AutoAttack at the reference budget; torchattacks' wrapper run (no ``budget``: written
    before the option) stays beside it; a file of another model or budget is refused."""
    _write(tmp_path, "res.json", _results())
    spec = _spec(autoattack="standard")
    aa = {"attack": "autoattack", "model": "clf", "version": "standard", "source": "zoo", "n": 100,
          "threat_model": {"norm": "linf", "eps": 0.3}, "robust_accuracy": 0.87, "clean_accuracy": 0.99,
          "budget": "reference", "settings": {"command": "python -m eval autoattack --model clf"}}  # fmt: skip
    wrapper = {k: v for k, v in aa.items() if k != "budget"} | {"robust_accuracy": 0.95}
    _write(tmp_path, spec.autoattack_path("linf-0.3"), aa, checked=False)
    _write(tmp_path, spec.autoattack_path("linf-0.3", "torchattacks"), wrapper, checked=False)
    assert spec.autoattack_path("linf-0.3") != spec.autoattack_path("linf-0.3", "torchattacks")
    row = collect_row(spec, root=tmp_path)
    cell = row["threats"]["linf-0.3"]["autoattack"]
    assert cell["accuracy"] == 0.87 and cell["harness_minus_autoattack"] == pytest.approx(0.03)
    assert cell["within_1_point"] is False and cell["budget"] == "reference"
    assert cell["torchattacks_wrapper"]["accuracy"] == 0.95
    assert any("AutoAttack on the same points is below" in n for n in row["notes"])
    board = {"n_target": 100, "rows": [row]}
    assert "0.90 ± 0.030 (AA 0.87)" in lb.readme_table(board)
    assert "| row | Linf 0.3 | 0.90 | 0.87 (100) | +0.03 | no | 0.95 (100) |" in lb.autoattack_table(board)
    assert row["threats"]["l2-2"]["autoattack"]["status"] == "not measured"
    assert "--norm l2 --eps 2 --version standard --budget reference" in row["threats"]["l2-2"]["autoattack"][
        "command"
    ]
    _write(tmp_path, spec.autoattack_path("linf-0.3"), aa | {"budget": "torchattacks"}, checked=False)
    with pytest.raises(ValueError, match=r"expected an autoattack result .*budget"):
        collect_row(spec, root=tmp_path)
    _write(tmp_path, spec.autoattack_path("linf-0.3"), aa | {"model": "other"}, checked=False)
    with pytest.raises(ValueError, match="expected an autoattack result"):
        collect_row(spec, root=tmp_path)


@pytest.mark.parametrize(
    ("rec", "message"),
    [
        ({"protocol": {}, "methods": {}}, "expected a robustness results file .* got schema None"),
        (_results(schema="manifold-defense robustness v9"), "got schema 'manifold-defense robustness v9'"),
        (_results(classifier="mnist-rmd"), "expected a run on classifier clf, got models 'classifier mnist-rmd"),
        (_results(defense="projection-fast"), "expected defense 'undefended' in it, got \\['projection-fast'\\]"),
        (_results(quick=True), "a --quick smoke run is no leaderboard figure"),
        (_results(data="my_data.py:data"), "expected the first test points of MNIST"),
    ],
)
def test_bad_results_are_refused(tmp_path: Path, rec: dict[str, Any], message: str) -> None:
    _write(tmp_path, "res.json", rec, checked=False)
    with pytest.raises(ValueError, match=message):
        collect_row(_spec(), root=tmp_path)


def test_unparseable_results_and_unknown_rows(tmp_path: Path) -> None:
    (tmp_path / "res.json").write_text("{not json")
    with pytest.raises(ValueError, match="expected a JSON results file"):
        collect_row(_spec(), root=tmp_path)
    with pytest.raises(ValueError, match=r"unknown leaderboard row 'nope'; expected one of \['mnist-classifier'"):
        row_spec("nope")
    with pytest.raises(ValueError, match="unknown leaderboard row 'nope'"):
        lb.select(["mnist-pgd-at", "nope"])
    assert [s.name for s in lb.select(["fast-pgd-at", "mnist-rmd"])] == ["mnist-rmd", "fast-pgd-at"]


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    lb.add_parsers(parser.add_subparsers())
    return parser.parse_args(["leaderboard", *argv])


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from eval.cli import run

    assert run(["leaderboard", "--out", str(tmp_path), "--rows", "nope"]) == 2  # one line on stderr, status 2
    assert "python -m eval leaderboard: error: unknown leaderboard row 'nope'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--rows goes with --out only"):
        lb.main(_parse("--collect", "--rows", "mnist-rmd"))
    with pytest.raises(SystemExit):
        _parse("--collect", "--out", str(tmp_path))  # one mode at a time
    assert lb.main(_parse("--out", str(tmp_path), "--rows", "fast-pgd-at", "--dry-run")) == 0
    assert capsys.readouterr().out.strip() == ""  # every threat of the row is committed: nothing to run
    assert lb.main(_parse("--out", str(tmp_path), "--rows", "diffpure-pgd-at", "--dry-run")) == 0
    assert capsys.readouterr().out.strip() == ""  # every threat committed
    # a finished run of the row in --out whose L2 2 figure is not converged: --convergence-rounds resumes it
    _write(tmp_path, "diffpure-pgd-at/results.json", _results(defense="diffpure"))
    assert lb.main(_parse("--out", str(tmp_path), "--rows", "diffpure-pgd-at", "--dry-run",
                          "--convergence-rounds", "3")) == 0  # fmt: skip
    assert capsys.readouterr().out.strip() == (
        f"manifold-defense robustness --out {tmp_path}/diffpure-pgd-at --defenses diffpure --classifier mnist-pgd-at "
        "--diffpure-t-star 150 --final-eot 20 --majority --no-curves --n 100 --threads 1 --no-progress "
        "--convergence-rounds 3")
    assert not (tmp_path / "fast-pgd-at").exists()


def test_run_missing_skips_what_is_measured(tmp_path: Path) -> None:
    _write(tmp_path, "res.json", _results())
    spec = _spec(autoattack="standard")
    out = tmp_path / "out"
    argv = lb.run_missing([spec], out, root=tmp_path, dry_run=True)
    assert argv[0] == ["robustness", "--out", str(out / "row"), "--defenses", "undefended", "--n", "100",
                       "--threats", "l2-4"]  # fmt: skip
    assert [a[a.index("--norm") + 1 : a.index("--norm") + 4] for a in argv[1:]] == [
        ["linf", "--eps", "0.3"], ["l2", "--eps", "2"], ["l2", "--eps", "4"]]  # fmt: skip
    _write(out, "row/results.json", _results())  # a finished run in --out: not run again, read by collect
    assert lb.run_missing([spec], out, root=tmp_path, dry_run=True)[0][0] == "autoattack"
    row = collect_row(spec, root=tmp_path, extra=out)
    assert row["status"] == "measured" and row["threats"]["l2-4"]["source"] == str(out / "row" / "results.json")


def test_run_missing_with_a_convergence_ladder(tmp_path: Path) -> None:
    _write(tmp_path, "res.json", _results())
    out, spec = tmp_path / "out", _spec()
    base = ["robustness", "--out", str(out / "row"), "--defenses", "undefended", "--n", "100"]
    assert lb.run_missing([spec], out, root=tmp_path, dry_run=True, rounds=3) == [
        [*base, "--threats", "l2-4", "--convergence-rounds", "3"]]  # fmt: skip
    # a finished run in --out whose L2 2 figure is not converged after one rerun: resumed with the ladder only
    _write(out, "row/results.json", _results())
    assert lb.run_missing([spec], out, root=tmp_path, dry_run=True, rounds=3) == [[*base, "--convergence-rounds", "3"]]
    assert lb.run_missing([spec], out, root=tmp_path, dry_run=True) == []
    rec = _results()
    rec["defenses"]["undefended"]["attacks"]["convergence"]["l2-2"]["ladder"] = [{}, {}, {}]  # three reruns ran
    _write(out, "row/results.json", rec)
    assert lb.run_missing([spec], out, root=tmp_path, dry_run=True, rounds=3) == []
    assert lb.run_missing([spec], out, root=tmp_path, dry_run=True, rounds=4)[0][-1] == "4"
    with pytest.raises(ValueError, match="--convergence-rounds goes with --out only"):
        lb.main(_parse("--collect", "--convergence-rounds", "2"))
    with pytest.raises(ValueError, match="expected --convergence-rounds >= 1, got 0"):
        lb.main(_parse("--out", str(out), "--convergence-rounds", "0"))


def test_plot_writes_a_png(tmp_path: Path) -> None:
    _write(tmp_path, "res.json", _results())
    board = {"n_target": 100, "rows": [collect_row(_spec(), root=tmp_path)]}
    lb.plot(board, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _git_history() -> bool:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0


@pytest.mark.skipif(not _git_history(), reason="the weights' commits need the git history")
def test_collect_reproduces_the_committed_leaderboard() -> None:
    assert lb.collect() == lb.load(), "run python -m eval leaderboard --collect"


def test_committed_leaderboard_is_checked_and_published() -> None:
    board = lb.load()
    assert [r["name"] for r in board["rows"]] == [s.name for s in lb.ROWS]
    for page in lb.PAGES:
        assert stale_blocks(page.read_text()) == [], f"{page.name}: run python -m eval leaderboard --collect"
    assert "<!-- table:leaderboard -->" in (ROOT / "README.md").read_text()


@pytest.mark.skipif(not _git_history(), reason="the quotes are checked against the git history")
def test_history_quotes_stand_in_their_commit() -> None:
    for _, commit, path, quote in QUOTES:
        shown = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=ROOT, capture_output=True, text=True)
        assert shown.returncode == 0 and quote in shown.stdout, f"{quote!r} is not in {commit}:{path}"


@pytest.mark.skipif(not _git_history(), reason="which weights a file was measured on is read from the git history")
def test_a_run_on_earlier_weights_says_so() -> None:
    """robust_manifold_projection_rmd.json was committed before the shipped mnist-gan and mnist-rmd weights."""
    spec = _spec(defense="projection-fast", classifier="mnist-rmd", weights=("mnist-rmd", "mnist-gan"),
                 args=("--defenses", "projection-fast", "--classifier", "mnist-rmd"),
                 sources=(Source("docs/figures/robust_manifold_projection_rmd.json", ("l2-2", "l2-4")),))  # fmt: skip
    row = collect_row(spec)
    assert [row["threats"][t].get("on_current_weights") for t in ("l2-2", "l2-4")] == [False, False]
    assert row["notes"][:2] == ["measured at n 20, not 100",
                                "measured on other weights than the shipped ones (an earlier prior or classifier)"]  # fmt: skip
    assert [w["name"] for w in row["weights"]] == ["mnist-rmd", "mnist-gan"] and len(row["weights"][0]["commit"]) == 40


def test_diffpure_rows_use_the_t_star_the_committed_sweep_chose() -> None:
    from eval.leaderboard_rows import DIFFPURE_T_STAR, ROWS

    sweep = json.loads((ROOT / "docs/figures/diffpure_tstar.json").read_text())
    assert sweep["chosen"] == DIFFPURE_T_STAR
    for spec in ROWS:
        if spec.purifier == "diffpure":
            at = spec.args.index("--diffpure-t-star")
            assert spec.args[at + 1] == str(sweep["chosen"]), spec.name


def test_a_source_run_with_other_defining_settings_is_named_in_the_notes() -> None:
    from eval.leaderboard_rows import _notes, other_settings, row_spec

    spec = row_spec("diffpure-pgd-at")
    t = spec.args[spec.args.index("--diffpure-t-star") + 1]
    same = f"manifold-defense robustness --out x --defenses diffpure --classifier mnist-pgd-at --diffpure-t-star={t}"
    assert other_settings(spec, same) == []
    # another t* and the default classifier (mnist-classifier) are another defense
    other = "python -m eval robustness --out x --defenses diffpure --diffpure-t-star 999"
    assert other_settings(spec, other) == ["--classifier: run mnist-classifier, row mnist-pgd-at",
                                           f"--diffpure-t-star: run 999, row {t}"]  # fmt: skip
    cell = {"status": "measured", "n": 100, "schema": 2, "other_settings": other_settings(spec, other)}
    notes = _notes({"linf-0.3": cell})
    assert any("--diffpure-t-star: run 999" in n and "until rerun" in n for n in notes)


def test_a_results_path_added_again_after_new_weights_counts_as_current(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import eval.leaderboard_rows as rows

    def git(*args: str) -> str:
        out = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                             capture_output=True, text=True, check=True)  # fmt: skip
        return out.stdout.strip()

    git("init", "-q")
    (tmp_path / "w.bin").write_text("old weights")
    (tmp_path / "r.json").write_text("{}")
    git("add", "-A")
    git("commit", "-qm", "weights and a run on them")
    git("rm", "-q", "r.json")
    (tmp_path / "w.bin").write_text("new weights")
    git("add", "-A")
    git("commit", "-qm", "new weights; the old run leaves")
    weights = git("rev-parse", "HEAD")
    monkeypatch.setattr(rows, "ROOT", tmp_path)
    (tmp_path / "r.json").write_text('{"rerun": 1}')
    assert rows._on_weights("r.json", [weights]) is True  # not committed yet: the working tree's weights
    git("add", "-A")
    git("commit", "-qm", "the rerun")
    assert rows._on_weights("r.json", [weights]) is True
    first = git("rev-list", "--max-parents=0", "HEAD")
    assert rows._on_weights("r.json", [first]) is True
    (tmp_path / "w.bin").write_text("newer weights")
    git("commit", "-qam", "newer weights")
    assert rows._on_weights("r.json", [git("rev-parse", "HEAD")]) is False
    (tmp_path / "r.json").write_text('{"rerun": 2}')  # rerun in place and committed: the newer weights'
    git("commit", "-qam", "rerun in place")
    assert rows._on_weights("r.json", [weights, git("rev-parse", "HEAD~1")]) is True
