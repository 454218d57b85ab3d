"""scripts/check_api_docs.py (``make docs``): a public symbol without a docstring and a broken cross-reference are
caught, on tiny fake packages written here; a documented package passes; the library itself passes."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _checker() -> ModuleType:
    path = ROOT / "scripts" / "check_api_docs.py"
    spec = importlib.util.spec_from_file_location("check_api_docs", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("check_api_docs", module)  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


check = _checker()

GOOD = {
    "__init__.py": '''
        """A fake package: :func:`fakepkg.core.double` and :class:`~fakepkg.core.Box`."""
        from fakepkg.core import LIMIT, Box, double

        __all__ = ["LIMIT", "Box", "double"]
    ''',
    "core.py": '''
        """Core of the fake package; see :data:`LIMIT` and :meth:`Box.grow`."""
        from dataclasses import dataclass

        __all__ = ["LIMIT", "Box", "double"]

        LIMIT = 3
        """Largest size (used by :func:`double`)."""


        @dataclass
        class Box:
            """A box (:attr:`size`, :attr:`label`)."""

            size: int

            def __init__(self, size: int) -> None:
                self.size = size
                self.label = "box"

            def grow(self) -> "Box":
                """A box of :func:`double` the size (:class:`Box`)."""
                return Box(double(self.size))


        def double(x: int) -> int:
            """Twice ``x``, at most :data:`fakepkg.core.LIMIT` (:mod:`fakepkg`)."""
            return min(2 * x, LIMIT)


        def _helper() -> None:
            """Private, still checked: :func:`double`."""
    ''',
}


@pytest.fixture
def fake_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder on sys.path where a test writes ``fakepkg``; its modules are dropped from sys.modules after."""
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [n for n in sys.modules if n == "fakepkg" or n.startswith("fakepkg.")]:
        del sys.modules[name]


def _write(root: Path, files: dict[str, str]) -> None:
    (root / "fakepkg").mkdir()
    for name, text in files.items():
        (root / "fakepkg" / name).write_text(textwrap.dedent(text))


def test_a_documented_package_passes(fake_package: Path) -> None:
    _write(fake_package, GOOD)
    modules, problems = check.check_packages(["fakepkg"])
    assert [m.__name__ for m in modules] == ["fakepkg", "fakepkg.core"]
    assert [str(p) for p in problems] == []


def test_a_function_without_docstring_is_caught(fake_package: Path) -> None:
    files = dict(GOOD)
    files["extra.py"] = '''
        """Extra module."""
        __all__ = ["undocumented"]


        def undocumented(x: int) -> int:
            return x
    '''
    _write(fake_package, files)
    _, problems = check.check_packages(["fakepkg"])
    assert [str(p) for p in problems] == [
        "fakepkg.extra.undocumented: missing docstring: expected a docstring on the function, found none"
    ]


def test_a_module_a_dataclass_and_a_constant_without_docstring_are_caught(fake_package: Path) -> None:
    files = dict(GOOD)
    files["bare.py"] = """
        from dataclasses import dataclass

        __all__ = ["Point", "SIZES", "Alias"]

        #: a comment is not what the reference shows
        SIZES = (1, 2)
        Alias = dict[str, int]


        @dataclass
        class Point:
            x: int
    """
    _write(fake_package, files)
    _, problems = check.check_packages(["fakepkg"])
    found = {(p.where, p.what) for p in problems}
    assert found == {
        ("fakepkg.bare", "missing docstring"),
        ("fakepkg.bare.Point", "missing docstring"),  # the generated "Point(x: int)" does not count
        ("fakepkg.bare.SIZES", "missing docstring"),
        ("fakepkg.bare.Alias", "missing docstring"),
    }
    sizes = next(p for p in problems if p.where == "fakepkg.bare.SIZES")
    assert "string literal after the assignment of SIZES (tuple)" in sizes.detail


def test_a_reexported_constant_is_documented_where_it_is_assigned(fake_package: Path) -> None:
    files = dict(GOOD)
    files["core.py"] = GOOD["core.py"].replace('        """Largest size (used by :func:`double`)."""\n', "")
    _write(fake_package, files)
    _, problems = check.check_packages(["fakepkg"])
    assert sorted(p.where for p in problems) == ["fakepkg.LIMIT", "fakepkg.core.LIMIT"]


def test_broken_cross_references_are_caught(fake_package: Path) -> None:
    files = dict(GOOD)
    files["core.py"] = (
        GOOD["core.py"]
        .replace(":meth:`Box.grow`", ":meth:`Box.shrink`")
        .replace(":mod:`fakepkg`)", ":mod:`fakepkg.missing`)")
        .replace("Private, still checked: :func:`double`", "Private, still checked: :func:`tripple`")
    )
    _write(fake_package, files)
    _, problems = check.check_packages(["fakepkg"])
    assert sorted(str(p) for p in problems) == [
        "fakepkg.core._helper: broken reference: :func:`tripple` resolves to no module or attribute",
        "fakepkg.core.double: broken reference: :mod:`fakepkg.missing` resolves to no module or attribute",
        "fakepkg.core: broken reference: :meth:`Box.shrink` resolves to no module or attribute",
    ]


@pytest.mark.parametrize(
    ("target", "ok"),
    [
        ("manifold_defense.inversion.invert", True),
        ("~manifold_defense.inversion.operators.GaussianMatrix", True),
        ("invert()", True),  # relative to the context below
        ("Inversion config <manifold_defense.inversion.InversionConfig>", True),
        ("InversionConfig.steps", True),  # a dataclass field, not a class attribute
        ("manifold_defense.inversion.no_such_function", False),
        ("manifold_defense.nowhere", False),
        ("RandomMeasurement.\nmeasure", False),  # a target wrapped over two lines resolves nowhere
    ],
)
def test_resolves(target: str, ok: bool) -> None:
    assert check.resolves(target, ["manifold_defense.inversion"]) is ok


def test_main_exit_status_and_report(fake_package: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = dict(GOOD)
    files["extra.py"] = '"""Extra."""\n__all__ = ["f"]\n\n\ndef f() -> None:\n    pass\n'
    _write(fake_package, files)
    assert check.main(["fakepkg"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "fakepkg.extra.f: missing docstring: expected a docstring on the function, found none",
        "API docs: 3 modules, 7 public symbols checked: 1 problem(s)",
    ]


def test_the_reference_lists_every_public_symbol(fake_package: Path) -> None:
    pytest.importorskip("pdoc")
    _write(fake_package, GOOD)
    out = fake_package / "api"
    assert check.main(["--out", str(out), "fakepkg"]) == 0
    assert (out / "index.html").exists() and (out / "fakepkg" / "core.html").exists()
    page = (out / "fakepkg" / "core.html").read_text()
    assert 'id="double"' in page and "Twice" in page
    # a page losing a symbol is reported
    (out / "fakepkg" / "core.html").write_text(page.replace('id="double"', 'id="gone"'))
    modules, _ = check.check_packages(["fakepkg"])
    assert [str(p) for p in check.check_html(modules, out)] == [
        f"fakepkg.core.double: not in the reference: no anchor id='double' on {out / 'fakepkg' / 'core.html'}"
    ]


def test_the_library_passes() -> None:
    """What ``make docs`` checks in CI, without building the HTML."""
    modules, problems = check.check_packages(["manifold_defense", "attacks"])
    assert len(modules) > 40
    assert [str(p) for p in problems] == []
