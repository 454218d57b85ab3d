"""Input validation of :func:`manifold_defense.inversion.invert`, and the measurement-tree helpers.

Holds the checks ``invert`` runs on its arguments before the loop (generator type and ``latent_dim``, devices,
seeds, the encoder's image shape), the first-forward and end-of-loop checks of the generator's output (shape,
the [0, 1] range up to :data:`RANGE_TOLERANCE`), the working dtype rule, and the small helpers that map over
a (possibly nested tuple) measurement ``y``: :func:`_tree_map`, :func:`_leaves`, :func:`_take_rows`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .operators import Identity, MeasurementOperator, Measurements

#: Slack allowed on the generator's [0, 1] output range before it is rejected.
RANGE_TOLERANCE = 1e-5


# --------------------------------------------------------------------------------- measurement trees


def _tree_map(fn: Callable[[torch.Tensor], torch.Tensor], y: Any) -> Any:
    """Apply ``fn`` to every tensor of a (possibly nested tuple) measurement."""
    if isinstance(y, (tuple, list)):
        return tuple(_tree_map(fn, item) for item in y)
    return fn(y)


def _leaves(y: Any) -> list[torch.Tensor]:
    if isinstance(y, (tuple, list)):
        return [leaf for item in y for leaf in _leaves(item)]
    return [y]


def _take_rows(y: Measurements, rows: torch.Tensor) -> Measurements:
    """Index the batch dimension of every tensor of ``y``."""
    return _tree_map(lambda t: t[rows], y)


# ---------------------------------------------------------------------------------------- validation


def _check_generator(generator: Any) -> int:
    if not isinstance(generator, nn.Module):
        raise TypeError(f"expected the generator as a torch.nn.Module, got {type(generator).__name__}")
    k = getattr(generator, "latent_dim", None)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise TypeError(f"expected generator.latent_dim as a positive int, got {k!r}")
    return k


def _check_device(module: nn.Module | None, device: torch.device, name: str) -> None:
    if module is None:
        return
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.device != device:
            raise ValueError(
                f"expected the {name} on y's device {device}, got a parameter/buffer on {tensor.device}; "
                f"move it with .to({str(device)!r})"
            )
        return


def _working_dtype(generator: nn.Module, y: Any) -> torch.dtype:
    for p in generator.parameters():
        if p.is_floating_point():
            return p.dtype
    for leaf in _leaves(y):
        if leaf.is_floating_point():
            return leaf.dtype
    return torch.get_default_dtype()


def _resolve_seeds(seeds: Sequence[int] | torch.Tensor | None, batch: int, default: int) -> list[int]:
    if seeds is None:
        return [default] * batch
    if isinstance(seeds, torch.Tensor):
        if seeds.ndim != 1 or seeds.is_floating_point() or seeds.is_complex():
            raise ValueError(
                f"expected seeds as a 1-D integer tensor, got {seeds.dtype} {tuple(seeds.shape)}"
            )
        values = [int(s) for s in seeds.tolist()]
    else:
        values = list(seeds)
    if len(values) != batch:
        raise ValueError(f"expected {batch} seeds (one per sample), got {len(values)}")
    for s in values:
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**63:
            raise ValueError(f"expected every seed as an int in [0, 2**63), got {s!r}")
    return values


def _check_generated(x: Any, rows: int, operator: MeasurementOperator) -> None:
    """First-forward checks of the generator's output: a (rows, C, H, W) tensor with values in [0, 1]."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[0] != rows:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"expected the generator to return images ({rows}, C, H, W), got {got}")
    if operator.input_shape is not None and tuple(x.shape[1:]) != operator.input_shape:
        raise ValueError(
            f"expected generator images of shape {operator.input_shape} (the operator's input_shape), "
            f"got {tuple(x.shape[1:])}"
            + (
                ": with the Identity operator the images y must have the generator's shape"
                if isinstance(operator, Identity)
                else ""
            )
        )
    _check_range(x.detach().min(), x.detach().max(), "at the first step")


def _check_range(low: torch.Tensor, high: torch.Tensor, when: str) -> None:
    """Raise unless the generator's outputs ``[low, high]`` (NaN included) lie in [0, 1] up to the tolerance."""
    lo, hi = float(low), float(high)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(
            f"expected finite generator outputs in [0, 1] on every step, got NaN or inf {when}: the generator "
            "is not finite at some latent"
        )
    if not (lo >= -RANGE_TOLERANCE and hi <= 1 + RANGE_TOLERANCE):
        raise ValueError(
            "expected generator outputs in [0, 1] (e.g. a sigmoid output layer) on every step, "
            f"got values in [{lo:.4g}, {hi:.4g}] {when}"
        )


def _probe_image_shape(generator: nn.Module, y: torch.Tensor, k: int) -> None:
    """Before an encoder reads images ``y``: raise unless they have the generator's image shape ``(C, H, W)``."""
    with torch.no_grad():
        x = generator(torch.zeros(1, k, device=y.device, dtype=_working_dtype(generator, y)))
    if isinstance(x, torch.Tensor) and x.ndim == 4 and tuple(x.shape[1:]) != tuple(y.shape[1:]):
        raise ValueError(
            f"expected images of the generator's shape {tuple(x.shape[1:])} (C, H, W), got "
            f"{tuple(y.shape[1:])}: a {y.shape[1]}-channel batch cannot be projected onto this generator"
        )
