"""``wsi-screen infer``: screen a folder of slides with a patch model."""

from __future__ import annotations

import shlex
import sys
from typing import TYPE_CHECKING

import click

from wsi_screen.commands._options import (
    common_options,
    configure_output,
    device_option,
    precision_option,
    report_top_option,
    slide_mpp_options,
    slide_mpp_table,
    slide_timeout_option,
    threads_option,
)

if TYPE_CHECKING:
    from wsi_screen.screening.run import RunSummary


@click.command(short_help="Screen slides: slide calls, heatmaps, QuPath GeoJSON and a report.")
@click.argument("slides", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("-o", "--out", "run", required=True, type=click.Path(file_okay=False, path_type=str), metavar="RUN",
              help="Run folder for results.csv, run.json, report.html and one folder per slide.")
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Model folder (model.safetensors + config.json). Default: the bundled PCam model.")
@click.option("--aggregate", "rule", type=click.Choice(["mean", "max", "topk", "fraction", "smoothmax", "region"]),
              default=None,
              help="Slide score from patch probabilities: mean, max, topk (mean of the k highest), fraction (share "
                   "above the patch threshold), smoothmax (highest 3x3-neighbourhood mean) or region (area in mm² "
                   "of the largest connected region above a patch threshold). Default: the rule calibrated for "
                   "the model (slide_rule.json in the model folder; see docs/default-model.md). --aggregate, "
                   "--threshold and --k are named as overrides of the model's rule in the report.")
@click.option("--threshold", type=click.FloatRange(min=0), default=None,
              help="Slide threshold on the aggregated score: a probability, or mm² for region (default: "
                   "calibrated for the model and rule). A region call needs a region: at 0, any region at the "
                   "patch threshold calls the slide positive, none never does.")
@click.option("--k", "k", type=float, default=None,
              help="Patches averaged by --aggregate topk: a whole count >= 1 or a share in (0, 1) (default: "
                   "calibrated). Another k keeps the threshold "
                   "calibrated for its own, with a warning: give --threshold for it. Refused with another rule "
                   "(none reads it).")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False), default=None,
              help="slides.csv with columns slide,label: adds slide_metrics.json (AUC with its "
                   "bootstrap 95% interval, as calibrate gives it; sensitivity and specificity with Wilson 95% "
                   "intervals) and slide_roc.png, and results.csv's label_agrees "
                   "(the report marks each call that is not its label). Two rows naming one slide (a, a.svs) "
                   "must agree. A rerun without it removes an earlier "
                   "run's slide_metrics.json and slide_roc.png, which would not describe its results.")
@click.option("--stores", type=str, default=None, metavar="DIR",
              help="Folder of patch stores to reuse and tile into (default: RUN/stores). Stores made with "
                   "other settings than the model needs are refused. Any `tile --codec`, or `tile --pixels none`, "
                   "is reused (the same patch grid), but only lz4 and coordinates-only stores give exactly the "
                   "scores of a run on the slide: `tile`'s default JPEG patches move them, enough to change a "
                   "slide's domain flag or a call near the threshold (run.json "
                   "records each slide's store codec, and the run warns; see docs/store.md). A coordinates-only "
                   "store reads its patches from the slide given here, which may have moved since it was tiled "
                   "(the same file by its fingerprint).")
@click.option("--keep-patches", is_flag=True,
              help="Keep every patch's pixels in the slide's store (lz4). By default a run keeps none: the store "
                   "holds coordinates, tissue, thumbnail, mask and stain fit, and patches are read from the slide, "
                   "normalised and scored in one pass (the report's patches are read from the slide too). A rerun "
                   "without this flag reuses stores that kept their pixels.")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=128, show_default=True,
              help="Patches per forward pass.")
@click.option("--workers", type=click.IntRange(0, 64), default=2, show_default=True,
              help="Reader threads per slide, for tiling and for streaming patches to the model (0 or 1: one).")
@click.option("--loader-workers", type=click.IntRange(0, 64), default=0, show_default=True,
              help="DataLoader worker processes for scoring. 0 reads patches in a background thread, a few "
                   "batches ahead of the model: fastest on small machines (reading 128 patches takes a few "
                   "ms); more helps only where reading is slower than the model.")
