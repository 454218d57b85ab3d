"""Rewrite every generated figure table of README.md and docs/*.md from its results JSON (see ``eval/docs_tables.py``).

Usage: ``python scripts/render_docs_tables.py`` (from the repository root); ``--check`` only lists stale pages and
exits 1 if there are any.
"""

from __future__ import annotations

import argparse
import sys

from eval.docs_tables import ROOT, pages, render_page, stale_blocks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="list stale blocks, write nothing")
    args = parser.parse_args()
    stale = 0
    for page in pages():
        text = page.read_text()
        names = stale_blocks(text)
        if not names:
            continue
        stale += len(names)
        print(f"{page.relative_to(ROOT)}: {', '.join(names)}")
        if not args.check:
            page.write_text(render_page(text))
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
