"""Malformed inputs to the defended model, ``invert`` and every attack family: a clear error, never a figure.

Each table row is one call a new user could make; the test asserts the exception type and its message.
Tiny deterministic models, a few steps: the whole file runs in seconds.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from attacks import (
    PGD,
    LatentAttack,
    LatentAttackConfig,
    Norm,
    OverpoweredAttack,
    OverpoweredConfig,
    PGDConfig,
    ThreatModel,
    TorchattacksAttack,
)
from attacks.base import NonFiniteLogitsError, predict
from manifold_defense import LatentProjector, ProjectedClassifier
from manifold_defense.inversion import InversionConfig, invert

SIDE, K = 5, 3
FAST = InversionConfig(optimizer="adam", lr=0.05, steps=5, restarts=2, init="encoder")
ESCAPE = InversionConfig(optimizer="adam", lr=1.0, steps=20, init_std=0.1)


class TinyGenerator(nn.Module):
    """``(B, K) -> (B, 1, 5, 5)`` in [0, 1]; ``escape > 0`` leaves [0, 1] once ``||z||`` grows past 2."""

    def __init__(self, escape: float = 0.0) -> None:
        super().__init__()
        self.latent_dim = K
        self.escape = escape
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(K, SIDE * SIDE, generator=g))

    def forward(self, z: Tensor) -> Tensor:
        x = torch.sigmoid(z @ self.w)
        if self.escape:
            x = x + self.escape * torch.relu(z.norm(dim=1, keepdim=True) - 2.0)
        return x.view(-1, 1, SIDE, SIDE)


class TinyEncoder(nn.Module):
    """A 1-channel conv encoder: a 3-channel batch would crash in its first layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.lin = nn.Linear(2 * 3 * 3, K)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(self.conv(x).flatten(1))


class TinyClassifier(nn.Module):
    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.lin = nn.Linear(SIDE * SIDE, 3)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(3, SIDE * SIDE, generator=g))
            self.lin.bias.zero_()
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x.flatten(1)) * self.scale


