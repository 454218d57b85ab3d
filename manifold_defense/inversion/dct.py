"""Orthonormal 2-D DCT-II as differentiable torch matrix products.

Purpose: the sparse-deviation inversion (Dhar, Grover & Ermon 2018, "Modeling sparse deviations for compressed
sensing using generative models") models ``x = G(z) + v`` with ``v`` sparse in the DCT basis; the deviation is
optimised through ``v = idct2(c)``. The matrices come from :func:`scipy.fft.dct` (``norm="ortho"``), so
``idct2(dct2(x)) == x`` and both maps are orthogonal (each is the other's adjoint).
"""

from __future__ import annotations

import numpy as np
import scipy.fft
import torch


def dct_matrix(
    n: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """The orthonormal DCT-II matrix ``D`` of size ``(n, n)``: ``D @ v == scipy.fft.dct(v, norm="ortho")``.

    Args:
        n: signal length, ``n >= 1``.
        dtype: floating dtype of the result.
        device: device of the result (default CPU).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"expected a positive int n, got {n!r}")
    matrix = scipy.fft.dct(np.eye(n), norm="ortho", axis=0)
    return torch.as_tensor(matrix, dtype=dtype, device=device)


def _matrices(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.ndim < 2 or not x.is_floating_point():
        raise ValueError(
            f"expected a floating tensor (..., H, W), got dtype {x.dtype} shape {tuple(x.shape)}"
        )
    return (
        dct_matrix(x.shape[-2], dtype=x.dtype, device=x.device),
        dct_matrix(x.shape[-1], dtype=x.dtype, device=x.device),
    )


def dct2(x: torch.Tensor, bases: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Orthonormal 2-D DCT-II over the last two dimensions of ``x`` ``(..., H, W)``; same shape out.

    ``bases`` optionally passes precomputed ``(dct_matrix(H), dct_matrix(W))`` to avoid rebuilding them in
    loops.
    """
    d_h, d_w = _matrices(x) if bases is None else bases
    return d_h @ x @ d_w.T


def idct2(c: torch.Tensor, bases: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Inverse of :func:`dct2` (orthonormal DCT-III) over the last two dimensions of ``c`` ``(..., H, W)``."""
    d_h, d_w = _matrices(c) if bases is None else bases
    return d_h.T @ c @ d_w
