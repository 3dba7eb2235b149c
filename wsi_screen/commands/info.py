"""``wsi-screen info``: what a patch store or an embeddings store holds and how it was made."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from wsi_screen.commands._options import common_options, configure_output


@click.command(short_help="Describe patch stores and embeddings stores (slide, resolution, contents, provenance).")
@click.argument("stores", nargs=-1, required=True, type=str)
@click.option("--json", "as_json", is_flag=True, help="Print each store's full attributes as JSON.")
@common_options
def info(stores: tuple[str, ...], as_json: bool) -> None:
    """Print a summary of each STORE written by `wsi-screen tile` or `wsi-screen embed` (or its attributes with
    --json).

    A folder of stores stands for every store in it and in its stores/ folder: `tile -o` output, a run's
    stores/ folder, or `embed -o` output (its embeddings stores, then the patch stores they were made from)."""
    configure_output()
    from wsi_screen.embedding.features import KIND, read_attrs
    from wsi_screen.errors import IncompleteStoreError, StoreError
    from wsi_screen.tiling.store import PatchStore, is_url

    expanded: list[str] = []
    for location in stores:
        folder = Path(location)
        inside = [] if is_url(location) or (folder / "zarr.json").exists() else \
            [*sorted(folder.glob("*.zarr")), *sorted((folder / "stores").glob("*.zarr"))]
        if inside:
            expanded.extend(str(p) for p in inside)
        elif not is_url(location) and folder.is_dir() and not (folder / "zarr.json").exists():
            raise StoreError(_holds_no_store(folder))
        else:
            expanded.append(location)
    for location in expanded:
        embeddings = None if is_url(location) else read_attrs(location)
        if embeddings is not None and embeddings.get("kind") == KIND:
            if as_json:
                click.echo(json.dumps({"location": str(Path(location)), **embeddings}, indent=2, sort_keys=True))
            else:
                _print_embeddings(str(Path(location)), embeddings)
            continue
        store = PatchStore.open(location, require_complete=False)
        if as_json:
            click.echo(json.dumps({"location": store.location, **store.attrs}, indent=2, sort_keys=True))
            continue
        a = store.attrs
        if a.get("complete") is not True:  # an interrupted tile's: its arrays (coords, ...) may not exist yet
            raise IncompleteStoreError(f"{store.location}: {_incomplete(1)}")
        stain = a.get("stain", {})
        click.echo(f"{store.location}")
        _print_slide(a.get("slide", {}))
        click.echo(f"  patches    {len(store)} x {a.get('patch_size')} px at {a.get('mpp')} um/px "
                   f"({a.get('tile_size_l0')} level-0 px, stride {a.get('stride_l0')})")
        tissue = a.get("tissue", {})
        click.echo(f"  tissue     {tissue.get('tissue_fraction', 0):.1%} of the slide; patches kept at "
                   f">= {tissue.get('min_tissue')} tissue")
        click.echo(f"  pixels     {_pixels_text(store.pixels_record)}")
        click.echo(f"  stain      {_stain_text(stain)}")
        _print_provenance(a)


def _pixels_text(record: dict[str, Any]) -> str:
    """Where a store's patches come from (its ``pixels_record``; an embeddings store's ``patch_pixels``)."""
    from wsi_screen.tiling.codecs import PatchCodec

    if record.get("pixels") == "none" or record.get("codec") is None:
        return "none (coordinates only: patches are read from the source slide)"
    return f"stored, {PatchCodec.from_json(record['codec'])}"


def _incomplete(n: int) -> str:
    """What ``n`` incomplete patch stores (``.zarr.partial``) are, and what to do."""
    return (f"{'an incomplete store' if n == 1 else 'incomplete stores'}, left by an interrupted `wsi-screen tile`; "
            f"rerun tile to finish {'it' if n == 1 else 'them'}")


def _holds_no_store(folder: Path) -> str:
    """Why ``folder`` (neither a store nor a folder of stores) is not one of info's inputs, and where its subfolders
    hold stores (``embed -o`` or ``tile -o`` folders side by side), which to name instead."""
    nested = sorted({p.name for p in folder.iterdir() if p.is_dir() and not p.name.endswith(".zarr")
                     and (any(p.glob("*.zarr")) or any((p / "stores").glob("*.zarr")))})
    text = f"{folder}: not a patch store or an embeddings store, and holds none"
    partial = sorted(p.name for p in [*folder.glob("*.zarr.partial"), *(folder / "stores").glob("*.zarr.partial")])
    if partial:
        names = ", ".join(partial[:3]) + (", ..." if len(partial) > 3 else "")
        return f"{text} complete: {names} {'is' if len(partial) == 1 else 'are'} {_incomplete(len(partial))}"
    if not nested:
        return text + " (no zarr group there)"
    names = ", ".join(nested[:3]) + (", ..." if len(nested) > 3 else "")
    return f"{text}; its folders {names} do: name them (`wsi-screen info {folder / '*'}`)"


def _print_slide(slide: dict[str, Any]) -> None:
    w, h = slide.get("dimensions", ["?", "?"])
    click.echo(f"  slide      {slide.get('name')}  ({slide.get('vendor')}, {w} x {h} px, "
               f"{slide.get('mpp')} um/px from {slide.get('mpp_source')})")
    click.echo(f"  source     {slide.get('path')}")


def _stain_text(stain: dict[str, Any]) -> str:
    """A store's stain normalisation (``attrs["stain"]``, as a patch store records it and its embeddings copy it)."""
    return str(stain.get("method")) + ("" if stain.get("method") == "none" else f" (fitted: {stain.get('fitted')})")


