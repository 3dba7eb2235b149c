"""``wsi-screen models``: the registered architectures and their sizes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from wsi_screen.commands._options import common_options, configure_output
from wsi_screen.errors import UnknownModelError

if TYPE_CHECKING:
    from pathlib import Path

    from wsi_screen.models.spec import ModelSpec

#: above this many matches, names are listed without building each model
MAX_COUNTED = 60


@click.command(short_help="List architectures (screen_cnn32 and timm's) with parameter counts.")
@click.argument("pattern", required=False)
@click.option("--all", "show_all", is_flag=True,
              help="List every registered architecture name (without parameter counts). Not with --encoders or "
                   "--card.")
@click.option("--num-classes", type=click.IntRange(2, 100000), default=2, show_default=True,
              help="Output classes assumed for the parameter counts.")
@click.option("--encoders", is_flag=True,
              help="List the known pathology encoders for `train --encoder` and `embed --encoder` (those matching "
                   "PATTERN, if given): name, hub repository, embedding size, input size, mpp, licence and whether "
                   "the hub gates it.")
@click.option("--card", is_flag=True,
              help="Print the model card of MODEL_DIR (given in place of PATTERN; default: the bundled model): "
                   "intended use, training data, validation figures, limitations (the last: what the folder's slide "
                   "rule does with scattered false-positive patches). Not with --encoders.")
@common_options
def models(pattern: str | None, show_all: bool, num_classes: int, encoders: bool, card: bool) -> None:
    """List architectures usable with `wsi-screen train --arch NAME`.

    Without arguments: the project's own screen_cnn32 and a few timm architectures suited to patches.
    PATTERN (a glob such as 'resnet*' or '*efficientnet_b?') lists the matching names; --all lists all
    of timm's. Parameter counts assume --num-classes outputs; the input is the architecture's default
    (any size works for convolutional networks; screen_cnn32 needs 32 px). Nothing is downloaded: weights
    come from `wsi-screen train`, optionally starting from a local --pretrained file.

    `wsi-screen models --card [MODEL_DIR]` prints a trained model's card instead; `wsi-screen models
    --encoders` the pathology encoders `train --encoder` and `embed --encoder` know by name.
    """
    configure_output()
    if card and encoders:
        raise click.UsageError("--card prints a model's card and --encoders lists encoders: give one of them")
    if show_all and (card or encoders):
        raise click.UsageError("--all lists all of timm's architectures; "
                               + ("--encoders lists every known encoder without it" if encoders
                                  else "--card prints one model's card") + ": drop --all")
    if encoders:
        _print_encoders(pattern)
        return
    if card:
        _print_card(pattern)
        return
    from wsi_screen.models.registry import SUGGESTED, arch_info, list_models

    if show_all or pattern:
        names = list_models(pattern or "")
        if not names and pattern and _is_glob(pattern):
            raise _no_match("architecture", pattern, list_models(), "`wsi-screen models --all` lists them")
        if not names:
            from wsi_screen.models.registry import check_arch

            check_arch(pattern or "")  # raises with the closest names
        if show_all or len(names) > MAX_COUNTED:
            for name in names:
                click.echo(name)
            if not show_all:
                click.echo(f"({len(names)} names; narrow the pattern to see parameter counts)", err=True)
            return
    else:
        names = list(SUGGESTED)
    click.echo(f"{'architecture':<24} {'parameters':>13} {'input':>6}  source")
    for name in names:
        info = arch_info(name, num_classes)
        click.echo(f"{info.name:<24} {info.params:>13,} {info.input_size:>6}  {info.source}")


def _slide_rule(folder: Path, spec: ModelSpec) -> str:
    """The slide rule ``infer`` uses with the model ``folder``: its slide_rule.json's, else the fallback."""
    from wsi_screen.screening.run import calibrated_rule, fallback_rule

    threshold = spec.threshold if spec.threshold is not None else 0.5
    found = calibrated_rule(folder, threshold)
    return found[0].rule if found is not None else fallback_rule(threshold).rule


def _is_glob(pattern: str) -> bool:
    """Whether ``pattern`` is a glob (``*``, ``?`` or ``[``) rather than a name."""
    return any(c in pattern for c in "*?[")


def _no_match(kind: str, pattern: str, names: list[str], otherwise: str) -> UnknownModelError:
    """The error for a glob ``pattern`` that matches none of ``names``: the close names, else ``otherwise``."""
    import difflib

    close = difflib.get_close_matches(pattern.strip("*?[]").lower(), names, n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else otherwise
    return UnknownModelError(f"no {kind} matches the pattern {pattern!r}; {hint}")


def _print_encoders(pattern: str | None) -> None:
    from wsi_screen.models.encoders import get_encoder_info, list_encoders

    found = list_encoders(pattern or "")
    if not found and pattern and _is_glob(pattern):
        raise _no_match("encoder", pattern, [e.name for e in list_encoders()],
                        "`wsi-screen models --encoders` lists them")
    if not found:
        get_encoder_info(pattern or "")  # raises with the closest names
    click.echo(f"{'encoder':<15} {'hub':<37} {'dim':>5} {'size':>5} {'mpp':>5}  {'licence':<21} gated")
    for e in found:
        click.echo(f"{e.name:<15} {e.hub:<37} {e.dim:>5} {e.input_size:>5} {e.mpp:>5g}  {e.licence:<21} "
                   f"{'yes' if e.gated else 'no'}")
    click.echo("train --encoder and embed --encoder also take 'default' or a model folder (its backbone), "
               "hf-hub:ORG/NAME, timm/NAME.TAG, or an architecture with --weights FILE (docs/encoders.md).", err=True)


def _print_card(model_dir: str | None) -> None:
    from pathlib import Path

    from wsi_screen.errors import ModelError
    from wsi_screen.models import default_model_dir
    from wsi_screen.models.card import CARD_NAME, read_card, render, with_slide_rule
    from wsi_screen.models.encoder import weights_in_use
    from wsi_screen.models.spec import ModelSpec

    folder = Path(model_dir) if model_dir else default_model_dir()
    spec = ModelSpec.read(folder)  # a clear error when it is not a model folder
    found = read_card(folder)
    if found is None:
        raise ModelError(f"{folder}: no {CARD_NAME} (a model trained before cards existed); retrain it, or write one "
                         "from the fields in docs/classifier.md")
    click.echo(render(with_slide_rule(found, _slide_rule(folder, spec))))
    moved = weights_in_use(spec.encoder, folder) if spec.encoder else None
    if moved:
        click.echo(f"encoder weights in use: {moved}")
