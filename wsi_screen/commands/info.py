"""``wsi-screen info``: what a patch store holds and how it was made."""

from __future__ import annotations

import json

import click

from wsi_screen.commands._options import common_options, configure_output


@click.command(short_help="Describe patch stores (slide, resolution, patches, stain, provenance).")
@click.argument("stores", nargs=-1, required=True, type=str)
@click.option("--json", "as_json", is_flag=True, help="Print each store's full attributes as JSON.")
@common_options
def info(stores: tuple[str, ...], as_json: bool) -> None:
    """Print a summary of each STORE written by `wsi-screen tile` (or its attributes with --json).

    A folder of stores (as `tile -o` or a run's stores/ folder) stands for every store in it."""
    configure_output()
    from pathlib import Path

    from wsi_screen.tiling.store import PatchStore, is_url

    expanded: list[str] = []
    for location in stores:
        folder = Path(location)
        inside = [] if is_url(location) or (folder / "zarr.json").exists() else sorted(folder.glob("*.zarr"))
        if inside:
            expanded.extend(str(p) for p in inside)
        else:
            expanded.append(location)
    for location in expanded:
        store = PatchStore.open(location, require_complete=False)
        if as_json:
            click.echo(json.dumps({"location": store.location, **store.attrs}, indent=2, sort_keys=True))
            continue
        a = store.attrs
        slide = a.get("slide", {})
        stain = a.get("stain", {})
        w, h = slide.get("dimensions", ["?", "?"])
        click.echo(f"{store.location}")
        click.echo(f"  slide      {slide.get('name')}  ({slide.get('vendor')}, {w} x {h} px, "
                   f"{slide.get('mpp')} um/px from {slide.get('mpp_source')})")
        click.echo(f"  source     {slide.get('path')}")
        click.echo(f"  patches    {len(store)} x {a.get('patch_size')} px at {a.get('mpp')} um/px "
                   f"({a.get('tile_size_l0')} level-0 px, stride {a.get('stride_l0')})")
        tissue = a.get("tissue", {})
        click.echo(f"  tissue     {tissue.get('tissue_fraction', 0):.1%} of the slide; patches kept at "
                   f">= {tissue.get('min_tissue')} tissue")
        codec = store.codec
        click.echo("  pixels     " + (f"stored, {codec}" if codec is not None else
                                      "none (coordinates only: patches are read from the source slide)"))
        fitted = "" if stain.get("method") == "none" else f" (fitted: {stain.get('fitted')})"
        click.echo(f"  stain      {stain.get('method')}{fitted}")
        click.echo(f"  complete   {a.get('complete')}   schema {a.get('schema_version')}   "
                   f"wsi-screen {a.get('package_version')}")
