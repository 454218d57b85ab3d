"""Device strings: one validated place to turn ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"auto"`` into a device."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """A ``torch.device`` from a string or device; ``"auto"``/``None`` means CUDA when available, else CPU.

    Raises:
        ValueError: an unknown device string, or a CUDA device on a machine without one.
        TypeError: neither a string, a ``torch.device`` nor ``None``.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, str):
        try:
            dev = torch.device(device)
        except RuntimeError as err:
            raise ValueError(
                f"unknown device {device!r}: expected 'cpu', 'cuda', 'cuda:N' or 'auto'"
            ) from err
    else:
        raise TypeError(f"device must be a str, torch.device or None, got {type(device).__name__}")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}: expected 'cpu', 'cuda', 'cuda:N' or 'auto'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {device!r} requested but CUDA is not available on this machine; use 'cpu'"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    return dev
