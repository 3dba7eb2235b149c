"""``wsi-screen predict``: class probabilities for individual image files."""

from __future__ import annotations

import click

from wsi_screen.commands._options import (
    common_options,
    configure_output,
    device_option,
    precision_option,
    threads_option,
)


@click.command(short_help="Classify image files (patches) with a model.")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--model", "model_dir", type=click.Path(exists=True), default=None, metavar="MODEL_DIR",
              help="Model folder from `wsi-screen train` (default: the bundled model).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per image instead of a table.")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=64, show_default=True,
              help="Images per forward pass.")
@threads_option
@precision_option("auto")
@device_option
@common_options
def predict(images: tuple[str, ...], model_dir: str | None, as_json: bool, batch_size: int, threads: int,
            precision: str, device: str) -> None:
    """Print the predicted class and class probabilities of each IMAGE.

    An IMAGE may be a folder: its image files (jpg, png, tif, bmp, webp) are classified, recursively, in
    name order. Images are resized to the model input (with a warning) when their size differs. The call
    uses the model's operating point: for a binary model, the positive class when its probability is at
    least the model's threshold. The table has one probability column per class (p_CLASS). A file that is
    not a readable image is one error line; the others are still predicted, and the exit status is 1.

    \b
    Examples:
      wsi-screen predict patch1.png patch2.png --model models/pcam
      wsi-screen predict patches/ --json > predictions.jsonl
    """
    configure_output()
    import json
    import logging
    from pathlib import Path

    import numpy as np

    from wsi_screen.commands.train import set_threads
    from wsi_screen.errors import DatasetError
    from wsi_screen.models import load_model
    from wsi_screen.training.data import IMAGE_SUFFIXES, read_image

    set_threads(threads)
    model = load_model(model_dir, precision=precision, device=device)
    spec = model.spec
    paths: list[Path] = []
    for item in map(Path, images):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise DatasetError(f"{item}: no image files found")
            paths.extend(found)
        else:
            paths.append(item)
    domain = model.domain
    if not as_json:  # one probability column per class
        extra = ["domain_distance", "in_domain"] if domain is not None else []
        click.echo("\t".join(["path", "predicted", *[f"p_{c}" for c in spec.classes], *extra]))
    flagged = unreadable = predicted = 0
    for start in range(0, len(paths), batch_size):
        chunk, pixels = [], []
        for path in paths[start:start + batch_size]:
            try:  # a file that is not an image is one line; the others are still predicted
                pixels.append(read_image(path))
                chunk.append(path)
            except DatasetError as exc:
                unreadable += 1
                logging.getLogger("wsi_screen.predict").error("%s", exc)
        if not chunk:
            continue
        predicted += len(chunk)
        probs, dist = model.predict_with_domain(pixels)
        calls = model.decide(probs)
        inside = domain.in_domain(dist) if domain is not None and dist is not None else None
        for i, (path, row, call) in enumerate(zip(chunk, probs, calls, strict=True)):
            label = spec.classes[int(call)]
            score = float(row[spec.positive_index]) if spec.positive_index is not None else float(np.max(row))
            where = {} if inside is None or dist is None else \
                {"domain_distance": round(float(dist[i]), 4), "in_domain": bool(inside[i])}
            flagged += int(inside is not None and not inside[i])
            if as_json:
                click.echo(json.dumps({
                    "path": str(path), "predicted": label,
                    "probabilities": {c: _rounded(p) for c, p in zip(spec.classes, row, strict=True)},
                    "positive_class": spec.positive_class,
                    "positive_probability": _rounded(score) if spec.positive_index is not None else None,
                    "threshold": spec.threshold, **where}))
            else:
                cells = [f"{where['domain_distance']:.4f}", str(where["in_domain"]).lower()] if where else []
                click.echo("\t".join([str(path), label, *[f"{float(p):.4f}" for p in row], *cells]))
    if flagged:
        logging.getLogger("wsi_screen.predict").warning(
            "%d of %d image(s) are out of the model's domain (domain distance above %.3f): unlike its training "
            "data, so their predictions are unreliable", flagged, predicted, domain.threshold if domain else 0)
    if unreadable:
        click.get_current_context().exit(1)


def _rounded(probability: float) -> float:
    """A probability as --json prints it, every one the same way (6 decimals): ``positive_probability`` is its
    class's entry of ``probabilities``, not the same number to 17 digits."""
    return round(float(probability), 6)
