"""The diffusion prior (DDPM), its DDIM reverse process, its trainer, and diffusion purification (DiffPure).

An *oracle* noise network makes the reverse process checkable in closed form: when the data is one image x0, the
optimal noise prediction is ``eps(x_t, t) = (x_t - sqrt(abar_t) x0') / sqrt(1 - abar_t)`` (x0' = 2 x0 - 1), and the
deterministic DDIM reverse process from any timestep returns x0 exactly, whatever the input or its noise.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from manifold_defense.diffpure import DiffusionPurifier
from manifold_defense.diffusion import DiffusionModel, ddim_reverse, ddim_timesteps, sample
from manifold_defense.models.unet import UNet
from manifold_defense.training.diffusion import DDPMTrainConfig, train_ddpm


class Oracle(nn.Module):
    """The exact noise prediction for data concentrated on one image ``x0`` (in [0, 1])."""

    def __init__(self, x0: Tensor, alpha_bar: Tensor) -> None:
        super().__init__()
        self.register_buffer("x0", 2.0 * x0 - 1.0)
        self.register_buffer("abar", alpha_bar)
        self.scale = nn.Parameter(torch.ones(()))  # a parameter, so the module has one (device and dtype)

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        a = self.abar[t].view(-1, 1, 1, 1)
        return self.scale * (x_t - a.sqrt() * self.x0) / (1.0 - a).sqrt()


def _oracle_model(x0: Tensor) -> DiffusionModel:
    model = DiffusionModel(UNet(channels=(8, 8, 8)), timesteps=100)
    model.network = Oracle(x0, model.alpha_bar)
    return model


def _digit() -> Tensor:
    x0 = torch.zeros(1, 28, 28)
    x0[:, 6:22, 12:16] = 1.0
    return x0


def test_unet_shapes_and_zero_initial_output() -> None:
    net = UNet(channels=(8, 16, 16))
    x, t = torch.randn(3, 1, 28, 28), torch.tensor([0, 10, 999])
    out = net(x, t)
    assert out.shape == (3, 1, 28, 28)
    assert float(out.detach().abs().max()) == 0.0  # the output convolution starts at zero
    with pytest.raises(ValueError, match=r"\(B, 1, 28, 28\)"):
        net(torch.randn(2, 1, 8, 8), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="timesteps"):
        net(x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="multiples of 8"):
        UNet(channels=(8, 12, 16))


def test_ddim_timesteps() -> None:
    assert ddim_timesteps(999, 10) == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert ddim_timesteps(999, 1) == [999]
    ts = ddim_timesteps(300, 5)
    assert ts[0] == 300 and len(ts) == 5 and ts == sorted(ts, reverse=True)
    assert ddim_timesteps(3, 10) == [3, 2, 1, 0]  # never more steps than timesteps
    with pytest.raises(ValueError, match="reverse steps"):
        ddim_timesteps(10, 0)


@pytest.mark.parametrize("start,steps", [(99, 1), (99, 7), (40, 40), (10, 3)])
def test_ddim_reverse_of_the_oracle_returns_the_data_point(start: int, steps: int) -> None:
    x0 = _digit()
    model = _oracle_model(x0)
    x_t = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    out = ddim_reverse(model, x_t, start, steps)
    assert torch.allclose(out, x0.expand(4, -1, -1, -1), atol=1e-4)


def test_loss_is_zero_for_the_oracle_and_positive_for_a_fresh_unet() -> None:
    x0 = _digit()
    assert float(_oracle_model(x0).loss(x0.expand(8, -1, -1, -1)).detach()) < 1e-8
    fresh = DiffusionModel(UNet(channels=(8, 8, 8)), timesteps=100)
    assert float(fresh.loss(x0.expand(8, -1, -1, -1)).detach()) == pytest.approx(1.0, abs=0.35)  # predicts 0: E[eps^2] = 1


def test_sample_is_seeded_and_in_range() -> None:
    model = _oracle_model(_digit())
    a, b = sample(model, 3, steps=4, seed=5), sample(model, 3, steps=4, seed=5)
    assert torch.equal(a, b) and a.shape == (3, 1, 28, 28)
    assert torch.allclose(a, _digit().expand(3, -1, -1, -1), atol=1e-4)
    with pytest.raises(ValueError, match="number of samples"):
        sample(model, 0)


def test_purifier_randomness_is_explicit() -> None:
    model = DiffusionModel(UNet(channels=(8, 8, 8)), timesteps=100)
    torch.nn.init.normal_(model.network.out.weight, std=0.1)  # a network whose output depends on its input
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    random = DiffusionPurifier(model, t_star=50, steps=3, randomize=True, seed=3)
    first, second = random(x), random(x)
    assert not torch.allclose(first, second)  # fresh noise on every call
    random.reseed(3)
    assert torch.equal(random(x), first)  # the stream restarts
    fixed = DiffusionPurifier(model, t_star=50, steps=3, randomize=False, seed=3)
    assert torch.equal(fixed(x), fixed(x))  # the "noise fixed" defense is a function of its input
    # ... of each image, not of its place in the batch (the harness re-judges subsets of a chunk)
    torch.testing.assert_close(fixed(x)[1:2], fixed(x[1:2]), atol=1e-5, rtol=0)
    torch.testing.assert_close(fixed(x.flip(0)).flip(0), fixed(x), atol=1e-5, rtol=0)
    ancestral = DiffusionPurifier(model, t_star=50, steps=3, eta=1.0, randomize=False, seed=3)
    torch.testing.assert_close(ancestral(x)[1:2], ancestral(x[1:2]), atol=1e-5, rtol=0)
    assert fixed.network_evals == 3 and fixed.last_network_evals == 3
    assert random.with_steps(1).network_evals == 1


def test_purifier_projects_onto_the_oracles_data_and_leaves_inputs_alone() -> None:
    x0 = _digit()
    purifier = DiffusionPurifier(_oracle_model(x0), t_star=60, steps=6, eta=1.0)
    x = torch.rand(3, 1, 28, 28)
    before = x.clone()
    assert torch.allclose(purifier(x), x0.expand(3, -1, -1, -1), atol=1e-4)
    assert torch.equal(x, before)


def test_exact_gradient_through_the_reverse_process_with_checkpointing() -> None:
    model = DiffusionModel(UNet(channels=(8, 8, 8)), timesteps=100)
    torch.nn.init.normal_(model.network.out.weight, std=0.1)
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointed in (True, False):
        purifier = DiffusionPurifier(model, t_star=30, steps=3, randomize=False, grad_checkpoint=checkpointed)
        xr = x.clone().requires_grad_(True)
        purifier(xr).pow(2).sum().backward()
        assert xr.grad is not None
        grads.append(xr.grad)
    assert float(grads[0].abs().sum()) > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_purifier_refuses_bad_inputs() -> None:
    purifier = DiffusionPurifier(_oracle_model(_digit()), t_star=10, steps=2)
    with pytest.raises(ValueError, match=r"\(B, 1, 28, 28\)"):
        purifier(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        purifier(torch.full((1, 1, 28, 28), float("nan")))
    with pytest.raises(TypeError, match="tensor"):
        purifier([0.5])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="t_star"):
        DiffusionPurifier(_oracle_model(_digit()), t_star=100, steps=2)
    with pytest.raises(ValueError, match="eta"):
        DiffusionPurifier(_oracle_model(_digit()), t_star=10, steps=2, eta=2.0)
    with pytest.raises(TypeError, match="DiffusionModel"):
        DiffusionPurifier(nn.Identity(), t_star=10, steps=2)  # type: ignore[arg-type]


def _tiny_run(tmp_path, steps: int, **changes: object) -> tuple[nn.Module, list[dict[str, float]]]:
    torch.manual_seed(0)
    model = DiffusionModel(UNet(channels=(8, 8, 8)), timesteps=50)
    data = TensorDataset(torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0)))
    base = {"steps": steps, "batch_size": 4, "warmup": 2, "checkpoint_every": 2, "log_every": 2, "autocast": "none"}
    config = DDPMTrainConfig(**{**base, **changes})  # type: ignore[arg-type]
    ema, history = train_ddpm(model, data, config, checkpoint_dir=tmp_path, progress=False)
    return ema.module, history


def test_ddpm_training_resumes_exactly_and_may_be_extended(tmp_path) -> None:
    whole, _ = _tiny_run(tmp_path / "whole", 6)
    _tiny_run(tmp_path / "parts", 4)
    resumed, history = _tiny_run(tmp_path / "parts", 6)  # the step target grows: allowed
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert [h["step"] for h in history] == [2.0, 4.0, 6.0]
    with pytest.raises(ValueError, match="lr"):
        _tiny_run(tmp_path / "parts", 8, lr=1e-3)


def test_ddpm_config_refuses_bad_values() -> None:
    with pytest.raises(ValueError, match="autocast"):
        DDPMTrainConfig(autocast="fp8")
    with pytest.raises(ValueError, match="ema_decay"):
        DDPMTrainConfig(ema_decay=1.0)
    with pytest.raises(TypeError, match="DiffusionModel"):
        train_ddpm(nn.Identity(), TensorDataset(torch.rand(4, 1, 28, 28)))  # type: ignore[arg-type]
