"""Options every command shares (--quiet, --verbose, --debug) and their effect, and options several share."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import click

from wsi_screen import progress

F = TypeVar("F", bound=Callable[..., Any])


def common_options(func: F) -> F:
    """Add ``--quiet``, ``--verbose`` and ``--debug`` to a command and apply them before it runs."""

    def _apply(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        ctx.ensure_object(dict)
        ctx.obj[param.name] = value
        return value

    func = click.option("--debug", is_flag=True, expose_value=False, callback=_apply,
                        help="Show a full traceback on error.")(func)
    func = click.option("-v", "--verbose", is_flag=True, expose_value=False, callback=_apply,
                        help="Log more detail (per-slide steps, timings).")(func)
    func = click.option("-q", "--quiet", is_flag=True, expose_value=False, callback=_apply,
                        help="No progress bars, warnings and errors only.")(func)
    return func


def configure_output() -> None:
    """Set up logging and progress bars from the current context's --quiet/--verbose flags."""
    ctx = click.get_current_context()
    obj = ctx.ensure_object(dict)
    quiet, verbose = bool(obj.get("quiet")), bool(obj.get("verbose"))
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    progress.install_log_handler(level)
    progress.set_enabled(not quiet)


def parse_float_list(text: str, name: str) -> list[float]:
    """Parse ``1e-3,3e-4`` into floats, with a clear usage error otherwise."""
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}", param_hint=name) from None


def slide_mpp_options(func: F) -> F:
    """``--slide-mpp`` and ``--slide-mpp-csv`` (tile and infer read slides the same way)."""
    func = click.option("--slide-mpp-csv", type=click.Path(exists=True, dir_okay=False), default=None,
                        help="CSV with columns slide,mpp: sets the level-0 um/px of the slides it names, even "
                             "over a value the file declares (a warning names both when they differ by > 5 %, once "
                             "per slide in a run).")(func)
    return click.option("--slide-mpp", type=float, default=None, callback=_plausible_mpp,
                        help="Level-0 um/px for slides that do not declare it (a declared value wins).")(func)


def _plausible_mpp(_ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """Refuse an impossible ``--slide-mpp`` up front, even when every slide declares its own."""
    from wsi_screen.slide.slide import PLAUSIBLE_MPP

    if value is not None and not PLAUSIBLE_MPP[0] <= value <= PLAUSIBLE_MPP[1]:
        raise click.BadParameter(f"{value:g} is outside the plausible range {PLAUSIBLE_MPP[0]:g}-{PLAUSIBLE_MPP[1]:g} "
                                 "um/px", param=param)
    return value


def slide_mpp_table(path: str | None) -> tuple[tuple[str, float], ...]:
    """``--slide-mpp-csv`` as the configs hold it."""
    from wsi_screen.slide.slide import read_mpp_table

    return tuple(sorted(read_mpp_table(path).items())) if path else ()


def slide_timeout_option(func: F) -> F:
    """``--slide-timeout`` (tile and infer read slides in a supervised child process)."""
    from wsi_screen.slide.isolation import DEFAULT_TIMEOUT

    return click.option("--slide-timeout", type=click.FloatRange(min=1), default=DEFAULT_TIMEOUT,
                        show_default=True, metavar="SECONDS",
                        help="A slide fails when its reader makes no progress for this long (opening it, or "
                             "between batches of patches): a corrupt file can hang a reader. Slides are read in a "
                             "separate process, so a reader that hangs or crashes fails only its slide.")(func)


def report_top_option(default: str) -> Callable[[F], F]:
    """``--report-top N`` (infer and report): how many slides besides those that need a look the report shows with
    pictures (:mod:`wsi_screen.screening.pictured`, which imports nothing heavy); ``default`` says what it is when
    not given."""
    from wsi_screen.screening.pictured import REPORT_TOP

    def decorate(func: F) -> F:
        return click.option("--report-top", type=click.IntRange(min=0), default=None, metavar="N",
                            help="report.html shows the pictures (heatmap preview, top patches) of every slide "
                                 "called positive, out of domain, called otherwise than its label or without "
                                 f"tissue, and of the N highest-scoring others; {default} {REPORT_TOP}. The other "
                                 "slides are table rows linking to their full-size heatmap.png, so a run of "
                                 "thousands of slides keeps a page a browser opens.")(func)
    return decorate


def threads_option(func: F) -> F:
    """``--threads``: torch's compute threads (train, tune, evaluate, infer, predict; see ``train.set_threads``)."""
    return click.option("--threads", type=click.IntRange(0, 256), default=0,
                        help="Torch compute threads. 0 (default): 1 on machines with 2 cores or fewer, where "
                             "more threads were slower (bench/RESULTS.md), else torch's default (all cores).")(func)


def precision_option(default: str) -> Callable[[F], F]:
    """``--precision`` for the commands that score (infer and predict default to ``auto``; evaluate to ``fp32``,
    so that its figures are those training's validation and the model card report)."""
    def decorate(func: F) -> F:
        return click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default=default,
                            show_default=True,
                            help="Arithmetic of the forward pass. auto: bfloat16 where the CPU (AMX/AVX512-BF16) or "
                                 "GPU computes it natively (~2x faster; scores near a decision threshold are rescored "
                                 "in float32, so the calls are float32's; docs/default-model.md), float32 elsewhere. "
                                 "fp32: always float32. bf16: bfloat16 even where emulated (slower).")(func)
    return decorate


