"""Check the public API's docstrings and build the API reference (``make docs``).

Usage::

    python scripts/check_api_docs.py [--out docs/api] PACKAGE [PACKAGE ...]

For each package (``manifold_defense``, ``attacks``) it imports the package and every submodule (names without a
leading underscore) and reports:

- a module without a docstring;
- a public symbol without a docstring: every name in the ``__all__`` of the package or a submodule (dunder names
  such as ``__version__`` excepted). Classes and functions need their own docstring (a dataclass's or named
  tuple's generated ``Name(field, ...)`` text does not count); any other object (a constant, a type alias) needs a
  string literal right after its assignment, where it was assigned (followed through ``from ... import``), which
  is what pdoc shows;
- a broken cross-reference: a Sphinx role (``:func:`x```, ``:class:`~a.b.C```, ``:mod:``, ``:meth:``,
  ``:attr:``, ``:data:``, ``:exc:``, ``:obj:``, ``:const:``) in any docstring of those modules whose target
  resolves neither as a full dotted name nor relative to the docstring's class, module or parent packages.

With ``--out DIR`` it then writes the HTML reference with pdoc (Google docstring format; every module listed, so
that a package's ``__all__`` does not hide its submodules) and checks that every public symbol has an anchor on
its module's page. Problems go to stdout, one a line; the exit status is 1 when there is any, else 0.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect
import pkgutil
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = [
    "Problem",
    "broken_references",
    "build_reference",
    "check_html",
    "check_packages",
    "iter_modules",
    "main",
    "missing_docstrings",
    "resolves",
]

#: Sphinx cross-reference roles; group 2 is the target text (``~`` / ``.`` prefixes and ``title <target>`` allowed).
ROLE = re.compile(r"(?::py)?:(mod|func|data|const|class|meth|attr|exc|obj):`([^`]+)`")


@dataclasses.dataclass(frozen=True)
class Problem:
    """One finding of the checker.

    Attributes:
        where: the dotted name of the module or object concerned.
        what: ``"missing docstring"``, ``"broken reference"``, ``"not in the reference"`` or ``"import error"``.
        detail: what was expected and what was found.
    """

    where: str
    what: str
    detail: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}: {self.detail}"


def iter_modules(package: str) -> list[ModuleType]:
    """Import ``package`` and every submodule whose dotted name has no part starting with ``_``, sorted by name.

    Raises:
        ImportError: (or whatever the import raises) when a module does not import; the reference cannot be built.
    """
    root = importlib.import_module(package)
    modules = [root]
    path = getattr(root, "__path__", None)
    if path is not None:
        for info in pkgutil.walk_packages(path, prefix=f"{package}."):
            if any(part.startswith("_") for part in info.name.split(".")):
                continue
            modules.append(importlib.import_module(info.name))
    return sorted(modules, key=lambda m: m.__name__)


def _public_names(module: ModuleType) -> list[str]:
    names = getattr(module, "__all__", None) or []
    return [n for n in names if not (n.startswith("__") and n.endswith("__"))]


def _generated_class_doc(cls: type, doc: str) -> bool:
    """Whether ``doc`` is the text Python generates for a dataclass or named tuple without a docstring."""
    if dataclasses.is_dataclass(cls):
        try:
            generated = cls.__name__ + str(inspect.signature(cls)).replace(" -> None", "")
        except (TypeError, ValueError):
            generated = None
        if doc == generated:
            return True
    fields = getattr(cls, "_fields", None)
    return isinstance(fields, tuple) and doc == f"{cls.__name__}({', '.join(fields)})"


def _own_doc(obj: Any) -> str | None:
    """The docstring an object carries itself (not inherited, not generated), or ``None``."""
    if inspect.isclass(obj):
        doc = obj.__dict__.get("__doc__")
        if not isinstance(doc, str) or not doc.strip() or _generated_class_doc(obj, doc):
            return None
        return doc
    doc = getattr(obj, "__doc__", None)
    return doc if isinstance(doc, str) and doc.strip() else None


def _source_tree(module: ModuleType) -> ast.Module | None:
    try:
        source = inspect.getsource(module)
    except (OSError, TypeError):
        return None
    return ast.parse(source)


def _assigned_names(node: ast.stmt) -> list[str]:
    if isinstance(node, ast.Assign):
        return [t.id for t in node.targets if isinstance(t, ast.Name)]
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [node.target.id]
    return []


def _is_string(node: ast.stmt) -> bool:
    return (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    )


def _variable_docstring(module: ModuleType, name: str, seen: frozenset[str] = frozenset()) -> str | None:
    """The string literal right after the module-level assignment of ``name``, following ``from X import name``
    to the module that assigns it; ``None`` when there is none."""
    if module.__name__ in seen:
        return None
    tree = _source_tree(module)
    if tree is None:
        return None
    body = tree.body
    for i, node in enumerate(body):
        if name in _assigned_names(node):
            nxt = body[i + 1] if i + 1 < len(body) else None
            if nxt is not None and _is_string(nxt):
                value = nxt.value.value  # type: ignore[attr-defined]
                return value if value.strip() else None
            return None
    for node in body:
        if isinstance(node, ast.ImportFrom) and any(
            (alias.asname or alias.name) == name and alias.name == name for alias in node.names
        ):
            source = _import_from_module(module, node)
            if source is not None:
                return _variable_docstring(source, name, seen | {module.__name__})
    return None


def _import_from_module(module: ModuleType, node: ast.ImportFrom) -> ModuleType | None:
    if node.level:
        package = module.__name__ if hasattr(module, "__path__") else module.__name__.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        target = f"{package}.{node.module}" if node.module else package
    else:
        target = node.module or ""
    try:
        return importlib.import_module(target)
    except ImportError:
        return None


def missing_docstrings(module: ModuleType) -> list[Problem]:
    """The module's docstring and every public symbol of its ``__all__`` without a docstring."""
    problems = []
    if not (module.__doc__ or "").strip():
        problems.append(
            Problem(module.__name__, "missing docstring", "expected a module docstring, found none")
        )
    for name in _public_names(module):
        where = f"{module.__name__}.{name}"
        try:
            obj = getattr(module, name)
        except AttributeError:
            problems.append(Problem(where, "missing docstring", "listed in __all__ but not an attribute"))
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.ismodule(obj):
            if _own_doc(inspect.unwrap(obj) if inspect.isfunction(obj) else obj) is None:
                kind = "class" if inspect.isclass(obj) else "module" if inspect.ismodule(obj) else "function"
                problems.append(
                    Problem(where, "missing docstring", f"expected a docstring on the {kind}, found none")
                )
        elif _variable_docstring(module, name) is None:
            problems.append(
                Problem(
                    where,
                    "missing docstring",
                    f"expected a string literal after the assignment of {name} ({type(obj).__name__}), found none",
                )
            )
    return problems


