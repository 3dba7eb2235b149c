"""CLI words stay in the CLI: the library names Python settings (`slide_mpp`), the CLI shows its options."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.conftest import REPO
from wsi_screen.cli import SETTING_FLAGS
from wsi_screen.errors import in_user_words, name_settings

PACKAGE = REPO / "wsi_screen"
FLAG = re.compile(r"--[a-z]")


def _library_files() -> list[Path]:
    return [p for p in sorted(PACKAGE.rglob("*.py"))
            if p.name != "cli.py" and "commands" not in p.relative_to(PACKAGE).parts]


def test_no_option_text_in_the_library() -> None:
    """No string literal outside cli.py and commands/ (messages, f-string parts and docstrings alike) holds a
    ``--flag``."""
    found = [f"{p.relative_to(REPO)}:{node.lineno}: {node.value.strip()[:80]!r}"
             for p in _library_files() for node in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
             if isinstance(node, ast.Constant) and isinstance(node.value, str) and FLAG.search(node.value)]
    assert not found, "\n".join(found)


def test_settings_become_the_front_ends_words_only_where_it_says_so() -> None:
    text = "no resolution; set `slide_mpp` (e.g. `slide_mpp`=0.25), see `spec` and --x"
    assert in_user_words(text) == text  # the library's own words
    with name_settings({"slide_mpp": "--slide-mpp"}):
        assert in_user_words(text) == "no resolution; set --slide-mpp (e.g. --slide-mpp=0.25), see `spec` and --x"
    assert in_user_words(text) == text  # and back


def test_every_flag_the_cli_names_is_one_of_its_options() -> None:
    source = "".join(p.read_text(encoding="utf-8") for p in [PACKAGE / "cli.py", *(PACKAGE / "commands").glob("*.py")])
    missing = sorted(f"{k}: {flag}" for k, flag in SETTING_FLAGS.items() if f'"{flag}"' not in source)
    assert not missing, missing