def device_option(func: F) -> F:
    """``--device auto|cpu|cuda|cuda:N|mps`` (train, evaluate, predict, tune, infer, embed).

    The name is checked here, at parse time, without importing torch; whether that device is present is asked
    in the command body with :func:`wsi_screen.models.device.resolve_device`, which fails in one line.
    """
    return click.option("--device", default="auto", show_default=True, callback=_device_name,
                        metavar="[auto|cpu|cuda|cuda:N|mps]",
                        help="Where the model runs. auto: the CUDA GPU where torch sees one, else the CPU (never "
                             "Apple's mps unless named). cuda: the current CUDA GPU; cuda:N: GPU N; mps: Apple "
                             "silicon. On a CUDA GPU training and embedding run in mixed precision, and "
                             "scoring in bfloat16 where the precision is auto. A device that is absent is an "
                             "error, never a silent fallback to the CPU.")(func)


def _device_name(_ctx: click.Context, param: click.Parameter, value: str) -> str:
    """Refuse a name that is not a device up front (``gpu``, ``cuda:x``), without importing torch."""
    from wsi_screen._device_name import parse_device_name
    from wsi_screen.errors import DeviceError

    try:
        kind, index = parse_device_name(value)
    except DeviceError as error:
        raise click.BadParameter(str(error), param=param) from None
    return kind if index is None else f"{kind}:{index}"


def encoder_options(*, required: bool, what: str) -> Callable[[F], F]:
    """``--encoder`` and ``--weights`` (train's heads and embed name encoders the same way); ``what`` says what the
    command does with the encoder. The weights reach the command as ``encoder_weights``."""

    def add(func: F) -> F:
        func = click.option("--weights", "encoder_weights", type=click.Path(exists=True, dir_okay=False),
                            default=None, metavar="FILE",
                            help="Local weights for --encoder ARCH: .safetensors, or .pth/.bin (read as tensors "
                                 "only).")(func)
        return click.option("--encoder", required=required, default=None, metavar="ENCODER",
                            help=f"{what}: a model folder ('default': the bundled model's backbone), a registry "
                                 "name (`wsi-screen models --encoders`: uni, uni2-h, virchow2, h-optimus-0, "
                                 "prov-gigapath, phikon-v2), hf-hub:ORG/NAME or timm/NAME.TAG (from the Hugging "
                                 "Face cache; HF_HOME, HF_HUB_OFFLINE and HF_TOKEN honoured), or a timm "
                                 "architecture with --weights FILE.")(func)

    return add
