"""Robust training: PGD adversarial training and robust manifold training on tiny models and synthetic data.

Covers: robustness improves; the classifier's modes and ``requires_grad`` flags are frozen during attack
generation and restored after (also on exceptions); checkpoint/resume equals an uninterrupted run; 2-process
DDP (gloo, CPU) equals 1 process on the same global batch, including a resume; bad input is refused before any
training step.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from attacks import PGD, Norm, PGDConfig, ThreatModel
from manifold_defense.inversion import InversionConfig
from manifold_defense.training import (
    AdversarialTrainConfig,
    RobustManifoldConfig,
    adversarial_train,
    attack_mode,
    robust_manifold_train,
)
from manifold_defense.training.loop import load_checkpoint

K = 4  # latent size of the toy generator


def _data(n: int = 128, seed: int = 0) -> tuple[Tensor, Tensor]:
    """8x8 images: class 1 has a bright 4x4 square, class 0 is dim noise (robustly separable)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.rand(n, 1, 8, 8, generator=g) * 0.2
    x[y == 1, :, 2:6, 2:6] += 0.7
    return x.clamp(0, 1), y


class _MLP(nn.Module):
    """No dropout or batch norm: its training-mode forward is deterministic and batch-independent."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 16), nn.Linear(16, 2)
        self.net = nn.Sequential(nn.Flatten(), self.fc1, nn.ReLU(), self.fc2)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class _Gen(nn.Module):
    latent_dim = K

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(K, 64)

    def forward(self, z: Tensor) -> Tensor:
        return torch.sigmoid(self.lin(z)).view(-1, 1, 8, 8)


class _Enc(nn.Module):
    def __init__(self, latent_dim: int = K) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.lin = nn.Linear(64, latent_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x.flatten(1))


def _models(seed: int = 0) -> tuple[_MLP, _Gen, _Enc]:
    torch.manual_seed(seed)
    return _MLP(), _Gen(), _Enc()


def _params(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _train_attack(**overrides: Any) -> PGD:
    return PGD(ThreatModel(Norm.LINF, 0.15), PGDConfig(steps=5, step_size=0.05, **overrides))


def _rmd_config(**overrides: Any) -> RobustManifoldConfig:
    settings: dict[str, Any] = dict(
        steps=60,
        batch_size=32,
        lr=3e-2,
        schedule="constant",
        log_every=10,
        pixel_eps=1.0,
        pixel_steps=5,
        latent_eps=1.0,
        latent_steps=5,
        op_eps=1.0,
        op_steps=5,
        op_every=3,
        inversion=InversionConfig(init="encoder", steps=5, lr=0.05),
    )
    settings.update(overrides)
    return RobustManifoldConfig(**settings)


def _robustness(model: nn.Module, attack: PGD) -> tuple[float, float]:
    """(adversarial loss, adversarial accuracy) of ``model`` on the training data."""
    x, y = _data()
    model.eval()
    result = attack(model, x, y)
    return float(F.cross_entropy(result.logits, y)), float((~result.success).float().mean())


# ------------------------------------------------------------------------------------------ training works


def test_adversarial_train_lowers_adversarial_loss(tmp_path: Path) -> None:
    model, _, _ = _models()
    evaluation = PGD(ThreatModel(Norm.LINF, 0.15), PGDConfig(steps=10, step_size=0.03))
    loss0, acc0 = _robustness(model, evaluation)
    x, y = _data()
    hist = adversarial_train(
        model,
        TensorDataset(x, y.int()),  # any integer labels (converted to int64); batches from the config
        _train_attack(),
        AdversarialTrainConfig(steps=60, batch_size=32, lr=3e-2, schedule="constant", log_every=20),
        val_data=(x[:32], y[:32]),
        checkpoint_dir=tmp_path,
        progress=False,
    )
    loss1, acc1 = _robustness(model, evaluation)
    assert not model.training
    assert loss1 < 0.2 * loss0 and acc1 > 0.9 > acc0
    # validation every epoch (128 // 32 = 4 steps) and after the last step, merged into the history
    val_steps = [e["step"] for e in hist if "val_adv_acc" in e]
    assert val_steps == [float(s) for s in range(4, 61, 4)]
    assert hist[-1]["val_adv_acc"] > 0.9 and hist[-1]["val_clean_acc"] == 1.0
    assert [e["step"] for e in hist if "adv_loss" in e] == [20.0, 40.0, 60.0]
    assert json.loads((tmp_path / "history.json").read_text()) == hist


def test_robust_manifold_train_lowers_adversarial_loss() -> None:
    model, gen, enc = _models()
    evaluation = PGD(ThreatModel(Norm.L2, 1.0), PGDConfig(steps=10))
    loss0, acc0 = _robustness(model, evaluation)
    gen_before = _params(gen).clone()
    gen.train()  # the trainer freezes it for the run and restores the mode afterwards
    hist = robust_manifold_train(model, gen, _data(), _rmd_config(), encoder=enc, progress=False)
    loss1, acc1 = _robustness(model, evaluation)
    assert loss1 < 0.6 * loss0 and acc1 > acc0 + 0.3
    assert torch.equal(_params(gen), gen_before) and gen.training and enc.training
    assert all(p.requires_grad for p in gen.parameters())
    # every term is logged; OP metrics are means over the OP steps only (every 3rd step)
    for key in ("inv_mse", "pixel_loss", "manifold_loss", "op_loss", "op_success"):
        assert key in hist[-1]


def test_robust_manifold_weights_select_terms() -> None:
    model, gen, enc = _models()
    cfg = _rmd_config(steps=2, pixel_weight=0.0, op_weight=0.0, clean_weight=1.0)
    hist = robust_manifold_train(model, gen, _data(), cfg, encoder=enc, progress=False)
    assert {"clean_loss", "manifold_loss"} <= set(hist[-1])
    assert not {"pixel_loss", "op_loss"} & set(hist[-1])


# ---------------------------------------------------------------------- frozen classifier during attacks


class _SpyPGD(PGD):
    """Records the model's mode and parameter flags while the attack runs; raises on request."""

    def __init__(self, log: list[tuple[bool, list[bool]]], fail: bool = False) -> None:
        super().__init__(ThreatModel(Norm.LINF, 0.1), PGDConfig(steps=2, step_size=0.05))
        self.log, self.fail = log, fail

    def run(self, model: Any, x: Tensor, y: Tensor) -> Tensor:
        modes = [m.training for m in model.modules()]
        self.log.append((any(modes), [p.requires_grad for p in model.parameters()]))
        if self.fail:
            raise RuntimeError("attack failed")
        return super().run(model, x, y)


