"""Sample-quality figures: Fréchet distances, MNIST score, confidence and class balance."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn

from manifold_defense.metrics import frechet_distance, logits, mnist_score, sample_quality


class _Probe(nn.Module):
    """A fixed random classifier with a ``features`` method, sensitive to spatial detail (3x3 filters)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 49, 10)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(torch.relu(self.conv(x)), 4).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def _digits(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, 28, 28)
    for i, (r, c) in enumerate(torch.randint(2, 18, (n, 2), generator=g).tolist()):
        x[i, :, r : r + 2, c : c + 8] = 1.0
        x[i, :, r : r + 8, c : c + 2] = 1.0
    return x


def _blur(x: torch.Tensor, k: int) -> torch.Tensor:
    return F.avg_pool2d(x, k, stride=1, padding=k // 2)


def test_frechet_distances_are_zero_for_identical_sets_and_grow_with_blur() -> None:
    clf = _Probe().eval()
    x = _digits(300, 0)
    same = sample_quality(clf, x, x)
    assert same["frechet_features"] == pytest.approx(0.0, abs=1e-3)
    assert same["frechet_logits"] == pytest.approx(0.0, abs=1e-3)
    mild, strong = sample_quality(clf, _blur(x, 3), x), sample_quality(clf, _blur(x, 5), x)
    assert 0.0 < mild["frechet_features"] < strong["frechet_features"]
    assert 0.0 < mild["frechet_logits"] < strong["frechet_logits"]
    assert sum(same["class_histogram"]) == 300 and 0.0 <= same["histogram_min_max"] <= 1.0
    assert same["histogram_tv"] == 0.0


def test_frechet_distance_is_exact_for_singular_covariances_without_warnings() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(400, 6)) * 2.0 + 0.5
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    reference = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(
        cov_a + cov_b - 2.0 * scipy.linalg.sqrtm(cov_a @ cov_b).real
    )
    assert frechet_distance(a, b) == pytest.approx(reference, rel=1e-9)
    dead = np.concatenate([a, np.zeros((500, 3))], axis=1)  # three dead ReLU units: rank-deficient covariance
    shift = np.array([0.3, -0.2, 0.0, 0.1, 0.0, 0.4, 0.0, 0.0, 0.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert frechet_distance(dead, dead + shift) == pytest.approx(float((shift**2).sum()), abs=1e-9)
        assert frechet_distance(dead, dead) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="finite"):
        frechet_distance(np.full((5, 3), np.nan), np.zeros((5, 3)))


def test_histogram_total_variation_against_the_reference_balance() -> None:
    clf = _Probe().eval()
    x = _digits(300, 0)
    labels = logits(clf, x).argmax(1)
    majority = int(np.bincount(labels).argmax())
    one_class = x[torch.as_tensor(labels == majority)]
    share = float((labels == majority).mean())
    assert sample_quality(clf, one_class, x)["histogram_tv"] == pytest.approx(1.0 - share, abs=1e-4)


def test_mnist_score_bounds_and_value() -> None:
    confident_balanced = np.eye(10)[np.arange(100) % 10] * 50.0
    assert mnist_score(confident_balanced) == pytest.approx(10.0, rel=1e-6)
    assert mnist_score(np.zeros((50, 10))) == pytest.approx(1.0)
    assert mnist_score(np.eye(10)[np.zeros(40, dtype=int)] * 50.0) == pytest.approx(1.0)  # one class only
    two = np.eye(10)[np.arange(40) % 2] * 50.0
    assert mnist_score(two) == pytest.approx(2.0, rel=1e-6)
    with pytest.raises(ValueError, match=r"expected logits \(N, classes\)"):
        mnist_score(np.zeros(10))


def test_frechet_refuses_mismatched_features_and_confidence_counts() -> None:
    with pytest.raises(ValueError, match="same d"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))

    class Sure(_Probe):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(len(x), 10)
            out[: len(x) // 2, 3] = 20.0  # half the images: confident class 3; the rest uniform
            return out

    fig = sample_quality(Sure().eval(), _digits(40, 1), _digits(40, 2))
    assert fig["confident_fraction"] == 0.5
