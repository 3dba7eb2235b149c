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



def test_the_out_of_domain_line_names_the_card_of_the_model_used(tmp_path: Path, demo_run: Path,
                                                                 example_slide: Path) -> None:
    """With --model, the out-of-domain line pointed at `wsi-screen models --card`, which prints the bundled model's
    card, not the card of the model that made the call."""
    import shutil

    from wsi_screen.models import default_model_dir

    model = tmp_path / "lab model"
    shutil.copytree(default_model_dir(), model)
    res = run_cli("infer", example_slide, "-o", tmp_path / "run", "--model", model, "--stores", demo_run / "stores",
                  "--workers", "0")
    assert res.code == 0, res
    line = [t for t in res.out.splitlines() if t.startswith("OUT OF DOMAIN: ")]
    assert len(line) == 1 and line[0].endswith(f"(`wsi-screen models --card '{model}'`)"), res.out
    bundled = run_cli("infer", example_slide, "-o", tmp_path / "run2", "--stores", demo_run / "stores",
                      "--workers", "0")
    line = [t for t in bundled.out.splitlines() if t.startswith("OUT OF DOMAIN: ")]
    assert len(line) == 1 and line[0].endswith("(`wsi-screen models --card`)"), bundled.out


def test_the_readme_lists_every_file_of_the_demo_run(demo_run: Path) -> None:
    """README's "What a run gives you" tree names each file and folder the demo run holds (it left out each
    slide's slide.json and the run's wsi-screen.log)."""
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    tree = readme.split("## What a run gives you", 1)[1].split("```\n", 1)[1].split("```", 1)[0]
    listed = {line.split()[0].rstrip("/") for line in tree.splitlines()[1:]
              if line.startswith(("  ", "    ")) and not line.startswith("      ") and line.strip()}
    slide = "CMU-1-Small-Region"
    present = {p.name for p in demo_run.iterdir() if not p.name.startswith(".")}
    present |= {p.name for p in (demo_run / slide).iterdir()}
    assert present <= listed, sorted(present - listed)
