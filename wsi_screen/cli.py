"""The ``wsi-screen`` command line: a thin click group.

Each command lives in its own module under :mod:`wsi_screen.commands` and is imported only when it is run
(or listed), and those modules import heavy libraries inside the command body, so ``--help`` is instant.
Errors raised on purpose (:class:`~wsi_screen.errors.WsiScreenError`) become one line on stderr and a
non-zero exit; ``--debug`` (or ``WSI_SCREEN_DEBUG=1``) shows the traceback instead. click's usage errors, where the
command line cannot be parsed (an unknown option, a value of the wrong type or outside the option's declared range,
a missing argument, and the few option pairs a command refuses as a click usage error, ``--quality`` with
``--codec lz4``), are the same one line, ``wsi-screen: error: ...``, ending with where the command's help is.

Exit status: 0 success; 1 a slide/item failed, or the tool refused a setting or an input (a ``ConfigError`` from
its own checks, ``--size 0``, is exit 1 whether raised before or during the run; so is a path that names nothing
usable, a missing slide, dataset, model folder or labels file, whichever command reads it); 2 the command line could not
be parsed (click's usage errors above); 130 interrupted. A slide without tissue is no failure: `infer` counts it
apart ("1 without a call (no tissue)") and exits 0.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import tomllib
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import import_module
from pathlib import Path
from typing import Any, NoReturn

import click

from wsi_screen import __version__
from wsi_screen._safe_write import disk_full
from wsi_screen.errors import ConfigError, WsiScreenError, in_user_words, name_settings

#: command name -> "module:attribute" (modules under wsi_screen.commands)
COMMANDS: dict[str, str] = {
    "tile": "wsi_screen.commands.tile:tile",
    "info": "wsi_screen.commands.info:info",
    "models": "wsi_screen.commands.models:models",
    "train": "wsi_screen.commands.train:train",
    "evaluate": "wsi_screen.commands.evaluate:evaluate",
    "predict": "wsi_screen.commands.predict:predict",
    "tune": "wsi_screen.commands.tune:tune",
    "embed": "wsi_screen.commands.embed:embed",
    "infer": "wsi_screen.commands.infer:infer",
    "report": "wsi_screen.commands.report:report",
    "calibrate": "wsi_screen.commands.calibrate:calibrate",
}

EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


class LazyGroup(click.Group):
    """A click group whose sub-commands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in COMMANDS if self._available(name)]

    @staticmethod
    def _available(name: str) -> bool:
        module = COMMANDS[name].split(":")[0]
        return (Path(__file__).parent / "commands" / (module.rsplit(".", 1)[1] + ".py")).exists()

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None or not self._available(cmd_name):
            return None
        module_name, attr = target.split(":")
        command = getattr(import_module(module_name), attr)
        if not isinstance(command, click.Command):  # pragma: no cover - programming error
            raise TypeError(f"{target} is not a click command")
        _name_envvars(command, cmd_name)
        _add_off_switches(command)
        defaults = (ctx.default_map or {}).get(cmd_name)
        if defaults:  # options from --config, by their long names: a misspelt one must not be silently ignored
            by_option = {o.lstrip("-").replace("-", "_"): p.name for p in command.params for o in p.opts
                         if o.startswith("--") and p.name}
            by_option.update({p.name: p.name for p in command.params if p.name})
            wrong = sorted(k for k in defaults if k not in by_option)
            if wrong:
                raise ConfigError(f"{ctx.meta.get('config_path', 'config')}: [{cmd_name}] has no option(s) "
                                  f"{', '.join('--' + w.replace('_', '-') for w in wrong)}; see "
                                  f"wsi-screen {cmd_name} --help")
            if ctx.default_map is not None:
                params = {p.name: p for p in command.params if p.name}
                ctx.default_map[cmd_name] = {
                    by_option[k]: _config_value(ctx, command, cmd_name, params[by_option[k]], v)
                    for k, v in defaults.items()}
        return command


