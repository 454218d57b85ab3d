"""``eval.crosscheck``: our PGD vs torchattacks vs foolbox on a tiny trained model; the command end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from eval.cli import main
from eval.crosscheck import ACCEPTANCE_GAP, crosscheck, peer_attacks
from manifold_defense.data import load_mnist


@pytest.fixture(scope="module")
def tiny_model_and_data(linear_mnist_model: nn.Module) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The shared softmax-regression MNIST classifier (conftest) and the first 64 test images."""
    test = load_mnist("test", limit=64)
    return linear_mnist_model, test.images, test.labels


def test_three_pgds_agree_on_a_tiny_model(
    tiny_model_and_data: tuple[nn.Module, torch.Tensor, torch.Tensor],
) -> None:
    model, x, y = tiny_model_and_data
    result = crosscheck(model, x, y, eps=0.05, steps=10, step_size=0.01, seed=0, batch_size=32)
    assert result.n == 64
    assert result.clean_accuracy > 0.75
    acc = result.robust_accuracy
    assert set(acc) == {"ours", "torchattacks", "foolbox"}
    # The attack does something: every implementation lowers accuracy well below clean...
    assert all(a < result.clean_accuracy - 0.1 for a in acc.values()), acc
    # ...and they agree (n = 64, so one image is 1.6 points; allow 3 images).
    assert result.max_gap <= 3 / 64 + 1e-9, acc
    assert result.max_gap == pytest.approx(max(acc.values()) - min(acc.values()))
    for name, mask in result.robust_masks.items():
        assert mask.shape == (64,) and mask.dtype == torch.bool
        assert float(mask.float().mean()) == pytest.approx(acc[name])
    record = result.to_json()
    assert record["threat"] == {"norm": "linf", "eps": 0.05}
    assert record["acceptance_gap"] == ACCEPTANCE_GAP
    json.dumps(record)


def test_peer_attacks_share_settings() -> None:
    attacks = peer_attacks(0.3, 40, 0.01, seed=3)
    assert [a.threat.eps for a in attacks.values()] == [0.3, 0.3, 0.3]
    assert "steps=40" in repr(attacks["ours"]) and "step_size=0.01" in repr(attacks["ours"])
    assert "alpha" in repr(attacks["torchattacks"]) and "abs_stepsize" in repr(attacks["foolbox"])


def test_bad_input_is_rejected(tiny_model_and_data: tuple[nn.Module, torch.Tensor, torch.Tensor]) -> None:
    model, x, y = tiny_model_and_data
    with pytest.raises(ValueError, match="expected n to be an int > 0"):
        crosscheck(model, x[:0], y[:0])
    with pytest.raises(ValueError, match="expected steps"):
        crosscheck(model, x, y, steps=0)
    with pytest.raises(ValueError, match=r"expected x \(N, C, H, W\) and y \(N,\)"):
        crosscheck(model, x, y[:3])
    with pytest.raises(ValueError, match="expected n to be an int > 0"):
        main(["crosscheck", "--n", "0"])


def test_command_end_to_end(tmp_path: Path) -> None:
    code = main(["crosscheck", "--n", "4", "--steps", "2", "--out", str(tmp_path), "--threads", "1"])
    record = json.loads((tmp_path / "crosscheck.json").read_text())
    assert code in (0, 1) and (code == 0) == record["within_acceptance"]
    assert record["n"] == 4 and record["settings"]["steps"] == 2 and record["settings"]["step_size"] == 0.01
    assert set(record["robust_accuracy"]) == {"ours", "torchattacks", "foolbox"}
    assert all(0.0 <= v <= 1.0 for v in record["robust_accuracy"].values())
    assert record["max_pairwise_gap"] >= 0 and record["command"].startswith("python -m eval")
