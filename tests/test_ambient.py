"""AmbientGAN (Bora, Price, Dimakis 2018): measurement statistics, seeded fresh draws, ambient training, exact resume,
baselines in [0, 1], bad input refused, the train command and the quick grid."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from manifold_defense import ambient
from manifold_defense.ambient import (
    BlockPatch,
    BlockPixels,
    ConvolveNoise,
    GaussianProjection,
    KeepPatch,
    MeasurementDiscriminator,
    build_measurement,
    measure_dataset,
    train_ambient,
    training_data,
)
from manifold_defense.models import Critic, Encoder, Generator
from manifold_defense.training import GANTrainConfig, train_gan

ALL = [BlockPixels(0.8), ConvolveNoise(0.2), BlockPatch(14), KeepPatch(14), GaussianProjection(2)]
IDS = [f.name for f in ALL]


def _squares(n: int = 128) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(n, 1, 28, 28)
    for i, (r, c) in enumerate(torch.randint(0, 20, (n, 2), generator=g).tolist()):
        x[i, :, r : r + 8, c : c + 8] = 1.0
    return x


def _positive(n: int = 64) -> torch.Tensor:
    """Images with no zero pixel, so a zero in the measurement is a dropped pixel."""
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 0.9 + 0.05


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_block_pixels_drops_a_fraction_p_and_rescales_the_kept_pixels() -> None:
    x = _positive(64)
    for p in (0.5, 0.9):
        f = BlockPixels(p)
        y, theta = f.measure(x, _seeded(0))
        dropped = float((y == 0).float().mean())
        n = x.numel()
        assert abs(dropped - p) < 4 * math.sqrt(p * (1 - p) / n), (p, dropped)
        kept = theta.bool()
        torch.testing.assert_close(y[kept], x[kept] / (1 - p))
        assert float(y.max()) > 1.0  # rescaled values exceed 1: the discriminator sees them so
        torch.testing.assert_close(f.as_image(y), x * theta)  # ignore baseline: the rescale undone
    # p = 0 measures nothing away
    torch.testing.assert_close(BlockPixels(0.0)(x, _seeded(0)), x)


def test_convolve_noise_has_the_stated_sigma_and_a_normalized_blur() -> None:
    x = _positive(64)
    f = ConvolveNoise(0.2)
    y, theta = f.measure(x, _seeded(0))
    noise = y - f.blur(x)
    torch.testing.assert_close(noise, theta)
    assert abs(float(noise.std()) - 0.2) < 0.005 and abs(float(noise.mean())) < 0.005
    assert f.kernel.shape == (5, 5) and abs(float(f.kernel.sum()) - 1.0) < 1e-6
    flat = torch.full((1, 1, 28, 28), 0.3)
    torch.testing.assert_close(ConvolveNoise(0.0)(flat)[..., 2:-2, 2:-2], flat[..., 2:-2, 2:-2])


def test_patches_zero_or_keep_one_uniformly_placed_square() -> None:
    ones = torch.ones(400, 1, 28, 28)
    for f, zeros in ((BlockPatch(14), 196), (KeepPatch(14), 784 - 196)):
        y = f(ones, _seeded(0))
        assert ((y == 0).flatten(1).sum(1) == zeros).all()
        centres = y.eq(0) if zeros == 196 else y.ne(0)
        rows = centres.float().mean(-1).squeeze(1).nonzero()[:, 1]
        assert int(rows.min()) == 0 and int(rows.max()) == 27  # every position can occur, also the edges


def test_gaussian_projection_holds_theta_and_the_projection() -> None:
    x = _positive(8)
    f = GaussianProjection(3)
    y, theta = f.measure(x, _seeded(0))
    assert y.shape == (8, 3, 785) and theta.shape == (8, 3, 784)
    torch.testing.assert_close(y[:, :, :784], theta)
    torch.testing.assert_close(y[:, :, 784], torch.einsum("bmn,bn->bm", theta, x.flatten(1)))
    assert abs(float(theta.std()) - 1.0) < 0.02  # theta ~ N(0, I_n), the paper's


@pytest.mark.parametrize("f", ALL, ids=IDS)
def test_measurement_is_reproducible_under_a_seed_and_fresh_per_call_and_sample(f: nn.Module) -> None:
    x = _positive(6)
    before = x.clone()
    a, b = f(x, _seeded(3)), f(x, _seeded(3))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    g = _seeded(3)
    first, second = f(x, g), f(x, g)
    assert not torch.equal(first, second)  # a fresh theta per call
    same = f(x[:1].expand(6, -1, -1, -1), _seeded(4))
    assert not torch.equal(same[0], same[1])  # and per sample
    torch.testing.assert_close(x, before, rtol=0, atol=0)  # the caller's images are untouched
    # without a generator: the global RNG, seeded by the caller (what train_gan's loop forks and checkpoints)
    torch.manual_seed(7)
    c = f(x)
    torch.manual_seed(7)
    torch.testing.assert_close(f(x), c, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("f", ALL, ids=IDS)
def test_a_cpu_generator_gives_the_same_theta_on_cuda(f: nn.Module) -> None:
    x = _positive(4)
    y_cpu = f(x, _seeded(0))
    y_gpu = f.to("cuda")(x.cuda(), _seeded(0))
    assert y_gpu.device.type == "cuda"
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-4, atol=1e-4)
    f.to("cpu")


def test_measure_dataset_is_seeded_and_matches_the_ambient_training_data() -> None:
    x = _squares(50)
    f = BlockPixels(0.5)
    y, theta = measure_dataset(x, f, seed=1, batch_size=16, return_theta=True)
    torch.testing.assert_close(measure_dataset(x, f, seed=1, batch_size=16), y, rtol=0, atol=0)
    assert not torch.equal(measure_dataset(x, f, seed=2, batch_size=16), y)
    torch.testing.assert_close(training_data(x, f, "ambient", 1, batch_size=16), y, rtol=0, atol=0)
    torch.testing.assert_close(training_data(x, f, "ignore", 1, batch_size=16), x * theta, rtol=0, atol=0)


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    from manifold_defense.data import load_mnist

    return load_mnist("train", limit=40).images


@pytest.mark.parametrize(
    ("f", "kwargs"),
    [
        (BlockPixels(0.5), {}),
        (BlockPixels(0.9), {}),
        (BlockPixels(0.9), {"inpaint": "normalized-convolution"}),
        (BlockPatch(14), {}),
        (KeepPatch(14), {"inpaint": "normalized-convolution"}),
        (ConvolveNoise(0.1), {}),
        (ConvolveNoise(0.2), {"balance": 0.1}),
        (GaussianProjection(20), {}),
    ],
    ids=lambda v: getattr(v, "name", None) or str(v),
)
def test_unmeasure_baselines_return_images_in_the_unit_interval(
    digits: torch.Tensor, f: ambient.RandomMeasurement, kwargs: dict[str, object]
) -> None:
    restored = training_data(digits, f, "unmeasure", 0, **kwargs)  # type: ignore[arg-type]
    assert restored.shape == digits.shape and torch.isfinite(restored).all()
    assert float(restored.min()) >= 0.0 and float(restored.max()) <= 1.0
    if f.image_like and not isinstance(f, KeepPatch):
        # the restoration is closer to the clean digits than the measurements read as images
        ignored = training_data(digits, f, "ignore", 0)
        assert F.mse_loss(restored, digits) < F.mse_loss(ignored, digits)
    if isinstance(f, BlockPixels) and not kwargs:
        _, theta = measure_dataset(digits, f, 0, return_theta=True)
        kept = theta.bool()
        torch.testing.assert_close(restored[kept], digits[kept])  # biharmonic inpainting keeps observed pixels


def _measured_gen_loss(gen: nn.Module, disc: nn.Module, f: nn.Module) -> float:
    z = torch.randn(256, gen.latent_dim, generator=_seeded(5))
    with torch.no_grad():
        return float(F.softplus(-disc(f(gen.eval()(z), _seeded(6)))).mean())


CFG = GANTrainConfig(steps=40, batch_size=32, lr=2e-3, ema_decay=0.9, bn_batches=4, checkpoint_every=20)


class _Spy(nn.Module):
    """A critic that records the share of exactly-zero entries of each batch it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.critic = Critic(width=8)
        self.zero_shares: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.zero_shares.append(float((x == 0).float().mean()))
        return self.critic(x)