def test_classifier_frozen_during_attack_and_restored_after() -> None:
    model, _, _ = _models()
    model.fc1.bias.requires_grad_(False)  # a user-frozen parameter stays frozen and untrained
    flags = [p.requires_grad for p in model.parameters()]
    frozen_bias = model.fc1.bias.detach().clone()
    during_attack: list[tuple[bool, list[bool]]] = []
    during_training: list[tuple[bool, list[bool]]] = []

    def hook(module: nn.Module, args: Any) -> None:
        if torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters()):
            during_training.append((module.training, [p.requires_grad for p in module.parameters()]))

    model.register_forward_pre_hook(hook)
    adversarial_train(
        model, _data(), _SpyPGD(during_attack), AdversarialTrainConfig(steps=3, batch_size=32), progress=False
    )
    assert len(during_attack) == 3 and all(mode is False and not any(f) for mode, f in during_attack)
    assert len(during_training) == 3 and all(mode is True and f == flags for mode, f in during_training)
    assert [p.requires_grad for p in model.parameters()] == flags and not model.training
    assert torch.equal(model.fc1.bias, frozen_bias)


def test_state_restored_when_the_attack_raises() -> None:
    model, gen, _ = _models()
    model.train()
    model.fc2.eval()  # a mixed state must come back exactly
    model.fc2.weight.requires_grad_(False)
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    log: list[tuple[bool, list[bool]]] = []
    with pytest.raises(RuntimeError, match="attack failed"):
        adversarial_train(
            model,
            _data(),
            _SpyPGD(log, fail=True),
            AdversarialTrainConfig(steps=3, batch_size=32),
            progress=False,
        )
    assert log and [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    # and the context manager alone
    with pytest.raises(ValueError, match="boom"), attack_mode(model, gen):
        assert not model.training and not any(p.requires_grad for p in gen.parameters())
        raise ValueError("boom")
    assert [m.training for m in model.modules()] == modes and [
        p.requires_grad for p in model.parameters()
    ] == flags
    assert all(p.requires_grad for p in gen.parameters()) and gen.training


# --------------------------------------------------------------------------------------------- resume


class _Interrupt(RuntimeError):
    pass


@contextmanager
def _interrupt_at(optimizer: type[torch.optim.Optimizer], call: int) -> Iterator[None]:
    """Make ``optimizer.step`` raise at its ``call``-th call (1-based), once."""
    original = optimizer.step
    counter = {"n": 0}

    def flaky(self: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        counter["n"] += 1
        if counter["n"] == call:
            raise _Interrupt
        return original(self, *args, **kwargs)

    optimizer.step = flaky  # type: ignore[method-assign]
    try:
        yield
    finally:
        optimizer.step = original  # type: ignore[method-assign]


def test_adversarial_train_resume_equals_uninterrupted(tmp_path: Path) -> None:
    cfg = AdversarialTrainConfig(steps=10, batch_size=32, checkpoint_every=3, log_every=2, seed=5)
    x, y = _data()
    val = (x[:16], y[:16])
    reference, _, _ = _models()
    ref_hist = adversarial_train(reference, _data(), _train_attack(), cfg, val_data=val, progress=False)
    interrupted, _, _ = _models()
    with _interrupt_at(torch.optim.Adam, 8), pytest.raises(_Interrupt):
        adversarial_train(
            interrupted, _data(), _train_attack(), cfg, val_data=val, checkpoint_dir=tmp_path, progress=False
        )
    resumed, _, _ = _models(seed=99)  # a fresh process rebuilds the model from scratch
    hist = adversarial_train(
        resumed, _data(), _train_attack(), cfg, val_data=val, checkpoint_dir=tmp_path, progress=False
    )
    torch.testing.assert_close(_params(resumed), _params(reference), rtol=0, atol=0)
    assert hist == ref_hist


def test_robust_manifold_resume_equals_uninterrupted(tmp_path: Path) -> None:
    cfg = _rmd_config(steps=8, optimizer="sgd", lr=0.1, checkpoint_every=3, log_every=2, op_every=2)
    reference, gen, enc = _models()
    ref_hist = robust_manifold_train(reference, gen, _data(), cfg, encoder=enc, progress=False)
    interrupted, gen, enc = _models()
    with _interrupt_at(torch.optim.SGD, 6), pytest.raises(_Interrupt):
        robust_manifold_train(
            interrupted, gen, _data(), cfg, encoder=enc, checkpoint_dir=tmp_path, progress=False
        )
    resumed, gen, enc = _models()
    hist = robust_manifold_train(
        resumed, gen, _data(), cfg, encoder=enc, checkpoint_dir=tmp_path, progress=False
    )
    torch.testing.assert_close(_params(resumed), _params(reference), rtol=0, atol=0)
    assert hist == ref_hist


def test_robust_manifold_checkpoint_is_bound_to_its_generator(tmp_path: Path) -> None:
    """A robust manifold checkpoint trained against one generator is refused for another (on-manifold examples
    and pairs come from it), instead of being continued against other weights."""
    cfg = _rmd_config(steps=4, checkpoint_every=2, log_every=2, op_every=2)
    model, gen, enc = _models()
    robust_manifold_train(model, gen, _data(), cfg, encoder=enc, checkpoint_dir=tmp_path, progress=False)
    model, _, _ = _models()
    _, other_gen, _ = _models(seed=1)  # another generator of the same shape
    with pytest.raises(ValueError, match="written by another run"):
        robust_manifold_train(model, other_gen, _data(), cfg, encoder=enc, checkpoint_dir=tmp_path, progress=False)



# ----------------------------------------------------------------------------------- distributed (DDP)

_DDP_ADV = AdversarialTrainConfig(steps=6, batch_size=32, lr=1e-2, checkpoint_every=2, log_every=2)
_DDP_RMD: dict[str, Any] = dict(steps=4, lr=1e-2, op_every=2, pixel_random_start=False, log_every=2)


def _ddp_runs(checkpoint_dir: Path | None, interrupt: bool) -> dict[str, Any]:
    """The runs compared between 1 and 2 processes: adversarial training (optionally interrupted and resumed
    from ``checkpoint_dir``) and robust manifold training, both with deterministic attacks."""
    torch.set_num_threads(1)
    attack = _train_attack(random_start=False)
    model, _, _ = _models()
    rows: list[
        int
    ] = []  # batch sizes of the training forward passes (the attack's run without grad to params)

    def record(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        if module.training:
            rows.append(int(args[0].shape[0]))

    model.register_forward_pre_hook(record)
    if interrupt:
        with _interrupt_at(torch.optim.Adam, 4), pytest.raises(_Interrupt):
            adversarial_train(model, _data(), attack, _DDP_ADV, checkpoint_dir=checkpoint_dir, progress=False)
        _settle_interrupted_ranks()
        model, _, _ = _models(seed=7)
        model.register_forward_pre_hook(record)
    adv_hist = adversarial_train(
        model, _data(), attack, _DDP_ADV, checkpoint_dir=checkpoint_dir, progress=False
    )
    rmd_model, gen, enc = _models()
    rmd_hist = robust_manifold_train(
        rmd_model, gen, _data(), _rmd_config(**_DDP_RMD), encoder=enc, progress=False
    )
    return {
        "adv": _params(model),
        "adv_hist": adv_hist,
        "rmd": _params(rmd_model),
        "rmd_hist": rmd_hist,
        "rows": torch.tensor(rows),
    }


def _settle_interrupted_ranks() -> None:
    """After a simulated crash, free the dead run's DistributedDataParallel wrapper (and its reducer) on every rank
    at the same point, then meet at a barrier, so no rank collects it while its peer is already inside the next
    run's collectives (a rank aborted with SIGABRT "terminate called without an active exception" in about 1 of
    20 runs without this)."""
    import gc

    import torch.distributed as dist

    gc.collect()
    if dist.is_initialized():
        dist.barrier()


def _ddp_worker(rank: int, port: int, out: str) -> None:
    import faulthandler

    faulthandler.enable(all_threads=True)  # a rank killed by SIGABRT prints where every thread was
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank)
    )
    result = _ddp_runs(Path(out) / "ckpt", interrupt=True)
    torch.save(result, Path(out) / f"rank{rank}.pt")
    # tear the group down together: a rank exiting while its peer is still inside gloo can abort the peer
    # (seen once as SIGABRT "terminate called without an active exception" in a loaded full run)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    # Leave without running the interpreter's and C++ runtime's exit-time destructors: a gloo/DDP thread still
    # joinable when its static owner is destroyed calls std::terminate ("terminate called without an active
    # exception", SIGABRT with no Python frame on the stack), which failed CI once on rank 1 after every
    # result was saved. The result file is closed above; os._exit(0) is a clean exit for mp.spawn.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_process_ddp_equals_one_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    single = _ddp_runs(None, interrupt=False)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        # each rank trained on its half of every global batch of 32
        assert set(got["rows"].tolist()) == {16} and single["rows"].tolist() == [32] * _DDP_ADV.steps
        for key in ("adv", "rmd"):
            torch.testing.assert_close(got[key], single[key], rtol=1e-5, atol=1e-6)
        for key in ("adv_hist", "rmd_hist"):  # metrics averaged over ranks: the same history on every rank
            assert len(got[key]) == len(single[key])
            for a, b in zip(got[key], single[key], strict=True):
                assert a.keys() == b.keys()
                assert all(a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6) for k in a)
    # only rank 0 wrote (no stray temporary files), and the checkpoint holds the finished run
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["checkpoint.pt", "history.json"]
    assert load_checkpoint(tmp_path / "ckpt" / "checkpoint.pt")["step"] == _DDP_ADV.steps


