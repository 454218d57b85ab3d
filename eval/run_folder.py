"""Run folders: every command that writes ``--out DIR`` claims it first, so no run overwrites another's.

Ownership. A claimed folder holds ``run.json``: the command that owns it and the protocol it runs (the settings
that decide its figures), with a SHA-256 over them (:func:`manifold_defense.integrity.checked_json`).
:func:`claim_run_folder` refuses a folder that holds another command's run, or the same command's run of another
protocol (its ``results.json`` would be replaced and the figures lost); a rerun of the same command and protocol
(a resume) is accepted. A ``run.json`` that is empty, unreadable or without its hash counts as absent when the
folder holds nothing else (a run that could not start: nothing to lose), and is refused, naming it, when the folder
holds other files. A folder without ``run.json`` is accepted when empty or when it holds only the robustness
harness's ``state.pt`` (which proves its own settings); a ``results.json`` without ``run.json`` is refused, naming
the command that wrote it or, when it is corrupt or carries no hash, naming the file.

One writer. While a process writes a folder it holds an exclusive ``flock`` on ``DIR/.lock`` (which records its
pid); a second writer is refused at once, naming the folder and that pid. The operating system drops the lock
when the process ends, however it ends, so a crashed or killed run never blocks its folder. Under ``torchrun``
only rank 0 (``RANK`` 0 or unset) writes run folders, so only rank 0 locks and writes ``run.json``; the other
ranks only check. A lock is taken by :func:`claim_run_folder` and held until the innermost
:func:`run_folder_session` around the claim ends (every command run by :func:`eval.cli.main` is one session), or
until the process ends. Temporary files left in the folder by killed writers (``.NAME.tmp-PID-TOKEN``, see
:func:`manifold_defense.integrity.unique_temp`) are removed when the lock is taken: no other writer can own them.

Records. :func:`write_record` writes a JSON record (``results.json``) with its SHA-256, atomically;
:func:`read_record` reads one back and raises :class:`~manifold_defense.integrity.IntegrityError` naming the file
when it is cut, altered or written without the hash.
"""

from __future__ import annotations

import errno
import json
import os
import re
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from manifold_defense.integrity import IntegrityError, atomic_write_text, checked_json, verify_json

try:  # POSIX; elsewhere no lock is taken (documented)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "LOCK",
    "MARKER",
    "RunFolderBusyError",
    "RunFolderError",
    "check_out_arg",
    "claim_run_folder",
    "is_bookkeeping",
    "read_record",
    "release_run_folder",
    "run_folder_session",
    "write_record",
]

#: The file naming the command and protocol of the run a folder holds.
MARKER = "run.json"
#: The lock file of a run folder (holds the writer's pid; never removed).
LOCK = ".lock"
#: Temporary files of :func:`manifold_defense.integrity.unique_temp`: ``.NAME.tmp-PID-TOKEN``.
_TEMP = re.compile(r"^\..+\.tmp-\d+-[0-9a-f]{8}$")

#: The source checkout this module belongs to (never a run folder).
_PROJECT = Path(__file__).resolve().parents[1]

_REGISTRY = threading.Lock()
_HELD: dict[str, int] = {}  # real path of a locked folder -> the open lock file
_SESSIONS: list[list[str]] = []  # per open session, the folders it locked


class RunFolderError(ValueError):
    """The output folder holds another command's run, another protocol's run, or an unreadable ``run.json``."""


class RunFolderBusyError(RunFolderError):
    """Another process is writing the output folder (it holds the folder's lock)."""


def is_bookkeeping(name: str) -> bool:
    """Whether a file name in a run folder is bookkeeping (the lock, a writer's temporary file), not a result."""
    return name == LOCK or bool(_TEMP.match(name))


def check_out_arg(text: str) -> None:
    """Refuse an ``--out`` that is empty or only whitespace (an unset shell variable would write into ``.``)."""
    if not text.strip():
        raise RunFolderError(
            f"expected --out to name a folder, got {text!r} (an unset shell variable?): pass a folder name"
        )


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


def _normalized(protocol: Mapping[str, Any] | None) -> Any:
    """JSON round trip (tuples become lists), so a protocol compares equal to the one read back."""
    return None if protocol is None else json.loads(json.dumps(protocol, sort_keys=True, default=str))


def _others(out: Path) -> list[str]:
    """The names in ``out`` other than ``run.json`` and bookkeeping files, sorted."""
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir() if p.name != MARKER and not is_bookkeeping(p.name))


def _command_of(record: Any) -> str:
    """The ``python -m eval`` command named by a record's ``command`` field, ``"?"`` when none."""
    command = record.get("command") if isinstance(record, dict) else None
    words = command.split() if isinstance(command, str) else []
    if len(words) >= 4 and words[:3] == ["python", "-m", "eval"]:
        return words[3]
    return "?"


def _what(owner: str) -> str:
    return "a run of unknown origin" if owner == "?" else f"a `python -m eval {owner}` run"


