"""The README and docs/ stay true to the code: the README is a short guide, its Python blocks run, every relative
link resolves, and every command written in the README or docs/ (``manifold-defense ...``, the console script, or
its equivalent ``python -m eval ...``) parses against the current command line (the runs themselves are documented
next to each command, with their times)."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
#: The API reference, written by ``make docs`` (scripts/check_api_docs.py) and not committed.
GENERATED = ROOT / "docs" / "api"

#: Markers of a synopsis rather than a command: optional parts, alternatives, elisions, option templates.
TEMPLATE_MARKERS = ("[", "|", "...", "FILE", "CKPT", "FIELD=", "COMMAND")
#: Placeholders of a command template, and a value each that the parser accepts.
PLACEHOLDERS = {"NAME": "mnist-classifier", "DIR": "runs/example", "<run>": "example"}
#: The two spellings of the command line: the console script (pyproject's [project.scripts]) and the module.
PREFIXES = ("manifold-defense ", "python -m eval ")


def _code_blocks(text: str, lang: str | None = None) -> list[str]:
    pattern = r"```(\w*)\n(.*?)```"
    return [body for tag, body in re.findall(pattern, text, flags=re.S) if lang is None or tag == lang]


def _commands(text: str) -> list[str]:
    """``manifold-defense ...`` and ``python -m eval ...`` commands: inline code spans (which may wrap over lines)
    and code-block lines."""
    found = []
    for block in _code_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():  # shell line continuations
            line = " ".join(line.split("#")[0].strip().rstrip("&").split())
            if line.startswith(PREFIXES):
                found.append(line)
    outside = re.sub(r"```.*?```", "", text, flags=re.S)
    for span in re.findall(r"`([^`]+)`", outside):
        span = " ".join(span.split())
        if span.startswith(PREFIXES):
            found.append(span)
    return found


def _arguments(command: str) -> list[str]:
    """The words after the program, whichever spelling the command uses."""
    prefix = next(p for p in PREFIXES if command.startswith(p))
    return command[len(prefix) :].split()


def test_commands_are_found_in_both_spellings() -> None:
    text = (
        "Run `manifold-defense cs --out DIR\n--quick` or `python -m eval cs --out DIR`; not `python3 -m evaluate x`.\n"
        "```bash\nmanifold-defense demo --out a \\\n  --n 5 &  # comment\nOMP_NUM_THREADS=1 python -m eval zoo\n```\n"
    )
    commands = _commands(text)
    assert commands == ["manifold-defense demo --out a --n 5", "manifold-defense cs --out DIR --quick",
                        "python -m eval cs --out DIR"]  # fmt: skip
    assert [_arguments(c) for c in commands] == [
        ["demo", "--out", "a", "--n", "5"], ["cs", "--out", "DIR", "--quick"], ["cs", "--out", "DIR"]
    ]  # fmt: skip


def test_docs_use_the_console_command() -> None:
    """Commands to type are spelled ``manifold-defense``; ``python -m eval`` only where the README names the
    equivalence."""
    old = {
        page.name: [
            c for c in _commands(page.read_text()) if c.startswith("python -m eval ") and ": error:" not in c
        ]
        for page in PAGES
    }  # an error message quoted as printed keeps its prefix
    old = {name: found for name, found in old.items() if found}
    assert not old, f"commands still spelled `python -m eval` (use `manifold-defense`): {old}"
    assert "python -m eval" in README.read_text(), "the README should say `python -m eval` still works"


def test_readme_is_a_short_guide() -> None:
    size = README.stat().st_size
    assert size < 15_000, f"expected README.md under 15 KB (details belong in docs/), got {size} bytes"
    text = README.read_text()
    for needed in ("make demo", "make test", "latent_dim", "[0, 1]", "logits", "examples/"):
        assert needed in text, f"README.md lost {needed!r}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page: Path) -> None:
    text = page.read_text()
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://|mailto:|#", target):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        if path.is_relative_to(GENERATED) and not GENERATED.exists():
            continue  # the API reference is built by `make docs` (not committed); CI builds it after the tests
        if not path.exists():
            missing.append(target)
    assert not missing, f"{page.name}: links to missing files {missing}"


def test_every_docs_page_is_linked_from_the_readme() -> None:
    text = README.read_text()
    unlinked = [p.name for p in PAGES[1:] if f"docs/{p.name}" not in text]
    assert not unlinked, f"docs pages not linked from README.md: {unlinked}"


def test_readme_shows_the_api() -> None:
    assert _code_blocks(README.read_text(), "python"), (
        "expected the README to show the API in a ```python block"
    )


#: Pages whose Python blocks take more than a few seconds on a CPU (the Defense-GAN schedule): run with --runslow.
SLOW_PAGES = {"zoo.md"}


@pytest.mark.parametrize(
    "page",
    [
        pytest.param(p, marks=[pytest.mark.slow] if p.name in SLOW_PAGES else [])
        for p in PAGES
        if _code_blocks(p.read_text(), "python")
    ],
    ids=lambda p: p.name,
)
def test_python_blocks_run(page: Path, tmp_path: Path) -> None:
    """Every ```python block of the README and docs/ runs as it is, in a fresh interpreter."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for i, block in enumerate(_code_blocks(page.read_text(), "python")):
        script = tmp_path / f"block_{i}.py"
        script.write_text("import torch\ntorch.manual_seed(0)\ntorch.set_num_threads(1)\n" + block)
        run = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env
        )
        assert run.returncode == 0, f"{page.name} python block {i} failed:\n{block}\n{run.stderr[-3000:]}"
        if page == README:
            assert "tensor(" in run.stdout, run.stdout


def test_documented_commands_parse() -> None:
    from eval.cli import build_parser

    commands = sorted({c for page in PAGES for c in _commands(page.read_text())})
    # A bare ``manifold-defense cs`` or ``--help`` names a command; it is not a run.
    runnable = [
        c
        for c in commands
        if not any(m in c for m in TEMPLATE_MARKERS) and len(_arguments(c)) > 1 and "--help" not in c
    ]
    assert len(runnable) >= 35, f"expected the docs to show their commands, found {len(runnable)}"
    parser = build_parser()
    failures = []
    for command in runnable:
        for placeholder, value in PLACEHOLDERS.items():
            command = command.replace(placeholder, value)
        argv = _arguments(command)
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                parser.parse_args(argv)
        except SystemExit:
            failures.append(f"{command}\n    {err.getvalue().strip()}")
    assert not failures, "documented commands that no longer parse:\n" + "\n".join(failures)
