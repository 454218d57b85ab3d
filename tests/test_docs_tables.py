"""Every generated figure table in README.md and docs/ matches the results JSON it restates (eval/docs_tables.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from eval.docs_tables import TABLES, pages, render_page, stale_blocks

PAGES = pages()


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_generated_tables_match_their_json(page: Path) -> None:
    stale = stale_blocks(page.read_text())
    assert not stale, f"{page.name}: tables {stale} differ from their JSON: run python scripts/render_docs_tables.py"


def test_every_table_is_published_somewhere() -> None:
    text = "".join(p.read_text() for p in PAGES)
    missing = [name for name in TABLES if f"<!-- table:{name} -->" not in text]
    assert not missing, f"tables published on no page: {missing}"


def test_a_retyped_figure_is_caught() -> None:
    name = next(iter(TABLES))
    good = f"<!-- table:{name} -->\n{TABLES[name]()}\n<!-- /table:{name} -->"
    empty = f"<!-- table:{name} -->\n<!-- /table:{name} -->"
    assert stale_blocks(empty) == [name] and render_page(empty) == good
    assert stale_blocks(good) == [] and render_page(good) == good
    edited = good.replace("0.", "9.", 1)
    assert edited != good and stale_blocks(edited) == [name]