def _config_value(ctx: click.Context, command: click.Command, cmd_name: str, param: click.Parameter,
                  value: Any) -> Any:
    """A --config value as click should read it: as the same text the environment would give (a number becomes
    its digits, so ``size = 96.5`` is refused as ``WSI_SCREEN_TILE_SIZE=96.5`` is, not cut to 96), a flag's
    true/false kept. A list or table for an option that takes one value is a usage error naming the option and the
    file (click would stringify it, or fail with a TypeError)."""
    many = getattr(param, "multiple", False) or param.nargs != 1
    if isinstance(value, (list, dict)) and not (many and isinstance(value, list)):
        where = ctx.meta.get("config_path", "the config file")
        raise click.BadParameter(f"{value!r} is a {'list' if isinstance(value, list) else 'table'}; it takes one "
                                 f"value (set in {where})", ctx=click.Context(command, info_name=cmd_name, parent=ctx),
                                 param=param)
    if isinstance(value, list):
        return [_config_value(ctx, command, cmd_name, param, v) if isinstance(v, list) else _as_text(v)
                for v in value]
    return _as_text(value)


def _as_text(value: Any) -> Any:
    """A TOML number or date as the text an environment variable holds; a string or true/false as it is."""
    return value if isinstance(value, (str, bool)) else str(value)


def envvar_name(command_name: str, option: click.Option) -> str:
    """The environment variable that sets ``option`` of ``command_name``: ``WSI_SCREEN_<COMMAND>_<OPTION>``, the
    option as its long flag is spelt (``--aggregate`` -> ``WSI_SCREEN_INFER_AGGREGATE``)."""
    flag = next((o for o in option.opts if o.startswith("--")), None)
    name = flag[2:] if flag else (option.name or "")
    return f"WSI_SCREEN_{command_name}_{name}".upper().replace("-", "_")


def _name_envvars(command: click.Command, command_name: str) -> None:
    """Name each option's environment variable after its flag. click's own (``auto_envvar_prefix``) is named
    after the parameter, which differs for some (``--aggregate`` sets ``rule``): that name still works, second."""
    for param in command.params:
        if isinstance(param, click.Option) and param.envvar is None and param.allow_from_autoenv:
            param.envvar = envvar_name(command_name, param)


def _add_off_switches(command: click.Command) -> None:
    """Give each on/off flag that lacks one its ``--no-`` form (``--quiet`` -> ``--no-quiet``), so that a flag a
    --config file or the environment switches on can be switched off on the command line, which wins."""
    for param in command.params:
        if not isinstance(param, click.Option) or not param.is_flag or not param.is_bool_flag or param.secondary_opts:
            continue
        flag = next((o for o in param.opts if o.startswith("--")), None)
        if flag is not None and param.default is not True:
            param.secondary_opts = [f"--no-{flag[2:]}"]


def _load_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """Read a TOML file into click's default_map: ``[tile]`` holds defaults for ``wsi-screen tile``."""
    if value is None:
        return None
    path = Path(value)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    unknown = sorted(name for name in data if name not in COMMANDS)
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(f'[{n}]' for n in unknown)}; sections are "
                          f"command names: {', '.join(f'[{n}]' for n in COMMANDS)}")
    not_tables = sorted(name for name, section in data.items() if not isinstance(section, dict))
    if not_tables:
        raise ConfigError(f"{path}: {', '.join(not_tables)} must be a [section] of options, e.g. [tile] mpp = 0.5")
    ctx.default_map = {name: {k.replace("-", "_"): v for k, v in section.items()} for name, section in data.items()}
    ctx.meta["config_path"] = str(path)
    return value


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"],
                                              "auto_envvar_prefix": "WSI_SCREEN",
                                              "max_content_width": 100})
@click.version_option(__version__, prog_name="wsi-screen")
@click.option("--config", type=click.Path(dir_okay=False), callback=_load_config, is_eager=True,
              expose_value=False,
              help="TOML file with per-command defaults, e.g. [tile] mpp = 0.5. Precedence: command line > "
                   "environment (WSI_SCREEN_<COMMAND>_<OPTION>) > file > built-in defaults. A file's value is "
                   "checked as the same value in the environment is (size = 96.5 is refused, not cut to 96); a flag it "
                   "switches on (quiet = true) is switched off with --no-FLAG (--no-quiet).")
def cli() -> None:
    """Screen whole-slide images for cancer.

    \b
    Typical run:
      wsi-screen tile slides/ -o stores/          # tissue patches, one zarr store per slide
      wsi-screen train patches/ --arch resnet18 -o model/
      wsi-screen infer slides/ -o run/            # slide calls, heatmaps, GeoJSON, report

    Every command explains itself with --help. Add --debug to see a traceback on error.
    """


