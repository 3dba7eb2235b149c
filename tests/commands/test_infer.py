"""wsi_screen.commands.infer: the command's own checks of its options (the run itself: tests/screening/test_run.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_cli


@pytest.mark.parametrize(("k", "why"), [("inf", "a count >= 1"), ("nan", "a count >= 1"),
                                        ("2.5", "a whole count >= 1"), ("0", "a whole count >= 1")])
def test_a_bad_k_is_refused_in_one_line_as_the_api_refuses_it(tmp_path: Path, k: str, why: str) -> None:
    """`--k inf` was an internal OverflowError and `--k 2.5` was cut to 2; call_slide(k=2.5) refused it."""
    res = run_cli("infer", tmp_path, "-o", tmp_path / "run", "--k", k)
    assert res.code == 1 and res.err_lines == [f"wsi-screen: error: top-k --k must be {why} or a share in (0, 1), got "
                                            f"{float(k)!r}"], res
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("rule", [["--aggregate", "region"], ["--aggregate", "mean"], []])
def test_k_for_a_rule_that_reads_none_is_refused(tmp_path: Path, example_slide: Path, rule: list[str]) -> None:
    """`--aggregate region --k 3` ignored the k without a word (so did the bundled model's own region rule)."""
    res = run_cli("infer", example_slide, "-o", tmp_path / "run", *rule, "--k", "3", "--workers", "0")
    name = rule[1] if rule else "region"  # the bundled model's calibrated rule
    assert res.code == 1 and res.err_lines[-1] == (f"wsi-screen: error: --k is read by the topk rule only, and the "
                                                   f"slide rule is {name}: drop --k, or set --aggregate to topk"), res
    assert not (tmp_path / "run" / "results.csv").exists()

