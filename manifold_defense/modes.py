"""Module modes: freeze models for the duration of a block (eval mode, no parameter gradients), then restore."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def frozen(*modules: nn.Module | None) -> Iterator[None]:
    """Eval mode and ``requires_grad=False`` on every parameter of ``modules`` (``None`` entries ignored).

    Every submodule's ``training`` flag and every parameter's ``requires_grad`` flag are restored exactly on exit,
    also when the body raises. Used while inverting a generator and while generating adversarial examples against
    a model under training (advertorch's ``ctx_noparamgrad_and_eval``).
    """
    present = [m for m in modules if m is not None]
    modes = [(sub, sub.training) for m in present for sub in m.modules()]
    flags = [(p, p.requires_grad) for m in present for p in m.parameters()]
    try:
        for m in present:
            m.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for sub, mode in modes:
            sub.training = mode
        for p, flag in flags:
            p.requires_grad_(flag)
