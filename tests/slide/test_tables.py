"""wsi_screen.slide.tables: the tables a user gives, read with one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_cli
from wsi_screen.errors import ConfigError
from wsi_screen.slide.tables import read_table


@pytest.mark.parametrize(("text", "what"), [("", "is empty"), ("\ufeff", "is empty"),
                                           ("\nslide,mpp\n", "starts with a blank line")])
def test_an_empty_table_is_called_empty(tmp_path: Path, text: str, what: str) -> None:
    """An empty --slide-mpp-csv said "needs columns 'slide' and 'mpp', found None"."""
    path = tmp_path / "mpp.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        read_table(path, ("slide", "mpp"), "`slide_mpps`")
    assert str(caught.value) == (f"{path}: `slide_mpps` {what}; it needs a header line naming the columns "
                                 "'slide' and 'mpp', then a row per slide")
    # a header without the columns still names what it found
    path.write_text("name,um\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"needs columns 'slide' and 'mpp', found \['name', 'um'\]"):
        read_table(path, ("slide", "mpp"), "`slide_mpps`")


def test_infer_with_an_empty_slide_mpp_csv_says_it_is_empty(tmp_path: Path) -> None:
    empty = tmp_path / "afile"
    empty.touch()
    res = run_cli("infer", tmp_path, "-o", tmp_path / "run", "--slide-mpp-csv", empty)
    assert res.code == 1 and res.err_lines == [f"wsi-screen: error: {empty}: --slide-mpp-csv is empty; it needs a "
                                               "header line naming the columns 'slide' and 'mpp', then a row per "
                                               "slide"], res
