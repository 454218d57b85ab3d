"""Files that prove themselves: checkpoints and state written with a SHA-256 of their content, atomically.

Every resumable file of the library (training checkpoints, the harness's ``state.pt``, the benchmarks' caches) is
written by :func:`save_checked` and read by :func:`load_checked`. The file is a one-line header,
``manifold-defense-checked sha256=<hex>``, followed by the ``torch.save`` bytes of the object; on reading, the hash
is recomputed over those bytes and a mismatch (a flipped byte, a cut file, an empty or random file) raises
:class:`IntegrityError` naming the file, never a different figure. The payload is read with
``torch.load(weights_only=True)``, which executes no code.

Writes go to a temporary file unique to the writer (process id and a random token) in the same folder, are flushed
to disk, then renamed over the target, so a reader sees the old file or the new one, never a mixture, and two
writers never share a temporary name. A write that fails for lack of space raises :class:`DiskFullError` saying so
and leaves the previous file in place.

Example:
    >>> import tempfile, pathlib, torch
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "state.pt"
    >>> save_checked({"step": 3, "w": torch.ones(2)}, path)
    >>> load_checked(path, what="test state")["step"]
    3
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch

__all__ = [
    "DiskFullError",
    "IntegrityError",
    "atomic_write_bytes",
    "atomic_write_text",
    "checked_json",
    "load_checked",
    "save_checked",
    "unique_temp",
    "verify_json",
]

MAGIC = b"manifold-defense-checked sha256="
_HEX_LEN = 64


class IntegrityError(ValueError):
    """A saved file does not match the hash written with it (or is not a checked file at all)."""


class DiskFullError(OSError):
    """A file could not be written because its file system has no space left."""


def unique_temp(path: str | os.PathLike[str]) -> Path:
    """A temporary name beside ``path`` that no other writer (process or thread) uses."""
    p = Path(path)
    return p.with_name(f".{p.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


@contextmanager
def _writing(path: Path) -> Iterator[IO[bytes]]:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = unique_temp(path)
    try:
        with open(tmp, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(
                exc.errno,
                f"could not write {path}: no space left on its file system; the previous file (if any) is "
                "unchanged: free some space and run the same command again to resume",
            ) from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically through a temporary file unique to this writer."""
    with _writing(Path(path)) as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically through a temporary file unique to this writer."""
    atomic_write_bytes(path, text.encode("utf-8"))


def save_checked(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` ``obj`` to ``path`` behind a SHA-256 header, atomically (see the module docstring).

    Args:
        obj: tensors, numbers, strings and containers of them (what ``torch.load(weights_only=True)`` reads).
        path: the target file; its folder is created when missing.

    Raises:
        DiskFullError: the file system is full (the previous file is left as it was).
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    payload = buffer.getvalue()
    header = MAGIC + hashlib.sha256(payload).hexdigest().encode("ascii") + b"\n"
    with _writing(Path(path)) as handle:
        handle.write(header)
        handle.write(payload)


def load_checked(
    path: str | os.PathLike[str],
    *,
    what: str = "file",
    recover: str = "delete it and run the same command again to recompute it",
    map_location: str | torch.device = "cpu",
) -> Any:
    """Read a file written by :func:`save_checked`, verifying its hash; the object it holds.

    Args:
        path: the file.
        what: what the file is, for the error message (``"harness state"``, ``"training checkpoint"``).
        recover: how to recover, for the error message.
        map_location: where tensors are loaded.

    Raises:
        IntegrityError: the file is empty, cut, altered, not written by :func:`save_checked`, or unreadable.
    """
    p = Path(path)
    data = p.read_bytes()
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + _HEX_LEN + 1:
        kind = "empty" if not data else "not a checked file (no integrity header; an older version's or foreign file)"
        raise IntegrityError(f"{what} {p} is {kind}: {recover}")
    stored = data[len(MAGIC) : len(MAGIC) + _HEX_LEN].decode("ascii", errors="replace")
    payload = data[len(MAGIC) + _HEX_LEN + 1 :]
    if hashlib.sha256(payload).hexdigest() != stored:
        raise IntegrityError(
            f"{what} {p} does not match the SHA-256 written with it (the file was cut or altered): {recover}"
        )
    try:
        return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as exc:  # a hash-valid file that torch cannot read: written by something else
        raise IntegrityError(f"{what} {p} could not be read ({type(exc).__name__}: {exc}): {recover}") from exc


def _canonical(record: Any) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=True).encode("utf-8")


def checked_json(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with a ``"sha256"`` field over the canonical JSON of its other fields (for JSON records)."""
    body = {k: v for k, v in record.items() if k != "sha256"}
    return {**body, "sha256": hashlib.sha256(_canonical(body)).hexdigest()}


def verify_json(
    record: Any, path: str | os.PathLike[str], *, what: str = "record", recover: str = "delete it and run again"
) -> dict[str, Any]:
    """Check a JSON record written through :func:`checked_json`; the record without its hash.

    Raises:
        IntegrityError: the record is not a JSON object with a matching ``"sha256"`` field.
    """
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
        raise IntegrityError(f"{what} {path} carries no integrity hash (an older version's or foreign file): {recover}")
    body = {k: v for k, v in record.items() if k != "sha256"}
    if hashlib.sha256(_canonical(body)).hexdigest() != record["sha256"]:
        raise IntegrityError(f"{what} {path} does not match the SHA-256 written with it (altered): {recover}")
    return body