def test_ambient_steps_train_the_generator_against_measured_data_only(tmp_path: Path) -> None:
    torch.manual_seed(0)
    f = BlockPixels(0.5)
    data = measure_dataset(_squares(), f, seed=0)
    gen, disc = Generator(latent_dim=8, width=8), _Spy()
    initial = copy.deepcopy(gen)
    hist = train_ambient(gen, disc, data, f, "ambient", CFG, checkpoint_dir=tmp_path, progress=False)
    # the discriminator only ever saw measurements: about half the entries zeroed (the generator's sigmoid
    # outputs are never exactly 0, so an unmeasured fake batch would have none)
    assert len(disc.zero_shares) == 3 * CFG.steps and min(disc.zero_shares) > 0.4
    # against the trained discriminator, the trained generator's measured samples pass far better
    assert _measured_gen_loss(gen, disc, f) < 0.5 * _measured_gen_loss(initial, disc, f)
    assert {"loss_d", "loss_g", "d_real", "d_fake"} <= set(hist[-1])


def test_ambient_resume_equals_the_uninterrupted_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    f = ConvolveNoise(0.2)
    data = measure_dataset(_squares(), f, seed=0)
    start_g, start_d = Generator(latent_dim=8, width=8), Critic(width=8)
    ref_g, ref_d = copy.deepcopy(start_g), copy.deepcopy(start_d)
    ref_hist = train_ambient(ref_g, ref_d, data, f, "ambient", CFG, checkpoint_dir=tmp_path / "ref", progress=False)

    class Interrupt(RuntimeError):
        pass

    original_step = torch.optim.Adam.step
    counter = {"n": 0}

    def flaky_step(self: torch.optim.Adam, *args: object, **kwargs: object) -> object:
        counter["n"] += 1
        if counter["n"] == 2 * 25 + 1:  # dies inside step 26, after the checkpoint of step 20
            raise Interrupt
        return original_step(self, *args, **kwargs)

    g1, d1 = copy.deepcopy(start_g), copy.deepcopy(start_d)
    with monkeypatch.context() as m:
        m.setattr(torch.optim.Adam, "step", flaky_step)
        with pytest.raises(Interrupt):
            train_ambient(g1, d1, data, f, "ambient", CFG, checkpoint_dir=tmp_path / "run", progress=False)
    g2, d2 = Generator(latent_dim=8, width=8), Critic(width=8)
    hist = train_ambient(g2, d2, data, f, "ambient", CFG, checkpoint_dir=tmp_path / "run", progress=False)
    torch.testing.assert_close(g2.state_dict(), ref_g.state_dict(), rtol=0, atol=0)
    torch.testing.assert_close(d2.state_dict(), ref_d.state_dict(), rtol=0, atol=0)
    assert hist == ref_hist
    # the measurement mattered: the same run without it (the ignore baseline on the same data) ends elsewhere
    g3, d3 = copy.deepcopy(start_g), copy.deepcopy(start_d)
    train_ambient(g3, d3, data.clamp(0, 1), f, "ignore", CFG, progress=False)
    assert not torch.equal(g3.fc[0].weight, ref_g.fc[0].weight)


