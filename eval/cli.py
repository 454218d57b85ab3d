"""Command line of manifold-defense: ``python -m eval <command> ...`` (``--help`` lists the commands).

Each command lives in its own module of :mod:`eval` that defines ``add_parsers(subparsers)``; the parser of a
command stores its handler as ``func`` (``args -> exit code``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
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


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result