def test_torchrun_environment_without_rank_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    model, _, _ = _models()
    with pytest.raises(ValueError, match="environment variable RANK"):
        adversarial_train(
            model, _data(), _train_attack(), AdversarialTrainConfig(steps=1, batch_size=32), progress=False
        )


# ------------------------------------------------------------------------------------------- bad input


def test_encoder_latent_size_mismatch_is_refused() -> None:
    model, gen, _ = _models()
    before = _params(model).clone()
    with pytest.raises(ValueError, match="encoder latent size does not match the generator"):
        robust_manifold_train(
            model, gen, _data(), _rmd_config(), encoder=_Enc(latent_dim=K + 1), progress=False
        )
    with pytest.raises(ValueError, match="expected an encoder"):
        robust_manifold_train(model, gen, _data(), _rmd_config(), progress=False)
    assert torch.equal(_params(model), before)


def test_images_outside_unit_range_are_refused() -> None:
    model, gen, enc = _models()
    before = _params(model).clone()
    x, y = _data()
    loader = TensorDataset(x * 2 - 0.5, y)
    with pytest.raises(ValueError, match=r"training images: expected values in \[0, 1\], got range"):
        adversarial_train(
            model, loader, _train_attack(), AdversarialTrainConfig(steps=2, batch_size=32), progress=False
        )
    with pytest.raises(ValueError, match=r"expected values in \[0, 1\]"):
        robust_manifold_train(model, gen, loader, _rmd_config(), encoder=enc, progress=False)
    with pytest.raises(ValueError, match=r"validation images: expected values in \[0, 1\]"):
        adversarial_train(
            model,
            (x, y),
            _train_attack(),
            AdversarialTrainConfig(steps=2, batch_size=32),
            val_data=(x + 1, y),
            progress=False,
        )
    assert torch.equal(_params(model), before)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("pixel_eps", -1.0),
        ("latent_eps", -0.5),
        ("op_eps", float("nan")),
        ("op_weight", -1.0),
        ("op_every", 0),
        ("op_multiplier_init", 0.0),
    ],
)
def test_negative_budgets_and_weights_are_refused(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"RobustManifoldConfig.{field}: expected"):
        RobustManifoldConfig(**{field: value})