def _member(obj: Any, attr: str) -> tuple[bool, Any]:
    """``(found, value)`` for ``obj.attr``, also finding dataclass fields, annotated attributes and attributes a
    class sets on ``self`` (none of which are class attributes)."""
    try:
        return True, getattr(obj, attr)
    except AttributeError:
        pass
    if inspect.isclass(obj):
        for klass in obj.__mro__:
            if attr in getattr(klass, "__dataclass_fields__", {}) or attr in inspect.get_annotations(klass):
                return True, None
        for klass in obj.__mro__:
            if klass is object:
                continue
            try:
                source = inspect.getsource(klass)
            except (OSError, TypeError):
                continue
            if re.search(rf"self\.{re.escape(attr)}\s*(:[^=\n]+)?=", source):
                return True, None
    return False, None


def _lookup(dotted: str) -> bool:
    """Whether ``dotted`` names an importable module or an attribute path under one."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        except Exception:  # a module that fails for another reason: not a valid target either
            return False
        for attr in parts[i:]:
            if obj is None:  # an attribute known only by name (a field): nothing below it to check
                return True
            found, obj = _member(obj, attr)
            if not found:
                return False
        return True
    return False


def resolves(target: str, context: Sequence[str]) -> bool:
    """Whether a role's target text resolves, as a full dotted name or relative to each prefix in ``context``.

    ``target`` may carry Sphinx's ``~`` or ``.`` prefix, a ``()`` suffix or the ``title <target>`` form.
    """
    text = target.strip()
    titled = re.fullmatch(r".*<([^<>]+)>", text, flags=re.S)
    if titled:
        text = titled.group(1).strip()
    text = text.lstrip("~").lstrip(".").removesuffix("()")
    if not text or not all(part.isidentifier() for part in text.split(".")):
        return False
    return any(_lookup(f"{prefix}.{text}" if prefix else text) for prefix in [*context, ""])


def _docstrings(module: ModuleType) -> Iterator[tuple[str, str, list[str]]]:
    """``(where, docstring, context prefixes)`` for the module's docstring, every class and function docstring in
    its source (methods included, not functions nested in functions) and every variable docstring."""
    packages = []
    name = module.__name__
    while "." in name:
        name = name.rpartition(".")[0]
        packages.append(name)
    base = [module.__name__, *packages]
    tree = _source_tree(module)
    if tree is None:
        if module.__doc__:
            yield module.__name__, module.__doc__, base
        return
    doc = ast.get_docstring(tree)
    if doc:
        yield module.__name__, doc, base

    def walk(body: list[ast.stmt], qual: str) -> Iterator[tuple[str, str, list[str]]]:
        context = [f"{module.__name__}.{qual}", *base] if qual else base
        for i, node in enumerate(body):
            if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                inner = f"{qual}.{node.name}" if qual else node.name
                text = ast.get_docstring(node)
                if text:
                    ctx = (
                        [f"{module.__name__}.{inner}", *context]
                        if isinstance(node, ast.ClassDef)
                        else context
                    )
                    yield f"{module.__name__}.{inner}", text, ctx
                if isinstance(node, ast.ClassDef):
                    yield from walk(node.body, inner)
            elif _assigned_names(node) and i + 1 < len(body) and _is_string(body[i + 1]):
                value = body[i + 1].value.value  # type: ignore[attr-defined]
                yield (
                    f"{module.__name__}.{qual + '.' if qual else ''}{_assigned_names(node)[0]}",
                    value,
                    context,
                )

    yield from walk(tree.body, "")


def broken_references(module: ModuleType) -> list[Problem]:
    """Every cross-reference role in the module's docstrings whose target does not resolve."""
    problems = []
    for where, doc, context in _docstrings(module):
        for match in ROLE.finditer(doc):
            if not resolves(match.group(2), context):
                problems.append(
                    Problem(where, "broken reference", f"{match.group(0)} resolves to no module or attribute")
                )
    return problems


