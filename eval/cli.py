"""Command line of manifold-defense: ``python -m eval <command> ...`` (``--help`` lists the commands).

Each command lives in its own module of :mod:`eval` that defines ``add_parsers(subparsers)``; the parser of a
command stores its handler as ``func`` (``args -> exit code``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import shlex
import sys
from collections.abc import Sequence

# Modules that define commands, in the order --help lists them.
COMMAND_MODULES = (
    "eval.demo",
    "eval.train_cli",
    "eval.zoo_cli",
    "eval.cs",
    "eval.defense_eval",
    "eval.crosscheck",
    "eval.bench",
    "eval.robustness",
    "eval.autoattack",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m eval", description=__doc__)
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


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(arguments)
    args.command_line = _format(arguments)
    result: int = args.func(args)
    return result
