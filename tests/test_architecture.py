"""docs/architecture.md's "What may import what" against the package's real imports.

The doc's block lists, line by line from the top layer down, each module and every module of the package it
imports (``a ─> b, c``; a line ending in a comma goes on on the next; a line without an arrow names modules
that import none; ``(comments)`` are left out). The real imports are read
from the source with ``ast`` (imports inside functions count: a lazy import is still an arrow). The tests
say which arrow is missing from the doc, which stated arrow is not true, and which import points up."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mindmirror"
DOC_NAME = "docs/architecture.md"
DOC = ROOT / DOC_NAME
SECTION = "## What may import what"
ARROW = "─>"


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name below ``mindmirror`` (a package's ``__init__`` by the
    package's name; the top package's is left out)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            found[".".join(parts)] = path
    return found


def _known(name: str, names: dict) -> str:
    """``name``, or the nearest package above it that is a module (``data.registry.X`` -> ``data.registry``)."""
    while name and name not in names:
        name = name.rpartition(".")[0]
    return name


def _imported(name: str, path: Path, node: ast.AST, names: dict) -> set[str]:
    """The package's modules that one import statement of module ``name`` names."""
    if isinstance(node, ast.Import):
        return {_known(a.name.removeprefix("mindmirror."), names) for a in node.names
                if a.name.startswith("mindmirror.")}
    if not isinstance(node, ast.ImportFrom):
        return set()
    if node.level:  # relative: from the module's own package up
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        base = ".".join([*package[:len(package) - node.level + 1], *([node.module] if node.module else [])])
    elif node.module == "mindmirror" or (node.module or "").startswith("mindmirror."):
        base = node.module.removeprefix("mindmirror").lstrip(".")
    else:
        return set()
    return {full if (full := f"{base}.{a.name}".lstrip(".")) in names else _known(base, names) for a in node.names}


def real_graph() -> dict[str, dict[str, int]]:
    """``{module: {imported module: line of the first import}}``, from the source."""
    names = modules()
    graph = {}
    for name, path in names.items():
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            for target in _imported(name, path, node, names) - {name, ""}:
                edges[target] = min(edges.get(target, node.lineno), node.lineno)
        graph[name] = edges
    return graph


def doc_lines() -> list[tuple[int, list[str], list[str]]]:
    """The doc's block as ``(line number in the doc, modules on the left, modules they import)``."""
    text = DOC.read_text().splitlines()
    start = text.index(SECTION)
    fence = next(i for i in range(start, len(text)) if text[i].startswith("```"))
    end = next(i for i in range(fence + 1, len(text)) if text[i].startswith("```"))
    lines, pending, first = [], "", 0
    for i in range(fence + 1, end):
        line = re.sub(r"\([^)]*\)", "", text[i]).strip()  # (comments) say why, they name no arrow
        if not line:
            continue
        pending, first = (pending + " " + line, first) if pending else (line, i + 1)
        if pending.endswith(","):  # the list goes on on the next line
            continue
        assert pending.count(ARROW) <= 1, f"{DOC_NAME}:{first}: one arrow a line ('a, b ─> c, d'): {pending!r}"
        left, _, right = pending.partition(ARROW)
        lines.append((first, *[[n.strip() for n in side.split(",") if n.strip()] for side in (left, right)]))
        pending = ""
    assert not pending, f"{DOC_NAME}:{first}: the block ends inside a list: {pending!r}"
    return lines


def placed() -> dict[str, int]:
    """Each module's place in the doc: the line where it stands on the left (its level, top down)."""
    where: dict[str, int] = {}
    for number, sources, _ in doc_lines():
        for name in sources:
            assert name not in where, f"{DOC_NAME}:{number}: {name} has a line already ({DOC_NAME}:{where[name]})"
            where[name] = number
    return where