def _input_text(a: dict[str, Any], pre: dict[str, Any], enc: dict[str, Any]) -> str:
    """What the encoder was given: its input size at the resolution it saw the patches (``mpp`` x ``size`` /
    ``input_size``, as EncoderIdentity.seen_mpp), naming the resize and the encoder's own resolution where
    ``embed --mpp/--size`` differed from them."""
    size, input_size, mpp = a.get("size"), pre.get("input_size"), a.get("mpp", pre.get("mpp"))
    if not isinstance(mpp, (int, float)) or not isinstance(size, int) or not isinstance(input_size, int) \
            or not input_size:
        return f"{input_size} px at {pre.get('mpp')} um/px"
    seen = mpp * size / input_size
    notes = [f"from {size} px patches at {mpp:.4g} um/px"] if size != input_size else []
    own = enc.get("mpp")
    if isinstance(own, (int, float)) and f"{own:.4g}" != f"{seen:.4g}":
        notes.append(f"the encoder was trained at {own:.4g} um/px")
    return f"{input_size} px at {seen:.4g} um/px" + (f" ({'; '.join(notes)})" if notes else "")


def _print_provenance(a: dict[str, Any]) -> None:
    click.echo(f"  complete   {a.get('complete')}   schema {a.get('schema_version')}   "
               f"wsi-screen {a.get('package_version')}")


def _print_embeddings(location: str, a: dict[str, Any]) -> None:
    """The text view of an embeddings store (`wsi-screen embed`): what its features are and how they were made."""
    enc = a.get("encoder", {})
    pre = a.get("preprocessing", {})
    click.echo(location)
    click.echo(f"  features   {a.get('n_patches')} x {enc.get('dim')} {a.get('dtype')} (embeddings, computed in "
               f"{a.get('precision')})")
    click.echo(f"  encoder    {enc.get('name')} (ref {enc.get('ref')}, {enc.get('arch')}, "
               f"pooling {enc.get('pooling')})")
    click.echo(f"  weights    {enc.get('weights')}  sha256 {enc.get('weights_sha256')}")
    click.echo(f"  input      {_input_text(a, pre, enc)}, resize {pre.get('resize')}, "
               f"mean {pre.get('mean')}, std {pre.get('std')}")
    click.echo(f"  patches    {a.get('size')} px at {a.get('mpp')} um/px ({a.get('tile_size_l0')} level-0 px) "
               f"from {a.get('patch_store')}")
    pixels = _pixels_text(a["patch_pixels"]) if "patch_pixels" in a else "not recorded (an older embeddings store)"
    click.echo(f"  pixels     {pixels}")
    stain = _stain_text(a["stain"]) if "stain" in a else "not recorded (an older embeddings store)"
    click.echo(f"  stain      {stain}")
    click.echo("  coords     level-0 (x, y) of each patch's top-left corner, in the patch store's order")
    _print_slide(a.get("slide", {}))
    _print_provenance(a)
