"""Backward Pass Differentiable Approximation (BPDA).

Athalye, Carlini, Wagner, "Obfuscated Gradients Give a False Sense of Security: Circumventing Defenses to
Adversarial Examples" (ICML 2018), section 4.1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["BPDA"]


class BPDA(nn.Module):
    """Forward pass of ``module``, backward pass of ``surrogate`` (the identity when ``None``).

    Purpose: attack a model whose preprocessing (a latent projection, quantization, JPEG, ...) has no useful
    gradient. ``BPDA(module, surrogate)(x)`` returns exactly ``module(x)`` (computed under
    ``torch.no_grad()``, so no graph through ``module`` is built) while ``d/dx`` is the gradient of
    ``surrogate(x)``: the value is ``module(x) + (s(x) - s(x).detach())``, whose second term is zero in value.

    Args:
        module: the non-differentiable (or too costly to differentiate) map, ``(B, ...) -> (B, ...)``.
        surrogate: a differentiable approximation with outputs of the same shape; ``None`` (default) is the
            identity, the usual choice for ``module(x) ≈ x`` (denoisers, projections onto an image manifold).
            ``nn.Module`` arguments are registered as submodules, so ``.eval()`` and ``.to()`` reach them.

    Example:
        >>> defended = nn.Sequential(BPDA(projection), classifier)   # doctest: +SKIP
        >>> PGD(ThreatModel(Norm.L2, 2.0))(defended.eval(), x, y)     # doctest: +SKIP
    """

    def __init__(
        self, module: Callable[[Tensor], Tensor], surrogate: Callable[[Tensor], Tensor] | None = None
    ):
        super().__init__()
        if not callable(module):
            raise TypeError(f"expected module to be callable, got {type(module).__name__}")
        if surrogate is not None and not callable(surrogate):
            raise TypeError(f"expected surrogate to be callable or None, got {type(surrogate).__name__}")
        self.module = module
        self.surrogate = surrogate

    def forward(self, x: Tensor) -> Tensor:
        """``module(x)`` in value, ``d surrogate(x) / dx`` in gradient; shapes as ``module``."""
        with torch.no_grad():
            out = self.module(x)
        if not isinstance(out, Tensor):
            raise TypeError(f"expected module to return a torch.Tensor, got {type(out).__name__}")
        if not torch.is_grad_enabled():
            return out
        s = x if self.surrogate is None else self.surrogate(x)
        if not isinstance(s, Tensor) or s.shape != out.shape:
            got = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
            raise ValueError(
                f"expected the surrogate's output to have the module's shape {tuple(out.shape)}, got {got}"
            )
        return out + (s - s.detach())
