"""Training loop: loss goes down, checkpoints resume exactly, bad input is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from manifold_defense.integrity import save_checked
from manifold_defense.models import VAE
from manifold_defense.training import (
    ClassifierTrainConfig,
    LoopConfig,
    run_loop,
    train_classifier,
)
from manifold_defense.training.loop import load_checkpoint, training_time


def _toy_data(n: int = 256) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (n,), generator=g)
    images = torch.rand(n, 1, 28, 28, generator=g) * 0.3
    images[labels == 1, :, 10:18, 10:18] += 0.6
    return TensorDataset(images.clamp(0, 1), labels)


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_classifier_training_lowers_loss() -> None:
    torch.manual_seed(1)
    model = _Tiny()
    before = _loss(model)
    hist = train_classifier(
        model, _toy_data(), ClassifierTrainConfig(steps=40, batch_size=32, lr=3e-3), progress=False
    )
    assert not model.training
    assert _loss(model) < 0.35 * before
    assert hist[-1]["step"] == 40.0 and hist[-1]["acc"] > 0.8


def _loss(model: nn.Module) -> float:
    model.eval()
    x, y = _toy_data().tensors
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(x), y))


class _Interrupt(RuntimeError):
    pass


def test_resume_equals_uninterrupted_run(tmp_path: Path) -> None:
    cfg = ClassifierTrainConfig(steps=12, batch_size=32, checkpoint_every=5, seed=3)
    torch.manual_seed(0)
    reference = _Tiny()
    start_state = {k: v.clone() for k, v in reference.state_dict().items()}
    ref_hist = train_classifier(reference, _toy_data(), cfg, checkpoint_dir=tmp_path / "ref", progress=False)

    # run the real trainer but interrupt it through a patched optimizer step
    interrupted = _Tiny()
    interrupted.load_state_dict(start_state)
    original_step = torch.optim.Adam.step
    counter = {"n": 0}

    def flaky_step(self: torch.optim.Adam, *args: object, **kwargs: object) -> object:
        counter["n"] += 1
        if counter["n"] == 8:
            raise _Interrupt
        return original_step(self, *args, **kwargs)

    torch.optim.Adam.step = flaky_step  # type: ignore[method-assign]
    try:
        with pytest.raises(_Interrupt):
            train_classifier(interrupted, _toy_data(), cfg, checkpoint_dir=tmp_path / "run", progress=False)
    finally:
        torch.optim.Adam.step = original_step  # type: ignore[method-assign]
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    resumed = _Tiny()  # a fresh process would rebuild the model from scratch
    hist = train_classifier(resumed, _toy_data(), cfg, checkpoint_dir=tmp_path / "run", progress=False)
    torch.testing.assert_close(_params(resumed), _params(reference), rtol=0, atol=0)
    assert hist == ref_hist
    # the record of who trained it: the interrupted process up to its last checkpoint (step 5), then the resume
    timing = training_time(tmp_path / "run")
    assert timing is not None
    assert [s["steps"] for s in timing["segments"]] == [[0, 5], [5, 12]]
    assert all(s["seconds"] >= 0 and s["device"] == "cpu" for s in timing["segments"])
    assert timing["seconds"] == pytest.approx(sum(s["seconds"] for s in timing["segments"]), abs=0.11)
    assert training_time(tmp_path / "absent") is None


def test_training_time_of_a_checkpoint_that_predates_segments(tmp_path: Path) -> None:
    x = torch.zeros(8, 1)
    model = nn.Linear(1, 1)

    def step(_step: int, _batch: tuple[torch.Tensor, ...]) -> dict[str, float]:
        return {"loss": 0.0}

    run_loop(step, (x,), LoopConfig(steps=4, batch_size=2, checkpoint_every=2), {"m": model},
             checkpoint_dir=tmp_path, progress=False, extendable=True)  # fmt: skip
    path = tmp_path / "checkpoint.pt"
    ckpt = load_checkpoint(path)
    del ckpt["segments"]  # as a checkpoint written before segments were recorded
    save_checked(ckpt, path)
    unknown = {"steps": [0, 4], "seconds": None, "device": None, "threads": None}
    assert training_time(tmp_path) == {"seconds": None, "segments": [unknown]}
    # continued by a later process: its own time is known, the older steps' is not, so the total is unknown
    run_loop(step, (x,), LoopConfig(steps=6, batch_size=2, checkpoint_every=2), {"m": model},
             checkpoint_dir=tmp_path, progress=False, extendable=True)  # fmt: skip
    timing = training_time(tmp_path)
    assert timing is not None and timing["seconds"] is None
    assert timing["segments"][0] == unknown and timing["segments"][1]["steps"] == [4, 6]
    assert timing["segments"][1]["seconds"] >= 0


def test_checkpoint_from_another_run_is_refused(tmp_path: Path) -> None:
    train_classifier(
        _Tiny(),
        _toy_data(),
        ClassifierTrainConfig(steps=3, batch_size=32),
        checkpoint_dir=tmp_path,
        progress=False,
    )
    with pytest.raises(ValueError, match=r"other settings \(steps: checkpoint 3, this run 4\)"):
        train_classifier(
            _Tiny(),
            _toy_data(),
            ClassifierTrainConfig(steps=4, batch_size=32),
            checkpoint_dir=tmp_path,
            progress=False,
        )


def test_global_rng_untouched() -> None:
    model = _Tiny()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    train_classifier(model, _toy_data(), ClassifierTrainConfig(steps=2, batch_size=32), progress=False)
    assert torch.equal(before, torch.get_rng_state())


def test_bad_images_and_configs_are_refused() -> None:
    x, y = _toy_data(64).tensors
    with pytest.raises(ValueError, match=r"expected values in \[0, 1\]"):
        train_classifier(_Tiny(), TensorDataset(x * 3.0, y), ClassifierTrainConfig(steps=1), progress=False)
    with pytest.raises(ValueError, match="lr must be a finite number >= 0"):
        ClassifierTrainConfig(lr=-1.0)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        LoopConfig(steps=0, batch_size=4)
    with pytest.raises(ValueError, match="smaller than one batch"):
        run_loop(lambda s, b: {}, (x[:3],), LoopConfig(steps=1, batch_size=4), {}, progress=False)


def test_vae_loss_is_finite_and_positive() -> None:
    vae = VAE(latent_dim=4, hidden=16)
    x = _toy_data(8).tensors[0]
    loss = vae.elbo_loss(x, torch.zeros(8, 4))
    loss = loss.detach()
    assert loss.shape == (8,) and bool(torch.isfinite(loss).all()) and float(loss.min()) > 0
