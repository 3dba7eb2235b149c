"""The command-line shell: help for every command, version, config file, error formatting."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import run_cli
from wsi_screen.cli import COMMANDS, LazyGroup


def test_every_registered_command_exists() -> None:
    missing = [name for name in COMMANDS if not LazyGroup._available(name)]
    assert missing == []


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_of_every_command(command: str) -> None:
    res = run_cli(command, "--help")
    assert res.code == 0, res
    assert f"Usage: wsi-screen {command}" in res.out
    assert "--quiet" in res.out or command in ("models",)


def test_tile_help_says_patches_are_normalised_only_with_stain() -> None:
    """The default is --stain none: the help used to promise stain-normalised patches."""
    res = run_cli("tile", "--help")
    assert res.code == 0 and "write its patches to OUT (stain-normalised with --stain; by default as scanned)" \
        in " ".join(res.out.split()), res
    stain = " ".join(res.out.split("--stain [none|macenko|reinhard|vahadane]")[1].split("--stain-target")[0].split())
    assert stain.endswith("[default: none]"), stain


def test_option_help_names_only_the_commands_own_options() -> None:
    """Shared options' help fits each command: a --flag it names is one of that command's options, or is given
    with the command it belongs to (`wsi-screen evaluate --split`)."""
    import re

    import click

    from wsi_screen.cli import cli

    ctx = click.Context(cli)
    wrong = []
    for name in COMMANDS:
        command = cli.get_command(ctx, name)
        assert command is not None
        own = {o for p in command.params for o in [*p.opts, *p.secondary_opts]} | {"--help"}
        for param in command.params:
            text = getattr(param, "help", None) or ""
            for match in re.finditer(r"(\S+ )?(--[a-z][a-z-]*)", text):
                if match.group(2) not in own and (match.group(1) or "").strip("`( ") not in COMMANDS:
                    wrong.append(f"{name} {param.name}: {match.group(0)}")
    assert not wrong, wrong


def test_group_help_lists_commands() -> None:
    res = run_cli("--help")
    assert res.code == 0
    for command in COMMANDS:
        assert command in res.out


def test_every_option_of_every_command_says_what_it_does() -> None:
    """`train --help` listed --warmup-epochs, --label-smoothing, --frozen-epochs, --batch-size and --optimizer with
    a default and nothing else (and the default shown, adamw, is not what the small recipe uses)."""
    import click

    from wsi_screen.cli import cli

    ctx = click.Context(cli)
    bare = [f"{name} {param.opts[0]}" for name in COMMANDS for param in cli.get_command(ctx, name).params
            if isinstance(param, click.Option) and not param.hidden and not (param.help or "").strip()]
    assert bare == [], bare


def test_folder_options_show_a_folder_metavar() -> None:
    """`infer --help` showed `--stores TEXT` beside `embed --stores DIR` (it takes a folder or an fsspec URL)."""
    for command in ("infer", "embed"):
        res = run_cli(command, "--help")
        assert res.code == 0 and "--stores DIR " in res.out, (command, res)


def test_version_and_unknown_command() -> None:
    res = run_cli("--version")
    assert res.code == 0 and "wsi-screen, version" in res.out
    res = run_cli("frobnicate")
    assert res.code == 2 and "No such command" in res.err


def test_usage_errors_are_one_line_with_exit_2(tmp_path: Path) -> None:
    """click's usage errors read as the house's errors, one line, with exit status 2 (1 is a run that failed).
    They were click's block: `Usage: wsi-screen tile [OPTIONS] SLIDES...`, `Try 'wsi-screen tile --help' for
    help.`, a blank line and `Error: ...`."""
    out = str(tmp_path / "out")
    cases = {  # argv -> the whole stderr line
        ("tile", out, "--bogus"): "No such option '--bogus'. (Did you mean one of: '--out', '--verbose'?) (see "
                                  "wsi-screen tile --help)",
        ("infer", out, "-o", out, "--aggregate", "nope"): "Invalid value for '--aggregate': 'nope' is not one of "
            "'mean', 'max', 'topk', 'fraction', 'smoothmax', 'region'. (see wsi-screen infer --help)",
        ("tile", out, "-o", out, "--size", "abc"): "Invalid value for '--size': 'abc' is not a valid integer. (see "
                                                   "wsi-screen tile --help)",
        ("tile", out, "-o", out, "--codec", "lz4", "--quality", "80"): "Invalid value for --quality: lz4 is lossless "
            "and has no quality; use --codec jpeg or jpegxl (or drop --quality) (see wsi-screen tile --help)",
        ("tile",): "Missing argument 'SLIDES...'. (see wsi-screen tile --help)",
        ("tile", out): "Missing option '-o' / '--out'. (see wsi-screen tile --help)",
        ("models", "--card", "--encoders"): "--card prints a model's card and --encoders lists encoders: give one of "
                                            "them (see wsi-screen models --help)",
        ("frobnicate",): "No such command 'frobnicate'. (see wsi-screen --help)",
        ("--bogus",): "No such option '--bogus'. (see wsi-screen --help)",
    }
    for argv, line in cases.items():
        res = run_cli(*argv)
        assert (res.code, res.out, res.err) == (2, "", f"wsi-screen: error: {line}\n"), (argv, res)
    assert not (tmp_path / "out").exists()


def test_a_usage_error_with_line_breaks_or_without_a_command_is_one_line() -> None:
    import click

    from wsi_screen.cli import _click_error_line

    assert _click_error_line(click.UsageError("no such thing.\n  Did you mean\nthat?")) == \
        "no such thing. Did you mean that? (see wsi-screen --help)"
    assert _click_error_line(click.ClickException("cannot open\nx")) == "cannot open x"  # not usage: no hint


def test_no_arguments_still_shows_the_help() -> None:
    """`wsi-screen` alone is not an error line: click's help, as `--help` shows it (exit status 2, as click's)."""
    res = run_cli()
    assert res.code == 2 and res.err.startswith("Usage: wsi-screen [OPTIONS] COMMAND [ARGS]...") \
        and "Commands:" in res.err and "wsi-screen: error" not in res.err, res


def test_help_is_instant_and_imports_nothing_heavy() -> None:
    code = ("import sys, time; t=time.time(); from wsi_screen.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy=[m for m in ('torch','timm','zarr','openslide','skimage','matplotlib') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout
    assert time.perf_counter() - start < 20


def test_a_command_run_in_process_leaves_the_process_as_it_found_it(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """``main`` called in-process (a notebook, this suite) changes neither how the rest of the process logs nor
    whether bars show, and leaves no slide reader behind for a later command (tests failed by their order)."""
    import logging

    from wsi_screen import progress
    from wsi_screen.slide import isolation

    monkeypatch.delenv("WSI_SCREEN_IN_PROCESS", raising=False)  # the early slide reader starts, as in a real run
    package, tiff = logging.getLogger("wsi_screen"), logging.getLogger("tifffile")
    state = lambda: (list(package.handlers), package.level, package.propagate, tiff.level, progress.enabled())  # noqa: E731
    before = state()
    (tmp_path / "mpp.csv").write_text("name,um\nx,0.5\n")
    # not --quiet: a terminal log handler and bars; the table is refused after the reader started, before any slide
    res = run_cli("tile", tmp_path, "-o", tmp_path / "out", "--slide-mpp-csv", tmp_path / "mpp.csv")
    assert res.code == 1 and res.err_lines[-1].startswith("wsi-screen: error: "), res
    assert isolation._early is None
    assert state() == before


def test_config_file_sets_defaults(tmp_path: Path, cmu_svs: Path) -> None:
    cfg = tmp_path / "wsi.toml"
    cfg.write_text("[tile]\nsize = 128\nmpp = 1.0\n")
    res = run_cli("--config", cfg, "tile", cmu_svs, "-o", tmp_path / "out", "--quiet")
    assert res.code == 0, res
    from wsi_screen.tiling.store import PatchStore

    store = PatchStore.open(tmp_path / "out" / "CMU-1-Small-Region.zarr")
    assert store.patch_size == 128 and store.mpp == 1.0
    # the command line wins over the file
    res = run_cli("--config", cfg, "tile", cmu_svs, "-o", tmp_path / "out2", "--size", "64", "--quiet")
    assert PatchStore.open(tmp_path / "out2" / "CMU-1-Small-Region.zarr").patch_size == 64


def test_a_flag_a_config_file_switches_on_is_switched_off_on_the_command_line(tmp_path: Path,
                                                                              cmu_svs: Path) -> None:
    """`quiet = true` in a --config file could not be undone: there was no --no-quiet."""
    cfg = tmp_path / "wsi.toml"
    cfg.write_text("[tile]\nquiet = true\nsize = 64\n")
    res = run_cli("--config", cfg, "tile", cmu_svs, "-o", tmp_path / "a")
    assert res.code == 0 and res.err == "", res
    res = run_cli("--config", cfg, "tile", cmu_svs, "-o", tmp_path / "b", "--no-quiet")
    assert res.code == 0 and "1 slide(s): 1 tiled" in res.err, res
    assert "--quiet / --no-quiet" in run_cli("tile", "--help").out


def test_bad_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[tile\n")
    res = run_cli("--config", cfg, "tile", "x", "-o", "y")
    assert res.code == 1 and res.err.startswith("wsi-screen: error:") and "bad.toml" in res.err
    assert len(res.err_lines) == 1


@pytest.mark.parametrize(("line", "expected"), [
    ("mpp = [1.0]", "Invalid value for '--mpp': [1.0] is a list; it takes one value (set in {cfg})"),
    ("stain = {a = 1}", "Invalid value for '--stain': {'a': 1} is a table; it takes one value (set in {cfg})"),
    # as WSI_SCREEN_TILE_SIZE=96.5 is refused: it used to be cut to 96 silently
    ("size = 96.5", "Invalid value for '--size': '96.5' is not a valid integer. (set in {cfg})"),
])
def test_a_config_value_of_the_wrong_kind_is_a_usage_error(tmp_path: Path, line: str, expected: str) -> None:
    """A list once escaped as `internal error: TypeError` (click's float() of a list)."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"[tile]\n{line}\n")
    res = run_cli("--config", cfg, "tile", "x", "-o", tmp_path / "out")
    assert res.code == 2, res
    line = "wsi-screen: error: " + expected.replace("{cfg}", str(cfg)) + " (see wsi-screen tile --help)"
    assert res.err_lines == [line], res
    assert not (tmp_path / "out").exists()


def test_every_option_is_set_by_the_environment_variable_named_after_its_flag() -> None:
    """WSI_SCREEN_<COMMAND>_<OPTION> as the help says, with OPTION the long flag (`--aggregate` sets the rule,
    `--model` the model folder), for every option of every command."""
    import click

    from wsi_screen.cli import cli

    ctx = click.Context(cli, auto_envvar_prefix="WSI_SCREEN")
    wrong = []
    for name in COMMANDS:
        command = cli.get_command(ctx, name)
        assert command is not None
        sub = click.Context(command, parent=ctx, info_name=name)
        assert sub.auto_envvar_prefix == f"WSI_SCREEN_{name.upper()}"
        for param in command.params:
            flag = next((o for o in param.opts if o.startswith("--")), None)
            if not isinstance(param, click.Option) or flag is None or flag == "--help":
                continue
            expected = f"WSI_SCREEN_{name}_{flag[2:]}".upper().replace("-", "_")
            if param.resolve_envvar_value(sub) is not None:
                continue  # set in this test's environment: nothing to learn
            import os

            os.environ[expected] = "1"
            try:
                if param.resolve_envvar_value(sub) != "1":
                    wrong.append(f"{name} {flag}: {expected}")
            finally:
                del os.environ[expected]
    assert not wrong, wrong


def test_environment_variables_named_after_flags_take_effect(tmp_path: Path, cmu_svs: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WSI_SCREEN_INFER_MODEL", str(tmp_path / "nope"))
    res = run_cli("infer", cmu_svs, "-o", tmp_path / "run", "--quiet")
    # the same error as `--model` on the command line (a path that does not exist: exit 1), saying where the
    # value came from
    assert res.code == 1 and str(tmp_path / "nope") in res.err and "(set in the environment)" in res.err, res
    assert not (tmp_path / "run" / "results.csv").exists()
    monkeypatch.delenv("WSI_SCREEN_INFER_MODEL")
    monkeypatch.setenv("WSI_SCREEN_MODELS_ALL", "1")  # --all (the parameter is show_all): every timm name
    every = run_cli("models")
    monkeypatch.delenv("WSI_SCREEN_MODELS_ALL")
    some = run_cli("models")
    assert every.code == some.code == 0
    assert len(every.out.splitlines()) > 50 * len(some.out.splitlines()), (every.out[-300:], some.out)


def test_a_path_that_does_not_exist_is_exit_1_for_every_command(tmp_path: Path, cmu_svs: Path) -> None:
    """A missing slide was exit 1 for `tile`, `infer` and `info` (the tool finds slides) and exit 2 for `embed`,
    `evaluate`, `predict`, `report` and `calibrate` (click's own path check, a usage error): the same mistake, two
    exit statuses. Now one line naming the path, exit 1, no help hint, nothing written."""
    missing, out = tmp_path / "missing.svs", tmp_path / "out"
    cases = [("tile", missing, "-o", out), ("infer", missing, "-o", out), ("info", missing),
             ("embed", missing, "-o", out, "--encoder", "default"), ("evaluate", missing, "-o", out),
             ("predict", missing), ("report", missing), ("calibrate", missing, "--labels", cmu_svs, "-o", out),
             ("infer", cmu_svs, "-o", out, "--model", missing), ("infer", cmu_svs, "-o", out, "--labels", missing),
             ("tile", cmu_svs, "-o", out, "--slide-mpp-csv", missing)]
    for argv in cases:
        res = run_cli(*argv)
        assert res.code == 1 and len(res.err_lines) == 1 and str(missing.name) in res.err \
            and res.err.startswith("wsi-screen: error: ") and "--help" not in res.err, (argv, res)
        assert not out.exists(), argv
    res = run_cli("infer", cmu_svs, "-o", cmu_svs)  # a file where a folder is wanted: the same
    assert res.code == 1 and res.err_lines == [f"wsi-screen: error: Invalid value for '-o' / '--out': Directory "
                                               f"'{cmu_svs}' is a file."], res


def test_exit_status_2_is_a_command_line_not_parsed_1_a_value_the_tool_refused(tmp_path: Path) -> None:
    """What README and docs/design.md promise: a value outside an option's declared range is a usage error (exit
    2, with where the help is); one the tool's own checks refuse is exit 1, one line without the hint."""
    res = run_cli("tile", "x", "-o", tmp_path / "o", "--workers", "65")
    assert res.code == 2 and res.err_lines == ["wsi-screen: error: Invalid value for '--workers': 65 is not in "
                                               "the range 0<=x<=64. (see wsi-screen tile --help)"], res
    res = run_cli("tile", "x", "-o", tmp_path / "o", "--size", "0")
    assert res.code == 1 and res.err_lines == ["wsi-screen: error: --size must be a whole number of pixels, at "
                                               "least 8; got 0"], res
    assert not (tmp_path / "o").exists()
