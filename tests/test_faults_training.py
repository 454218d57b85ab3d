"""Faults around training: every trainer's resume is bound to its settings, broken checkpoints and full disks are
refused by name, training data of another shape gets one clear message (issue 37)."""

from __future__ import annotations

import copy
import errno
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from attacks import PGD, Norm, PGDConfig, ThreatModel
from manifold_defense import integrity
from manifold_defense.ambient import BlockPixels, measure_dataset, train_ambient
from manifold_defense.causal import CausalController, CausalGraph, Node, one_hot_labels, train_controller
from manifold_defense.causal.models import train_causal_gan
from manifold_defense.integrity import DiskFullError, IntegrityError
from manifold_defense.inversion import InversionConfig
from manifold_defense.models import VAE
from manifold_defense.training import (
    AdversarialTrainConfig,
    ClassifierTrainConfig,
    EncoderTrainConfig,
    GANTrainConfig,
    RobustManifoldConfig,
    VAETrainConfig,
    adversarial_train,
    robust_manifold_train,
    train_classifier,
    train_encoder,
    train_gan,
    train_vae,
)
from manifold_defense.training.loop import _check_resumable, load_checkpoint

K = 4  # latent size of the toy generators
GRAPH = CausalGraph([Node("A", ("a0", "a1")), Node("B", ("b0", "b1"), ("A",))])
OTHER_GRAPH = CausalGraph([Node("A", ("a0", "a1")), Node("B", ("b0", "b1"))])  # same one-hot size, no edge