def check_packages(packages: Sequence[str]) -> tuple[list[ModuleType], list[Problem]]:
    """Import every module of ``packages`` and check it: ``(modules, problems)``."""
    modules: list[ModuleType] = []
    problems: list[Problem] = []
    for package in packages:
        try:
            found = iter_modules(package)
        except Exception as err:  # report it as a finding: the reference cannot document what does not import
            problems.append(Problem(package, "import error", f"{type(err).__name__}: {err}"))
            continue
        modules.extend(found)
    for module in modules:
        problems.extend(missing_docstrings(module))
        problems.extend(broken_references(module))
    return modules, problems


def build_reference(modules: Sequence[ModuleType], out: Path) -> None:
    """Write the HTML reference of ``modules`` into ``out`` with pdoc (``index.html`` and one page per module).

    Names a package exports lazily (a module ``__getattr__``) are resolved into the module first, in this process
    only, so that pdoc, which reads ``module.__dict__``, documents them.
    """
    import pdoc  # the dev extra: .venv/bin/pip install -e ".[dev]"
    import pdoc.render

    for module in modules:
        for name in _public_names(module):
            if name not in module.__dict__ and hasattr(module, name):
                module.__dict__[name] = getattr(module, name)
    pdoc.render.configure(docformat="google", show_source=True)
    with warnings.catch_warnings():
        # dataclass fields annotated ``Tensor`` under ``from __future__ import annotations``: pdoc cannot evaluate
        # the __init__ signature it generates and shows the annotation as text, which is what we want anyway
        warnings.filterwarnings("ignore", message="Error parsing type annotation ForwardRef")
        pdoc.pdoc(*[m.__name__ for m in modules], output_directory=out)


def check_html(modules: Sequence[ModuleType], out: Path) -> list[Problem]:
    """Every module has a page under ``out`` and every public symbol an anchor (``id="name"``) on it."""
    problems = []
    if not (out / "index.html").exists():
        problems.append(Problem(str(out), "not in the reference", "expected index.html, found none"))
    for module in modules:
        page = out / f"{module.__name__.replace('.', '/')}.html"
        if not page.exists():
            problems.append(
                Problem(module.__name__, "not in the reference", f"expected the page {page}, found none")
            )
            continue
        html = page.read_text(encoding="utf-8")
        for name in _public_names(module):
            if f'id="{name}"' not in html:
                problems.append(
                    Problem(
                        f"{module.__name__}.{name}",
                        "not in the reference",
                        f"no anchor id={name!r} on {page}",
                    )
                )
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: check ``PACKAGE ...``, build the reference into ``--out`` when given; exit status 1 on any
    problem."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("packages", nargs="+", metavar="PACKAGE")
    parser.add_argument("--out", type=Path, default=None, help="write the HTML reference here (pdoc)")
    args = parser.parse_args(argv)
    modules, problems = check_packages(args.packages)
    if args.out is not None and modules:
        build_reference(modules, args.out)
        problems.extend(check_html(modules, args.out))
    for problem in problems:
        print(problem)
    names = sum(len(_public_names(m)) for m in modules)
    verdict = f"{len(problems)} problem(s)" if problems else "no problems"
    built = f"; reference in {args.out}/index.html" if args.out is not None else ""
    print(f"API docs: {len(modules)} modules, {names} public symbols checked: {verdict}{built}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