def _without_marker(out: Path, command: str) -> None:
    """Checks for a folder that has no ``run.json``: refuse what another or an older run left there."""
    results = out / "results.json"
    if results.is_file():
        try:
            record = json.loads(results.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise RunFolderError(
                f"{out} holds no {MARKER} and its {results.name} {results} is corrupt (not JSON: {err}): a run of "
                f"unknown origin; refusing to write a `{command}` run over it: choose another --out"
            ) from err
        owner = _command_of(record)
        if isinstance(record, dict) and "sha256" in record:
            try:
                verify_json(record, results, what="results record")
            except IntegrityError as err:
                raise RunFolderError(
                    f"{out} holds no {MARKER} and its results record {results} is corrupt (it does not match the "
                    f"SHA-256 written with it): a run of unknown origin; refusing to write a `{command}` run over "
                    "it: choose another --out"
                ) from err
            why = f"its {MARKER} is missing, so its protocol cannot be checked"
        else:
            why = f"written by an older version: no {MARKER}, and {results} carries no integrity hash"
        if owner != command:
            raise RunFolderError(
                f"{out} holds {_what(owner)}; refusing to write a `{command}` run over it (its results would be "
                f"lost; {why}): choose another --out"
            )
        raise RunFolderError(
            f"{out} holds {_what(owner)} that cannot be resumed ({why}): choose a fresh --out"
        )
    if (out / "state.pt").is_file() and command != "robustness":
        raise RunFolderError(
            f"{out} holds a `python -m eval robustness` run (its state.pt, no {MARKER}); refusing to write a "
            f"`{command}` run over it: choose another --out"
        )


def _read_marker(out: Path) -> tuple[str, Any] | None:
    """``(command, protocol)`` of ``out/run.json``; ``None`` when absent, or unreadable with nothing else in
    ``out`` (a run that could not start); refuse an unreadable one beside other files."""
    marker = out / MARKER
    if not marker.is_file():
        return None
    problem: str | None = None
    try:
        text = marker.read_text()
        info = json.loads(text) if text.strip() else None
    except (OSError, ValueError, UnicodeDecodeError) as err:
        problem, info = f"not JSON: {err}", None
    if info is None:
        problem = problem or "empty"
    elif not isinstance(info, dict) or not isinstance(info.get("command"), str):
        problem = "not a run record"
    elif "sha256" not in info:
        problem = (
            f"written by an older version of manifold-defense ({_what(info['command'])}, no integrity hash)"
        )
    else:
        try:
            body = verify_json(info, marker, what="run record")
        except IntegrityError:
            problem = "it does not match the SHA-256 written with it: altered"
        else:
            return body["command"], body.get("protocol")
    others = _others(out)
    if not others:
        return None  # nothing to lose: the marker of a run that never started
    raise RunFolderError(
        f"{marker} is unreadable ({problem}) and {out} holds other files ({', '.join(others[:5])}"
        f"{' ...' if len(others) > 5 else ''}): refusing to write over a run of unknown origin: choose another "
        "--out (or delete the folder if nothing in it is needed)"
    )


def _differences(saved: Any, new: Any) -> str:
    if isinstance(saved, dict) and isinstance(new, dict):
        keys = sorted(k for k in set(saved) | set(new) if saved.get(k) != new.get(k))
        shown = [f"{k}: {saved.get(k)!r} -> {new.get(k)!r}" for k in keys[:4]]
        return "; ".join(shown) + (" ..." if len(keys) > 4 else "")
    return f"{saved!r} -> {new!r}"


def _check(out: Path, command: str, wanted: Any, replace: bool) -> tuple[str, Any] | None:
    """Refuse ``out`` for a ``command`` run of ``wanted`` (see :func:`claim_run_folder`); its marker if any."""
    if not out.is_dir():
        return None
    found = _read_marker(out)
    if found is None:
        _without_marker(out, command)
        return None
    owner, saved = found
    if owner != command:
        raise RunFolderError(
            f"{out} holds {_what(owner)}; refusing to write a `{command}` run over it (its results would be lost): "
            "choose another --out"
        )
    if not replace and saved is not None and wanted is not None and saved != wanted:
        raise RunFolderError(
            f"{out} holds another run: a `{command}` run of another protocol ({_differences(saved, wanted)}); "
            "refusing to replace its results: choose another --out"
        )
    return found


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", errors="replace").strip()
    except OSError:
        text = ""
    return f"pid {text}" if text.isdigit() else "pid unknown"


def _remove_stale_temps(out: Path) -> None:
    """Delete temporary files of writers that died in ``out`` and its subfolders (called while holding its lock);
    nested run folders (their own ``run.json`` or lock) are left to their own writers."""
    for root, dirs, files in os.walk(out):
        for name in files:
            if _TEMP.match(name):
                Path(root, name).unlink(missing_ok=True)
        dirs[:] = [d for d in dirs if not (Path(root, d, MARKER).exists() or Path(root, d, LOCK).exists())]


def _lock(out: Path) -> bool:
    """Take the writer lock of ``out`` (created if needed); ``True`` when this call took it, ``False`` when this
    process holds it already (or the platform has no ``flock``)."""
    key = os.path.realpath(out)
    with _REGISTRY:
        if key in _HELD or fcntl is None:
            return False
        path = out / LOCK
        try:
            out.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise RunFolderError(
                f"cannot write --out {out}: {err.strerror or err} ({path}): choose a folder this process can write"
            ) from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _holder(fd)
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunFolderBusyError(
                    f"{out} is being written by another run ({holder}, holding {path}): wait for it to end or "
                    "choose another --out"
                ) from err
            raise
        try:  # best effort: the pid is only for the message of a refused writer
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        except OSError:
            pass
        _HELD[key] = fd
        if _SESSIONS:
            _SESSIONS[-1].append(key)
    _remove_stale_temps(out)
    return True


def _unlock(key: str) -> None:
    with _REGISTRY:
        fd = _HELD.pop(key, None)
    if fd is not None:
        os.close(fd)  # closing the only descriptor drops the flock


def release_run_folder(out: str | Path) -> None:
    """Release this process's writer lock on ``out`` (no-op when it holds none)."""
    _unlock(os.path.realpath(out))


@contextmanager
def run_folder_session() -> Iterator[None]:
    """Hold the writer locks taken inside (by :func:`claim_run_folder`) until the block ends, then release them.

    Sessions nest: an inner session releases only the locks it took, not those an outer one already held. Usable
    as a decorator (``@run_folder_session()``) on a function that writes a run folder.
    """
    with _REGISTRY:
        _SESSIONS.append([])
    try:
        yield
    finally:
        with _REGISTRY:
            taken = _SESSIONS.pop()
        for key in taken:
            _unlock(key)


def claim_run_folder(
    out: str | Path,
    command: str,
    protocol: Mapping[str, Any] | None = None,
    *,
    replace: bool = False,
) -> Path:
    """Create ``out`` (if needed), lock it for this writer and record a ``command`` run of ``protocol`` in
    ``out/run.json``.

    Args:
        out: the output folder.
        command: the ``python -m eval`` command writing it (``"defense"``, ``"robustness"``...).
        protocol: JSON-able settings that decide the run's figures; ``None`` when the command checks its own
            (the robustness harness fingerprints its state).
        replace: accept the same command's run of another protocol (the caller discards it, e.g. ``--fresh``).

    Returns:
        ``out`` as a ``Path``.

    Raises:
        RunFolderError: ``out`` is empty text, a file, unwritable, holds another command's run, (without
            ``replace``) a run of another protocol, a run an older version wrote, or an unreadable ``run.json``
            beside other files.
        RunFolderBusyError: another process is writing ``out`` (it holds the lock).
        DiskFullError: no space left to write ``run.json``.
    """
    if isinstance(out, str):
        check_out_arg(out)
    out = Path(out)
    check_out_arg(out.name if out.name else str(out))
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"expected --out {out} to be a folder, got a file")
    if out.is_dir() and out.resolve() == _PROJECT and (_PROJECT / "pyproject.toml").is_file():
        raise RunFolderError(
            f"expected --out to name a run folder, got {out}, the project's own source folder: pass a subfolder "
            "(e.g. runs/NAME)"
        )
    wanted = _normalized(protocol)
    _check(out, command, wanted, replace)  # refuse before writing anything
    if _rank() != 0:
        return out  # under torchrun rank 0 owns the folder
    took = _lock(out)
    try:
        found = _check(out, command, wanted, replace)  # again, now as the only writer
        saved = found[1] if found is not None else None
        if found is None or saved is None or (replace and saved != wanted):
            atomic_write_text(
                out / MARKER,
                json.dumps(checked_json({"command": command, "protocol": wanted}), indent=1, sort_keys=True)
                + "\n",
            )
    except BaseException:
        if took:
            release_run_folder(out)
        raise
    return out


def write_record(path: str | Path, record: Mapping[str, Any]) -> None:
    """Write a JSON ``record`` (``results.json``) with a ``"sha256"`` field over its content, atomically.

    The record is normalized by a JSON round trip first (tuples become lists, keys strings), so the hash is over
    exactly what :func:`read_record` reads back.

    Raises:
        DiskFullError: no space left (the previous file, if any, is unchanged).
    """
    body = json.loads(json.dumps(dict(record)))
    atomic_write_text(path, json.dumps(checked_json(body), indent=1) + "\n")


def read_record(
    path: str | Path,
    *,
    what: str = "results record",
    recover: str = "delete it and run the same command again",
) -> dict[str, Any]:
    """Read a record written by :func:`write_record`, verifying its hash; the record without ``"sha256"``.

    Raises:
        IntegrityError: the file is not JSON (cut), does not match its hash (altered) or carries none.
    """
    p = Path(path)
    try:
        record = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise IntegrityError(f"{what} {p} is not JSON (cut or altered: {err}): {recover}") from err
    return verify_json(record, p, what=what, recover=recover)
