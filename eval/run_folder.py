"""Run folders: every command that writes ``--out DIR`` claims it first, so no run overwrites another's.

A claimed folder holds ``run.json``: the command that owns it and the protocol it runs (the settings that
decide its figures). :func:`claim_run_folder` refuses a folder that holds another command's run, or the same
command's run of another protocol (its ``results.json`` would be replaced and the figures lost); a rerun of
the same command and protocol (a resume) is accepted. Folders written before ``run.json`` existed are
recognised by their ``results.json`` (its ``command`` field) or the robustness harness's ``state.pt``.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

__all__ = ["MARKER", "RunFolderError", "claim_run_folder"]

#: The file naming the command and protocol of the run a folder holds.
MARKER = "run.json"


class RunFolderError(ValueError):
    """The output folder holds another command's run, or another protocol's run of the same command."""


def _normalized(protocol: Mapping[str, Any] | None) -> Any:
    """JSON round trip (tuples become lists), so a protocol compares equal to the one read back."""
    return None if protocol is None else json.loads(json.dumps(protocol, sort_keys=True, default=str))


def _legacy_command(out: Path) -> str | None:
    """The command of a run written before :data:`MARKER` existed, ``"?"`` for an unknown results file."""
    results = out / "results.json"
    if results.is_file():
        try:
            command = json.loads(results.read_text()).get("command")
        except (ValueError, AttributeError):
            return "?"
        words = command.split() if isinstance(command, str) else []
        if len(words) >= 4 and words[:3] == ["python", "-m", "eval"]:
            return words[3]
        return "?"
    if (out / "state.pt").is_file():
        return "robustness"
    return None


def _differences(saved: Any, new: Any) -> str:
    if isinstance(saved, dict) and isinstance(new, dict):
        keys = sorted(k for k in set(saved) | set(new) if saved.get(k) != new.get(k))
        shown = [f"{k}: {saved.get(k)!r} -> {new.get(k)!r}" for k in keys[:4]]
        return "; ".join(shown) + (" ..." if len(keys) > 4 else "")
    return f"{saved!r} -> {new!r}"


def claim_run_folder(
    out: str | Path,
    command: str,
    protocol: Mapping[str, Any] | None = None,
    *,
    replace: bool = False,
    legacy_owners: Collection[str] = (),
) -> Path:
    """Create ``out`` (if needed) for a ``command`` run of ``protocol`` and record it in ``out/run.json``.

    Args:
        out: the output folder.
        command: the ``python -m eval`` command writing it (``"defense"``, ``"robustness"``...).
        protocol: JSON-able settings that decide the run's figures; ``None`` when the command checks its own
            (the robustness harness fingerprints its state).
        replace: accept the same command's run of another protocol (the caller discards it, e.g. ``--fresh``).
        legacy_owners: other commands whose pre-``run.json`` runs count as this command's (the demo's robustness
            sub-run recorded the ``demo`` command line).

    Returns:
        ``out`` as a ``Path``.

    Raises:
        RunFolderError: ``out`` is a file, holds another command's run, or (without ``replace``) a run of
            another protocol; ``run.json`` is unreadable.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"expected --out {out} to be a folder, got a file")
    marker = out / MARKER
    wanted = _normalized(protocol)
    if marker.is_file():
        try:
            info = json.loads(marker.read_text())
            owner, saved = info["command"], info.get("protocol")
        except (ValueError, KeyError, TypeError) as err:
            raise RunFolderError(f"{marker} is unreadable ({err}): choose another --out") from err
    else:
        owner, saved = (_legacy_command(out) if out.is_dir() else None), None
        owner = command if owner in legacy_owners else owner
    if owner is not None and owner != command:
        what = "a run of unknown origin" if owner == "?" else f"a `python -m eval {owner}` run"
        raise RunFolderError(
            f"{out} holds {what}; refusing to write a `{command}` run over it (its results would be lost): "
            "choose another --out"
        )
    if not replace and saved is not None and wanted is not None and saved != wanted:
        raise RunFolderError(
            f"{out} holds another run: a `{command}` run of another protocol ({_differences(saved, wanted)}); "
            "refusing to replace its results: choose another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    if not marker.is_file() or (replace and saved != wanted) or saved is None:
        marker.write_text(
            json.dumps({"command": command, "protocol": wanted}, indent=1, sort_keys=True) + "\n"
        )
    return out