def test_the_doc_names_only_real_modules():
    names = modules()
    for number, sources, targets in doc_lines():
        for name in sources + targets:
            assert name in names, f"{DOC_NAME}:{number}: {name} is not a module of mindmirror (renamed or moved?)"


def test_every_module_that_imports_or_is_imported_has_its_line():
    graph, where = real_graph(), placed()
    used = {name for name, edges in graph.items() if edges} | {t for edges in graph.values() for t in edges}
    missing = sorted(used - set(where))
    assert not missing, f"{DOC_NAME}: give these modules a line in '{SECTION}': {', '.join(missing)}"


def test_every_arrow_the_doc_states_is_a_real_import():
    graph = real_graph()
    wrong = [f"{DOC_NAME}:{number}: states {source} {ARROW} {target}, but {source} does not import {target}: remove it"
             for number, sources, targets in doc_lines() for source in sources for target in targets
             if target not in graph.get(source, {})]
    assert not wrong, "\n".join(wrong)


def test_every_real_import_is_in_the_doc():
    stated = {(s, t) for _, sources, targets in doc_lines() for s in sources for t in targets}
    names, where = modules(), placed()
    missing = [f"mindmirror/{names[source].relative_to(PACKAGE)}:{line}: {source} imports {target}; the doc lacks "
               f"the arrow {source} {ARROW} {target}: "
               + (f"add {target} to the line of {source} ({DOC_NAME}:{where[source]})" if source in where
                  else f"give {source} a line ({source} {ARROW} {target}) above {target}'s")
               for source, edges in sorted(real_graph().items()) for target, line in sorted(edges.items())
               if (source, target) not in stated]
    assert not missing, "\n".join(missing)


def test_no_module_imports_one_the_doc_places_above_it():
    where = placed()
    upward = [f"{source} (line {where[source]}) imports {target} (line {where[target]}), which the doc places "
              f"above it: move {target}'s line below {source}'s, or drop the import"
              for source, edges in sorted(real_graph().items()) for target in sorted(edges)
              if source in where and target in where and where[target] <= where[source]]
    assert not upward, f"{DOC_NAME}:\n" + "\n".join(upward)


def cycle(graph: dict[str, dict]) -> list[str]:
    """An import cycle of ``graph`` as ``[a, b, ..., a]``, or ``[]`` when there is none."""
    state: dict[str, str] = {}  # "open" while on the path of the search, "done" after

    def visit(path: list[str]) -> list[str]:
        state[path[-1]] = "open"
        for target in sorted(graph.get(path[-1], {})):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (found := visit(path + [target])):
                return found
        state[path[-1]] = "done"
        return []

    return next((found for name in sorted(graph) if name not in state and (found := visit([name]))), [])


def test_no_import_cycles():
    found = cycle(real_graph())
    assert not found, f"an import cycle: {f' {ARROW} '.join(found)}"


def test_cycle_finder():
    assert cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {}}) == []
    assert cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b": 1}, "b": {"c": 1, "d": 1}, "c": {}, "d": {"b": 1}}) == ["b", "d", "b"]
    assert cycle({"a": {"a": 1}}) == ["a", "a"]


def test_the_reader_sees_relative_and_lazy_imports(tmp_path, monkeypatch):
    """The graph reader itself: absolute, relative, from-package and function-level imports all count."""
    package = tmp_path / "mindmirror"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from . import leaf\n")
    (package / "sub" / "leaf.py").write_text("")
    (package / "base.py").write_text("")
    (package / "top.py").write_text("import json\nfrom mindmirror import base\n\n\ndef f():\n"
                                    "    from mindmirror.sub.leaf import x\n    import mindmirror.sub\n")
    (package / "sub" / "mid.py").write_text("from .leaf import y\nfrom ..base import z\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    assert real_graph() == {"base": {}, "sub": {"sub.leaf": 1}, "sub.leaf": {},
                            "sub.mid": {"sub.leaf": 1, "base": 2}, "top": {"base": 2, "sub.leaf": 6, "sub": 7}}