def test_op_settings_reach_the_overpowered_attack() -> None:
    config = RobustManifoldConfig(
        op_eps=4.0, op_steps=7, op_step_size=0.05, op_multiplier_init=0.002, op_temperature=10.0, seed=3
    )
    op = config.op_attack().config
    assert (op.eps, op.steps, op.step_size, op.multiplier_init, op.temperature, op.seed) == (
        4.0,
        7,
        0.05,
        0.002,
        10.0,
        3,
    )
    default = RobustManifoldConfig().op_attack().config
    assert default.multiplier_init == 0.001 and default.temperature == 1.0
    with pytest.raises(ValueError, match=r"RobustManifoldConfig.op_temperature: expected a finite float > 0"):
        RobustManifoldConfig(op_temperature=0.0)


def test_other_bad_arguments() -> None:
    model, _, _ = _models()
    with pytest.raises(
        ValueError, match=r"AdversarialTrainConfig.clean_weight: expected a finite number >= 0"
    ):
        AdversarialTrainConfig(clean_weight=-1.0)
    with pytest.raises(ValueError, match=r"expected eps to be finite and >= 0"):
        ThreatModel(Norm.L2, -1.0)
    with pytest.raises(TypeError, match=r"expected attack to be an attacks\.Attack"):
        adversarial_train(model, _data(), "pgd", progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"training labels: expected whole-number class indices, got 0\.5 at row 0"):
        x, y = _data()
        adversarial_train(model, (x, y.float() + 0.5), _train_attack(), progress=False)


