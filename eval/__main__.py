"""``python -m eval <command> ...``: see ``python -m eval --help``."""

from eval.cli import run

raise SystemExit(run())
