"""CLI words stay in the CLI: the library names Python settings (`slide_mpp`), the CLI shows its options."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

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


# --- each surface names its own parameters --------------------------------------------------------------
def test_api_errors_name_the_python_api_parameters(slides_dir: Path, cmu_svs: Path) -> None:
    """A notebook user reads parameters they can pass: `mpp` (open_slide, screen), `size` (tile),
    `wsi_screen.open_slide(path, force_mpp=...)` and `wsi_screen.models.list_models()`, never the configuration's
    names (`slide_mpp`, `slide_mpps`, `size_px`) nor a screening run's (`stores`, `overwrite`)."""
    import inspect

    import wsi_screen
    from wsi_screen.errors import MissingMppError, ModelMismatchError, ResolutionError, UnknownModelError

    tcga = slides_dir / "TCGA-CR-7395-01A-01-TS1.svs"
    no_mpp = r"does not declare its resolution \(microns per pixel\); set `mpp` \(e\.g\. `mpp`=0\.25 for a 40x scan\)$"
    with pytest.raises(MissingMppError, match=no_mpp):
        wsi_screen.open_slide(tcga)
    with pytest.raises(MissingMppError, match=no_mpp):
        wsi_screen.screen(tcga)
    assert {"mpp"} <= set(inspect.signature(wsi_screen.open_slide).parameters)
    assert {"mpp"} <= set(inspect.signature(wsi_screen.screen).parameters)

    with pytest.raises(ResolutionError) as coarse:
        wsi_screen.screen(slides_dir / "camelyon-lowres.dcm")
    # open_slide and screen take force_mpp (docs/api.md); wsi_screen.Slide's was named, which they did not accept
    assert str(coarse.value).endswith("set it with `wsi_screen.open_slide(path, force_mpp=...)`)")
    assert "force_mpp" in inspect.signature(wsi_screen.open_slide).parameters
    assert "force_mpp" in inspect.signature(wsi_screen.screen).parameters
    assert "open_slide(path, mpp=None, *, name=None, reader=\"auto\", force_mpp=None)" in (
        REPO / "docs" / "api.md").read_text(encoding="utf-8")

    model = wsi_screen.load_model()
    with wsi_screen.open_slide(cmu_svs) as slide:
        store = wsi_screen.tile(slide, mpp=2.0, size=64)
    with pytest.raises(ModelMismatchError) as other:
        wsi_screen.score(store, model)
    assert str(other.value).endswith("tile it again with `mpp`=0.972, `size`=96 and `stain`=none, or pass the open "
                                     "slide to `score`, which tiles it as the model needs"), other.value
    assert {"mpp", "size", "stain"} <= set(inspect.signature(wsi_screen.tile).parameters)

    with pytest.raises(UnknownModelError) as unknown:
        wsi_screen.create_model("nonexistent_arch", 2)
    assert str(unknown.value) == "unknown architecture 'nonexistent_arch'; `wsi_screen.models.list_models()` lists them"
    assert callable(wsi_screen.models.list_models)


def test_api_resolution_warnings_name_the_api_parameter(cmu_svs: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A slide's forced resolution is warned of, and refused, naming the parameter it was given as, `force_mpp`, from
    open_slide and from wsi_screen.Slide alike (they named `wsi_screen.open_slide(path, force_mpp=...)` and the CLI's
    table's `slide_mpps`); the CLI's words turn it into its option, the only way a command forces a resolution."""
    import logging

    import wsi_screen
    from wsi_screen.errors import ConfigError, MissingMppError

    with caplog.at_level(logging.WARNING, logger="wsi_screen"):
        with wsi_screen.open_slide(cmu_svs, force_mpp=0.3) as slide:
            assert slide.mpp == 0.3 and slide.mpp_source == "user"
        # the public class (another mpp: a slide warns once per forced mpp)
        wsi_screen.Slide(cmu_svs, force_mpp=0.31).close()
    assert [r.getMessage() for r in caplog.records] == [
        f"{cmu_svs}: using 0.3 um/px from `force_mpp`; the file declares 0.499 um/px",
        f"{cmu_svs}: using 0.31 um/px from `force_mpp`; the file declares 0.499 um/px"]
    for opener in (wsi_screen.open_slide, wsi_screen.Slide):
        with pytest.raises(ConfigError) as bad:
            opener(cmu_svs, force_mpp=-1)
        assert str(bad.value) == "`force_mpp` must be a positive number of microns per pixel, got -1"
        with pytest.raises(MissingMppError) as absurd:
            opener(cmu_svs, force_mpp=200.0)
        assert str(absurd.value) == f"{cmu_svs}: `force_mpp` 200.0 is outside the plausible range 0.05-100.0 um/px"
    with name_settings(SETTING_FLAGS):
        with wsi_screen.open_slide(cmu_svs, force_mpp=0.32):
            pass  # a front end's words installed: the record keeps the library's, for its terminal log to rewrite
        assert caplog.records[-1].getMessage().endswith("from `force_mpp`; the file declares 0.499 um/px")
        assert in_user_words(caplog.records[-1].getMessage()).endswith(
            "from --slide-mpp-csv; the file declares 0.499 um/px")


def test_api_words_name_real_api_names() -> None:
    """Every word of the API table names something the package exports."""
    import importlib

    from wsi_screen.errors import API_WORDS, in_api_words

    for word in API_WORDS.values():
        dotted = re.match(r"`(wsi_screen(?:\.\w+)+)\(", word)
        if dotted:
            module, _, name = dotted.group(1).rpartition(".")
            assert hasattr(importlib.import_module(module), name), word
    assert in_api_words(in_api_words("set `slide_mpp`")) == "set `mpp`"  # rewriting twice changes nothing


def test_cli_errors_name_the_cli_options(slides_dir: Path, tmp_path: Path) -> None:
    """The same messages through the CLI name its options, not the Python API's parameters."""
    from tests.conftest import run_cli

    res = run_cli("tile", str(slides_dir / "TCGA-CR-7395-01A-01-TS1.svs"), "-o", str(tmp_path / "out"))
    assert res.code == 1 and any(line.endswith("does not declare its resolution (microns per pixel); set --slide-mpp "
                                               "(e.g. --slide-mpp=0.25 for a 40x scan)") for line in res.err_lines), res
    # the run log file says it as the terminal does (it wrote `slide_mpp`, the Python setting, for --slide-mpp)
    log = (tmp_path / "out" / "wsi-screen.log").read_text(encoding="utf-8")
    assert "set --slide-mpp (e.g. --slide-mpp=0.25 for a 40x scan)" in log and "slide_mpp" not in log, log
    res = run_cli("models", "nonexistent_arch")
    assert res.code == 1 and res.err_lines[-1] == (
        "wsi-screen: error: unknown architecture 'nonexistent_arch'; `wsi-screen models` lists them"), res
