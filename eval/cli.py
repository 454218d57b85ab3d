"""Command line: one sub-command per job (train, measure-zoo, demo, ...)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from eval import train_cli, zoo_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m eval", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train_cli.add_parser(sub)
    zoo_cli.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result