class _RecordingPGD(PGD):
    """PGD that logs the budget and step size it was run with (the log is shared by the trainer's copies)."""

    def __init__(self, threat: ThreatModel, config: PGDConfig, log: list[tuple[float, float]]) -> None:
        super().__init__(threat, config)
        self.log = log

    def run(self, model: Any, x: Tensor, y: Tensor) -> Tensor:
        assert self.config.step_size is not None
        self.log.append((self.threat.eps, self.config.step_size))
        return super().run(model, x, y)


def test_eps_warmup_scales_budget_and_step_size_then_holds() -> None:
    """``eps_warmup=0.4`` of 10 steps: the budget (and PGD's step) grow over the first 4 steps, then stay full."""
    model, _, _ = _models()
    log: list[tuple[float, float]] = []
    attack = _RecordingPGD(ThreatModel(Norm.LINF, 0.2), PGDConfig(steps=2, step_size=0.08), log)
    config = AdversarialTrainConfig(steps=10, batch_size=32, log_every=5, eps_warmup=0.4)
    adversarial_train(model, _data(), attack, config, progress=False)
    factors = [0.25, 0.5, 0.75] + [1.0] * 7
    assert [config.budget_factor(s) for s in range(10)] == factors
    assert len(log) == 10
    for (eps, step), f in zip(log, factors, strict=True):
        assert eps == pytest.approx(0.2 * f) and step == pytest.approx(0.08 * f)
    assert attack.threat.eps == 0.2 and attack.config.step_size == 0.08  # the caller's attack is untouched
    assert AdversarialTrainConfig(steps=10).budget_factor(0) == 1.0


