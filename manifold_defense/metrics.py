"""Figures of merit: sample quality of a generator (Fréchet distances, MNIST score, confidence, class balance) and
batched accuracy."""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.linalg
import scipy.special
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

    ``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2})``. The trace of the square root is taken as the sum of
    the square roots of the eigenvalues of ``S_a^{1/2} S_b S_a^{1/2}`` (similar to ``S_a S_b``, but symmetric), so
    it stays exact when a covariance is singular: features after a ReLU often have dead units (the zoo classifier's
    128 features have rank 94 on MNIST), where ``scipy.linalg.sqrtm(S_a S_b)`` warns that its result may be
    inaccurate. Eigenvalues below 0 from round-off count as 0, and so does a total below 0.
    """
    if feats_a.ndim != 2 or feats_b.ndim != 2 or feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(
            f"expected two (N, d) feature arrays with the same d, got {feats_a.shape} and {feats_b.shape}"
        )
    if min(len(feats_a), len(feats_b)) < 2:
        raise ValueError("expected at least 2 samples in each feature set")
    if not (np.isfinite(feats_a).all() and np.isfinite(feats_b).all()):
        raise ValueError("expected finite features, got NaN or infinite values")
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    cov_a = np.atleast_2d(np.cov(feats_a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(feats_b, rowvar=False))
    eig_a, vec_a = scipy.linalg.eigh(cov_a)
    root_a = (vec_a * np.sqrt(np.clip(eig_a, 0.0, None))) @ vec_a.T
    middle = root_a @ cov_b @ root_a
    trace_root = np.sqrt(np.clip(scipy.linalg.eigvalsh((middle + middle.T) / 2.0), 0.0, None)).sum()
    distance = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_root)
    return max(distance, 0.0)


@torch.no_grad()
def logits(model: nn.Module, images: torch.Tensor, batch_size: int = 1000) -> np.ndarray:
    """The classifier's logits ``(N, classes)`` float64 of ``images`` ``(N, C, H, W)``."""
    dev = next(model.parameters()).device
    out = torch.cat([model(images[i : i + batch_size].to(dev)).double().cpu() for i in range(0, len(images), batch_size)])
    if not torch.isfinite(out).all():
        raise ValueError(f"{type(model).__name__} returned non-finite logits")
    return out.numpy()


def mnist_score(logit: np.ndarray) -> float:
    """TF-GAN's "MNIST score" (the inception score on an MNIST classifier): ``exp E_x KL(p(y|x) || p(y))``.

    ``logit`` ``(N, classes)``; ``p(y)`` is the mean of ``p(y|x)`` over the set. Ranges from 1 (every image gets
    the same distribution) to the number of classes (confident predictions, classes balanced).
    """
    if logit.ndim != 2 or len(logit) < 1:
        raise ValueError(f"expected logits (N, classes) with N >= 1, got shape {logit.shape}")
    log_p = logit - scipy.special.logsumexp(logit, axis=1, keepdims=True)
    p = np.exp(log_p)
    log_marginal = np.log(p.mean(0) + 1e-300)
    return float(np.exp((p * (log_p - log_marginal)).sum(1).mean()))


def sample_quality(classifier: nn.Module, samples: torch.Tensor, reference: torch.Tensor) -> dict[str, Any]:
    """Sample-quality figures of ``samples`` against real ``reference`` images, all on ``classifier``.

    Returns a dict: ``frechet_features`` (Fréchet distance of the penultimate features, :func:`features`),
    ``frechet_logits`` and ``mnist_score`` (TF-GAN's MNIST protocol on the logits), ``confident_fraction`` (share of
    samples whose top softmax probability is >= 0.9), ``class_histogram`` and its ``histogram_min_max`` ratio, and
    ``histogram_tv``: the total variation distance between the predicted-class frequencies of the samples and of
    ``reference`` (0: the data's own balance; better posed than min/max, since real classes are not balanced).
    Compute the same figures for a second real set against ``reference`` to get the floors at this sample count.
    """
    logit_s, logit_r = logits(classifier, samples), logits(classifier, reference)
    probs = np.exp(logit_s - scipy.special.logsumexp(logit_s, axis=1, keepdims=True))
    hist = np.bincount(probs.argmax(1), minlength=logit_s.shape[1])
    hist_r = np.bincount(logit_r.argmax(1), minlength=logit_s.shape[1])
    return {
        "n": len(samples),
        "frechet_features": round(frechet_distance(features(classifier, samples), features(classifier, reference)), 3),
        "frechet_logits": round(frechet_distance(logit_s, logit_r), 3),
        "mnist_score": round(mnist_score(logit_s), 3),
        "confident_fraction": round(float((probs.max(1) >= 0.9).mean()), 4),
        "class_histogram": hist.tolist(),
        "histogram_min_max": round(float(hist.min() / max(hist.max(), 1)), 3),
        "histogram_tv": round(float(0.5 * np.abs(hist / hist.sum() - hist_r / hist_r.sum()).sum()), 4),
    }


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
