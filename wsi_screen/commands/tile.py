"""``wsi-screen tile``: slides -> one patch store per slide."""

from __future__ import annotations

import time

import click

from wsi_screen.commands._options import (
    common_options,
    configure_output,
    slide_mpp_options,
    slide_mpp_table,
    slide_timeout_option,
)
from wsi_screen.errors import ConfigError, in_user_words
from wsi_screen.tiling.codecs import CODECS, DEFAULT_CODEC, DEFAULT_QUALITY, PatchCodec, refuse_pixel_settings


@click.command(short_help="Cut slides into tissue patches, one zarr store per slide.")
@click.argument("slides", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("-o", "--out", "out", required=True, type=str, metavar="OUT",
              help="Output folder (or fsspec URL); each slide becomes OUT/<slide name>.zarr.")
@click.option("--mpp", type=float, default=0.5, show_default=True,
              help="Patch resolution in microns per pixel (0.5 ~ 20x, 0.25 ~ 40x, 1.0 ~ 10x).")
@click.option("--size", type=int, default=224, show_default=True, help="Patch edge in pixels.")
@click.option("--overlap", type=int, default=0, show_default=True,
              help="Overlap between neighbouring patches, in patch pixels.")
@click.option("--min-tissue", type=float, default=0.5, show_default=True,
              help="Keep patches whose footprint is at least this fraction tissue (0-1).")
@click.option("--stain", type=click.Choice(["none", "macenko", "reinhard", "vahadane"]), default="none",
              show_default=True,
              help="Stain normalisation, fitted on each slide's own tissue and mapped to the target.")
@click.option("--stain-target", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Image whose stain is the target of --stain (default: the bundled H&E target, see docs/stain.md).")
@click.option("--codec", type=click.Choice(CODECS), default=DEFAULT_CODEC, show_default=True,
              help="How each patch is stored: jpeg (4:4:4, ~1/5 of lz4's bytes at quality "
                   f"{DEFAULT_QUALITY['jpeg']}, > 38 dB), jpegxl (smaller, ~10x slower to write) or lz4 "
                   "(lossless, ~5x the bytes). Plain zarr reads all of them; figures in docs/store.md. jpeg and "
                   "jpegxl are lossy: `infer --stores` on them scores differently from `infer` on the slide, "
                   "enough to change a slide's domain flag (and warns); lz4 or --pixels none give the exact "
                   "scores.")
@click.option("--quality", type=click.IntRange(1, 100), default=None,
              help="Quality of jpeg / jpegxl, 1-100 (default: "
                   + ", ".join(f"{k} {v}" for k, v in DEFAULT_QUALITY.items()) + ").")
@click.option("--pixels", type=click.Choice(["store", "none"]), default="store", show_default=True,
              help="none: a coordinates-only store (coordinates, tissue, thumbnail, mask, stain fit, settings, no "
                   "patch pixels; --codec and --quality are refused); reading it reads the patches from the "
                   "slide, which must stay where it is.")
@slide_mpp_options
@click.option("--workers", type=click.IntRange(0, 64), default=2, show_default=True,
              help="Reader threads per slide (0 or 1: one).")
@click.option("--reader", type=click.Choice(["auto", "openslide", "tifffile"]), default="auto",
              show_default=True,
              help="Pixel reader. auto: files OpenSlide opens use its metadata, and where their tiles are plain "
                   "JPEG in a TIFF (SVS, generic tiled TIFF) wsi-screen decodes the tiles itself (same pixels, "
                   "faster); OME-TIFF and plain TIFF are read with tifffile; everything else through OpenSlide.")
@click.option("--overwrite", is_flag=True,
              help="Replace existing stores made with other settings or from another slide version.")
@slide_timeout_option
@click.option("--dask", type=str, default=None, metavar="ADDRESS",
              help="Tile on a Dask cluster, one task per slide: tcp://HOST:PORT of a running scheduler, or "
                   "local[:N] for N worker processes here (default 2). Every worker must read the slides and "
                   "write OUT by the same paths (see docs/cluster.md). Needs the dask extra: "
                   "pip install \"wsi-screen[dask]\".")
@common_options
def tile(slides: tuple[str, ...], out: str, mpp: float, size: int, overlap: int, min_tissue: float,
         stain: str, stain_target: str | None, codec: str, quality: int | None, pixels: str,
         slide_mpp: float | None, slide_mpp_csv: str | None, workers: int,
         reader: str, overwrite: bool, slide_timeout: float, dask: str | None) -> None:
    """Find tissue in SLIDES and write its patches to OUT (stain-normalised with --stain; by default as scanned).

    Each SLIDE is a slide file (SVS, NDPI, MRXS, SCN, BIF, VMS, tiled or OME-TIFF, DICOM, ...) or a folder,
    scanned recursively; a folder whose .dcm files form one DICOM series is one slide named after it.

    A store holds the patches, their level-0 (x, y) coordinates, tissue fractions, the slide thumbnail
    and tissue mask, and the full provenance (see docs/store.md). Complete, matching stores are skipped,
    so an interrupted run resumes where it stopped. A slide that fails (corrupt, unreadable, or crashing or
    hanging the slide reader, which runs in its own process) is reported on one line and the rest are
    still tiled; the exit status is 1 if any slide failed. A store another wsi-screen process is writing is
    skipped on one warning line and counted busy, not failed. Details and tracebacks go to OUT/wsi-screen.log.
    SLIDES that hold no slide at all are one error line (exit status 1), and OUT is not created.

    \b
    Examples:
      wsi-screen tile slides/ -o stores/
      wsi-screen tile a.svs b.ndpi -o stores/ --mpp 0.25 --size 256 --stain macenko
      wsi-screen tile slides/ -o stores/ --codec lz4
      wsi-screen tile slides/ -o coords/ --pixels none
      wsi-screen tile plain.tif -o stores/ --slide-mpp 0.5
      wsi-screen tile slides/ -o stores/ --slide-mpp-csv resolutions.csv
      wsi-screen tile /shared/slides -o /shared/stores --dask tcp://10.0.0.5:8786
    """
    configure_output()
    try:
        patch_codec = PatchCodec(codec, quality)  # its rules (lz4 takes no quality) are the API's
    except ConfigError as exc:
        raise click.BadParameter(in_user_words(str(exc)), param_hint="--quality") from None
    if stain_target is not None and stain == "none":
        raise click.BadParameter("a stain target is only used with --stain macenko, reinhard or vahadane; add one "
                                 "(or drop --stain-target)", param_hint="--stain-target")
    ctx = click.get_current_context()
    if pixels == "none":
        _refuse_pixel_options(ctx)
    if dask is None and not ctx.obj.get("debug"):
        from wsi_screen.slide import isolation

        # the slide reader starts up (and imports the tiler, and numba's stain loops) while this process does
        isolation.start_early("wsi_screen.tiling.pipeline",
                              *(() if stain == "none" else ("wsi_screen.tiling.stain",)))
        ctx.call_on_close(isolation.stop_early)  # unused when the command fails before reading a slide
    import logging

    from wsi_screen.distributed import maybe_connect, parse_address
    from wsi_screen.errors import RunError
    from wsi_screen.runlog import held, run_log
    from wsi_screen.slide.discovery import discover, nothing_found
    from wsi_screen.slide.slide import warn_unmatched_mpp
    from wsi_screen.tiling.grid import TileSpec
    from wsi_screen.tiling.pipeline import TileConfig, output_location, tile_slides
    from wsi_screen.tiling.store import is_url

    log = logging.getLogger("wsi_screen.tile")
    config = TileConfig(spec=TileSpec(mpp=mpp, size_px=size, overlap_px=overlap, min_tissue=min_tissue),
                        stain=stain, stain_target=stain_target, slide_mpp=slide_mpp,
                        slide_mpps=slide_mpp_table(slide_mpp_csv),
                        codec=patch_codec, pixels=pixels == "store",
                        workers=workers,
                        reader=reader,  # type: ignore[arg-type]
                        overwrite=overwrite, slide_timeout=slide_timeout)
    if stain != "none":  # an unusable target is one error before any slide, not the same one for every slide
        from wsi_screen.tiling.stain import target_params

        target_params(stain, stain_target)
    target = parse_address(dask) if dask is not None else None
    if target is not None:
        output_location(out, absolute=True)  # refuse memory:// before starting a cluster
    started = time.perf_counter()
    local = output_location(out)
    with held():  # library warnings of discovery (DICOM headers) wait for the run log
        sources, problems = discover(slides)
        if not sources:  # nothing to tile: say why in one line, as infer and embed do, and leave no OUT behind
            raise RunError(nothing_found("tile", problems))
        with run_log(None if is_url(local) else local):
            for problem in problems:
                log.error("%s: %s", problem.path, problem.reason)
            warn_unmatched_mpp(dict(config.slide_mpps), sources)
            with maybe_connect(target) as runner:
                results = tile_slides(sources, out, config, on_error="raise" if ctx.obj.get("debug") else "record",
                                      dask=runner)

    counts = {s: sum(r.status == s for r in results) for s in ("done", "skipped", "failed", "locked")}
    failed = counts["failed"] + len(problems)
    patches = sum(r.n_patches for r in results if r.status == "done")
    parts = [f"{counts['done']} tiled", f"{counts['skipped']} up to date"]
    if counts["locked"]:
        parts.append(f"{counts['locked']} busy in another process")
    parts.append(f"{counts['failed']} failed")
    if not ctx.obj.get("quiet"):
        unreadable = f"; {len(problems)} input(s) gave no slide" if problems else ""
        kept = config.codec
        verb = (f"written ({kept.name}" + (f" quality {kept.quality}, lossy)" if kept.lossy else ", lossless)")
                if pixels == "store" else "located (coordinates only)")
        click.echo(f"wsi-screen: {len(results)} slide(s): {', '.join(parts)}{unreadable}; "
                   f"{patches:,} patches {verb} in {time.perf_counter() - started:.1f} s -> {out}", err=True)
    if failed:
        ctx.exit(1)


def _refuse_pixel_options(ctx: click.Context) -> None:
    """--codec and --quality say how patch pixels are kept, and a coordinates-only store (--pixels none) keeps
    none: either one typed is refused (at any value), as is one that a --config file or the environment sets to
    other than its default (such a file may serve runs that keep pixels; its defaults are left alone). The default
    of --quality is the codec's (--help's ``jpeg 90``), so ``quality = 90`` in a file is left alone too."""
    source = click.core.ParameterSource
    defaults = {"codec": DEFAULT_CODEC, "quality": DEFAULT_QUALITY.get(ctx.params["codec"])}
    given = []
    for param in ctx.command.params:
        if param.name not in defaults:
            continue
        where = ctx.get_parameter_source(param.name)
        if where == source.COMMANDLINE or (where in (source.DEFAULT_MAP, source.ENVIRONMENT)
                                           and ctx.params[param.name] not in (param.default, defaults[param.name])):
            given.append(str(param.name))
    refuse_pixel_settings(given)  # the rule and its words are the API's tile(pixels=False)'s