class NaNAfterMove(nn.Module):
    """Finite logits on the clean batch it first sees, NaN as soon as the input moves away from it."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = TinyClassifier()
        self.clean: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.clean is None:
            self.clean = x.detach().clone()
        logits = self.inner(x)
        moved = (x - self.clean).flatten(1).abs().amax(1) > 1e-3
        return torch.where(moved[:, None], torch.full_like(logits, float("nan")).detach(), logits)


def _x(n: int = 4, channels: int = 1, seed: int = 0) -> Tensor:
    return torch.rand(n, channels, SIDE, SIDE, generator=torch.Generator().manual_seed(seed)) * 0.8 + 0.1


def _y(n: int = 4) -> Tensor:
    return torch.arange(n) % 3


def _z(n: int = 4) -> Tensor:
    return torch.randn(n, K, generator=torch.Generator().manual_seed(2)) * 0.1


NAN = TinyClassifier(scale=float("nan"))
INF = TinyClassifier(scale=float("inf"))
PGD_FAST = PGD(ThreatModel(Norm.LINF, 0.3), PGDConfig(steps=3, step_size=0.1))


def _projector(**kwargs: Any) -> LatentProjector:
    return LatentProjector(TinyGenerator(), FAST, encoder=TinyEncoder(), **kwargs).eval()


# --------------------------------------------------------------------------- non-finite logits: every attack
ATTACK_CASES: list[tuple[str, Callable[[], Any]]] = [
    ("pgd-nan", lambda: PGD_FAST(NAN.eval(), _x(), _y())),
    ("pgd-inf", lambda: PGD_FAST(INF.eval(), _x(), _y())),
    ("pgd-nan-function", lambda: PGD_FAST(lambda x: TinyClassifier()(x) * float("nan"), _x(), _y())),
    ("pgd-nan-after-a-step", lambda: PGD_FAST(NaNAfterMove().eval(), _x(), _y())),
    (
        "pgd-l2-restarts",
        lambda: PGD(ThreatModel(Norm.L2, 1.0), PGDConfig(steps=2, restarts=2))(NAN, _x(), _y()),
    ),
    (
        "torchattacks-pgd",
        lambda: TorchattacksAttack("PGD", ThreatModel(Norm.LINF, 0.3), steps=2)(NAN, _x(), _y()),
    ),
    (
        "latent",
        lambda: LatentAttack(LatentAttackConfig(eps=1.0, steps=2))(NAN, TinyGenerator().eval(), _z(), _y()),
    ),
    (
        "overpowered",
        lambda: OverpoweredAttack(OverpoweredConfig(eps=2.0, steps=2))(NAN, TinyGenerator().eval(), _z()),
    ),
    ("defended-model", lambda: PGD_FAST(ProjectedClassifier(NAN, _projector()).eval(), _x(), _y())),
]


@pytest.mark.parametrize(("case", "call"), ATTACK_CASES, ids=[c for c, _ in ATTACK_CASES])
def test_non_finite_logits_are_an_error_in_every_attack(case: str, call: Callable[[], Any]) -> None:
    with pytest.raises(NonFiniteLogitsError, match=r"expected finite logits from the (model|classifier) \S+"):
        call()


def test_non_finite_logits_name_the_rows_and_where() -> None:
    with pytest.raises(
        NonFiniteLogitsError,
        match=r"model NaNAfterMove at PGD step 1 of restart 0, got NaN or inf in 4 of 4 rows",
    ):
        PGD(ThreatModel(Norm.LINF, 0.3), PGDConfig(steps=3, random_start=False))(
            NaNAfterMove().eval(), _x(), _y()
        )
    with pytest.raises(NonFiniteLogitsError, match=r"model TinyClassifier .*rows 0, 1, 2, 3"):
        predict(NAN, _x(), "model TinyClassifier", "on batch 0")


# ------------------------------------------------------------------------------- defended model and invert
def _call_projector(x: Tensor, **kwargs: Any) -> Tensor:
    return _projector(**kwargs)(x)


DEFENSE_CASES: list[tuple[str, Callable[[], Any], type[Exception], str]] = [
    (
        "3-channel-before-encoder",
        lambda: _call_projector(_x(channels=3)),
        ValueError,
        r"expected images of the generator's shape \(1, 5, 5\) \(C, H, W\), got \(3, 5, 5\)",
    ),
    ("nan-image", lambda: _call_projector(_x() * float("nan")), ValueError, r"input: expected finite values"),
    ("out-of-range", lambda: _call_projector(_x() + 1), ValueError, r"input: expected values in \[0, 1\]"),
    ("int-images", lambda: _call_projector((_x() * 255).long()), ValueError, r"expected float images"),
    ("not-a-tensor", lambda: _call_projector([[0.5]]), TypeError, r"expected a torch.Tensor of images"),  # type: ignore[arg-type]
    (
        "other-device",
        lambda: _projector().to("meta")(_x()),
        ValueError,
        r"expected input on the generator's device meta, got cpu",
    ),
    (
        "3-channel-invert",
        lambda: invert(TinyGenerator(), _x(channels=3), config=FAST, encoder=TinyEncoder()),
        ValueError,
        r"got \(3, 5, 5\): a 3-channel batch cannot be projected",
    ),
    (
        "3-channel-invert-no-encoder",
        lambda: invert(TinyGenerator(), _x(channels=3), config=InversionConfig(steps=2)),
        ValueError,
        r"expected generator images of shape \(3, 5, 5\) .* the images y must have the generator's shape",
    ),
    (
        "generator-leaves-range-later",
        lambda: invert(TinyGenerator(escape=5.0), _x(), config=ESCAPE),
        ValueError,
        r"expected generator outputs in \[0, 1\] .* on every step, got values in .* over the \d+ steps",
    ),
]


@pytest.mark.parametrize(
    ("case", "call", "error", "message"), DEFENSE_CASES, ids=[c[0] for c in DEFENSE_CASES]
)
def test_defense_and_invert_refuse_malformed_input(
    case: str, call: Callable[[], Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        call()


def test_escaping_generator_starts_in_range() -> None:
    # the case above is only meaningful if the first step passes the old first-step-only check
    with torch.no_grad():
        x = TinyGenerator(escape=5.0)(torch.randn(8, K, generator=torch.Generator().manual_seed(0)) * 0.1)
    assert float(x.min()) >= 0 and float(x.max()) <= 1


# --------------------------------------------------------------------------------- the one float64 rule
def test_float64_images_are_cast_to_the_model_dtype_everywhere() -> None:
    x64, y = _x().double(), _y()
    clf = TinyClassifier().eval()
    res = PGD_FAST(clf, x64, y)  # attacks: cast to the model's float32
    assert res.x_adv.dtype == torch.float32 and res.logits.dtype == torch.float32
    defended = ProjectedClassifier(clf, _projector()).eval()
    with torch.no_grad():
        clean = defended(x64)
    x_req = x64.clone().requires_grad_(True)
    logits = defended(x_req)  # the defended model under autograd: BPDA gradient back in float64
    (grad,) = torch.autograd.grad(logits.sum(), x_req)
    assert grad.dtype == torch.float64 and logits.dtype == torch.float32
    torch.testing.assert_close(logits.detach(), clean)
    res = PGD_FAST(defended, x64, y)
    assert res.x_adv.dtype == torch.float32
    inv = invert(TinyGenerator(), x64, config=InversionConfig(steps=2))  # invert: the generator's dtype
    assert inv.x_hat.dtype == torch.float32
    z64 = _z().double()
    lat = LatentAttack(LatentAttackConfig(eps=1.0, steps=2))(clf, TinyGenerator().eval(), z64, y)
    assert lat.z_adv.dtype == torch.float32


def test_attack_input_on_another_device_is_refused_before_the_model_runs() -> None:
    model = TinyClassifier().to("meta").eval()
    with pytest.raises(ValueError, match=r"expected x on the model's device meta, got cpu"):
        PGD_FAST(model, _x(), _y())


def test_a_finite_model_still_runs() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = PGD_FAST(TinyClassifier().eval(), _x(), _y())
    assert torch.isfinite(res.logits).all()
