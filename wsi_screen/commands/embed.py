"""``wsi-screen embed``: slides or patch stores -> one feature store (embeddings + coordinates) per slide."""

from __future__ import annotations

import time

import click

from wsi_screen.commands._options import (
    common_options,
    configure_output,
    device_option,
    encoder_options,
    slide_mpp_options,
    slide_mpp_table,
    slide_timeout_option,
)


@click.command(short_help="Embed slides' patches with an encoder, one feature store per slide.")
# a missing path is discovery's to report (one line, exit 1), as in tile and infer, not a usage error
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=str),
                metavar="SLIDES_OR_STORES...")
@encoder_options(required=True, what="The encoder whose features are written")
@click.option("-o", "--out", "out", required=True, type=click.Path(file_okay=False), metavar="OUT",
              help="Output folder: OUT/<slide>.zarr per slide (features, coords), OUT/stores/ the patch stores.")
@click.option("--mpp", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Patch resolution in um/px (default: the encoder's, e.g. 0.5 for the registry encoders; "
                   "needed for a hf-hub:/timm/ encoder or one given with --weights, which record none).")
@click.option("--size", type=click.IntRange(8, 4096), default=None, metavar="PX",
              help="Patch edge in pixels (default: the encoder's input size); patches are resized to the encoder's.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True,
              help="Stored precision of the features.")
@click.option("--min-tissue", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Keep patches whose footprint is at least this fraction tissue.")
@click.option("--stores", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Folder of patch stores to reuse and tile into (default OUT/stores). A store there that holds "
                   "these patches (any codec, or coordinates only) is reused, and its pixels are embedded: a "
                   "JPEG store's (tile's default) are not exactly the slide's, lz4 and coordinates-only ones are; "
                   "one made with other settings is refused (in OUT/stores it is re-tiled). A coordinates-only "
                   "store reads its patches from the slide given here, which may have moved since it was tiled "
                   "(the same file by its fingerprint).")
@click.option("--keep-patches", is_flag=True,
              help="Write the patch pixels into the stores (lz4, lossless). By default a store holds only the "
                   "patches' coordinates, tissue and a thumbnail (a few MB), and the patches are read from the "
                   "slide while embedding. A rerun without this flag reuses stores that kept their pixels.")
@slide_mpp_options
@click.option("--batch-size", type=click.IntRange(1, 4096), default=128, show_default=True,
              help="Patches per forward pass of the encoder.")
@click.option("--workers", type=click.IntRange(0, 64), default=2, show_default=True,
              help="Reader threads per slide while tiling.")
@click.option("--loader-workers", type=click.IntRange(0, 64), default=0, show_default=True,
              help="DataLoader worker processes reading patches (0: a background thread).")
@click.option("--threads", type=click.IntRange(0, 256), default=0,
              help="Torch compute threads (0: 1 on machines with 2 cores or fewer, else all).")
@click.option("--overwrite", is_flag=True,
              help="Replace embeddings made with other settings, and recompute (and re-tile stores) those up to "
                   "date.")
@slide_timeout_option
@device_option
@common_options
def embed(inputs: tuple[str, ...], encoder: str, encoder_weights: str | None, out: str, mpp: float | None,
          size: int | None, dtype: str, min_tissue: float, stores: str | None, slide_mpp: float | None,
          slide_mpp_csv: str | None, batch_size: int, workers: int, loader_workers: int, threads: int,
          overwrite: bool, slide_timeout: float, device: str, keep_patches: bool) -> None:
    """Embed every tissue patch of SLIDES_OR_STORES with ENCODER into OUT/<slide>.zarr.

    Each input is a slide, a folder of slides, a patch store (from `wsi-screen tile`) or a folder of stores.
    Slides are tiled at the encoder's resolution and input size (--mpp/--size override; only registry encoders
    and model folders record a resolution: a hub reference or a --weights file needs --mpp); a store is embedded
    when its mpp and patch size are those. Each OUT/<slide>.zarr holds `features` (N, D; --dtype),
    `coords` (N, 2; level-0 x, y of each patch, as in the patch store) and attributes naming the encoder (name,
    weights sha256, pooling), its preprocessing, the mpp and the patch size.

    The patch stores (OUT/stores, or --stores) hold only the patches' coordinates unless --keep-patches: the
    patches are read from the slide as they are embedded, in the supervised reader process that tiles it.

    A rerun skips slides whose embeddings are complete and made with the same encoder and settings; embeddings
    in OUT made otherwise (another encoder, --mpp, --size, --dtype) are kept: that slide fails with one line
    naming what differs, unless --overwrite. A slide that fails, or an input that is missing or holds no slide, is
    reported on one line and the others go on; the exit status is 1 if any failed, or if the inputs hold no slide
    or store at all. A slide whose store another wsi-screen process is writing is skipped as busy (a warning, counted
    apart, not a failure: that process writes the same store); rerun afterwards to pick it up.

    \b
    Examples:
      wsi-screen embed slides/ --encoder uni --device cuda -o embeddings/
      wsi-screen embed stores/ --encoder default -o embeddings/
      wsi-screen embed a.svs --encoder vit_small_patch16_224 --weights vits.safetensors --mpp 0.5 -o emb/
    """
    configure_output()
    ctx = click.get_current_context()
    from wsi_screen._safe_write import usable_folder

    usable_folder(out, create=False)  # an OUT that cannot be written: one line before torch and the encoder load
    from wsi_screen.commands.train import set_threads

    set_threads(threads)
    import logging

    from wsi_screen.embedding.slides import EmbedConfig, embed_inputs, find_inputs
    from wsi_screen.errors import ConfigError
    from wsi_screen.models.device import resolve_device
    from wsi_screen.models.encoder import load_encoder, recorded_mpp
    from wsi_screen.runlog import run_log
    from wsi_screen.tiling.codecs import PatchCodec
    from wsi_screen.tiling.grid import TileSpec
    from wsi_screen.tiling.pipeline import TileConfig, with_stores_policy

    log = logging.getLogger("wsi_screen.embed")
    torch_device = resolve_device(device)  # an absent GPU is one line before anything is read
    found = find_inputs(inputs)  # inputs that name nothing: one line before the encoder is loaded
    mpp = mpp if mpp is not None else recorded_mpp(encoder, weights=encoder_weights)
    if mpp is None:  # known from the reference alone: refused before the weights (GBs for some) are loaded
        raise ConfigError(f"encoder {encoder} records no patch resolution; pass --mpp")
    enc = load_encoder(encoder, weights=encoder_weights, device=torch_device,
                       precision="auto" if torch_device.type == "cuda" else "fp32")
    size = size or enc.identity.input_size
    config = EmbedConfig(mpp=mpp, size=size, dtype=dtype, batch_size=batch_size, loader_workers=loader_workers,
                         overwrite=overwrite)
    tile = TileConfig(spec=TileSpec(mpp=mpp, size_px=size, min_tissue=min_tissue), slide_mpp=slide_mpp,
                      slide_mpps=slide_mpp_table(slide_mpp_csv), workers=workers, overwrite=overwrite,
                      slide_timeout=slide_timeout, pixels=keep_patches, codec=PatchCodec("lz4"))
    tile = with_stores_policy(tile, given=stores is not None)
    started = time.perf_counter()
    with run_log(out):
        results = embed_inputs(found, out, enc, config, tile, stores_dir=stores,
                               on_error="raise" if ctx.obj.get("debug") else "record")
    counts = {s: sum(r.status == s for r in results) for s in ("done", "skipped", "busy", "failed")}
    patches = sum(r.n_patches for r in results if r.status == "done")
    log.debug("embedded %d patches", patches)
    if not ctx.obj.get("quiet"):
        what = (f"; {patches:,} patches of {size} px at {mpp:g} um/px -> {enc.identity.dim}-dim {dtype}"
                if counts["done"] else "")
        busy = f"{counts['busy']} busy in another process, " if counts["busy"] else ""
        click.echo(f"wsi-screen: {len(results)} slide(s): {counts['done']} embedded, {counts['skipped']} up to date, "
                   f"{busy}{counts['failed']} failed{what} in {time.perf_counter() - started:.1f} s -> {out}", err=True)
    if counts["failed"]:
        ctx.exit(1)
