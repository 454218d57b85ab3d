"""Checks shared by the evaluation commands' Python entry points (bench, defense, robustness)."""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import Tensor

__all__ = ["check_labeled_images", "positive_int_arg"]


def check_labeled_images(x: Any, y: Any, n: int) -> None:
    """Raise unless ``x`` is an ``(N, C, H, W)`` tensor of [0, 1] images, ``y`` its ``(N,)`` int64 labels on the same
    device, and ``N >= n``.

    Raises:
        TypeError: not tensors, labels not int64 or on another device.
        ValueError: wrong shapes, fewer than ``n`` points, NaN or inf pixels, values outside [0, 1].
    """
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(f"expected x and y as tensors, got {type(x).__name__} and {type(y).__name__}")
    if x.dim() != 4 or tuple(y.shape) != (x.shape[0],):
        raise ValueError(
            f"expected x as (N, C, H, W) and y as (N,) tensors, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if y.dtype != torch.int64 or x.device != y.device:
        raise TypeError(f"expected y as int64 on x's device {x.device}, got {y.dtype} on {y.device}")
    if x.shape[0] < n:
        raise ValueError(f"expected at least n={n} images, got {x.shape[0]}")
    if x.numel() and not bool(torch.isfinite(x).all()):  # NaN slips past a min/max comparison
        bad = torch.nonzero(~torch.isfinite(x).reshape(x.shape[0], -1).all(dim=1)).reshape(-1)
        raise ValueError(
            f"expected finite images in [0, 1], got NaN or inf in {len(bad)} image(s), the first at index {int(bad[0])}"
        )
    if x.numel() and (float(x.min()) < 0 or float(x.max()) > 1):
        raise ValueError(
            f"expected images in [0, 1], got values in [{float(x.min()):.4g}, {float(x.max()):.4g}]"
        )


def positive_int_arg(text: str) -> int:
    """``argparse`` type: an int >= 1, with a message naming what came."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int (>= 1), got {value}")
    return value