#: the settings library messages name (`slide_mpp`) and the options that set them here: what the CLI prints
SETTING_FLAGS: dict[str, str] = {
    "slide_mpp": "--slide-mpp", "slide_mpps": "--slide-mpp-csv", "slide_timeout": "--slide-timeout",
    "force_mpp": "--slide-mpp-csv",  # a Slide's forced resolution: the CLI forces one only from its table
    "overwrite": "--overwrite", "restart": "--restart", "mpp": "--mpp", "size": "--size", "size_px": "--size",
    "overlap_px": "--overlap", "min_tissue": "--min-tissue", "stain": "--stain", "stain_method": "--stain",
    "stain_target": "--stain-target", "stores": "--stores", "labels": "--labels", "model": "--model",
    "dask": "--dask", "split": "--split", "positive": "--positive", "folds": "--folds",
    "cache_limit_mb": "--cache-limit", "label_column": "--label-column", "group_column": "--group-column",
    "split_column": "--split-column", "carve_valid": "--carve-valid", "pretrained": "--pretrained",
    "freeze_backbone": "--freeze-backbone", "arch": "--arch", "encoder": "--encoder", "encoder_weights": "--weights",
    "head": "--head", "embedding_cache": "--embedding-cache", "recipe": "--recipe", "lr": "--lr", "epochs": "--epochs",
    "flips": "--flips/--no-flips", "hed_jitter": "--hed-jitter", "color_jitter": "--color-jitter",
    "frozen_epochs": "--frozen-epochs", "compile": "--compile", "min_specificity": "--min-specificity",
    "codec": "--codec", "quality": "--quality", "no_pixels": "--pixels none", "keep_pixels": "--pixels store",
    "rule": "--aggregate", "threshold": "--threshold",
    "slide_threshold": "--threshold", "k": "--k",
    "valid_fraction": "--valid-fraction", "batch_size": "--batch-size", "weight_decay": "--weight-decay",
    "warmup_epochs": "--warmup-epochs", "label_smoothing": "--label-smoothing", "drop_rate": "--drop-rate",
    "patience": "--patience", "workers": "--workers", "optimizer": "--optimizer", "seed": "--seed",
    "schedule": "--schedule", "monitor": "--monitor", "threshold_rule": "--threshold-rule",
    "class_weights": "--class-weights/--no-class-weights", "device": "--device",
    "report_top": "--report-top",
}


#: library names messages cite (`list_models`) and the commands that show the same here
LIBRARY_COMMANDS: dict[str, str] = {
    "list_models": "`wsi-screen models`", "list_encoders": "`wsi-screen models --encoders`",
}


def _debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("WSI_SCREEN_DEBUG", "") not in ("", "0")


#: libraries that log what they find wrong in a file (tifffile) or each retry while the hub is unreachable
#: (huggingface_hub); wsi-screen reports each bad slide, or the missing encoder, on one line of its own
QUIET_LOGGERS = ("tifffile", "huggingface_hub")


@contextmanager
def _quiet_libraries(argv: list[str]) -> Iterator[None]:
    """Keep third-party log records (raw, unprefixed lines) off stderr unless --verbose or --debug, while the
    command runs. huggingface_hub sets its logger's level when it is imported (from HF_HUB_VERBOSITY), so that
    variable is set too, for an import during the command."""
    if _debug_requested(argv) or "-v" in argv or "--verbose" in argv:
        yield
        return
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    before = os.environ.get("HF_HUB_VERBOSITY")
    os.environ["HF_HUB_VERBOSITY"] = before or "critical"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("HF_HUB_VERBOSITY", None)


def _os_error_line(exc: OSError) -> str:
    """One line for an operating-system error that escaped the library (disk full, read-only, permissions)."""
    where = f"{exc.filename}: " if exc.filename else ""
    what = exc.strerror or str(exc) or type(exc).__name__
    if disk_full(exc):
        what += " (disk full or over quota; free space and rerun: finished work is kept)"
    return f"{where}{what}"


def main(argv: list[str] | None = None) -> Any:
    """Console-script entry point."""
    from wsi_screen import progress
    from wsi_screen.screening import startup

    startup.mark_entry(whole_process=argv is None)  # the console script: this process is the command
    args = list(sys.argv[1:] if argv is None else argv)
    # called in-process (a notebook, a test), the command's log handler, levels and bars end with it
    with progress.output_restored(*QUIET_LOGGERS), warnings.catch_warnings(), _quiet_libraries(args):
        # matplotlib warns once per character of a slide name its font cannot draw (the heatmap title shows
        # a box instead): two stray stderr lines per glyph, and an exception where warnings are errors
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from font", category=UserWarning)
        with name_settings(SETTING_FLAGS | LIBRARY_COMMANDS):  # library messages name settings: the user reads options
            return _main(args, whole_process=argv is None)


