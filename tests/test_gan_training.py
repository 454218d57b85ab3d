"""GAN trainer: the adversarial game moves the generator, EMA weights are what is saved, exact resume, bad input."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from manifold_defense.integrity import save_checked
from manifold_defense.models import Critic, Encoder, Generator
from manifold_defense.training import (
    EncoderTrainConfig,
    GANTrainConfig,
    WeightAverage,
    recalibrate_batchnorm,
    train_encoder,
    train_gan,
)
from manifold_defense.training.gan import _batchnorm_eval
from manifold_defense.training.loop import load_checkpoint, module_fingerprint


def _squares(n: int = 128) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(n, 1, 28, 28)
    for i, (r, c) in enumerate(torch.randint(0, 20, (n, 2), generator=g).tolist()):
        x[i, :, r : r + 8, c : c + 8] = 1.0
    return TensorDataset(x, torch.zeros(n, dtype=torch.int64))


def _params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _gen_loss(gen: nn.Module, disc: nn.Module) -> float:
    z = torch.randn(256, gen.latent_dim, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return float(F.softplus(-disc(gen.eval()(z))).mean())


CFG = GANTrainConfig(steps=60, batch_size=32, lr=2e-3, ema_decay=0.9, bn_batches=4, checkpoint_every=20)


def test_training_lowers_the_adversarial_loss_and_saves_the_average(tmp_path: Path) -> None:
    torch.manual_seed(0)
    gen, disc = Generator(latent_dim=8, width=8), Critic(width=8)
    initial = copy.deepcopy(gen)
    hist = train_gan(gen, disc, _squares(), CFG, checkpoint_dir=tmp_path, progress=False)
    assert not gen.training and not disc.training
    # against the trained discriminator, the trained generator's samples pass far better than the initial ones
    assert _gen_loss(gen, disc) < 0.5 * _gen_loss(initial, disc)
    assert {"loss_d", "loss_g", "d_real", "d_fake"} <= set(hist[-1])
    # the generator returned holds the EMA weights, not the last iterate kept in the checkpoint
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    raw = Generator(latent_dim=8, width=8)
    raw.load_state_dict(ckpt["state"]["generator"])
    averaged = Generator(latent_dim=8, width=8)
    averaged.load_state_dict({k.removeprefix("module."): v for k, v in ckpt["state"]["ema"].items() if k != "count"})
    assert not torch.allclose(_params(gen), _params(raw))
    torch.testing.assert_close(_params(gen), _params(averaged), rtol=0, atol=0)
    assert int(ckpt["state"]["ema"]["count"]) == CFG.steps


def test_resume_equals_uninterrupted_run(tmp_path: Path) -> None:
    torch.manual_seed(0)
    start_g, start_d = Generator(latent_dim=8, width=8), Critic(width=8)
    ref_g, ref_d = copy.deepcopy(start_g), copy.deepcopy(start_d)
    ref_hist = train_gan(ref_g, ref_d, _squares(), CFG, checkpoint_dir=tmp_path / "ref", progress=False)

    class Interrupt(RuntimeError):
        pass

    original_step = torch.optim.Adam.step
    counter = {"n": 0}

    def flaky_step(self: torch.optim.Adam, *args: object, **kwargs: object) -> object:
        counter["n"] += 1
        if counter["n"] == 2 * 25 + 1:  # two optimizer steps per training step: dies inside step 26
            raise Interrupt
        return original_step(self, *args, **kwargs)

    g1, d1 = copy.deepcopy(start_g), copy.deepcopy(start_d)
    torch.optim.Adam.step = flaky_step  # type: ignore[method-assign]
    try:
        with pytest.raises(Interrupt):
            train_gan(g1, d1, _squares(), CFG, checkpoint_dir=tmp_path / "run", progress=False)
    finally:
        torch.optim.Adam.step = original_step  # type: ignore[method-assign]
    g2, d2 = Generator(latent_dim=8, width=8), Critic(width=8)  # a fresh process rebuilds the models
    hist = train_gan(g2, d2, _squares(), CFG, checkpoint_dir=tmp_path / "run", progress=False)
    torch.testing.assert_close(g2.state_dict(), ref_g.state_dict(), rtol=0, atol=0)
    torch.testing.assert_close(_params(d2), _params(ref_d), rtol=0, atol=0)
    assert hist == ref_hist


def test_wgan_gp_and_reconstruction_term_run_and_fit() -> None:
    torch.manual_seed(0)
    gen, enc = Generator(latent_dim=8, width=8), Encoder(latent_dim=8, width=8)
    x = _squares().tensors[0]

    def rec() -> float:
        with torch.no_grad():
            return float((gen.eval()(enc.eval()(x)) - x).pow(2).mean())

    before = rec()
    cfg = GANTrainConfig(
        steps=40, batch_size=32, lr=2e-3, objective="wgan-gp", n_critic=2, beta2=0.9, rec_weight=0.1, ema_decay=None
    )
    hist = train_gan(gen, Critic(width=8), _squares(), cfg, encoder=enc, progress=False)
    assert rec() < 0.5 * before
    assert "rec_mse" in hist[-1]


def test_weight_average_and_batchnorm_recalibration() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    avg = WeightAverage(net, decay=0.5)
    start = _params(avg.module).clone()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    avg.update()  # first update: effective decay min(0.5, 1/10) = 0.1
    torch.testing.assert_close(_params(avg.module), start + 0.9)
    gen = Generator(latent_dim=4, width=4)
    recalibrate_batchnorm(gen, batches=3, batch_size=64, seed=1)
    assert not gen.training
    bn = gen.fc[1]
    assert float(bn.running_var.mean()) != 1.0 and bn.momentum == 0.1
    with _batchnorm_eval(gen.train()):
        assert not bn.training and gen.training
    assert bn.training


class _Unbounded(nn.Module):
    latent_dim = 4

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 784)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc(z).view(-1, 1, 28, 28) * 10


@pytest.mark.parametrize(
    ("build", "data", "kwargs", "match"),
    [
        (_Unbounded, None, {}, r"expected finite outputs in \[0, 1\]"),
        (lambda: Generator(latent_dim=8, width=4), None, {"encoder": Encoder(latent_dim=4, width=4)},
         "expected an encoder exactly when rec_weight > 0"),
        (lambda: Generator(latent_dim=8, width=4), TensorDataset(torch.randint(0, 10, (64,))), {},
         r"expected a float tensor \(N, C, H, W\)"),
        (lambda: Generator(latent_dim=8, width=4),
         TensorDataset(torch.rand(64, 1, 14, 14)), {}, r"expected images \(B, 1, 14, 14\) like the data"),
    ],
)
def test_bad_input_is_refused_before_the_first_step(build, data, kwargs, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=match):
        train_gan(build(), Critic(width=4), data or _squares(64), GANTrainConfig(steps=1, batch_size=32), progress=False,
                  **kwargs)


def test_encoder_latent_size_mismatch_and_configs_are_refused() -> None:
    with pytest.raises(ValueError, match="does not match the generator's latent_dim 8"):
        train_gan(Generator(latent_dim=8, width=4), Critic(width=4), _squares(64),
                  GANTrainConfig(steps=1, batch_size=32, rec_weight=1.0), encoder=Encoder(latent_dim=4, width=4),
                  progress=False)
    with pytest.raises(ValueError, match="objective must be 'ns' or 'wgan-gp'"):
        GANTrainConfig(objective="hinge")
    with pytest.raises(ValueError, match=r"ema_decay must be None or in \(0, 1\)"):
        GANTrainConfig(ema_decay=1.0)


def test_a_finished_run_continues_to_more_steps_as_one_longer_run(tmp_path: Path) -> None:
    torch.manual_seed(0)
    start_g, start_d = Generator(latent_dim=8, width=8), Critic(width=8)
    long_g, long_d = copy.deepcopy(start_g), copy.deepcopy(start_d)
    train_gan(long_g, long_d, _squares(), CFG, checkpoint_dir=tmp_path / "long", progress=False)
    short = dataclasses.replace(CFG, steps=40)
    g, d = copy.deepcopy(start_g), copy.deepcopy(start_d)
    train_gan(g, d, _squares(), short, checkpoint_dir=tmp_path / "run", progress=False)
    g2, d2 = Generator(latent_dim=8, width=8), Critic(width=8)
    train_gan(g2, d2, _squares(), CFG, checkpoint_dir=tmp_path / "run", progress=False)  # 40 -> 60 steps
    torch.testing.assert_close(g2.state_dict(), long_g.state_dict(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="has done 60 steps, more than the 40 asked for"):
        train_gan(g2, d2, _squares(), short, checkpoint_dir=tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match=r"other settings \(seed: checkpoint 0, this run 1\)"):
        train_gan(g2, d2, _squares(), dataclasses.replace(CFG, seed=1), checkpoint_dir=tmp_path / "run", progress=False)


def test_a_non_finite_loss_stops_training_before_it_reaches_the_weights() -> None:
    from manifold_defense.training.loop import NonFiniteMetricError

    class NaNCritic(Critic):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * float("nan")

    gen, disc = Generator(latent_dim=8, width=4), NaNCritic(width=4)
    before = copy.deepcopy(disc.state_dict())
    with pytest.raises(NonFiniteMetricError, match="in GAN training at step 0"):
        train_gan(gen, disc, _squares(64), GANTrainConfig(steps=2, batch_size=32), progress=False)
    torch.testing.assert_close(disc.state_dict(), before, rtol=0, atol=0)


def test_encoder_checkpoint_is_bound_to_its_generator(tmp_path: Path) -> None:
    """An encoder checkpoint trained for one generator is refused for another (it used to be returned finished,
    silently, against the new weights); the same generator still resumes it."""
    torch.manual_seed(0)
    gen = Generator(latent_dim=8, width=8)
    start = Encoder(latent_dim=8, width=8)
    cfg = EncoderTrainConfig(steps=4, batch_size=32, checkpoint_every=2)
    done = copy.deepcopy(start)
    train_encoder(done, gen, _squares(), cfg, checkpoint_dir=tmp_path, progress=False)
    assert not torch.equal(_params(done), _params(start))
    other = copy.deepcopy(gen)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    assert module_fingerprint(other) != module_fingerprint(gen) == module_fingerprint(copy.deepcopy(gen))
    with pytest.raises(TypeError, match=r"expected a torch\.nn\.Module"):
        module_fingerprint(gen.state_dict())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"written by another run \(bound_to \(the frozen models"):
        train_encoder(copy.deepcopy(start), other, _squares(), cfg, checkpoint_dir=tmp_path, progress=False)
    again = copy.deepcopy(start)  # same generator: the finished checkpoint is read back, no step is redone
    train_encoder(again, gen, _squares(), cfg, checkpoint_dir=tmp_path, progress=False)
    torch.testing.assert_close(_params(again), _params(done), rtol=0, atol=0)


def test_learning_rate_decay_schedule_and_its_resume_rules(tmp_path: Path) -> None:
    decay = dataclasses.replace(CFG, steps=60, lr_decay_from=40)
    assert decay.lr_at(0) == decay.lr_at(40) == CFG.lr
    assert decay.lr_at(50) == pytest.approx(CFG.lr / 2) and decay.lr_at(59) == pytest.approx(CFG.lr / 20)
    with pytest.raises(ValueError, match="lr_decay_from must be None or an int in"):
        dataclasses.replace(CFG, lr_decay_from=60)
    torch.manual_seed(0)
    start_g, start_d = Generator(latent_dim=8, width=8), Critic(width=8)
    ref_g, ref_d = copy.deepcopy(start_g), copy.deepcopy(start_d)
    train_gan(ref_g, ref_d, _squares(), decay, checkpoint_dir=tmp_path / "ref", progress=False)
    flat_g = copy.deepcopy(start_g)
    train_gan(flat_g, copy.deepcopy(start_d), _squares(), CFG, progress=False)
    assert not torch.equal(_params(ref_g), _params(flat_g))  # the decay changes the weights
    # a constant-rate run stopped at the decay's first step continues into the decay as one run
    g, d = copy.deepcopy(start_g), copy.deepcopy(start_d)
    train_gan(g, d, _squares(), dataclasses.replace(CFG, steps=40), checkpoint_dir=tmp_path / "run", progress=False)
    g2, d2 = Generator(latent_dim=8, width=8), Critic(width=8)
    train_gan(g2, d2, _squares(), decay, checkpoint_dir=tmp_path / "run", progress=False)
    torch.testing.assert_close(g2.state_dict(), ref_g.state_dict(), rtol=0, atol=0)
    # ... but not one whose decay would have started before the checkpoint, nor with another learning rate
    with pytest.raises(ValueError, match="other learning rates"):
        train_gan(g2, d2, _squares(), dataclasses.replace(decay, steps=80, lr_decay_from=20),
                  checkpoint_dir=tmp_path / "run", progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="other learning rates"):  # a decaying run extended changes its slope
        train_gan(g2, d2, _squares(), dataclasses.replace(decay, steps=80), checkpoint_dir=tmp_path / "run",
                  progress=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"other settings \(lr: checkpoint 0\.002, this run 0\.001\)"):
        train_gan(g2, d2, _squares(), dataclasses.replace(CFG, steps=80, lr=1e-3), checkpoint_dir=tmp_path / "run",
                  progress=False)  # fmt: skip


def test_a_checkpoint_from_before_the_schedule_guard_resumes_only_at_constant_rate(tmp_path: Path) -> None:
    torch.manual_seed(0)
    g, d = Generator(latent_dim=8, width=8), Critic(width=8)
    short = dataclasses.replace(CFG, steps=40)
    train_gan(g, d, _squares(), short, checkpoint_dir=tmp_path / "run", progress=False)
    path = tmp_path / "run" / "checkpoint.pt"
    ckpt = load_checkpoint(path)
    del ckpt["state"]["schedule"]  # as written before the guard existed (then converted to the checked format)
    save_checked(ckpt, path)
    with pytest.raises(ValueError, match="constant learning rate, but lr_decay_from=20"):
        train_gan(g, d, _squares(), dataclasses.replace(CFG, lr_decay_from=20), checkpoint_dir=tmp_path / "run",
                  progress=False)  # fmt: skip
    train_gan(g, d, _squares(), dataclasses.replace(CFG, lr_decay_from=40), checkpoint_dir=tmp_path / "run",
              progress=False)  # fmt: skip


def test_pacgan_packing_judges_stacked_examples_and_refuses_an_unpacked_discriminator() -> None:
    torch.manual_seed(0)
    packed = dataclasses.replace(CFG, steps=30, pack=2)
    seen: list[tuple[int, ...]] = []
    disc = Critic(width=8, in_channels=2)
    disc.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape)))
    gen = Generator(latent_dim=8, width=8)
    before = _params(gen).clone()
    train_gan(gen, disc, _squares(), packed, progress=False)
    assert set(seen[1:]) == {(16, 2, 28, 28)}  # batches of 32 judged as 16 pairs (after the probe of one pair)
    assert not torch.equal(_params(gen), before)
    with pytest.raises(ValueError, match=r"does not take 2 examples stacked.*Critic\(in_channels=2\)"):
        train_gan(Generator(latent_dim=8, width=8), Critic(width=8), _squares(), packed, progress=False)
    with pytest.raises(ValueError, match="must be a multiple of pack"):
        dataclasses.replace(CFG, pack=3)
    with pytest.raises(ValueError, match="pack must be an int >= 1"):
        dataclasses.replace(CFG, pack=0)
