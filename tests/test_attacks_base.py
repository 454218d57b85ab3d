"""The Attack base contract: validation, warnings, projection onto the threat model, untouched inputs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from attacks import (
    Attack,
    AttackResult,
    Norm,
    ThreatModel,
    ce_loss,
    classification_margin,
    dlr_loss,
    get_loss,
    margin_loss,
    per_sample_norm,
    project_onto_threat,
)
from attacks.base import Model


class Linear(nn.Module):
    """Flatten + fixed random linear layer to ``k`` logits."""

    def __init__(self, shape: tuple[int, int, int], k: int = 3, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(math.prod(shape), k, generator=gen), requires_grad=False)
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1) @ self.weight


class Cheater(Attack):
    """Returns points far outside the threat model (and outside [0, 1]) to test the base projection."""

    def __init__(self, threat: ThreatModel, scale: float = 10.0) -> None:
        super().__init__(threat)
        self.scale = scale
        self.seen: list[Tensor] = []

    def run(self, model: Model, x: Tensor, y: Tensor) -> Tensor:
        self.seen.append(x)
        x.add_(0.5)  # in-place on the private copy: must not reach the caller
        gen = torch.Generator().manual_seed(0)
        return x + self.scale * torch.randn(x.shape, generator=gen)


def _inputs(batch: int = 4, shape: tuple[int, int, int] = (1, 4, 4)) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.rand((batch, *shape), generator=gen), torch.randint(0, 3, (batch,), generator=gen)


# ------------------------------------------------------------------------------------------- threat model
def test_threat_model_accepts_strings_and_is_frozen() -> None:
    threat = ThreatModel("L2", 1)  # type: ignore[arg-type]
    assert threat.norm is Norm.L2 and threat.eps == 1.0 and isinstance(threat.eps, float)
    with pytest.raises(AttributeError):
        threat.eps = 2.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("norm", "eps", "error", "match"),
    [
        ("l1", 0.1, ValueError, r"expected norm to be one of 'linf', 'l2', got 'l1'"),
        (Norm.LINF, -0.1, ValueError, r"expected eps to be finite and >= 0, got -0.1"),
        (Norm.LINF, float("nan"), ValueError, r"expected eps to be finite"),
        (Norm.LINF, "0.3", TypeError, r"expected eps to be a float, got str"),
    ],
)
def test_threat_model_rejects_bad_values(norm: object, eps: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        ThreatModel(norm, eps)  # type: ignore[arg-type]


def test_subclass_cannot_override_call() -> None:
    with pytest.raises(TypeError, match=r"must not override Attack\.__call__"):

        class Bad(Attack):
            def run(self, model: Model, x: Tensor, y: Tensor) -> Tensor:
                return x

            def __call__(self, model: Model, x: Tensor, y: Tensor) -> AttackResult:  # type: ignore[misc]
                raise NotImplementedError


def test_attack_requires_threat_model() -> None:
    with pytest.raises(TypeError, match="expected threat to be a ThreatModel, got tuple"):
        Cheater(("linf", 0.1))  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------- projection
@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3),
    channels=st.integers(1, 3),
    side=st.integers(1, 5),
    norm=st.sampled_from(list(Norm)),
    eps=st.floats(0.0, 2.0),
    scale=st.floats(0.0, 20.0),
)
def test_base_projects_any_run_output_into_threat_model(
    batch: int, channels: int, side: int, norm: Norm, eps: float, scale: float
) -> None:
    shape = (channels, side, side)
    x, y = _inputs(batch, shape)
    x_before, y_before = x.clone(), y.clone()
    attack = Cheater(ThreatModel(norm, eps), scale)
    result = attack(Linear(shape), x, y)
    assert torch.equal(x, x_before) and torch.equal(y, y_before)
    assert attack.seen[0].data_ptr() != x.data_ptr()
    assert result.x_adv.shape == x.shape and result.x_adv.dtype == x.dtype
    assert float(result.x_adv.min()) >= 0.0 and float(result.x_adv.max()) <= 1.0
    distance = per_sample_norm(result.x_adv - x, norm)
    assert bool((distance <= eps * (1 + 1e-5) + 1e-7).all())
    assert torch.allclose(result.distance, distance)
    assert result.success.dtype == torch.bool and result.success.shape == (batch,)
    assert result.logits.shape == (batch, 3)


def test_success_is_recomputed_from_the_projected_point() -> None:
    model = Linear((1, 4, 4))
    x, _ = _inputs()
    with torch.no_grad():
        y = model(x).argmax(1)
    result = Cheater(ThreatModel(Norm.LINF, 0.0))(model, x, y)  # eps 0: x_adv must equal x
    assert torch.equal(result.x_adv, x)
    assert not bool(result.success.any())


def test_with_eps_copies_the_attack_into_a_smaller_ball() -> None:
    x, y = _inputs()
    attack = Cheater(ThreatModel(Norm.L2, 1.0))
    small = attack.with_eps(0.25)
    assert type(small) is Cheater and small is not attack
    assert small.threat == ThreatModel(Norm.L2, 0.25) and attack.threat == ThreatModel(Norm.L2, 1.0)
    result = small(Linear((1, 4, 4)), x, y)
    assert float(result.distance.max()) <= 0.25 * (1 + 1e-5)
    with pytest.raises(ValueError, match="expected eps to be finite and >= 0"):
        attack.with_eps(-1.0)


def test_project_onto_threat_l2_scales_radially() -> None:
    x = torch.full((1, 1, 2, 2), 0.5)
    x_adv = x + torch.tensor([0.3, 0.4, 0.0, 0.0]).view(1, 1, 2, 2)  # norm 0.5
    out = project_onto_threat(x_adv, x, ThreatModel(Norm.L2, 0.25))
    assert torch.allclose(out - x, (x_adv - x) / 2, atol=1e-6)


def test_project_onto_threat_linf_clamps_box_and_ball() -> None:
    x = torch.tensor([0.0, 0.5, 0.95]).view(1, 1, 1, 3)
    threat = ThreatModel("linf", 0.1)  # type: ignore[arg-type]
    out = project_onto_threat(x + torch.tensor([-0.2, 0.3, 0.2]).view(1, 1, 1, 3), x, threat)
    assert torch.allclose(out.flatten(), torch.tensor([0.0, 0.6, 1.0]))


# ----------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("x", "y", "error", "match"),
    [
        (
            torch.rand(2, 16),
            torch.tensor([0, 1]),
            ValueError,
            r"expected x of shape \(B, C, H, W\), got shape \(2, 16\)",
        ),
        (
            torch.ones(2, 1, 4, 4, dtype=torch.int64),
            torch.tensor([0, 1]),
            TypeError,
            r"floating-point tensor, got dtype torch.int64",
        ),
        (
            torch.full((2, 1, 4, 4), 1.5),
            torch.tensor([0, 1]),
            ValueError,
            r"expected x values in \[0, 1\], got range \[1.5, 1.5\]",
        ),
        (torch.full((2, 1, 4, 4), -1e-3), torch.tensor([0, 1]), ValueError, r"expected x values in \[0, 1\]"),
        (
            torch.full((2, 1, 4, 4), float("nan")),
            torch.tensor([0, 1]),
            ValueError,
            r"expected x to be finite",
        ),
        ([[0.0]], torch.tensor([0]), TypeError, r"expected x to be a torch.Tensor, got list"),
        (
            torch.rand(2, 1, 4, 4),
            torch.tensor([0, 1], dtype=torch.int32),
            TypeError,
            r"expected y of dtype torch.int64, got torch.int32",
        ),
        (
            torch.rand(2, 1, 4, 4),
            torch.tensor([0, 1, 2]),
            ValueError,
            r"expected y of shape \(2,\), got shape \(3,\)",
        ),
        (
            torch.rand(2, 1, 4, 4),
            torch.tensor([0, 3]),
            ValueError,
            r"expected labels in \[0, 3\) .*got range \[0, 3\]",
        ),
        (torch.rand(2, 1, 4, 4), torch.tensor([-1, 0]), ValueError, r"expected labels in \[0, 3\)"),
    ],
)
def test_bad_inputs_raise(x: object, y: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        Cheater(ThreatModel(Norm.LINF, 0.1))(Linear((1, 4, 4)), x, y)  # type: ignore[arg-type]


def test_tolerates_tiny_range_violation() -> None:
    x = torch.full((2, 1, 4, 4), 1 + 5e-7)
    result = Cheater(ThreatModel(Norm.LINF, 0.1))(Linear((1, 4, 4)), x, torch.tensor([0, 1]))
    assert float(result.x_adv.max()) <= 1.0


def test_bad_model_output_raises() -> None:
    x, y = _inputs()
    with pytest.raises(
        ValueError, match=r"expected model to return float logits of shape \(4, num_classes\)"
    ):
        Cheater(ThreatModel(Norm.LINF, 0.1))(lambda t: t.flatten(1).sum(1), x, y)
    with pytest.raises(TypeError, match="expected model to be callable, got int"):
        Cheater(ThreatModel(Norm.LINF, 0.1))(3, x, y)  # type: ignore[arg-type]


def test_run_returning_wrong_shape_raises() -> None:
    class Wrong(Attack):
        def run(self, model: Model, x: Tensor, y: Tensor) -> Tensor:
            return x[:1]

    x, y = _inputs()
    with pytest.raises(
        ValueError, match=r"expected Wrong.run to return shape \(4, 1, 4, 4\), got \(1, 1, 4, 4\)"
    ):
        Wrong(ThreatModel(Norm.LINF, 0.1))(Linear((1, 4, 4)), x, y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_labels_on_another_device_raise() -> None:
    x, y = _inputs()
    with pytest.raises(ValueError, match="expected y on device cpu"):
        Cheater(ThreatModel(Norm.LINF, 0.1))(Linear((1, 4, 4)), x, y.cuda())


# ------------------------------------------------------------------------------------------- warnings
def test_warns_on_training_mode() -> None:
    x, y = _inputs()
    model = Linear((1, 4, 4)).train()
    with pytest.warns(UserWarning, match="model is in training mode"):
        Cheater(ThreatModel(Norm.LINF, 0.1))(model, x, y)
    assert model.training  # the attack does not change the caller's model state


def test_warns_on_probability_outputs() -> None:
    x, y = _inputs()
    model = nn.Sequential(Linear((1, 4, 4)), nn.Softmax(dim=1)).eval()
    with pytest.warns(UserWarning, match="outputs look like probabilities"):
        Cheater(ThreatModel(Norm.LINF, 0.1))(model, x, y)


def test_no_warning_for_eval_model_with_logits(recwarn: pytest.WarningsRecorder) -> None:
    x, y = _inputs()
    Cheater(ThreatModel(Norm.LINF, 0.1))(Linear((1, 4, 4)).eval(), x, y)
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


# --------------------------------------------------------------------------------------------- losses
def test_losses_values() -> None:
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    y = torch.tensor([0, 0])
    assert torch.allclose(classification_margin(logits, y), torch.tensor([2.0, -2.0]))
    assert torch.allclose(margin_loss(logits, y), torch.tensor([-2.0, 2.0]))
    assert torch.allclose(ce_loss(logits, y), nn.functional.cross_entropy(logits, y, reduction="none"))
    # DLR: -(z_y - max other) / (z_pi1 - z_pi3)
    assert torch.allclose(dlr_loss(logits, y), torch.tensor([-2.0 / 3.0, 2.0 / 2.0]))
    # DLR is invariant to shift and positive scale
    assert torch.allclose(dlr_loss(5 * logits + 7, y), dlr_loss(logits, y), atol=1e-6)


def test_losses_are_per_sample_and_batch_independent() -> None:
    gen = torch.Generator().manual_seed(0)
    logits, y = torch.randn(6, 5, generator=gen), torch.randint(0, 5, (6,), generator=gen)
    for loss in (ce_loss, margin_loss, dlr_loss):
        full = loss(logits, y)
        assert full.shape == (6,)
        assert torch.allclose(full[:2], loss(logits[:2], y[:2]))


def test_loss_errors() -> None:
    with pytest.raises(
        ValueError, match=r"expected loss to be one of \['ce', 'dlr', 'margin'\] or a callable, got 'hinge'"
    ):
        get_loss("hinge")
    with pytest.raises(ValueError, match="expected at least 3 classes, got 2"):
        dlr_loss(torch.zeros(2, 2), torch.tensor([0, 1]))
    assert get_loss("CE") is ce_loss
