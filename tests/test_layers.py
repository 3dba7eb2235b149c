"""The package's stages import one way only (docs/design.md, "The house"): a test on the import graph.

Every ``import`` and ``from ... import`` in the package, at module level or inside a function, is read
from the source (nothing is imported). A module may import its own layer and the layers below it, never
one above: the slide does not know about tiling, tiling does not know about models, models do not know
about training, and so on. ``synthetic`` builds test slides from the pipeline's parts and nothing imports
it. A violation names the file, the line and the two layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "wsi_screen"

#: top to bottom; a module of layer i may import layers >= i (its own and those listed after it)
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("interface", ("cli", "commands")),
    ("synthetic", ("synthetic",)),
    ("embedding", ("embedding",)),
    ("screening", ("screening",)),
    ("training", ("training",)),
    ("models", ("models",)),
    ("tiling", ("tiling",)),
    ("slide", ("slide",)),
    ("shared", ("metrics", "decision", "distributed", "progress", "runlog", "memory", "threads", "errors",
                "tables", "_safe_write", "_timm_hook", "_device_name", "__init__")),
]
RANK = {top: i for i, (_, tops) in enumerate(LAYERS) for top in tops}


def _layer(dotted: str) -> int | None:
    parts = dotted.split(".")
    if parts[0] != "wsi_screen":
        return None
    return RANK["__init__"] if len(parts) == 1 else RANK.get(parts[1])


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            # "from wsi_screen import x" imports the module wsi_screen.x when x is one
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names
                    if (PACKAGE.parent / node.module.replace(".", "/") / a.name).exists()
                    or (PACKAGE.parent / node.module.replace(".", "/") / f"{a.name}.py").exists()]
    return out


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


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