def test_gaussian_projection_trains_with_the_mlp_discriminator_and_wgan_gp() -> None:
    f = GaussianProjection(1)
    data = measure_dataset(_squares(64), f, seed=0)
    disc = MeasurementDiscriminator(785, hidden=16)
    cfg = GANTrainConfig(steps=3, batch_size=32, objective="wgan-gp", n_critic=2, ema_decay=None, checkpoint_every=3)
    hist = train_ambient(Generator(latent_dim=8, width=4), disc, data, f, "ambient", cfg, progress=False)
    assert all(math.isfinite(v) for v in hist[-1].values())


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: BlockPixels(1.0), ValueError, r"expected p in \[0.0, 1.0\), got 1.0"),
        (lambda: BlockPixels(-0.1), ValueError, r"expected p in \[0.0, 1.0\)"),
        (lambda: BlockPixels("0.5"), ValueError, r"expected p in .*got '0.5'"),  # type: ignore[arg-type]
        (lambda: ConvolveNoise(-1.0), ValueError, r"expected sigma in \[0.0, inf\), got -1.0"),
        (lambda: ConvolveNoise(0.1, kernel_size=4), ValueError, "expected an odd kernel_size, got 4"),
        (lambda: BlockPatch(0), ValueError, "expected size to be a positive int, got 0"),
        (lambda: GaussianProjection(1.5), ValueError, "expected m to be a positive int, got 1.5"),  # type: ignore[arg-type]
        (lambda: build_measurement("blur"), ValueError, "unknown measurement 'blur': expected one of"),
        (lambda: build_measurement("block-pixels", q=1), TypeError, "measurement 'block-pixels'"),
        (lambda: BlockPatch(30)(torch.rand(2, 1, 28, 28)), ValueError, r"expected images at least 30x30"),
        (lambda: BlockPixels(0.5)(torch.rand(28, 28)), ValueError, r"expected a float tensor \(B, C, H, W\), got"),
        (lambda: BlockPixels(0.5)(torch.ones(2, 1, 4, 4, dtype=torch.long)), ValueError, "got torch.int64"),
        (lambda: BlockPixels(0.5)(torch.rand(2, 1, 4, 4), 0), TypeError,  # type: ignore[arg-type]
         "expected generator to be a torch.Generator or None, got int"),
        (lambda: measure_dataset(torch.rand(2, 1, 4, 4), nn.Identity(), 0), TypeError,  # type: ignore[arg-type]
         "expected a RandomMeasurement, got Identity"),
        (lambda: training_data(torch.rand(2, 1, 4, 4), BlockPixels(0.5), "clean"), ValueError,  # type: ignore[arg-type]
         "expected method in"),
        (lambda: training_data(torch.rand(2, 1, 4, 4), BlockPixels(0.5), "ignore", inpaint="biharmonic"), ValueError,
         "apply to method 'unmeasure' only"),
        (lambda: training_data(torch.rand(2, 1, 4, 4), GaussianProjection(1), "ignore"), ValueError,
         "ignore baseline needs image measurements"),
        (lambda: training_data(torch.rand(2, 1, 4, 4), BlockPixels(0.5), "unmeasure", inpaint="tv"), ValueError,
         "expected inpainting method 'biharmonic' or 'normalized-convolution', got 'tv'"),
    ],
)
def test_bad_input_is_refused(build, error, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=match):
        build()