@slide_mpp_options
@click.option("--min-tissue", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Minimum tissue fraction of a patch.")
@click.option("--overwrite", is_flag=True, help="Re-tile stores made with other settings and rescore every slide.")
@slide_timeout_option
@click.option("--dask", type=str, default=None, metavar="ADDRESS",
              help="Screen on a Dask cluster, one task per slide: tcp://HOST:PORT of a running scheduler, or "
                   "local[:N] for N worker processes here (default 2). Every worker must see the slides, the "
                   "model folder and RUN by the same paths (see docs/cluster.md). Needs the dask extra: "
                   "pip install \"wsi-screen[dask]\".")
@report_top_option("default")
@threads_option
@precision_option("auto")
@device_option
@common_options
def infer(slides: tuple[str, ...], run: str, model_dir: str | None, rule: str | None, threshold: float | None,
          k: float | None, labels: str | None, stores: str | None, keep_patches: bool, batch_size: int,
          workers: int,
          loader_workers: int, slide_mpp: float | None, slide_mpp_csv: str | None, min_tissue: float, overwrite: bool,
          slide_timeout: float, dask: str | None, report_top: int | None, threads: int, precision: str,
          device: str) -> None:
    """Screen SLIDES (files or folders) and write the results to RUN.

    Each slide is tiled at the model's resolution, patch size and stain (stores are reused when they
    match), every patch is scored, and the slide is called positive when its aggregated score reaches the
    threshold. RUN gets results.csv (one row per slide), run.json (provenance), report.html, and per slide
    heatmap.png (the call in its title, every counted focus outlined with its size), patches.geojson (QuPath:
    File > Import objects; the counted foci as annotations, tiles classed at the call's patch threshold) and
    scores.csv.

    A rerun reuses finished slides scored from the stores it would read (a rerun without --stores rescores
    slides scored from a --stores folder). A slide that fails (corrupt, unreadable, or crashing or hanging
    the slide reader, which runs in its own process) is a row with status=error and its reason, and results
    an earlier run left for it are moved to RUN/<slide>/stale/; the others still finish and the exit status
    is 1. A slide without tissue has no call and is no failure: the closing lines count it apart. Nor is a slide
    another wsi-screen process is writing (its store or its results): it is skipped on one warning line, a row
    with status=busy, counted apart as busy; rerun afterwards to pick it up. Details and tracebacks go to
    RUN/wsi-screen.log.

    \b
    Examples:
      wsi-screen infer examples/ -o runs/demo
      wsi-screen infer slides/ -o runs/cohort --labels slides.csv --aggregate topk
      wsi-screen infer /shared/slides -o /shared/runs/cohort --dask tcp://10.0.0.5:8786
    """
    configure_output()
    from wsi_screen.screening.aggregate import as_k

    k_value = None if k is None else as_k(k)  # a bad --k is refused before the slow start-up
    from wsi_screen._safe_write import usable_folder

    usable_folder(run, "run folder", create=False)  # so is a run folder that cannot be written (nothing is made)
    ctx = click.get_current_context()
    if dask is None and not ctx.obj.get("debug"):
        from wsi_screen.slide import isolation

        # the slide reader starts up (and imports the tiler) while this process imports torch and the model
        isolation.start_early("wsi_screen.tiling.pipeline")
        ctx.call_on_close(isolation.stop_early)  # unused when the command fails before reading a slide
    from pathlib import Path

    from wsi_screen.commands.train import set_threads
    from wsi_screen.distributed import maybe_connect, parse_address
    from wsi_screen.models import default_model_dir, load_model
    from wsi_screen.screening.run import InferConfig, run_infer

    set_threads(threads)  # a Dask run's workers score with this count too

    target = parse_address(dask) if dask is not None else None
    mdir = Path(model_dir) if model_dir else default_model_dir()
    classifier = load_model(mdir, precision=precision, device=device)
    config = InferConfig(rule=rule, threshold=threshold, k=k_value, stores=stores, batch_size=batch_size,
                         workers=workers, loader_workers=loader_workers, slide_mpp=slide_mpp,
                         slide_mpps=slide_mpp_table(slide_mpp_csv),
                         min_tissue=min_tissue, overwrite=overwrite, slide_timeout=slide_timeout,
                         labels=labels, device=device, keep_patches=keep_patches,
                         **({} if report_top is None else {"report_top": report_top}))
    with maybe_connect(target) as runner:
        summary = run_infer(slides, Path(run), classifier, mdir, config, argv=sys.argv[1:],
                            on_error="raise" if ctx.obj.get("debug") else "record", dask=runner)
    card = "wsi-screen models --card" + (f" {shlex.quote(str(model_dir))}" if model_dir else "")
    _print_table(summary, patch_um=classifier.spec.input_size * float(classifier.spec.mpp or 0), card=card)
    if summary.failed:  # a slide skipped as busy is not a failure (its row and the closing line say so)
        ctx.exit(1)


def _print_table(summary: RunSummary, *, patch_um: float, card: str) -> None:
    """The slides' table and the run's rule in words; ``patch_um``: the side of one patch (the model's input size x
    its mpp), the resolution at which foci are measured; ``card``: the command that shows the model's card."""
    from wsi_screen.errors import in_user_words
    from wsi_screen.metrics import auc_words, rate_words
    from wsi_screen.screening import runfolder
    from wsi_screen.screening.aggregate import (
        AREA_UNIT,
        NO_RESULT,
        STATUS_ERROR,
        STATUS_NO_TISSUE,
        call_comparison,
        call_counts,
        out_of_domain_words,
        score_decimals,
    )
    from wsi_screen.screening.spatial import mm_words

    rows = sorted(summary.rows, key=lambda r: r.name)
    agg = summary.aggregate
    # scores and the threshold under the table with the same decimals, enough to show each on its side of it
    digits = score_decimals(agg.slide_threshold, [r.result.score for r in rows if r.result is not None])
    width = max([len("slide"), *(_display_width(r.name) for r in rows)])
    sw = max(6, digits + 3)
    click.echo(f"{'slide':<{width}}  {'status':<9}  {'patches':>7}  {'score':>{sw}}  {'diagnosis':<10}  "
               f"{'metastasis':<10}  {'focus mm':>8}  {'foci':>4}  domain")
    for r in rows:
        res = r.result
        score = f"{res.score:.{digits}f}" if res and res.score is not None else "-"
        n = str(res.n_patches) if res else "-"
        pad = " " * (width - _display_width(r.name))
        if res is None:
            said = "error: " if r.status == STATUS_ERROR else ""  # busy: the reason says it was skipped
            click.echo(f"{r.name}{pad}  {r.status:<9}  {n:>7}  {score:>{sw}}  {said}{in_user_words(r.error)}")
            continue
        focus = mm_words(res.largest_focus_mm) if res.largest_focus_mm else "-"
        foci = str(res.n_foci) if res.score is not None else "-"
        meta = res.metastasis if res.score is not None else "-"
        click.echo(f"{r.name}{pad}  {r.status:<9}  {n:>7}  {score:>{sw}}  {res.diagnosis:<10}  {meta:<10}  "
                   f"{focus:>8}  {foci:>4}  {_domain_cell(r.extra)}")
    unit = f" {AREA_UNIT}" if agg.rule == "region" else ""
    size = f"of {agg.min_focus_patches}+ patches " if agg.min_focus_patches > 1 else ""
    size += "(and the largest) " if size and agg.rule == "region" else ""
    compared = call_comparison(agg.rule, agg.slide_threshold, digits)
    click.echo(f"\nslide call: {agg.label} score {compared}{unit} -> positive; foci: regions "
               f"{size}at p >= {agg.call_patch_threshold:.3g} (the pictures' patch threshold); metastasis by the "
               f"largest focus (itc < 0.2 mm <= micro <= 2 mm < macro, measured on the ~{patch_um:.0f} um patch "
               "grid)")
    if summary.metrics:
        m = summary.metrics
        click.echo(f"slide AUC {auc_words(m.get('auc'), m.get('auc_ci95'))}, sensitivity "
                   f"{rate_words(m, 'sensitivity')}, specificity {rate_words(m, 'specificity')} "
                   f"({summary.run / runfolder.SLIDE_METRICS_JSON})")
    outside = [r.name for r in rows if r.extra.get("out_of_domain")]
    if outside:
        click.echo(f"OUT OF DOMAIN: {', '.join(outside)}: most patches are unlike the model's training data "
                   "(another tissue, stain or resolution?); their calls are kept but unreliable "
                   f"(`{card}`)")
    counts = call_counts((r.result.diagnosis if r.result is not None else r.status, bool(r.extra.get("out_of_domain")))
                         for r in rows)
    click.echo("calls: " + ", ".join(f"{n} {call}{out_of_domain_words(ood)}" for call, n, ood in counts))
    scored = sum(r.status not in NO_RESULT for r in rows)
    empty = sum(r.status == STATUS_NO_TISSUE for r in rows)
    click.echo(f"{summary.reused} slide(s) reused from an earlier run with the same model, slide, resolution and "
               f"settings; {scored - summary.reused} (re)computed"
               f"{f'; {empty} without a call (no tissue)' if empty else ''}"
               f"{f'; {summary.busy} busy in another process (skipped: rerun afterwards)' if summary.busy else ''}"
               f"; {summary.failed} failed")
    click.echo(f"results: {summary.run / runfolder.RESULTS_CSV}")
    click.echo(f"report: {summary.run / runfolder.REPORT_HTML}")
    for r in rows:
        if r.status not in NO_RESULT:
            click.echo(f"heatmap: {summary.run / r.name / runfolder.HEATMAP_PNG}")


def _domain_cell(extra: dict[str, object]) -> str:
    """``in 98%`` or ``OUT 12%``: the share of the slide's patches within the model's domain."""
    fraction = extra.get("in_domain_fraction")
    if not isinstance(fraction, float):
        return "-"
    return f"{'OUT' if extra.get('out_of_domain') else 'in'} {100 * fraction:.0f}%"


def _display_width(text: str) -> int:
    """Terminal columns of ``text`` (wide East Asian characters take two)."""
    import unicodedata

    return sum(2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1 for ch in text)
