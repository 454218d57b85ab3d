"""The sparse-deviation machinery of :func:`manifold_defense.inversion.invert` (``config.deviation``).

Sparse deviations: each loop step is one ``config.optimizer`` step on ``z`` and one FISTA step (Beck & Teboulle
2009) on the deviation coefficients ``c`` (``v = c`` or ``v = IDCT(c)``): a gradient step ``1 / L`` on the data
term at the extrapolated point ``c_k + (k-2)/(k+1) (c_k - c_{k-1})``, then the proximal map of the l1 term (a
soft-threshold, clipped to ``config.deviation_range`` when set), so ``v`` is exactly sparse. ``L`` is the
Lipschitz constant of the data term's gradient in ``c``, estimated per row by power iteration on its Hessian
(exact up to the power-iteration margin for linear operators with the squared loss: ``2 ||A||_2^2 / m``; a local
estimate at the start point for non-linear ones). With ``G(z)`` fixed this is FISTA on a Lasso and reaches the
Lasso optimum; a per-coordinate Adam step on ``v`` (the earlier scheme) does not converge in a few hundred
steps when the measurements determine a dense, small ``v``.

Holds the FISTA state of the active rows (:class:`_Deviation`), its start, the per-row Lipschitz estimate
and the FISTA step; the loop in :mod:`manifold_defense.inversion.core` calls them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checks import _tree_map
from .config import InversionConfig
from .dct import dct_matrix, idct2
from .operators import MeasurementOperator, Measurements


def _soft_threshold(c: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """Proximal map of ``threshold * ||c||_1``: ``sign(c) * max(|c| - threshold, 0)``."""
    return c.sign() * (c.abs() - threshold).clamp_min(0.0)


@dataclass
class _Deviation:
    """State of the deviation's FISTA iteration for the active rows.

    ``coef`` is the current (proximal, exactly sparse) iterate ``c_k``, ``prev`` the previous one ``c_{k-1}``,
    ``lipschitz`` the per-row step constant ``L`` ``(N,)``, ``bases`` the DCT matrices (``None`` for pixels).
    """

    coef: torch.Tensor  # (N, C, H, W)
    prev: torch.Tensor  # (N, C, H, W)
    lipschitz: torch.Tensor | None  # (N,), estimated before the first update
    bases: tuple[torch.Tensor, torch.Tensor] | None

    def pixels(self, coef: torch.Tensor | None = None) -> torch.Tensor:
        """Pixel-space deviation ``v`` of ``coef`` (default the current iterate)."""
        c = self.coef if coef is None else coef
        return c if self.bases is None else idct2(c, self.bases)

    def take(self, keep: torch.Tensor) -> None:
        """Keep only the rows ``keep`` (bool mask over the active rows)."""
        self.coef, self.prev = self.coef[keep], self.prev[keep]
        if self.lipschitz is not None:
            self.lipschitz = self.lipschitz[keep]


#: Power-iteration steps and the safety factor on the estimated Lipschitz constant (the power iteration
#: approaches the top eigenvalue from below; 30 steps reach >= 0.97 of it for CSGM's Gaussian matrices).
_POWER_STEPS = 30
_LIPSCHITZ_MARGIN = 1.1


def _start_deviation(x_gen: torch.Tensor, config: InversionConfig) -> _Deviation | None:
    """Zero deviation coefficients shaped like the images, with the DCT bases for ``deviation="dct"``."""
    if config.deviation is None:
        return None
    coef = torch.zeros_like(x_gen, requires_grad=False)
    bases = None
    if config.deviation == "dct":
        h, w = x_gen.shape[-2:]
        bases = (
            dct_matrix(h, dtype=x_gen.dtype, device=x_gen.device),
            dct_matrix(w, dtype=x_gen.dtype, device=x_gen.device),
        )
    return _Deviation(coef=coef, prev=coef, lipschitz=None, bases=bases)


def _row_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1)


def _deviation_lipschitz(
    operator: MeasurementOperator, x_gen: torch.Tensor, state: _Deviation, y_rows: Measurements
) -> torch.Tensor:
    """Per-row Lipschitz constant ``(N,)`` of the gradient of ``loss_A(A(x_gen + v(c)), y)`` in ``c``.

    Power iteration on the Hessian (Hessian-vector products by double back-propagation through the operator
    only), from a fixed pseudo-random direction shared by every row (so a row's estimate does not depend on
    its batch), at the current coefficients; times :data:`_LIPSCHITZ_MARGIN`. For a linear operator with the
    mean squared loss the Hessian is ``2 Psi^T A^T A Psi / m``, constant, so this is ``2 ||A||_2^2 / m``. Rows
    with a zero (or non-finite) estimate get ``L = 1``.
    """
    x0 = x_gen.detach()
    y0 = _tree_map(torch.Tensor.detach, y_rows)
    with torch.enable_grad():
        c = state.coef.detach().requires_grad_(True)
        loss = operator.loss(operator(x0 + state.pixels(c)), y0).sum()
        (grad,) = torch.autograd.grad(loss, c, create_graph=True)
        direction = torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(0), dtype=x0.dtype).to(
            x0.device
        )
        u = direction.expand_as(x0)
        hu = torch.zeros_like(x0)
        for _ in range(_POWER_STEPS):
            u = u / _row_norm(u).clamp_min(torch.finfo(x0.dtype).tiny).view(-1, *([1] * (x0.ndim - 1)))
            if not grad.requires_grad:  # the loss is linear in c: zero curvature
                break
            (hvp,) = torch.autograd.grad(grad, c, grad_outputs=u, retain_graph=True, allow_unused=True)
            if hvp is None:
                break
            hu = hvp.detach()
            u = hu
    estimate = _row_norm(hu) * _LIPSCHITZ_MARGIN
    ok = torch.isfinite(estimate) & (estimate > 0)
    return torch.where(ok, estimate, torch.ones_like(estimate))


def _deviation_step(
    operator: MeasurementOperator,
    x_gen: torch.Tensor,
    state: _Deviation,
    y_rows: Measurements,
    update: int,
    config: InversionConfig,
    differentiable: bool,
) -> None:
    """One FISTA step on the deviation coefficients (in place on ``state``; tensors are replaced, not
    modified).

    ``update`` counts from 1. The gradient of the data term is taken at the extrapolated point
    ``w = c_k + (update - 2) / (update + 1) * (c_k - c_{k-1})`` (zero momentum for the first two updates) with
    ``x_gen = G(z_k)``; then ``c_{k+1} = prox_{(weight / L) ||.||_1}(w - grad / L)``, clipped so that
    ``x_gen + v`` stays in ``config.deviation_range`` (pixel deviations).
    """
    assert state.lipschitz is not None  # internal invariant: estimated before the first update
    beta = max(update - 2, 0) / (update + 1)
    w = state.coef + beta * (state.coef - state.prev) if beta else state.coef
    base = x_gen if differentiable else x_gen.detach()
    with torch.enable_grad():
        if not differentiable:
            w = w.detach().requires_grad_(True)
        elif not w.requires_grad:
            w = w.requires_grad_(True)
        loss = operator.loss(operator(base + state.pixels(w)), y_rows).sum()
        (grad,) = torch.autograd.grad(loss, w, create_graph=differentiable)
    with torch.set_grad_enabled(differentiable):
        step = (1.0 / state.lipschitz).view(-1, *([1] * (w.ndim - 1)))
        coef = _soft_threshold(w - step * grad, step * config.deviation_weight)
        if config.deviation_range is not None and state.bases is None:
            lo, hi = config.deviation_range
            coef = torch.minimum(torch.maximum(coef, lo - base), hi - base)
        if not differentiable:
            coef = coef.detach()
    state.prev, state.coef = state.coef, coef
