"""Command line of manifold-defense: ``python -m eval <command> ...`` (``--help`` lists the commands).

Each command lives in its own module of :mod:`eval` that defines ``add_parsers(subparsers)``; the parser of a
command stores its handler as ``func`` (``args -> exit code``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from typing import NoReturn

from eval.run_folder import check_out_arg, run_folder_session

# Modules that define commands, in the order --help lists them.
COMMAND_MODULES = (
    "eval.demo",
    "eval.train_cli",
    "eval.zoo_cli",
    "eval.cs",
    "eval.ambient",
    "eval.causal",
    "eval.defense_eval",
    "eval.crosscheck",
    "eval.deepinv_crosscheck",
    "eval.bench",
    "eval.robustness",
    "eval.autoattack",
    "eval.diffpure",
    "eval.diffpure_exact",
    "eval.purifier_cost",
    "eval.leaderboard",
    "eval.cascade_profile",
    "eval.break_anatomy",
)


#: Errors a command reports as one line on stderr with exit status 2 (bad arguments, files, data, models,
#: non-finite logits, an output folder holding another run); anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, OSError)


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line: ``PROG: error: MESSAGE (see PROG --help)``, status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m eval", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:  # a command module not written yet
                continue
            raise
        module.add_parsers(sub)
    return parser


def console_spelling(command: str) -> str:
    """A recorded ``python -m eval ...`` command in the console spelling the docs use (the same command)."""
    prefix = "python -m eval "
    return "manifold-defense " + command[len(prefix) :] if command.startswith(prefix) else command


def command_line(args: argparse.Namespace) -> str:
    """The command that produced ``args``, as records store it: ``python -m eval <arguments>``.

    :func:`main` stores the arguments it parsed (``argv``, or ``sys.argv[1:]`` when ``None``) in
    ``args.command_line``, so a command run from Python (``main([...])``) records its own arguments, not the
    calling process's. A namespace built elsewhere falls back to ``sys.argv``.
    """
    stored = getattr(args, "command_line", None)
    if isinstance(stored, str):
        return stored
    return _format(sys.argv[1:])


def _format(argv: Sequence[str]) -> str:
    return " ".join(["python -m eval", *(shlex.quote(a) for a in argv)])


def run(argv: Sequence[str] | None = None) -> int:
    """``python -m eval``: :func:`main`, with every error of :data:`USER_ERRORS` printed as one line on stderr
    (``python -m eval COMMAND: error: MESSAGE``) and exit status 2 instead of a traceback.

    ``MANIFOLD_DEFENSE_TRACEBACK=1`` in the environment re-raises them (the full traceback, for debugging).
    """
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        return main(arguments)
    except USER_ERRORS as err:
        if os.environ.get("MANIFOLD_DEFENSE_TRACEBACK"):
            raise
        prog = " ".join(["python -m eval", *arguments[:1]])
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2


def _check_out(arguments: Sequence[str]) -> None:
    """Refuse an empty or whitespace-only ``--out`` (``--out "$UNSET"``), which would write into ``.``."""
    for i, word in enumerate(arguments):
        if word == "--":
            break
        if word == "--out" and i + 1 < len(arguments):
            check_out_arg(arguments[i + 1])
        elif word.startswith("--out="):
            check_out_arg(word[len("--out=") :])


def _check_threads(args: argparse.Namespace) -> None:
    """Every command's ``--threads``, checked before the command runs (``torch.set_num_threads(0)`` raises a
    RuntimeError, a traceback with exit status 1, after the command may have done work)."""
    threads = getattr(args, "threads", None)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"expected --threads as a positive int (>= 1), got {threads!r}")


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the command; its exit code.

    The command runs inside one :func:`eval.run_folder.run_folder_session`: the run folders it claims stay
    locked against other writers until it returns.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(arguments)
    _check_out(arguments)
    _check_threads(args)
    args.command_line = _format(arguments)
    with run_folder_session():
        result: int = args.func(args)
    return result