def _interrupted(whole_process: bool, exc: BaseException) -> NoReturn:
    """Ctrl-C: one line and exit 130. The line says that finished work is kept and a rerun resumes, unless the
    library noted otherwise on the KeyboardInterrupt (``add_note``: work it does not keep, such as a
    cross-validated training's epochs); then it says that. Where the command is the whole process, a second
    Ctrl-C while it winds down (children stopped, threads joined) would end it by the signal instead (status -2,
    no line): from here on it is ignored. Called in-process (a notebook, a test), the caller's handler stays."""
    notes = dict.fromkeys(n for e in (exc, exc.__cause__, exc.__context__) if e is not None
                          for n in getattr(e, "__notes__", ()))
    what = in_user_words("; ".join(notes)) if notes else "finished work is kept, rerun to resume"
    click.echo(f"wsi-screen: interrupted; {what}", err=True)
    if whole_process:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(EXIT_INTERRUPTED)


def _main(args: list[str], whole_process: bool) -> Any:
    try:
        code = cli.main(args=args, prog_name="wsi-screen", standalone_mode=False)
        # without standalone mode click returns ctx.exit()'s code instead of exiting
        if isinstance(code, int) and code != 0:
            sys.exit(code)
        return code
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc = _name_value_source(exc)
        if isinstance(exc, click.exceptions.NoArgsIsHelpError):  # a group or command given nothing: its help
            exc.show()
        else:
            click.echo(f"wsi-screen: error: {_click_error_line(exc)}", err=True)
        sys.exit(EXIT_FAILED if _names_nothing_usable(exc) else exc.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt) as exc:  # click turns Ctrl-C into Abort
        _interrupted(whole_process, exc)
    except WsiScreenError as exc:
        if _debug_requested(args):
            raise
        click.echo(f"wsi-screen: error: {in_user_words(str(exc))}", err=True)
        sys.exit(EXIT_FAILED)
    except OSError as exc:  # the environment, not a bug: no "internal error", no traceback
        if _debug_requested(args):
            raise
        click.echo(f"wsi-screen: error: {_os_error_line(exc)}", err=True)
        sys.exit(EXIT_FAILED)
    except Exception as exc:
        if _debug_requested(args):
            raise
        click.echo(f"wsi-screen: internal error: {type(exc).__name__}: {exc} (rerun with --debug for "
                   "the traceback)", err=True)
        sys.exit(EXIT_FAILED)


def _click_error_line(exc: click.ClickException) -> str:
    """click's own error as the house's one line: an unknown option, a missing argument, a bad value or an option
    clash a command refuses (a usage error, exit 2) ends with where its help is, ``(see wsi-screen tile --help)``;
    click would print its usage block and a hint over three lines. A message's line breaks become spaces."""
    line = re.sub(r"\s*\n\s*", " ", exc.format_message()).strip()
    if not isinstance(exc, click.UsageError) or _names_nothing_usable(exc):
        return line
    command = exc.ctx.command_path if exc.ctx is not None else "wsi-screen"
    return f"{line} (see {command} --help)"


def _names_nothing_usable(exc: click.ClickException) -> bool:
    """A path argument or option that click's checks refuse (``click.Path``: it does not exist, or is a file where
    a folder is wanted) is an input the tool refused, exit 1 without the help hint, as a missing slide is for
    ``tile`` and ``infer`` (their slides are found by the tool, not by click): the command line was read."""
    param = getattr(exc, "param", None)
    return isinstance(exc, click.BadParameter) and not isinstance(exc, click.MissingParameter) \
        and param is not None and isinstance(param.type, click.Path)


def _name_value_source(exc: click.ClickException) -> click.ClickException:
    """A bad option value the user did not type names where it came from: the --config file or the environment."""
    ctx, param = getattr(exc, "ctx", None), getattr(exc, "param", None)
    if not isinstance(exc, click.BadParameter) or ctx is None or param is None or not param.name:
        return exc
    source = ctx.get_parameter_source(param.name)
    if source is click.core.ParameterSource.DEFAULT_MAP:
        where = ctx.find_root().meta.get("config_path", "the config file")
    elif source is click.core.ParameterSource.ENVIRONMENT:
        where = "the environment"
    else:
        return exc
    return click.BadParameter(f"{exc.message} (set in {where})", ctx=ctx, param=param, param_hint=exc.param_hint)


if __name__ == "__main__":  # pragma: no cover
    main()
