"""Convert a training checkpoint of the older format (plain ``torch.save``) to the checked one, bound to its run.

Checkpoints are now written with a SHA-256 of their content and a record of the trainer and the settings that define
their run (:func:`manifold_defense.training.loop.run_loop`); :func:`~manifold_defense.training.loop.load_checkpoint`
refuses one of the older format, which carries neither. This script converts such a checkpoint by running the
command that resumes it up to the moment the checkpoint is checked, so the trainer name and settings it records are
exactly the ones that command gives its run; no training step is taken and no weights are written. A checkpoint
already hashed but written before trainers recorded their name and settings is completed the same way.

Usage (the arguments of the ``python -m eval`` command that resumes the checkpoint)::

    python scripts/upgrade_checkpoint.py train gan --out training-state/mnist-gan --steps 50000 --set pack=2
    python scripts/upgrade_checkpoint.py --check train gan --out training-state/mnist-gan --steps 60000 --set pack=2

``--check`` converts nothing: it runs the command with the real checks and stops before the first step, so it says
whether a (converted) checkpoint resumes under the command. ``--no-backup`` skips the copy of the old file kept as
``checkpoint.pt.pre-upgrade``. From Python, pass a call that resumes the run: ``upgrade(lambda: train_gan(gen, disc,
data, config, checkpoint_dir=...))``.

What is checked before the file is replaced: the old checkpoint's loop record (steps, batch size, seed, the frozen
models' fingerprint) fits the command's run, as a resume always required; a GAN checkpoint's schedule record (its
learning rate, objective, betas, batch size, packing...) matches the command's settings; the checkpoint's state
loads into the command's models. What the older format did not record (the attack of an adversarial run, the
measured data of an ambient run, any setting the schedule record lacks) is taken from the command, so run the
script with the settings the checkpoint was trained with.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from manifold_defense.integrity import MAGIC, save_checked
from manifold_defense.training import loop

__all__ = ["Upgraded", "upgrade", "upgrade_command"]


@dataclass(frozen=True)
class Upgraded:
    """What :func:`upgrade` did: the checkpoint, its trainer and step, the settings recorded, whether it was
    converted (``False``: it was already in the checked format, or ``check`` was asked) and the backup's path."""

    path: Path
    trainer: str
    step: int
    settings: Mapping[str, Any]
    converted: bool
    backup: Path | None


class _Stop(BaseException):
    """Raised where the command would start training; a BaseException so no trainer's handler swallows it."""


@dataclass
class _Seen:
    path: Path | None = None
    config: loop.LoopConfig | None = None
    legacy: dict[str, Any] | None = None
    new: dict[str, Any] | None = None


def _load_any(path: str | Path) -> dict[str, Any]:
    """A checkpoint of either format: the checked one through the real reader, the older one by ``torch.load``."""
    with open(path, "rb") as handle:
        checked = handle.read(len(MAGIC)) == MAGIC
    if checked:
        return loop.load_checkpoint(path)
    old = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(old, dict) or not {"step", "config", "state"} <= set(old):
        raise ValueError(f"{path}: expected a training checkpoint (step, config, state), got {type(old).__name__}")
    return old


def _convert(
    old: Mapping[str, Any],
    config: loop.LoopConfig,
    extendable: bool,
    path: Path,
    check_resumable: Callable[[Mapping[str, Any], loop.LoopConfig, bool, Path], None],
) -> dict[str, Any]:
    """``old`` with the trainer and settings of ``config``, after the checks of the module docstring
    (``check_resumable``: the loop's own check, run on the converted record)."""
    if not loop._compatible(old.get("config"), config, extendable):
        raise ValueError(
            f"{path} was written by another run (its loop record {old.get('config')}, the command's "
            f"{loop._config_record(config)}): run the script with the command that trained it"
        )
    schedule = old["state"].get("schedule") if isinstance(old.get("state"), Mapping) else None
    wanted = loop._plain(dict(config.settings))
    if isinstance(schedule, Mapping):
        differ = [
            f"{k}: checkpoint {v!r}, command {wanted[k]!r}"
            for k, v in schedule.items()
            if k in wanted and loop._plain(v) != wanted[k]
        ]
        if differ:
            raise ValueError(
                f"{path} was trained with other settings ({'; '.join(differ)}): run the script with the settings "
                "the checkpoint was trained with"
            )
    new = {**old, "trainer": config.trainer, "settings": wanted}
    check_resumable(new, config, extendable, path)  # what the resume will check, on the converted record
    return new


