"""The package's stages import one way only (docs/design.md, "The house"), and no files import each other:
tests on the import graph.

Every ``import`` and ``from ... import`` in the package, at module level or inside a function, is read from the
source (nothing is imported), and so is every string that names a module of the package (``"wsi_screen.tiling.
pipeline"`` handed to ``importlib``: a slide reader's preload, the lazy public API). A module may import its own
layer and the layers below it, never one above: the slide does not know about tiling, tiling does not know about
models, models do not know about training, and so on. ``synthetic`` builds test slides from the pipeline's parts
and nothing imports it; the package's ``__init__`` (the public API, re-exported lazily) and the timm hook sit at
the top with the CLI. A module importing a package it lives in (``from wsi_screen import __version__``) is not
counted: Python loads a package before its modules whatever the code says. A violation names the file, the line
and the two layers; a cycle names its files.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "wsi_screen"

#: top to bottom; a module of layer i may import layers >= i (its own and those listed after it)
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("interface", ("cli", "commands", "__init__", "_timm_hook")),
    ("synthetic", ("synthetic",)),
    ("embedding", ("embedding",)),
    ("screening", ("screening",)),
    ("training", ("training",)),
    ("models", ("models",)),
    ("tiling", ("tiling",)),
    ("slide", ("slide",)),
    ("shared", ("metrics", "distributed", "progress", "runlog", "errors", "_safe_write", "_device_name")),
]
RANK = {top: i for i, (_, tops) in enumerate(LAYERS) for top in tops}


def _layer(dotted: str) -> int | None:
    parts = dotted.split(".")
    if parts[0] != "wsi_screen":
        return None
    return RANK["__init__"] if len(parts) == 1 else RANK.get(parts[1])


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(dotted: str) -> bool:
    base = PACKAGE.parent / dotted.replace(".", "/")
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in ``path`` and every string naming a module of the package."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # "from wsi_screen import x" imports the module wsi_screen.x when x is one, else wsi_screen itself
            subs = [f"{node.module}.{a.name}" for a in node.names if _is_module(f"{node.module}.{a.name}")]
            out += [(node.lineno, node.module)] * (len(subs) < len(node.names)) + [(node.lineno, m) for m in subs]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and re.fullmatch(r"wsi_screen(\.\w+)+", node.value) and _is_module(node.value):
            out.append((node.lineno, node.value))  # handed to importlib
    own = _module_name(path) if path.is_relative_to(PACKAGE) else ""
    # a package the importer lives in is loaded before it anyway: not an edge
    return [(line, name) for line, name in out if not (own + ".").startswith(name + ".")]


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_at_most_ten_modules_at_the_top() -> None:
    """The stages are visible from ``ls wsi_screen``: the top holds the shared plumbing only."""
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 10, top


def test_every_module_has_a_layer() -> None:
    unplaced = [str(p.relative_to(PACKAGE)) for p in _modules()
                if _layer("wsi_screen." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts)) is None]
    assert not unplaced, f"add these to LAYERS: {unplaced}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_flow_down(path: Path) -> None:
    own = _layer("wsi_screen." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts))
    assert own is not None
    upward = [f"{path.relative_to(PACKAGE.parent)}:{line} imports {name} ({LAYERS[target][0]}, above "
              f"{LAYERS[own][0]})"
              for line, name in _imports(path)
              if (target := _layer(name)) is not None and target < own]
    assert not upward, "\n".join(upward)


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    """The test above can fail: a slide module importing the screening stage is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from wsi_screen.screening.runfolder import read_table\n")
    names = [name for _, name in _imports(bad)]
    assert names == ["wsi_screen.screening.runfolder"]
    assert _layer(names[0]) < RANK["slide"]  # type: ignore[operator]


def test_the_checker_sees_a_string_import(tmp_path: Path) -> None:
    """A module named in a string (handed to importlib) counts as an import."""
    bad = tmp_path / "bad.py"
    bad.write_text('PRELOAD = ("wsi_screen.tiling.pipeline",)\nLOGGER = "wsi_screen.no_such_module"\n')
    assert [name for _, name in _imports(bad)] == ["wsi_screen.tiling.pipeline"]


# ------------------------------------------------------------------------------------------------- no cycles
def _graph() -> dict[str, dict[str, int]]:
    """{module: {module it imports: first line}} over the package, imports of the package's own modules only."""
    graph: dict[str, dict[str, int]] = {}
    for path in _modules():
        edges = graph.setdefault(_module_name(path), {})
        for line, name in _imports(path):
            while name and not _is_module(name):  # "import wsi_screen.x.y as z" and the like
                name = name.rpartition(".")[0]
            if name.startswith("wsi_screen") and name != _module_name(path):
                edges.setdefault(name, line)
    return graph


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_two_files_import_each_other() -> None:
    graph = _graph()
    pairs = [f"{a} (line {graph[a][b]}) <-> {b} (line {graph[b][a]})"
             for a in sorted(graph) for b in sorted(graph[a]) if a < b and a in graph.get(b, {})]
    assert not pairs, "\n".join(pairs)


def test_no_import_cycles() -> None:
    cycles = _cycles(_graph())
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_a_cycle() -> None:
    """The tests above can fail: a mutual pair and a three-module loop are both found."""
    graph = {"a": {"b": 1}, "b": {"a": 2}, "c": {"d": 1}, "d": {"e": 1}, "e": {"c": 1}, "f": {"a": 1}}
    assert _cycles(graph) == [["a", "b"], ["c", "d", "e"]]