def test_train_gan_refuses_mismatched_measured_data_and_an_encoder() -> None:
    f = BlockPixels(0.5)
    cfg = GANTrainConfig(steps=1, batch_size=32)
    gen = Generator(latent_dim=8, width=4)
    with pytest.raises(ValueError, match=r"measured generator output to have the shape .*\(B, 1, 14, 14\)"):
        train_gan(gen, Critic(4), TensorDataset(torch.rand(64, 1, 14, 14)), cfg, measurement=f, progress=False)
    with pytest.raises(ValueError, match="expected no encoder with a measurement"):
        train_gan(gen, Critic(4), TensorDataset(torch.rand(64, 1, 28, 28)), replace_rec(cfg), measurement=f,
                  encoder=Encoder(latent_dim=8, width=4), progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="measured training data: expected finite values"):
        train_gan(gen, Critic(4), TensorDataset(torch.full((64, 1, 28, 28), math.nan)), cfg, measurement=f,
                  progress=False)  # fmt: skip
    with pytest.raises(TypeError, match=r"expected measurement to be an nn\.Module or None, got function"):
        train_gan(gen, Critic(4), TensorDataset(torch.rand(64, 1, 28, 28)), cfg, measurement=lambda x: x,  # type: ignore[arg-type]
                  progress=False)  # fmt: skip


def replace_rec(cfg: GANTrainConfig) -> GANTrainConfig:
    from dataclasses import replace

    return replace(cfg, rec_weight=1.0)


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["train", "gan", "--measurement", "block-pixels"], "--measurement apply to model ambient only"),
        (["train", "ambient"], "--measurement is required for ambient training"),
        (["train", "ambient", "--measurement", "convolve-noise", "--p", "0.5"],
         "--p does not apply to --measurement convolve-noise"),
        (["train", "ambient", "--measurement", "block-pixels", "--inpaint", "biharmonic"],
         "pass --baseline unmeasure with it"),
        (["train", "ambient", "--measurement", "block-pixels", "--p", "1.5"], r"expected p in \[0.0, 1.0\)"),
    ],
)
def test_train_ambient_flags_are_checked(tmp_path: Path, argv: list[str], match: str) -> None:
    from eval.cli import main

    with pytest.raises(ValueError, match=match):
        main([*argv, "--out", str(tmp_path / "run")])


def test_train_ambient_writes_a_generator_with_its_measurement_record(tmp_path: Path) -> None:
    from eval.cli import main
    from manifold_defense import zoo

    args = ["train", "ambient", "--measurement", "block-pixels", "--p", "0.9", "--out", str(tmp_path), "--steps", "2",
            "--val-every", "0", "--no-progress", "--set", "batch_size=16", "--set", "bn_batches=1"]  # fmt: skip
    assert main(args) == 0
    rec = zoo.record("mnist-gan", tmp_path)
    amb = rec["training"]["ambient"]
    assert amb["method"] == "ambient" and amb["measurement"] == {"name": "block-pixels", "p": 0.9}
    assert amb["discriminator"] == "Critic" and "measured copy" in rec["training"]["data"]
    gen = zoo.load("mnist-gan", "cpu", weights_dir=tmp_path)
    assert gen(torch.zeros(1, 64)).shape == (1, 1, 28, 28)
    assert (tmp_path / "checkpoints" / "ambient-ambient-block-pixels-p0.9" / "checkpoint.pt").is_file()
    # the folder's generator is this model's: another measurement or method is refused, not written over it
    for other in (["--p", "0.5"], ["--p", "0.9", "--baseline", "ignore"]):
        with pytest.raises(ValueError, match="holds a mnist-gan of another run"):
            main([*args[:2], "--measurement", "block-pixels", *other, "--out", str(tmp_path), "--steps", "2"])


