"""BPDA: forward value of the module, backward gradient of the surrogate (identity by default)."""

from __future__ import annotations

import pytest
import torch
from test_attacks_fixtures import trained_classifier
from torch import Tensor, nn

from attacks import BPDA, PGD, Norm, PGDConfig, ThreatModel


class Quantize(nn.Module):
    """Round to 4 levels: zero gradient almost everywhere, the textbook obfuscated-gradient preprocessing."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.round(x * 3) / 3


class CountingModule(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.grad_enabled_calls: list[bool] = []

    def forward(self, x: Tensor) -> Tensor:
        self.grad_enabled_calls.append(torch.is_grad_enabled())
        return x.flip(-1) ** 2


def test_forward_is_exactly_the_module() -> None:
    x = torch.rand(3, 1, 4, 4, requires_grad=True)
    out = BPDA(Quantize())(x)
    assert torch.equal(out, Quantize()(x))
    out_s = BPDA(Quantize(), surrogate=torch.sigmoid)(x)
    assert torch.equal(out_s, Quantize()(x))


def test_backward_is_identity_without_surrogate() -> None:
    x = torch.rand(2, 1, 3, 3, requires_grad=True)
    weights = torch.randn(2, 1, 3, 3)
    (BPDA(Quantize())(x) * weights).sum().backward()
    assert x.grad is not None
    assert torch.equal(x.grad, weights)  # d/dx of identity, times the upstream gradient


def test_backward_is_the_surrogate_gradient() -> None:
    x = torch.rand(2, 5, requires_grad=True)
    weights = torch.randn(2, 5)
    (g,) = torch.autograd.grad((BPDA(Quantize(), surrogate=torch.sin)(x) * weights).sum(), x)
    assert torch.allclose(g, torch.cos(x.detach()) * weights)


def test_module_runs_without_graph() -> None:
    module = CountingModule()
    x = torch.rand(2, 4, requires_grad=True)
    BPDA(module)(x).sum().backward()
    assert module.grad_enabled_calls == [False]


def test_submodules_are_registered() -> None:
    surrogate = nn.Linear(4, 4)
    module = CountingModule()
    wrapped = BPDA(module, surrogate=surrogate)
    wrapped.eval()
    assert not module.training and not surrogate.training
    assert set(dict(wrapped.named_children())) == {"module", "surrogate"}


def test_errors() -> None:
    with pytest.raises(TypeError, match="expected module to be callable, got int"):
        BPDA(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expected surrogate to be callable or None, got str"):
        BPDA(Quantize(), surrogate="identity")  # type: ignore[arg-type]
    x = torch.rand(2, 4, requires_grad=True)
    with pytest.raises(
        ValueError, match=r"expected the surrogate's output to have the module's shape \(2, 4\), got \(2, 2\)"
    ):
        BPDA(Quantize(), surrogate=lambda t: t[:, :2])(x)


def test_bpda_breaks_gradient_masking() -> None:
    """Quantization in front of the classifier masks the gradient (PGD fails); BPDA restores the attack."""
    model, x, y = trained_classifier()
    threat = ThreatModel(Norm.LINF, 0.3)
    config = PGDConfig(steps=20, step_size=0.03, random_start=False)
    masked = nn.Sequential(Quantize(), model).eval()
    through_bpda = nn.Sequential(BPDA(Quantize()), model).eval()
    masked_result = PGD(threat, config)(masked, x, y)
    bpda_result = PGD(threat, config)(through_bpda, x, y)
    assert float(masked_result.success.float().mean()) < 0.2  # zero gradients: PGD barely moves
    assert float(bpda_result.success.float().mean()) > 0.8
    # success is judged on the true (quantized) model, not the surrogate
    with torch.no_grad():
        assert torch.equal(bpda_result.success, masked(bpda_result.x_adv).argmax(1) != y)
