"""Tests of ``python -m eval cs``: the ratio's interpolation, input validation, and a tiny end-to-end run."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

import eval.cs as cs
from eval.cli import main as cli_main
from eval.cs_core import (
    METHODS,
    CSProtocol,
    check_methods,
    measurements_to_reach,
    quick_protocol,
)
from eval.run_folder import read_record

PNGS = ("mse_vs_m.png", "grid_cs.png", "grid_inpainting.png", "grid_superres.png", "grid_nonlinear.png")


def _tiny(**overrides: Any) -> CSProtocol:
    """A protocol small enough for a unit test (seconds), keeping every code path."""
    settings: dict[str, Any] = dict(
        n_images=2,
        n_val=2,
        m_grid=(25, 50),
        csgm_steps=4,
        csgm_restarts=2,
        gan_steps=4,
        gan_restarts=2,
        gan_prune_after=1,
        dip_restarts=2,
        batch=2,
        lasso_alphas=(0.01, 0.1),
        lasso_max_iter=200,
        dip_ngf=4,
        dip_iters=3,
        sparse_weights=(0.1,),
        sparse_steps=3,
        grid_images=2,
        grid_1bit_m=16,
    )
    settings.update(overrides)
    return quick_protocol(**settings)


# ------------------------------------------------------------------------------ interpolation of the ratio


def test_measurements_to_reach_interpolates_in_log_m() -> None:
    # Error falls linearly in log m from 0.04 at m=100 to 0.02 at m=400: 0.03 is reached at m=200 exactly.
    m = [25, 100, 400, 750]
    assert measurements_to_reach(m, [0.08, 0.04, 0.02, 0.01], 0.03) == pytest.approx(200.0)
    # A quarter of the way (in error) between grid points -> a quarter of the way in log m.
    expected = math.exp(math.log(100) + 0.25 * (math.log(400) - math.log(100)))
    assert measurements_to_reach(m, [0.08, 0.04, 0.02, 0.01], 0.035) == pytest.approx(expected)


def test_measurements_to_reach_exact_grid_point_and_first_point() -> None:
    m = [10, 50, 200]
    assert measurements_to_reach(m, [0.1, 0.05, 0.01], 0.05) == pytest.approx(50.0)
    assert measurements_to_reach(m, [0.001, 0.0005, 0.0001], 0.05) == 10.0  # reached already: upper bound


def test_measurements_to_reach_never_reached_and_non_monotone() -> None:
    assert measurements_to_reach([25, 50, 750], [0.09, 0.08, 0.03], 0.02) is None
    assert measurements_to_reach([25, 50], [math.nan, math.inf], 0.02) is None
    # A bump: the first crossing counts (between 100 and 200), not the later one.
    got = measurements_to_reach([50, 100, 200, 400], [0.05, 0.03, 0.01, 0.02], 0.02)
    assert got == pytest.approx(math.sqrt(100 * 200))


def test_measurements_to_reach_rejects_bad_grids() -> None:
    with pytest.raises(ValueError, match="equally long"):
        measurements_to_reach([1, 2], [0.1], 0.05)
    with pytest.raises(ValueError, match="strictly increasing positive m"):
        measurements_to_reach([50, 25], [0.1, 0.05], 0.05)


def _results(mse: dict[str, list[float]], m: list[int]) -> dict[str, Any]:
    return {"m": m, "methods": {k: {"mse": v} for k, v in mse.items()}}


def test_lasso_ratio_uses_better_csgm_and_lasso_envelope() -> None:
    m = [25, 50, 100, 200, 400]
    res = _results(
        {
            "csgm-vae": [0.05, 0.03, 0.02, 0.02, 0.02],
            "csgm-gan": [0.04, 0.02, 0.01, 0.01, 0.01],
            "lasso-pixel": [0.09, 0.08, 0.06, 0.04, 0.01],
            "lasso-dct": [0.09, 0.08, 0.05, 0.02, 0.015],
        },
        m,
    )
    ratio, info = cs.lasso_ratio(res)
    assert info["csgm_reference"] == "csgm-gan"
    assert info["csgm_mse_at_m50"] == 0.02
    assert info["lasso_m_needed"] == pytest.approx(200.0)  # lasso-dct reaches 0.02 at m=200
    assert ratio == pytest.approx(4.0)
    assert info["best_lasso_per_m"]["400"] == "lasso-pixel"


def test_lasso_ratio_never_reached_and_missing_inputs() -> None:
    m = [25, 50, 750]
    ratio, info = cs.lasso_ratio(
        _results({"csgm-gan": [0.03, 0.01, 0.005], "lasso-wavelet": [0.1, 0.09, 0.02]}, m)
    )
    assert ratio is None
    assert info["never_reached_flag"] == ">750"
    ratio, info = cs.lasso_ratio(_results({"csgm-gan": [0.03, 0.01]}, [25, 100]))
    assert ratio is None and info["csgm_reference"] is None and "m = 50" in info["reason"]


# ------------------------------------------------------------------------------------------ validation


def test_check_methods_orders_and_rejects_unknown() -> None:
    assert check_methods(["dip", "csgm-vae"]) == ("csgm-vae", "dip")
    with pytest.raises(
        ValueError, match=r"unknown method\(s\) \['bogus'\]: expected names from .*sparse-gen"
    ):
        check_methods(["csgm-vae", "bogus"])


def test_protocol_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="n_images: expected an int >= 1, got 0"):
        CSProtocol(n_images=0)
    with pytest.raises(ValueError, match="expected every m to be an int >= 1, got 0"):
        CSProtocol(m_grid=(0, 25))
    with pytest.raises(ValueError, match="strictly increasing, distinct"):
        CSProtocol(m_grid=(50, 50))
    with pytest.raises(ValueError, match="sparse_bases"):
        CSProtocol(sparse_bases=("wavelet",))
    with pytest.raises(ValueError, match="dip_n: expected None or an int >= 1, got 0"):
        CSProtocol(dip_n=0)
    with pytest.raises(ValueError, match=r"gan_prune_after: expected None or an int in \[0, gan_steps=500\)"):
        CSProtocol(gan_prune_after=500)
    with pytest.raises(ValueError, match="sparse_generators"):
        CSProtocol(sparse_generators=("mnist-encoder",))
    with pytest.raises(ValueError, match="dip_aggregate"):
        CSProtocol(dip_aggregate="median")


def test_csgm_configs_per_generator() -> None:
    proto = CSProtocol()
    vae, gan = proto.csgm_config("csgm-vae"), proto.csgm_config("csgm-gan")
    assert (vae.lr, vae.steps, vae.restarts, vae.z_prior_weight, vae.prune_after) == (
        0.01,
        1000,
        10,
        0.1,
        None,
    )
    assert (gan.lr, gan.steps, gan.restarts, gan.prune_after, gan.prune_keep) == (0.03, 500, 20, 50, 1)
    assert CSProtocol(gan_restarts=1).csgm_config("csgm-gan").prune_after is None
    assert CSProtocol(n_images=5, dip_n=3).dip_images == 3 and CSProtocol(n_images=2, dip_n=3).dip_images == 2


def test_figure_checks() -> None:
    m = [10, 50, 200, 750]
    res = _results(
        {
            "csgm-vae": [0.05, 0.02, 0.015, 0.015],
            "csgm-gan": [0.06, 0.01, 0.004, 0.003],
            "lasso-dct": [0.09, 0.07, 0.03, 0.001],
            "dip": [0.08, 0.03, 0.001, 0.0001],
            "sparse-gen": [0.054, 0.011, 0.004, 0.0012],
        },
        m,
    )
    res["lasso_over_csgm_measurements_at_m50"] = 6.0
    checks = cs.figure_checks(res)
    assert checks["ratio_at_least_5"] is True
    sg = checks["sparse_gen_within_10pct"]
    assert sg["sparse_gen_over_min_csgm_lasso"] == {"10": 1.08, "50": 1.1, "200": 1.0, "750": 1.2}
    assert sg["ok"] is False  # 750: 0.0012 vs the Lasso's 0.001
    dp = checks["dip_beats_lasso_m_le_200"]
    assert dp == {"ok": True, "dip_over_best_lasso": {"10": 0.889, "50": 0.429, "200": 0.033}}
    del res["methods"]["dip"]
    res["lasso_over_csgm_measurements_at_m50"] = None
    checks = cs.figure_checks(res)
    assert checks["dip_beats_lasso_m_le_200"] is None and checks["ratio_at_least_5"] is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--methods", "csgm-vae", "lasso"], "invalid choice: 'lasso'.*csgm-vae.*sparse-gen"),
        (["--m", "0", "25"], "--m: expected a positive int .>= 1., got 0"),
        (["--m", "-5"], "--m: expected a positive int"),
        (["--n", "0"], "--n: expected a positive int .>= 1., got 0"),
        (["--n", "two"], "--n: expected a positive int, got 'two'"),
    ],
)
def test_cli_rejects_bad_input(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli_main(["cs", "--out", str(tmp_path), *argv])
    assert exc.value.code == 2
    assert __import__("re").search(message, capsys.readouterr().err)


def test_cli_rejects_duplicate_m(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="distinct m values"):
        cli_main(["cs", "--out", str(tmp_path), "--quick", "--m", "25", "25", "--no-grids"])


# ------------------------------------------------------------------------------------------ end to end


def _check_schema(results: dict[str, Any], m: list[int], methods: tuple[str, ...]) -> None:
    assert set(results) == {"protocol", "m", "methods", "lasso_over_csgm_measurements_at_m50", "checks"}
    assert results["m"] == m
    assert list(results["methods"]) == list(methods)
    for name, res in results["methods"].items():
        assert set(res) == {"mse", "mse_std", "seconds_per_image"}, name
        for values in res.values():
            assert len(values) == len(m)
            assert all(isinstance(v, float) and math.isfinite(v) and v >= 0 for v in values)
    ratio = results["lasso_over_csgm_measurements_at_m50"]
    assert ratio is None or (isinstance(ratio, float) and ratio > 0)


def test_quick_cli_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The CLI's --quick path with the quick protocol shrunk further (steps, images) so it runs in seconds.
    monkeypatch.setattr(cs, "quick_protocol", lambda **kw: _tiny(**kw))
    out = tmp_path / "cs"
    code = cli_main(["cs", "--quick", "--out", str(out), "--n", "2", "--m", "50", "25", "--threads", "1"])
    assert code == 0
    stdout = capsys.readouterr().out
    assert "QUICK protocol" in stdout and "csgm_steps: 300 (full 1000)" in stdout
    results = read_record(out / "results.json")  # verified against its SHA-256, which it drops
    _check_schema(results, [25, 50], METHODS)
    proto = results["protocol"]
    assert proto["quick"] is True and proto["n_images"] == 2 and proto["seed"] == 0
    assert proto["quick_reductions"]["csgm_restarts"] == {"full": 10, "quick": 3}
    assert proto["seeds"]["A_per_m"] == {"25": 25, "50": 50}
    for basis in ("pixel", "dct", "wavelet"):
        for m in ("25", "50"):
            assert proto["selected"]["lasso_alpha"][basis][m]["alpha"] in (0.01, 0.1)
    choice = proto["selected"]["sparse_gen"]["50"]
    assert choice["basis"] in ("pixel", "off") and choice["generator"] in ("mnist-vae", "mnist-gan")
    # The choice is the validation minimum over every candidate, "off" (the CSGM start) included.
    best_key = min(choice["val_mse"], key=choice["val_mse"].get)
    assert best_key.split(":")[:2] == [choice["generator"], choice["basis"]]
    assert set(results["checks"]) == {
        "ratio_at_least_5",
        "sparse_gen_within_10pct",
        "dip_beats_lasso_m_le_200",
    }
    # The ratio agrees with its definition applied to the written curves.
    ref = proto["ratio"]["csgm_reference"]
    meth = results["methods"]
    assert meth[ref]["mse"][1] == min(meth["csgm-vae"]["mse"][1], meth["csgm-gan"]["mse"][1])
    md = (out / "results.md").read_text()
    assert "QUICK protocol" in md and "| 25 |" in md and "lasso-wavelet" in md
    for name in PNGS:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, name


def test_run_benchmark_dip_n_caps_dip_images(tmp_path: Path) -> None:
    protocol = _tiny(n_images=3, m_grid=(10,), dip_n=1)
    results = cs.run_benchmark(protocol, tmp_path, ["dip", "lasso-dct"], "cpu", grids=False, progress=False)
    assert results["protocol"]["images_per_method"] == {"lasso-dct": 3, "dip": 1}
    assert results["protocol"]["dip_n"] == 1 and 0 < results["methods"]["dip"]["mse"][0] < 1


def test_run_benchmark_subset_without_grids(tmp_path: Path) -> None:
    protocol = _tiny(n_images=3, m_grid=(10,))
    results = cs.run_benchmark(
        protocol, tmp_path, ["lasso-dct", "csgm-vae"], "cpu", grids=False, progress=False
    )
    _check_schema(results, [10], ("csgm-vae", "lasso-dct"))
    from manifold_defense import zoo

    assert results["protocol"]["weights_sha256"] == {"mnist-vae": zoo.record("mnist-vae")["sha256"]}
    assert results["lasso_over_csgm_measurements_at_m50"] is None  # m = 50 not run
    assert not (tmp_path / "grid_cs.png").exists() and (tmp_path / "mse_vs_m.png").exists()
    # CSGM with a few steps from random latents is far from the truth but finite; Lasso is clipped to [0, 1].
    assert 0 < results["methods"]["lasso-dct"]["mse"][0] < 1
    with pytest.raises(ValueError, match="unknown method"):
        cs.run_benchmark(protocol, tmp_path, ["csgm"], "cpu", grids=False, progress=False)


def test_sparse_gen_config_fista_with_range_for_pixels() -> None:
    from eval.cs_core import _sparse_config

    protocol = _tiny()
    pixel = _sparse_config(protocol, "mnist-gan", "pixel", 0.002)
    dct = _sparse_config(protocol, "mnist-vae", "dct", 0.1)
    assert (
        pixel.deviation == "pixel" and pixel.deviation_range == (0.0, 1.0) and pixel.deviation_weight == 0.002
    )
    assert dct.deviation == "dct" and dct.deviation_range is None
    assert pixel.restarts == 1 and pixel.steps == protocol.sparse_steps
    assert pixel.z_prior_weight == protocol.z_prior_gan and dct.z_prior_weight == protocol.z_prior_vae
    assert CSProtocol().sparse_weights == quick_protocol().sparse_weights == (0.002, 0.01, 0.1, 1.0)


def test_run_benchmark_resumes_and_merges_split_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    protocol = _tiny(n_images=2, m_grid=(10, 25))
    whole = cs.run_benchmark(
        protocol, tmp_path / "whole", ["lasso-dct", "sparse-gen"], "cpu", grids=False, progress=False
    )
    split = tmp_path / "split"
    # Two runs of disjoint methods into one folder (as two processes would), then a run of both that recomputes
    # nothing: every recovery function is replaced by one that fails.
    cs.run_benchmark(protocol, split, ["lasso-dct"], "cpu", grids=False, progress=False)
    cs.run_benchmark(protocol, split, ["sparse-gen"], "cpu", grids=False, progress=False)
    assert sorted(p.name for p in (split / "cache").iterdir()) == [
        "lasso-dct-m10.pt", "lasso-dct-m25.pt", "sparse-gen-m10.pt", "sparse-gen-m25.pt",
    ]  # fmt: skip

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a cached result was recomputed")

    for name in ("recover_lasso", "recover_sparse_gen", "recover_csgm", "select_sparse_gen"):
        monkeypatch.setattr(cs, name, fail)
    merged = cs.run_benchmark(
        protocol, split, ["lasso-dct", "sparse-gen"], "cpu", grids=False, progress=False
    )
    for method in ("lasso-dct", "sparse-gen"):
        assert merged["methods"][method]["mse"] == pytest.approx(whole["methods"][method]["mse"], rel=1e-9)
    assert merged["protocol"]["selected"] == whole["protocol"]["selected"]
    assert sorted(merged["protocol"]["reused_from_cache"]) == [
        "lasso-dct-m10", "lasso-dct-m25", "sparse-gen-m10", "sparse-gen-m25",
    ]  # fmt: skip
    assert whole["protocol"]["reused_from_cache"] == []
    # A folder holding another protocol's results is refused, never mixed in.
    with pytest.raises(ValueError, match="another run"):
        cs.run_benchmark(_tiny(n_images=2, m_grid=(10,), seed=1), split, ["lasso-dct"], "cpu", grids=False,
                         progress=False)  # fmt: skip