def test_the_grid_runs_end_to_end_and_resumes_from_its_cache(tmp_path: Path) -> None:
    from eval.ambient import quick_protocol, run_grid

    protocol = quick_protocol(points=(("block-pixels", 0.9),), steps=3, n_samples=100, train_limit=128, bn_batches=1)
    results = run_grid(protocol, tmp_path, command="test")
    assert set(results["methods"]) == {"ambient", "ignore", "unmeasure"} and results["reused_from_cache"] == 0
    for rows in results["methods"].values():
        (row,) = rows
        assert row["point"] == "block-pixels-p0.9" and row["mnist_score"] >= 1.0
        assert sum(row["class_histogram"]) == 100
    assert results["real"]["mnist_score"] > 5.0  # the real-data floor, next to the generators
    assert set(results["checks"]["ambient_beats_baselines"]) == {"block-pixels-p0.9"}
    for name in ("results.json", "results.md", "mnist_score_vs_p.png", "samples_block-pixels-p0.9.png", "run.json"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "generators" / "ambient-block-pixels-p0.9" / "mnist-gan.safetensors").is_file()
    again = run_grid(protocol, tmp_path, command="test")
    assert again["reused_from_cache"] == 3 and again["methods"] == results["methods"]
    # the grid grows in the same folder: the cached point is reused, only the new one is trained
    grown = run_grid(dataclasses.replace(protocol, points=(("convolve-noise", 0.2), ("block-pixels", 0.9)),
                                         methods=("ambient",)), tmp_path, command="test")  # fmt: skip
    assert grown["reused_from_cache"] == 1
    assert [r["point"] for r in grown["methods"]["ambient"]] == ["convolve-noise-sigma0.2", "block-pixels-p0.9"]
    assert grown["methods"]["ambient"][1] == results["methods"]["ambient"][0]
    # another protocol in the same folder is refused, not mixed in
    with pytest.raises(ValueError, match="another protocol"):
        run_grid(quick_protocol(points=(("block-pixels", 0.9),), steps=4, n_samples=100, train_limit=128), tmp_path)


@pytest.mark.slow
def test_eval_ambient_quick_runs_end_to_end(tmp_path: Path) -> None:
    """``python -m eval ambient --quick``: about 100 s on a loaded 2-core CPU (hence slow)."""
    from eval.cli import main

    assert main(["ambient", "--quick", "--out", str(tmp_path), "--threads", "1"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["protocol"]["quick"] is True and len(results["points"]) == 3
    assert all(len(rows) == 3 for rows in results["methods"].values())
    assert len(list(tmp_path.glob("samples_*.png"))) == 3


def test_eval_ambient_inpaint_option_sets_the_protocol(tmp_path: Path) -> None:
    """``--inpaint`` picks the unmeasure baseline's inpainting; the default is biharmonic (quick: the cheap one)."""
    import argparse

    from eval import ambient as ambient_cli

    parser = argparse.ArgumentParser()
    ambient_cli.add_parsers(parser.add_subparsers())
    base = ["ambient", "--out", str(tmp_path)]
    assert ambient_cli.protocol_from_args(parser.parse_args(base)).inpaint == "biharmonic"
    assert ambient_cli.protocol_from_args(parser.parse_args([*base, "--quick"])).inpaint == "normalized-convolution"
    chosen = ambient_cli.protocol_from_args(parser.parse_args([*base, "--inpaint", "normalized-convolution"]))
    assert chosen.inpaint == "normalized-convolution" and not chosen.quick
    assert chosen.item_settings()["inpaint"] == "normalized-convolution"  # part of the cache fingerprint
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--inpaint", "telea"])


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--inpaint", "telea"], "invalid choice"),
        (["--points", "block-pixels"], "block-pixels:P"),
        (["--points", "keep-patch:0.5"], "block-pixels:P"),
        (["--points", "block-pixels:x"], "a number"),
        (["--points", "block-pixels:1.5"], r"\[0, 1\)"),
        (["--points", "convolve-noise:nan"], r"\[0, 1\)"),
    ],
)
def test_eval_ambient_points_are_checked(
    tmp_path: Path, argv: list[str], match: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from eval.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["ambient", "--out", str(tmp_path / "run"), *argv])
    assert exit_info.value.code == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "run").exists()
