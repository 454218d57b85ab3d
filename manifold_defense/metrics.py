"""Figures of merit: the Fréchet feature distance of samples (an MNIST analogue of FID) and batched accuracy."""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch
from torch import nn


@torch.no_grad()
def features(model: nn.Module, images: torch.Tensor, batch_size: int = 1000) -> np.ndarray:
    """Penultimate-layer features ``(N, d)`` float64 of ``images`` ``(N, C, H, W)`` from ``model.features``."""
    if not hasattr(model, "features"):
        raise TypeError(f"expected a classifier with a .features(x) method, got {type(model).__name__}")
    dev = next(model.parameters()).device
    feat = model.features
    if not callable(feat):
        raise TypeError(f"expected {type(model).__name__}.features to be a method, got {type(feat).__name__}")
    chunks = [
        feat(images[i : i + batch_size].to(dev)).double().cpu() for i in range(0, len(images), batch_size)
    ]
    return torch.cat(chunks).numpy()


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``(N, d)`` and ``(M, d)`` (Heusel et al. 2017).

    ``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2})``; the matrix square root is scipy's ``sqrtm``.
    """
    if feats_a.ndim != 2 or feats_b.ndim != 2 or feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(
            f"expected two (N, d) feature arrays with the same d, got {feats_a.shape} and {feats_b.shape}"
        )
    if min(len(feats_a), len(feats_b)) < 2:
        raise ValueError("expected at least 2 samples in each feature set")
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    cov_a, cov_b = np.cov(feats_a, rowvar=False), np.cov(feats_b, rowvar=False)
    covmean = scipy.linalg.sqrtm(cov_a @ cov_b)
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2.0 * covmean))


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` on ``images`` ``(N, C, H, W)`` with ``labels`` ``(N,)``."""
    if len(images) != len(labels):
        raise ValueError(f"expected as many labels as images, got {len(labels)} and {len(images)}")
    dev = next(model.parameters()).device
    correct = 0
    for i in range(0, len(images), batch_size):
        pred = model(images[i : i + batch_size].to(dev)).argmax(1).cpu()
        correct += int((pred == labels[i : i + batch_size]).sum())
    return correct / max(len(images), 1)


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Predicted labels ``(N,)`` (on CPU)."""
    dev = next(model.parameters()).device
    return torch.cat(
        [model(images[i : i + batch_size].to(dev)).argmax(1).cpu() for i in range(0, len(images), batch_size)]
    )