@pytest.mark.parametrize("value", [-0.1, 1.0, float("nan"), True])
def test_bad_eps_warmup_is_refused(value: Any) -> None:
    with pytest.raises(
        ValueError, match=r"AdversarialTrainConfig.eps_warmup: expected a fraction in \[0, 1\)"
    ):
        AdversarialTrainConfig(eps_warmup=value)


# ------------------------------------------------------------------- Jalal et al.'s schedule (issue 17)


def test_l2_pgd_training_lowers_l2_adversarial_loss() -> None:
    """The ``l2-at`` baseline's configuration (l2 PGD with step 2 eps / steps, budget warm-up) on a tiny model."""
    from eval.train_cli import l2_pgd

    model, _, _ = _models()
    evaluation = PGD(ThreatModel(Norm.L2, 1.0), PGDConfig(steps=10))
    loss0, acc0 = _robustness(model, evaluation)
    attack = l2_pgd(1.0, 5, seed=0)
    assert attack.threat.norm is Norm.L2 and attack.config.step_size == pytest.approx(0.4)
    adversarial_train(
        model,
        _data(),
        attack,
        AdversarialTrainConfig(steps=60, batch_size=32, lr=3e-2, schedule="constant", eps_warmup=0.2),
        progress=False,
    )
    loss1, acc1 = _robustness(model, evaluation)
    assert loss1 < 0.6 * loss0 and acc1 > acc0 + 0.3


def test_op_consistency_on_valid_pairs_only() -> None:
    """``op_pairs="valid"`` (Jalal et al.'s code) trains on the found pairs only; with none found the term is 0."""
    model, gen, enc = _models()
    hist = robust_manifold_train(
        model, gen, _data(), _rmd_config(op_pairs="valid", op_every=1, steps=30), encoder=enc, progress=False
    )
    assert "op_loss" in hist[-1] and hist[-1]["op_loss"] >= 0
    # an unreachable budget: no pair is ever valid, so the consistency term is exactly 0 on every OP step
    model, gen, enc = _models()
    hist = robust_manifold_train(
        model,
        gen,
        _data(),
        _rmd_config(op_pairs="valid", op_every=1, steps=4, op_eps=0.0, log_every=1),
        encoder=enc,
        progress=False,
    )
    assert all(e["op_loss"] == 0.0 for e in hist if "op_loss" in e)
    with pytest.raises(ValueError, match="op_pairs"):
        _rmd_config(op_pairs="some")