def _data(n: int = 64, seed: int = 0) -> tuple[Tensor, Tensor]:
    """8x8 images in [0, 1]: class 1 has a bright square."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.rand(n, 1, 8, 8, generator=g) * 0.2
    x[y == 1, :, 2:6, 2:6] += 0.7
    return x.clamp(0, 1), y


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 2))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class _Gen(nn.Module):
    latent_dim = K

    def __init__(self, conditions: int = 0) -> None:
        super().__init__()
        self.label_dim = conditions
        self.lin = nn.Linear(K + conditions, 64)

    def forward(self, z: Tensor, c: Tensor | None = None) -> Tensor:
        return torch.sigmoid(self.lin(z if c is None else torch.cat([z, c], 1))).view(-1, 1, 8, 8)


class _Critic(nn.Module):
    def __init__(self, conditions: int = 0) -> None:
        super().__init__()
        self.lin = nn.Linear(64 + conditions, 1)

    def forward(self, x: Tensor, c: Tensor | None = None) -> Tensor:
        h = x.flatten(1)
        return self.lin(h if c is None else torch.cat([h, c], 1)).squeeze(1)


class _Enc(nn.Module):
    latent_dim = K

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, K)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x.flatten(1))


def _params(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _attack(eps: float = 0.15) -> PGD:
    return PGD(ThreatModel(Norm.LINF, eps), PGDConfig(steps=2, step_size=0.05))


SMALL = {"steps": 4, "batch_size": 16, "checkpoint_every": 2}
GAN = {**SMALL, "ema_decay": 0.9, "bn_batches": 0}


def _run(trainer: str, ckpt: Path | None, *, model: nn.Module | None = None, **changes: Any) -> tuple[nn.Module, Any]:
    """Run ``trainer`` on tiny data with its small config updated by ``changes`` (the pseudo-fields ``eps``, ``p``
    and ``graph`` change the attack, the measurement and the causal graph); the trained model and the history."""
    torch.manual_seed(0)
    x, y = _data()
    kw: dict[str, Any] = {"checkpoint_dir": ckpt, "progress": False}
    if trainer in ("classifier", "adversarial", "robust-manifold"):
        net, gen, enc = _MLP(), _Gen(), _Enc()  # built in one order, so the frozen models never depend on `model`
        net = model or net
        if trainer == "classifier":
            return net, train_classifier(net, TensorDataset(x, y), ClassifierTrainConfig(**{**SMALL, **changes}), **kw)
        if trainer == "adversarial":
            eps = changes.pop("eps", 0.15)
            cfg = AdversarialTrainConfig(**{**SMALL, "log_every": 2, **changes})
            return net, adversarial_train(net, (x, y), _attack(eps), cfg, **kw)
        cfg = RobustManifoldConfig(**{**SMALL, "steps": 2, "pixel_steps": 1, "latent_steps": 1, "op_steps": 1,
                                      "op_every": 1, "inversion": InversionConfig(init="encoder", steps=1), **changes})  # fmt: skip
        return net, robust_manifold_train(net, gen, (x, y), cfg, encoder=enc, **kw)
    if trainer == "encoder":
        gen, enc = _Gen(), _Enc()
        enc = model or enc
        return enc, train_encoder(enc, gen, TensorDataset(x), EncoderTrainConfig(**{**SMALL, **changes}), **kw)
    if trainer == "vae":
        vae = model or VAE(latent_dim=2, hidden=8)
        images = torch.rand(32, 1, 28, 28, generator=torch.Generator().manual_seed(1))
        return vae, train_vae(vae, TensorDataset(images), VAETrainConfig(**{**SMALL, **changes}), **kw)
    if trainer == "gan":
        gen = model or _Gen()
        return gen, train_gan(gen, _Critic(), TensorDataset(x), GANTrainConfig(**{**GAN, **changes}), **kw)
    if trainer == "ambient":
        gen, f = model or _Gen(), BlockPixels(changes.pop("p", 0.5))
        data = measure_dataset(x, f, seed=0)
        return gen, train_ambient(gen, _Critic(), data, f, "ambient", GANTrainConfig(**{**GAN, **changes}),
                                  data_settings={"measure_seed": 0}, **kw)  # fmt: skip
    assert trainer == "causal-gan"
    graph = changes.pop("graph", GRAPH)
    gen = model or _Gen(conditions=4)
    labels = torch.stack([y, 1 - y], 1)
    return gen, train_causal_gan(gen, _Critic(conditions=4), x, labels, graph, GANTrainConfig(**{**GAN, **changes}), **kw)


# ------------------------------------------------------------------------------- resume bound to settings

REFUSED = [  # (trainer, a run-defining change, what the message must name)
    ("classifier", {"lr": 2e-3}, r"lr: checkpoint 0\.001, this run 0\.002"),
    ("classifier", {"steps": 6}, r"steps: checkpoint 4, this run 6"),  # cosine decay over the run: run-defining
    ("encoder", {"latent_weight": 0.5}, r"latent_weight: checkpoint 0\.001, this run 0\.5"),
    ("vae", {"batch_size": 8}, r"batch_size: checkpoint 16, this run 8"),
    ("gan", {"beta1": 0.0}, r"beta1: checkpoint 0\.5, this run 0\.0"),
    ("ambient", {"p": 0.6}, r"measured_by: checkpoint \{'name': 'block-pixels', 'p': 0\.5\}, this run \{.*'p': 0\.6\}; measurement"),
    ("causal-gan", {"graph": OTHER_GRAPH}, r"graph: checkpoint \{'A'.*'parents': \['A'\]\}\}, this run"),
    ("adversarial", {"eps": 0.3}, r"attack: checkpoint \{.*'eps': 0\.15.*\}, this run \{.*'eps': 0\.3"),
    ("adversarial", {"lr": 1e-2}, r"lr: checkpoint 0\.001, this run 0\.01"),
    ("robust-manifold", {"pixel_eps": 2.0}, r"pixel_eps: checkpoint 1\.5, this run 2\.0"),
]


@pytest.mark.parametrize(("trainer", "change", "named"), REFUSED, ids=[f"{t}-{next(iter(c))}" for t, c, _ in REFUSED])
def test_a_resume_under_a_changed_run_defining_setting_is_refused_naming_it(
    tmp_path: Path, trainer: str, change: dict[str, Any], named: str
) -> None:
    _run(trainer, tmp_path)
    before = load_checkpoint(tmp_path / "checkpoint.pt")
    assert before["trainer"] == trainer and before["step"] == (2 if trainer == "robust-manifold" else 4)
    with pytest.raises(ValueError, match=f"trained with other settings \\({named}"):
        _run(trainer, tmp_path, **change)
    # the refused run left the checkpoint as it was
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == before["step"]


ACCEPTED = [  # (trainer, changes that only touch logging, checkpointing or (extendable) the step target, steps done)
    ("classifier", {"checkpoint_every": 3}, 4),
    ("encoder", {"checkpoint_every": 1}, 4),
    ("vae", {"checkpoint_every": 3}, 4),
    ("adversarial", {"log_every": 1, "validate_every": 3, "checkpoint_every": 1}, 4),
    ("robust-manifold", {"log_every": 1, "checkpoint_every": 1}, 2),
    ("gan", {"steps": 6, "checkpoint_every": 3, "bn_batches": 2, "lr_decay_from": 4}, 6),
    ("ambient", {"steps": 6}, 6),
    ("causal-gan", {"steps": 6}, 6),
]


@pytest.mark.parametrize(("trainer", "change", "done"), ACCEPTED, ids=[t for t, _, _ in ACCEPTED])
def test_logging_and_step_target_changes_resume(tmp_path: Path, trainer: str, change: dict[str, Any], done: int) -> None:
    _, first = _run(trainer, tmp_path)
    _, hist = _run(trainer, tmp_path, **change)
    assert hist[: len(first)] == first  # the history resumed, not restarted
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == done


def test_an_extended_gan_run_equals_one_longer_run(tmp_path: Path) -> None:
    long, _ = _run("ambient", tmp_path / "long", steps=6)
    _run("ambient", tmp_path / "run")
    resumed, _ = _run("ambient", tmp_path / "run", model=_Gen(), steps=6)
    torch.testing.assert_close(resumed.state_dict(), long.state_dict(), rtol=0, atol=0)


def test_adversarial_training_refuses_a_standard_training_checkpoint(tmp_path: Path) -> None:
    _run("classifier", tmp_path)
    with pytest.raises(ValueError, match="written by the classifier trainer, this run is the adversarial trainer"):
        _run("adversarial", tmp_path)
    _run("gan", tmp_path / "gan")
    with pytest.raises(ValueError, match="written by the gan trainer, this run is the ambient trainer"):
        _run("ambient", tmp_path / "gan")


class _Interrupt(RuntimeError):
    pass


def _interrupted(monkeypatch: pytest.MonkeyPatch, trainer: str, ckpt: Path, **changes: Any) -> None:
    """Run ``trainer`` and kill it inside its third step (after the checkpoint of step 2)."""
    real_step, calls = torch.optim.Adam.step, {"n": 0}

    def flaky(self: torch.optim.Adam, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 4:
            raise _Interrupt
        return real_step(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch.optim.Adam, "step", flaky)
        with pytest.raises(_Interrupt):
            _run(trainer, ckpt, **changes)


@pytest.mark.parametrize("trainer", ["adversarial", "encoder"])
def test_an_interrupted_run_resumes_to_exactly_the_uninterrupted_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trainer: str
) -> None:
    reference, ref_hist = _run(trainer, tmp_path / "ref", steps=6)
    _interrupted(monkeypatch, trainer, tmp_path / "run", steps=6)
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 2
    fresh = _MLP() if trainer == "adversarial" else _Enc()  # a new process rebuilds the model
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)  # other starting weights: everything must come from the checkpoint
    resumed, hist = _run(trainer, tmp_path / "run", model=fresh, steps=6)
    torch.testing.assert_close(_params(resumed), _params(reference), rtol=0, atol=0)
    assert hist == ref_hist


# ------------------------------------------------------------------------------ broken files, full disks


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str]] = {
    "flipped-byte": (_flip, "does not match the SHA-256 written with it"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:-1000]), "does not match the SHA-256 written with it"),
    "empty": (lambda p: p.write_bytes(b""), "is empty"),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_a_damaged_checkpoint_is_refused_naming_the_file(tmp_path: Path, kind: str) -> None:
    _run("classifier", tmp_path)
    path = tmp_path / "checkpoint.pt"
    damage, says = CORRUPTIONS[kind]
    damage(path)
    with pytest.raises(IntegrityError, match=f"training checkpoint {path} {says}.*delete it"):
        _run("classifier", tmp_path)


def test_a_full_disk_while_checkpointing_raises_disk_full_and_keeps_the_last_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference, _ = _run("classifier", tmp_path / "ref")
    real_replace, calls = os.replace, {"n": 0}

    def replace(src: Any, dst: Any) -> None:
        if Path(dst).name == "checkpoint.pt":
            calls["n"] += 1
            if calls["n"] == 2:  # the checkpoint of step 4
                raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(integrity.os, "replace", replace)
    with pytest.raises(DiskFullError, match=r"checkpoint\.pt: no space left on its file system.*unchanged"):
        _run("classifier", tmp_path / "run")
    monkeypatch.setattr(integrity.os, "replace", real_replace)
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 2
    assert [p.name for p in (tmp_path / "run").iterdir() if ".tmp-" in p.name] == []  # no temporary left behind
    resumed, _ = _run("classifier", tmp_path / "run", model=_MLP())
    torch.testing.assert_close(_params(resumed), _params(reference), rtol=0, atol=0)


def _upgrade_script() -> Any:
    path = Path(__file__).resolve().parents[1] / "scripts" / "upgrade_checkpoint.py"
    spec = importlib.util.spec_from_file_location("upgrade_checkpoint", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("upgrade_checkpoint", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_an_older_format_checkpoint_is_refused_and_converts_with_the_script(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference, _ = _run("classifier", tmp_path / "ref", steps=6)
    _interrupted(monkeypatch, "classifier", tmp_path, steps=6)
    path = tmp_path / "checkpoint.pt"
    ckpt = load_checkpoint(path)
    assert ckpt["step"] == 2
    torch.save({k: v for k, v in ckpt.items() if k not in ("trainer", "settings")}, path)  # the older format
    with pytest.raises(IntegrityError, match=r"older format .*scripts/upgrade_checkpoint\.py"):
        _run("classifier", tmp_path, steps=6)
    script = _upgrade_script()
    with pytest.raises(ValueError, match="written by another run"):  # the loop record still has to fit
        script.upgrade(lambda: _run("classifier", tmp_path, steps=7))
    done = script.upgrade(lambda: _run("classifier", tmp_path, steps=6))
    assert done.converted and done.trainer == "classifier" and done.settings["lr"] == 1e-3
    assert done.backup is not None and done.backup.read_bytes()[:4] == b"PK\x03\x04"
    assert not script.upgrade(lambda: _run("classifier", tmp_path, steps=6), check=True).converted
    resumed, _ = _run("classifier", tmp_path, model=_MLP(), steps=6)
    torch.testing.assert_close(_params(resumed), _params(reference), rtol=0, atol=0)


def test_the_committed_training_state_resumes_under_its_documented_settings() -> None:
    """training-state/README.md's commands: ``train gan --set pack=2`` and ``train ambient --measurement
    block-pixels --p 0.9``, each with a larger --steps (the GAN trainers are extendable)."""
    root = Path(__file__).resolve().parents[1] / "training-state"
    f = BlockPixels(0.9)
    ambient = {"measurement": f.spec(), "conditional": False, "method": "ambient", "measured_by": f.spec(),
               "data": {"measure_seed": 0}}  # fmt: skip
    cases = [
        (root / "mnist-gan/checkpoints/gan/checkpoint.pt", "gan", {"pack": 2}, {"measurement": None, "conditional": False}),
        (root / "mnist-ambient-gan/checkpoints/ambient-ambient-block-pixels-p0.9/checkpoint.pt", "ambient", {}, ambient),
    ]
    for path, trainer, fields, extra in cases:
        ckpt = load_checkpoint(path)
        config = GANTrainConfig(steps=ckpt["step"] + 1000, **fields)
        _check_resumable(ckpt, config.loop(trainer, **extra), True, path)
        with pytest.raises(ValueError, match=r"other settings \(lr: checkpoint 0\.0002, this run 0\.0001\)"):
            _check_resumable(ckpt, GANTrainConfig(lr=1e-4, **fields).loop(trainer, **extra), True, path)


# ------------------------------------------------------------------------------------- training data


def test_training_data_in_other_shapes_gets_one_clear_message() -> None:
    x, y = _data(32)
    cfg = ClassifierTrainConfig(steps=2, batch_size=16)

    def train(data: Any) -> Any:
        return train_classifier(_MLP(), data, cfg, progress=False)

    class Dicts(torch.utils.data.Dataset[dict[str, Tensor]]):
        def __len__(self) -> int:
            return 32

        def __getitem__(self, i: int) -> dict[str, Tensor]:
            return {"image": x[i], "label": y[i]}

    accepts = r"expected a TensorDataset, an indexable Dataset whose examples are \(image, label, \.\.\.\) tuples"
    with pytest.raises(TypeError, match=f"{accepts}.*example 0 is a dict with keys \\['image', 'label'\\]"):
        train(Dicts())
    with pytest.raises(TypeError, match="got a DataLoader: pass its dataset"):
        train(DataLoader(TensorDataset(x, y), batch_size=4))
    with pytest.raises(TypeError, match=r"holding list at position 1: convert each column with torch\.as_tensor"):
        train((x, y.tolist()))
    with pytest.raises(TypeError, match=r"got Tensor \(a bare tensor: wrap it as TensorDataset\(images\)\)"):
        train(x)
    with pytest.raises(ValueError, match=r"training labels: expected whole-number class indices, got 0\.5 at row 3"):
        train(TensorDataset(x, torch.where(torch.arange(32) == 3, 0.5, y.float())))
    with pytest.raises(ValueError, match=r"one-hot or soft labels: pass labels\.argmax\(1\)"):
        train(TensorDataset(x, torch.nn.functional.one_hot(y).float()))
    with pytest.raises(ValueError, match=r"training labels: expected class indices in 0\.\.1, got 2 at row 0"):
        train(TensorDataset(x, torch.where(torch.arange(32) == 0, 2, y)))  # 2 logits
    with pytest.raises(ValueError, match=r"training images: expected a float tensor \(N, C, H, W\), got torch\.uint8"):
        train(TensorDataset((x * 255).to(torch.uint8), y))
    with pytest.raises(TypeError, match="got a DataLoader"):  # the same helper behind every trainer
        adversarial_train(_MLP(), DataLoader(TensorDataset(x, y)), _attack(), progress=False)
    with pytest.raises(TypeError, match="example 0 is a dict"):
        train_gan(_Gen(), _Critic(), Dicts(), GANTrainConfig(steps=1, batch_size=16), progress=False)
    # any integer dtype and whole-number floats are converted: the same run as int64 labels
    torch.manual_seed(0)
    start = _MLP()
    results = []
    for labels in (y, y.int(), y.to(torch.uint8), y.double(), [(x[i], int(y[i])) for i in range(32)]):
        net = copy.deepcopy(start)
        data = labels if isinstance(labels, list) else TensorDataset(x, labels)
        train_classifier(net, data, cfg, progress=False)  # a list of (image, int) tuples is an indexable dataset
        results.append(_params(net))
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=0, atol=0)


def test_causal_labels_are_whole_value_indices_within_each_nodes_range() -> None:
    rows = torch.tensor([[0, 1], [1, 0], [1, 1], [0, 0]])
    with pytest.raises(ValueError, match=r"labels of node 'B': expected whole-number value indices, got 0\.6 at row 1"):
        train_controller(CausalController(GRAPH), torch.tensor([[0.0, 1.0], [1.0, 0.6]]), steps=1)
    with pytest.raises(ValueError, match=r"labels of node 'B': expected value indices in 0\.\.1, got 2 at row 2"):
        one_hot_labels(GRAPH, torch.tensor([[0, 1], [1, 0], [1, 2]]))
    with pytest.raises(ValueError, match=r"labels of node 'A': expected value indices in 0\.\.1, got -1 at row 0"):
        one_hot_labels(GRAPH, torch.tensor([[-1, 0]]))
    with pytest.raises(ValueError, match=r"labels of node 'A': expected value indices in 0\.\.1, got 3"):
        train_causal_gan(_Gen(4), _Critic(4), torch.rand(2, 1, 8, 8), torch.tensor([[3, 0], [0, 0]]), GRAPH,
                         GANTrainConfig(steps=1, batch_size=2), progress=False)  # fmt: skip
    assert torch.equal(one_hot_labels(GRAPH, rows.float()), one_hot_labels(GRAPH, rows))
    fits = []
    for labels in (rows, rows.float(), rows.to(torch.int8)):
        ctrl = CausalController(GRAPH, hidden=4)
        fits.append(train_controller(ctrl, labels, steps=5)["nll"])
    assert fits[0] == fits[1] == fits[2]
