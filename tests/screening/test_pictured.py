"""Which slides the report pictures: the rule on results.csv rows, and a bad number refused up front."""

from __future__ import annotations

import pytest

from wsi_screen.errors import ConfigError
from wsi_screen.screening.pictured import needs_a_look, pictured_rows


def _row(name: str, **kw: str) -> dict[str, str]:
    return {"slide": name, "status": "ok", "diagnosis": "normal", "score": "0.1", "out_of_domain": "false",
            "label_agrees": "", **kw}


def test_the_slides_that_need_a_look_and_the_top_others_in_table_order() -> None:
    rows = [_row("low", score="0.01"), _row("call", diagnosis="tumour", score="0.9"), _row("high", score="0.3"),
            _row("failed", status="error", score="", diagnosis=""), _row("empty", status="no tissue", score=""),
            _row("odd", out_of_domain="true", score="0.0"), _row("wrong", label_agrees="false", score="0.0"),
            _row("tie-a", score="0.2"), _row("tie-b", score="0.2")]
    assert [r["slide"] for r in rows if needs_a_look(r, "tumour")] == ["call", "empty", "odd", "wrong"]
    names = lambda top: [rows[i]["slide"] for i in pictured_rows(rows, "tumour", top)]  # noqa: E731
    assert names(0) == ["call", "empty", "odd", "wrong"]
    assert names(2) == ["call", "high", "empty", "odd", "wrong", "tie-a"]  # a tie: the first in the table
    assert names(100) == [r["slide"] for r in rows if r["status"] != "error"]


@pytest.mark.parametrize("bad", [-1, 1.5, "3", True, None])
def test_a_bad_number_of_slides_is_one_clear_error_before_the_run(bad: object) -> None:
    from wsi_screen.screening.run import InferConfig

    with pytest.raises(ConfigError, match=r"^`report_top`=.*must be a whole number >= 0$"):
        pictured_rows([], "tumour", bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="report_top"):
        InferConfig(report_top=bad)  # type: ignore[arg-type]
