"""The Python versions claimed (``requires-python`` in pyproject.toml) are the ones that work.

Two checks: every module of ``manifold_defense``, ``attacks`` and ``eval`` is scanned (``ast``) for names and
syntax newer than the lowest claimed version (``typing.Self`` and the other 3.11 additions to ``typing``,
``tomllib``, ``datetime.UTC``, ``except*``...), naming the file and line; and where an interpreter of the lowest
claimed version runs (``python3.10`` on PATH, or the one ``MANIFOLD_DEFENSE_LOWEST_PYTHON`` names), it imports
every module; when that interpreter lacks the project's third-party packages (torch, numpy), it compiles every
module with its grammar and resolves every standard-library name each one imports or reads (``from typing import
Self``, ``datetime.UTC``) against its own standard library: the part that differs between versions.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("manifold_defense", "attacks", "eval")

#: Names of ``typing`` added in Python 3.11.
TYPING_311 = frozenset(
    {
        "Self",
        "Never",
        "LiteralString",
        "assert_never",
        "assert_type",
        "TypeVarTuple",
        "Unpack",
        "Required",
        "NotRequired",
        "reveal_type",
        "dataclass_transform",
        "get_overloads",
        "clear_overloads",
    }
)
#: Standard-library modules added in Python 3.11.
MODULES_311 = frozenset({"tomllib", "wsgiref.types"})
#: Names added in 3.11 to older standard-library modules.
NAMES_311 = frozenset(
    {
        ("datetime", "UTC"),
        ("enum", "StrEnum"),
        ("enum", "ReprEnum"),
        ("enum", "verify"),
        ("enum", "member"),
        ("enum", "nonmember"),
        ("hashlib", "file_digest"),
        ("contextlib", "chdir"),
        ("asyncio", "TaskGroup"),
        ("asyncio", "timeout"),
        ("operator", "call"),
    }
    | {("typing", name) for name in TYPING_311}
)
BUILTINS_311 = frozenset({"ExceptionGroup", "BaseExceptionGroup"})


def lowest_claimed() -> tuple[int, int]:
    """``(major, minor)`` of ``requires-python = ">=X.Y"`` in pyproject.toml (read with a regex: ``tomllib`` is 3.11)."""
    text = (REPO / "pyproject.toml").read_text()
    match = re.search(r'^requires-python\s*=\s*">=\s*(\d+)\.(\d+)', text, re.MULTILINE)
    assert match, 'expected requires-python = ">=X.Y" in pyproject.toml'
    return int(match.group(1)), int(match.group(2))


def newer_than_310(source: str) -> list[str]:
    """``line N: what`` for each use of a 3.11-only name, module or syntax in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            if node.module in MODULES_311:
                found.append(f"line {line}: import of {node.module} (Python 3.11)")
            found += [
                f"line {line}: {node.module}.{a.name} (Python 3.11)"
                for a in node.names
                if (node.module, a.name) in NAMES_311
            ]
        elif isinstance(node, ast.Import):
            found += [
                f"line {line}: import of {a.name} (Python 3.11)" for a in node.names if a.name in MODULES_311
            ]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if (node.value.id, node.attr) in NAMES_311:
                found.append(f"line {line}: {node.value.id}.{node.attr} (Python 3.11)")
        elif isinstance(node, ast.Name) and node.id in BUILTINS_311:
            found.append(f"line {line}: {node.id} (Python 3.11)")
        elif type(node).__name__ == "TryStar":
            found.append(f"line {line}: except* (Python 3.11)")
    return found


def module_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def module_names() -> list[str]:
    names = []
    for path in module_files():
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        if parts[-1] != "__main__":
            names.append(".".join(parts))
    return names


def test_the_claim_is_3_10_and_tools_target_it() -> None:
    assert lowest_claimed() == (3, 10)
    text = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^target-version\s*=\s*"py310"', text, re.MULTILINE), "ruff's target-version"
    assert re.search(r'^python_version\s*=\s*"3\.10"', text, re.MULTILINE), "mypy's python_version"


def test_the_scanner_finds_3_11_names() -> None:
    source = textwrap.dedent(
        """
        import tomllib
        import typing
        from typing import Any, Self
        from datetime import UTC
        x: typing.Never
        y = enum.StrEnum
        raise ExceptionGroup("a", [])
        """
    )
    assert sorted(newer_than_310(source)) == [
        "line 2: import of tomllib (Python 3.11)",
        "line 4: typing.Self (Python 3.11)",
        "line 5: datetime.UTC (Python 3.11)",
        "line 6: typing.Never (Python 3.11)",
        "line 7: enum.StrEnum (Python 3.11)",
        "line 8: ExceptionGroup (Python 3.11)",
    ]
    assert (
        newer_than_310("from typing import Any, TypeVar\nimport datetime\nt = datetime.timezone.utc\n") == []
    )
    if sys.version_info >= (3, 11):  # except* only parses on 3.11+
        assert newer_than_310("try:\n    pass\nexcept* ValueError:\n    pass\n") == [
            "line 1: except* (Python 3.11)"
        ]


