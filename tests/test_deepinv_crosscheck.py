"""``python -m eval deepinv-crosscheck`` (eval/deepinv_crosscheck.py): the summary's spreads and verdicts, its tables,
a tiny end-to-end run with resume, and the deepinv adapter driving the CS benchmark's own methods. The parts that
run deepinv are skipped where it is not installed."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import eval.deepinv_crosscheck as dx
from eval.cli import main as cli_main
from eval.run_folder import read_record

try:
    import deepinv as dinv
except ImportError:  # the optional extra: pip install 'manifold-defense[deepinv]'
    dinv = None

needs_deepinv = pytest.mark.skipif(dinv is None, reason="deepinv not installed (the optional deepinv extra)")


def _runs(mse: list[list[float]], seconds: list[float]) -> list[dict[str, Any]]:
    return [{"mse": torch.tensor(m, dtype=torch.float64), "psnr": -10 * torch.tensor(m).log10(), "seconds": s}
            for m, s in zip(mse, seconds, strict=True)]  # fmt: skip


def test_summarize_spreads_and_verdicts() -> None:
    per_seed = {
        "csgm-ours-shared": _runs([[0.01, 0.03], [0.02, 0.05]], [1.0, 1.0]),  # 2 seeds x 2 images
        "csgm-deepinv-shared": _runs([[0.012, 0.031], [0.02, 0.049]], [4.0, 6.0]),
        "dip-ours": _runs([[0.02, 0.02], [0.02, 0.02]], [2.0, 2.0]),
        "dip-deepinv": _runs([[0.05, 0.05], [0.06, 0.06]], [1.0, 1.0]),
    }
    out = dx.summarize(per_seed)
    ours = out["rows"]["csgm-ours-shared"]
    assert ours["mse_per_seed"] == pytest.approx([0.02, 0.035])
    assert ours["mse"] == pytest.approx(0.0275) and ours["seed_spread"] == pytest.approx(0.0075)
    # restart spread: per image, the std over seeds (0.005 and 0.01), averaged
    assert ours["restart_spread"] == pytest.approx(0.0075)
    assert ours["seconds_per_image"] == pytest.approx(0.5) and ours["library"] == "manifold-defense"
    assert out["rows"]["csgm-deepinv-shared"]["library"] == "deepinv"
    pairs = {tuple(p["rows"]): p for p in out["pairs"]}
    assert set(pairs) == {("csgm-ours-shared", "csgm-deepinv-shared"), ("dip-ours", "dip-deepinv")}
    shared = pairs[("csgm-ours-shared", "csgm-deepinv-shared")]
    assert shared["agree"] and shared["mse_difference"] == pytest.approx(0.0275 - 0.0280)
    assert shared["faster"] == "csgm-ours-shared" and shared["speedup"] == pytest.approx(5.0)
    dip = pairs[("dip-ours", "dip-deepinv")]
    assert not dip["agree"] and dip["lower_mse"] == "dip-ours" and dip["faster"] == "dip-deepinv"
    assert dip["larger_restart_spread"] == pytest.approx(0.005) and dip["speedup"] == pytest.approx(2.0)


def test_summarize_one_seed_has_zero_spread() -> None:
    row = dx.summarize({"dip-ours": _runs([[0.01, 0.02]], [1.0])})["rows"]["dip-ours"]
    assert row["restart_spread"] == 0 and row["seed_spread"] == 0 and row["seeds"] == 1


def _record() -> dict[str, Any]:
    per_seed = {"csgm-ours-shared": _runs([[0.01], [0.02]], [1.0, 1.0]),
                "csgm-deepinv-shared": _runs([[0.01], [0.02]], [3.0, 3.0])}  # fmt: skip
    return {"settings": {"n": 1, "m": 50, "noise_std": 0.1, "seeds": 2}, "device": "cpu", "threads": 1,
            "deepinv": "0.5.0", "load_average_before": [1.0], "load_average_after": [1.5], **dx.summarize(per_seed)}  # fmt: skip


def test_markdown_table() -> None:
    md = dx.markdown_table(_record())
    assert "| csgm-ours-shared | manifold-defense | 0.0150 | " in md
    assert "| csgm-ours-shared vs csgm-deepinv-shared: CSGM, shared settings" in md
    assert (
        "| yes | csgm-ours-shared | csgm-ours-shared (3.0x) |" in md
        and "m = 50" in md
        and "load average 1.0" in md
    )


def test_docs_tables_render_records_or_say_what_to_run(tmp_path: Path) -> None:
    missing = dx._docs_table(tmp_path / "absent.json", dx.markdown_table, "manifold-defense x")
    assert (
        missing()
        == "Not measured yet: `manifold-defense x`, then copy its JSON to `docs/figures/absent.json`."
    )
    from eval.run_folder import write_record

    path = tmp_path / "rec.json"
    write_record(path, _record())
    assert dx._docs_table(path, dx.markdown_table, "")() == dx.markdown_table(read_record(path))
    assert set(dx.RENDERERS) <= set(__import__("eval.docs_tables", fromlist=["TABLES"]).TABLES)


def test_cs_diffusion_table() -> None:
    results: dict[str, Any] = {
        "m": [50, 200],
        "methods": {
            "csgm-gan": {"mse": [0.02, 0.004], "seconds_per_image": [1.5, 1.4]},
            "lasso-dct": {"mse": [0.07, 0.03], "seconds_per_image": [0.1, 0.1]},
            "lasso-wavelet": {"mse": [0.08, 0.02], "seconds_per_image": [0.2, 0.2]},
            "diffpir-ddpm": {"mse": [0.04, 0.0005], "seconds_per_image": [3.0, 3.1]},
        },
        "protocol": {
            "n_images": 100,
            "n_val": 50,
            "device": "cpu",
            "threads": 1,
            "wall_seconds": 10.0,
            "command": "python -m eval cs",
            "diffpir": {"samples": 4},
            "selected": {"diffpir": {"50": {"aggregate": "mean"}, "200": {"aggregate": "best"}}},
        },
    }
    md = dx.cs_diffusion_table(results)
    assert "| 50 | 0.0200 (1.50) | 0.0700 (0.10, dct) | 0.0400 (3.00, mean of 4) | 2.00x |" in md
    assert "| 200 | 0.0040 (1.40) | 0.0200 (0.20, wavelet) | 0.0005 (3.10, best of 4) | 0.12x |" in md
    assert "10 s in all, the zoo's weights at the commit that added this file;" in md
    results["protocol"]["weights_sha256"] = {"mnist-gan": "ab" * 32, "mnist-ddpm": "cd" * 32}
    assert "10 s in all, weights `mnist-ddpm` cdcdcdcdcdcd, `mnist-gan` abababababab;" in dx.cs_diffusion_table(results)
    del results["methods"]["diffpir-ddpm"]
    with pytest.raises(ValueError, match="with diffpir-ddpm"):
        dx.cs_diffusion_table(results)


def test_cli_refuses_bad_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from eval.cli import run

    assert run(["deepinv-crosscheck", "--out", str(tmp_path / "x"), "--noise-std", "nan"]) == 2
    assert "expected --noise-std as a finite float > 0, got nan" in capsys.readouterr().err
    with pytest.raises(ValueError, match="expected methods from"):
        dx.run_crosscheck(tmp_path / "y", {}, ["bogus"], torch.device("cpu"))


@needs_deepinv
def test_tiny_run_shared_csgm_agrees_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "dx"
    argv = ["deepinv-crosscheck", "--out", str(out), "--n", "2", "--m", "20", "--seeds", "2", "--csgm-steps", "5",
            "--dip-iters", "3", "--threads", "1", "--methods", "csgm-ours-shared", "csgm-deepinv-shared",
            "dip-ours-single", "dip-deepinv"]  # fmt: skip
    assert cli_main(argv) == 0
    rec = read_record(out / "crosscheck.json")
    rows = rec["rows"]
    assert set(rows) == {"csgm-ours-shared", "csgm-deepinv-shared", "dip-ours-single", "dip-deepinv"}
    # the same z0, lr, steps and loss: the two CSGM implementations take the same path
    for a, b in zip(
        rows["csgm-ours-shared"]["mse_per_seed"], rows["csgm-deepinv-shared"]["mse_per_seed"], strict=True
    ):
        assert a == pytest.approx(b, rel=1e-3)
    assert rows["csgm-ours-shared"]["mse_per_seed"][0] != rows["csgm-ours-shared"]["mse_per_seed"][1]
    assert all(r["images"] == 2 and r["seeds"] == 2 and 0 < r["mse"] < 1 for r in rows.values())
    assert all(math.isfinite(r["psnr"]) and r["psnr"] > 5 for r in rows.values())
    assert rec["deepinv"] == dinv.__version__ and "CompressedSensing(m=20" in rec["measurement"]
    assert (out / "crosscheck.md").read_text().startswith("| row | library |")
    # a rerun reads every (row, seed) from the cache: nothing is recomputed
    monkeypatch.setattr(dx, "_run", lambda *a, **k: pytest.fail("recomputed a cached row"))
    assert cli_main(argv) == 0
    assert read_record(out / "crosscheck.json")["rows"]["dip-deepinv"] == rows["dip-deepinv"]


class TinyGenerator(nn.Module):
    """z (B, 4) -> images (B, 1, 28, 28) in [0, 1]."""

    latent_dim = 4

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 784), nn.Sigmoid())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).view(-1, 1, 28, 28)


@needs_deepinv
def test_adapter_drives_the_cs_benchmarks_methods_like_the_native_matrix() -> None:
    # The CS benchmark's own recovery functions on from_deepinv(CompressedSensing) give what they give on the
    # library's GaussianMatrix holding the same matrix.
    from eval.cs_core import (
        noisy_measurements,
        operator_matrix,
        quick_protocol,
        recover_csgm,
        recover_dip,
        recover_lasso,
        recover_sparse_gen,
    )
    from manifold_defense.inversion import GaussianMatrix, InversionConfig
    from manifold_defense.inversion.deepinv_adapter import DeepinvLinearOperator

    physics = dinv.physics.CompressedSensing(m=40, img_size=(1, 28, 28), rng=torch.Generator().manual_seed(0))
    ours = DeepinvLinearOperator(physics, (1, 28, 28))
    native = GaussianMatrix(40, (1, 28, 28), scaling="normalized")
    native.A = physics._A.clone()
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    y = noisy_measurements(ours, x, 0.01, seed=3)
    assert torch.allclose(y, noisy_measurements(native, x, 0.01, seed=3), atol=1e-5)
    G, cfg = TinyGenerator(), InversionConfig(steps=10, restarts=2, lr=0.05)
    a, b = (recover_csgm(G, y, op, cfg, [0, 1], batch=2) for op in (ours, native))
    assert torch.allclose(a.x_hat, b.x_hat, atol=1e-4)
    protocol = quick_protocol(n_val=2, lasso_alphas=(0.01,), lasso_max_iter=50, dip_ngf=4, dip_iters=3,
                              dip_restarts=1, sparse_steps=3)  # fmt: skip
    assert np.allclose(operator_matrix(ours), native.numpy(), atol=1e-6)
    la = recover_lasso(operator_matrix(ours), y, "dct", y, x, protocol)
    lb = recover_lasso(native.numpy(), y, "dct", y, x, protocol)
    assert torch.allclose(la.x_hat, lb.x_hat, atol=1e-4)
    da, db = (recover_dip(y, op, protocol, 5e-3, [0, 1], torch.device("cpu")) for op in (ours, native))
    assert torch.allclose(da.x_hat, db.x_hat, atol=1e-3)
    sa, sb = (recover_sparse_gen(G, y, op, a, "pixel", 0.01, protocol, [0, 1]) for op in (ours, native))
    assert torch.allclose(sa.x_hat, sb.x_hat, atol=1e-3)