@contextmanager
def _intercepted(seen: _Seen, check_only: bool) -> Iterator[None]:
    """``run_loop``'s checkpoint reading and checking observed (and for a conversion, replaced); its progress
    display, reached after the state is loaded and before the first step, stops the command."""
    real_load, real_check, real_progress = loop.load_checkpoint, loop._check_resumable, loop.progress_display

    def load(path: str | Path) -> dict[str, Any]:
        seen.path = Path(path)
        if check_only:
            return real_load(path)
        ckpt = _load_any(path)
        if not ckpt.get("trainer"):  # the older format, or a checked file written before trainers named their runs
            seen.legacy = {k: v for k, v in ckpt.items() if k not in ("trainer", "settings")}
        return ckpt

    def check(ckpt: Mapping[str, Any], config: loop.LoopConfig, extendable: bool, path: Path) -> None:
        seen.config = config
        if seen.legacy is None:
            real_check(ckpt, config, extendable, path)
        else:
            seen.new = _convert(ckpt, config, extendable, path, real_check)

    def progress(*args: Any, **kwargs: Any) -> Any:
        if seen.path is None:
            raise ValueError(
                "the command would train from the start: it found no checkpoint (check its --out and model)"
            )
        raise _Stop

    loop.load_checkpoint, loop._check_resumable, loop.progress_display = load, check, progress  # type: ignore[assignment]
    try:
        yield
    finally:
        loop.load_checkpoint, loop._check_resumable, loop.progress_display = real_load, real_check, real_progress


def upgrade(run: Callable[[], object], *, check: bool = False, backup: bool = True) -> Upgraded:
    """Convert the older-format checkpoint that ``run`` (a call that resumes it) would read, as the module says.

    Args:
        run: resumes the training run, e.g. ``lambda: train_gan(gen, disc, data, config, checkpoint_dir=d)``; it
            is stopped before its first step.
        check: convert nothing; only check, with the real reader and checks, that the checkpoint resumes.
        backup: keep the old file beside the new one as ``<name>.pre-upgrade``.

    Raises:
        ValueError: no checkpoint found, or one that does not fit the run (the message says what differs).
    """
    seen = _Seen()
    with _intercepted(seen, check):
        try:
            run()
        except _Stop:
            pass
        else:
            raise ValueError("the command finished without reading a checkpoint: nothing to upgrade")
    if seen.path is None or seen.config is None:
        raise ValueError("the command read no training checkpoint: nothing to upgrade")
    kept = None
    if seen.new is not None:
        if backup:
            kept = seen.path.with_name(seen.path.name + ".pre-upgrade")
            shutil.copy2(seen.path, kept)
        save_checked(seen.new, seen.path)
    ckpt = loop.load_checkpoint(seen.path)  # read back through the real reader
    return Upgraded(seen.path, ckpt["trainer"], int(ckpt["step"]), ckpt["settings"], seen.new is not None, kept)


def upgrade_command(argv: Sequence[str], *, check: bool = False, backup: bool = True) -> Upgraded:
    """:func:`upgrade` for the ``python -m eval`` command with arguments ``argv`` (e.g. ``["train", "gan", ...]``)."""
    from eval.cli import main

    return upgrade(lambda: main(list(argv)), check=check, backup=backup)


def cli(argv: Sequence[str] | None = None) -> int:
    """The command line (module docstring); exit status 2 with one line on stderr for a refused checkpoint."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check that the checkpoint resumes")
    parser.add_argument("--no-backup", action="store_true", help="do not keep the old file as *.pre-upgrade")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="arguments of `python -m eval` that resume it")
    args = parser.parse_args(argv)
    if not args.command:
        parser.error("expected the arguments of the python -m eval command that resumes the checkpoint")
    try:
        done = upgrade_command(args.command, check=args.check, backup=not args.no_backup)
    except (ValueError, TypeError, OSError) as err:
        print(f"upgrade_checkpoint: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    what = "converted" if done.converted else "in the checked format, and it resumes under this command"
    print(f"{done.path}: {what}; trainer {done.trainer}, step {done.step}, settings {dict(done.settings)}")
    if done.backup is not None:
        print(f"the old file is kept as {done.backup}")
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