def test_no_module_uses_names_newer_than_the_lowest_claimed_python() -> None:
    assert lowest_claimed() == (3, 10), "the scan's lists are the 3.11 additions: update them with the claim"
    files = module_files()
    assert len(files) > 50 and any(p.name == "base.py" and p.parent.name == "attacks" for p in files)
    offenders = {str(p.relative_to(REPO)): hits for p in files if (hits := newer_than_310(p.read_text()))}
    assert not offenders, "names newer than Python 3.10 (requires-python >= 3.10):\n" + "\n".join(
        f"{path}: {'; '.join(hits)}" for path, hits in offenders.items()
    )


#: Run by the lowest claimed interpreter on every module: imports them for real when it has the third-party packages
#: they need (torch, numpy); otherwise compiles each (its grammar) and resolves every standard-library name each
#: imports or reads (``from typing import Self``, ``datetime.UTC``) against its own standard library.
_CHILD = r"""
import ast, importlib, importlib.util, json, sys, traceback
from pathlib import Path

root, names = Path(sys.argv[1]), sys.argv[2].split(",")
sys.path.insert(0, str(root))
real = all(importlib.util.find_spec(dep) is not None for dep in ("torch", "numpy"))
failed = {}


def resolve(name, path):
    tree = compile(path.read_text(), str(path), "exec", ast.PyCF_ONLY_AST)  # SyntaxError under this grammar
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in sys.stdlib_module_names:
                    importlib.import_module(a.name)
                    aliases[a.asname or a.name.split(".")[0]] = a.asname and a.name or a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] in sys.stdlib_module_names:
                module = importlib.import_module(node.module)
                for a in node.names:
                    if a.name != "*" and not hasattr(module, a.name):
                        try:
                            importlib.import_module(node.module + "." + a.name)
                        except ImportError:
                            raise ImportError(f"cannot import name {a.name!r} from {node.module!r}") from None
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            module = importlib.import_module(aliases[node.value.id])
            if not hasattr(module, node.attr):
                raise AttributeError(f"module {module.__name__!r} has no attribute {node.attr!r}")


for name in names:
    parts = name.split(".")
    path = root.joinpath(*parts).with_suffix(".py")
    if not path.exists():
        path = root.joinpath(*parts, "__init__.py")
    try:
        importlib.import_module(name) if real else resolve(name, path)
    except Exception:
        failed[name] = traceback.format_exc(limit=-2)
print(json.dumps({"version": list(sys.version_info[:2]), "real_imports": real, "failed": failed}))
"""


def _lowest_interpreter(version: tuple[int, int]) -> tuple[str | None, str]:
    """The lowest claimed interpreter that runs, or ``None`` and why not."""
    name = f"python{version[0]}.{version[1]}"
    exe = os.environ.get("MANIFOLD_DEFENSE_LOWEST_PYTHON") or shutil.which(name)
    if exe is None:
        return None, f"no {name} on PATH (set MANIFOLD_DEFENSE_LOWEST_PYTHON to one to run this check)"
    probe = subprocess.run(
        [exe, "-c", "import sys; print(sys.version_info[0], sys.version_info[1])"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if probe.returncode != 0 or probe.stdout.split() != [str(v) for v in version]:
        why = (probe.stderr.strip().splitlines() or [probe.stdout.strip()])[0]
        return (
            None,
            f"{exe} does not run as {name} ({why}); set MANIFOLD_DEFENSE_LOWEST_PYTHON to one that does",
        )
    return exe, ""


def test_every_module_imports_under_the_lowest_claimed_python() -> None:
    version = lowest_claimed()
    exe, reason = _lowest_interpreter(version)
    if exe is None:
        pytest.skip(reason)
    names = module_names()
    run = subprocess.run(
        [exe, "-c", _CHILD, str(REPO), ",".join(names)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["version"] == list(version)
    assert not result["failed"], (
        f"modules that do not import under Python {version[0]}.{version[1]}:\n"
        + "\n".join(f"{name}: {tb.strip().splitlines()[-1]}" for name, tb in result["failed"].items())
    )
