"""``wsi-screen embed`` (wsi_screen.embedding): real slides and stores -> feature stores, resumed per slide, one line
per bad slide."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import coordinates_only_store_of_a_moved_slide, run_cli
from tests.hub import write_hub_model
from wsi_screen.embedding.features import FeatureStore
from wsi_screen.models.encoder import file_sha256
from wsi_screen.models.spec import WEIGHTS_NAME
from wsi_screen.tiling.store import PatchStore


@pytest.fixture(scope="module")
def embedded(example_slide: Path, slides_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """The example slide and a slide without a resolution, embedded with the bundled model's backbone."""
    out = tmp_path_factory.mktemp("embed") / "out"
    bad = slides_dir / "unsupported" / "kidney-ihc-plain-strip.tif"
    res = run_cli("embed", example_slide, bad, "--encoder", "default", "-o", out, "--workers", "0")
    return out, res


def test_features_coords_and_identity(embedded: tuple[Path, object]) -> None:
    out, res = embedded
    assert res.code == 1  # type: ignore[attr-defined]
    errors = [line for line in res.err_lines if "error" in line]  # type: ignore[attr-defined]
    assert len(errors) == 1 and "kidney-ihc-plain-strip.tif" in errors[0] and "--slide-mpp" in errors[0]
    store = FeatureStore(out / "CMU-1-Small-Region.zarr")
    patches = PatchStore.open(out / "stores" / "CMU-1-Small-Region.zarr")
    features = store.features
    assert features.shape == (len(patches), 512) and features.dtype == np.float16 and len(patches) > 10
    np.testing.assert_array_equal(store.coords, patches.coords)
    attrs = store.attrs
    from wsi_screen.models import default_model_dir

    assert attrs["encoder"]["name"] == "default"
    assert attrs["encoder"]["weights_sha256"] == file_sha256(default_model_dir() / WEIGHTS_NAME)
    assert (attrs["mpp"], attrs["size"]) == (0.972, 96) and attrs["preprocessing"]["input_size"] == 96
    # the features are the bundled model's penultimate features of those patches
    from wsi_screen.models.encoder import load_encoder

    with patches:  # a coordinates-only store: the patches are read from the slide, closed after
        want = load_encoder("default").embed(patches.read(slice(0, 8)))
    np.testing.assert_allclose(features[:8].astype(np.float32), want, rtol=2e-3, atol=2e-3)


def test_info_describes_embeddings(embedded: tuple[Path, object]) -> None:
    """`info` on an embeddings store says what it holds (features, encoder, preprocessing), not patch-store fields;
    on the embed output folder it lists the embeddings stores, then the patch stores of OUT/stores/."""
    out, _ = embedded
    emb = out / "CMU-1-Small-Region.zarr"
    from wsi_screen.models import default_model_dir

    sha = file_sha256(default_model_dir() / WEIGHTS_NAME)
    res = run_cli("info", emb)
    assert res.code == 0, res
    lines = res.out.splitlines()
    n = len(FeatureStore(emb))
    assert lines[0] == str(emb)
    assert f"  features   {n} x 512 float16 (embeddings, computed in fp32)" in lines
    assert "  encoder    default (ref default, resnet10t, pooling model)" in lines
    assert f"  weights    model.safetensors  sha256 {sha}" in lines
    assert any(x.startswith("  input      96 px at 0.972 um/px, resize ") for x in lines)
    patch_store = out / "stores" / "CMU-1-Small-Region.zarr"
    assert f"  patches    96 px at 0.972 um/px (187 level-0 px) from {patch_store}" in lines
    assert any(x.startswith("  coords     level-0 (x, y)") for x in lines)
    assert "  stain      none" in lines  # the patches' stain normalisation, as info shows a patch store's
    # the patches the features came from: embed's own coordinates-only store reads them from the slide
    assert "  pixels     none (coordinates only: patches are read from the source slide)" in lines
    assert "None" not in res.out and "tissue" not in res.out
    folder = run_cli("info", out)
    assert folder.code == 0, folder
    heads = [x for x in folder.out.splitlines() if not x.startswith(" ")]
    assert heads == [str(emb), str(patch_store)]
    assert folder.out.startswith(res.out) and f"  patches    {n} x 96 px at 0.972 um/px" in folder.out
    js = run_cli("info", emb, "--json")
    assert js.code == 0 and '"kind": "wsi-screen embeddings"' in js.out


def test_stores_keep_no_pixels_unless_asked_and_both_embed_alike(embedded: tuple[Path, object], example_slide: Path,
                                                                  tmp_path: Path) -> None:
    """By default `embed` keeps coordinates-only stores (the patches are read from the slide as they are embedded);
    --keep-patches writes lz4 pixel stores of the same patches, so the features are the same."""
    out, _ = embedded
    name = "CMU-1-Small-Region"
    streamed = PatchStore.open(out / "stores" / f"{name}.zarr")
    assert not streamed.has_pixels
    kept = tmp_path / "kept"
    res = run_cli("embed", example_slide, "--encoder", "default", "-o", kept, "--workers", "0", "--keep-patches")
    assert res.code == 0, res
    pixels = PatchStore.open(kept / "stores" / f"{name}.zarr")
    assert pixels.has_pixels and pixels.codec.name == "lz4"  # type: ignore[union-attr]
    np.testing.assert_array_equal(pixels.coords, streamed.coords)
    with streamed:
        np.testing.assert_array_equal(pixels.read(slice(0, 16)), streamed.read(slice(0, 16)))
    np.testing.assert_array_equal(FeatureStore(kept / f"{name}.zarr").features,
                                  FeatureStore(out / f"{name}.zarr").features)
    # a plain rerun keeps the kept patches: the same patches, so nothing is re-tiled or re-embedded
    plain = run_cli("embed", example_slide, "--encoder", "default", "-o", kept, "--workers", "0")
    assert plain.code == 0 and "1 up to date" in plain.err, plain
    # a folder of the user's stores (--stores) is reused whatever it keeps: no second tiling, nothing re-embedded
    again = run_cli("embed", example_slide, "--encoder", "default", "-o", tmp_path / "again", "--workers", "0",
                    "--stores", kept / "stores")
    assert again.code == 0 and "1 embedded" in again.err, again
    assert PatchStore.open(kept / "stores" / f"{name}.zarr").has_pixels  # not re-tiled as coordinates only
    np.testing.assert_array_equal(FeatureStore(tmp_path / "again" / f"{name}.zarr").features,
                                  FeatureStore(out / f"{name}.zarr").features)
    assert FeatureStore(tmp_path / "again" / f"{name}.zarr").attrs["patch_pixels"] == {
        "pixels": "store", "codec": {"name": "lz4", "quality": None}}
    assert FeatureStore(out / f"{name}.zarr").attrs["patch_pixels"] == {"pixels": "none", "codec": None}
    assert "compressed" not in again.err


def test_a_slide_linked_under_another_name_embeds_and_screens(embedded: tuple[Path, object], example_slide: Path,
                                                              tmp_path: Path) -> None:
    """Cohorts are often folders of links: a slide linked under another name used to fail in `embed` and `infer`
    ("the slide ... is not the file this store was made from"), as the fingerprint hashed the link's name."""
    out, _ = embedded
    (tmp_path / "lnk").mkdir()
    (tmp_path / "lnk" / "patientA.svs").symlink_to(example_slide)
    res = run_cli("embed", tmp_path / "lnk", "--encoder", "default", "-o", tmp_path / "emb", "--workers", "0")
    assert res.code == 0 and "1 embedded" in res.err, res
    np.testing.assert_array_equal(FeatureStore(tmp_path / "emb" / "patientA.zarr").features,
                                  FeatureStore(out / "CMU-1-Small-Region.zarr").features)
    res = run_cli("infer", tmp_path / "lnk", "-o", tmp_path / "run", "--workers", "0", "--quiet")
    assert res.code == 0, res
    rows = (tmp_path / "run" / "results.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("patientA,ok,")


def test_a_coordinates_only_store_of_a_moved_slide_names_the_cli_way_out(embedded: tuple[Path, object],
                                                                         example_slide: Path, tmp_path: Path) -> None:
    """`embed STORE` of a coordinates-only store whose slide has moved used to end in a Python-only hint
    (PatchStore.open(..., slide=PATH)); it names the command's way out, which works: the slide with --stores."""
    out, _ = embedded
    name = example_slide.stem
    stores, moved = coordinates_only_store_of_a_moved_slide(example_slide, tmp_path)
    res = run_cli("embed", stores, "--encoder", "default", "-o", tmp_path / "emb", "--workers", "0")
    errors = [line for line in res.err_lines if line.startswith("wsi-screen: error:")]
    assert res.code == 1 and len(errors) == 1 and "Traceback" not in res.err, res
    assert f"screen or embed it at its new path with --stores={stores}" in errors[0]
    res = run_cli("embed", moved, "--stores", stores, "--encoder", "default", "-o", tmp_path / "emb", "--workers", "0")
    assert res.code == 0 and "1 embedded" in res.err, res
    np.testing.assert_array_equal(FeatureStore(tmp_path / "emb" / f"{name}.zarr").features,
                                  FeatureStore(out / f"{name}.zarr").features)


def test_embeddings_of_a_moved_slide_record_where_it_was_read(example_slide: Path, tmp_path: Path) -> None:
    """Embedding a moved slide through its reused store records the slide file it read, as a store tiled now records
    the path it was tiled from (it recorded the store's old path); a store or embeddings reused as they are keep the
    record they were made with (tile's rule: the slide is known by its fingerprint, not by its folder)."""
    import json

    stores, moved = coordinates_only_store_of_a_moved_slide(example_slide, tmp_path)
    old = str((tmp_path / "a" / moved.name).resolve())
    args = ("--stores", stores, "--encoder", "default", "-o", tmp_path / "emb", "--workers", "0")
    res = run_cli("embed", moved, *args)
    assert res.code == 0 and "1 embedded" in res.err, res
    features = tmp_path / "emb" / f"{example_slide.stem}.zarr"
    patch_store = stores / f"{example_slide.stem}.zarr"
    read = str(moved.resolve())
    assert FeatureStore(features).attrs["slide"]["path"] == read
    assert json.loads((patch_store / "zarr.json").read_text())["attributes"]["slide"]["path"] == old  # reused as is
    # moved again: the embeddings are up to date (same slide by its fingerprint) and kept as they were made
    again = Path(moved.rename(tmp_path / "a" / moved.name))
    res = run_cli("embed", again, *args)
    assert res.code == 0 and "0 embedded, 1 up to date" in res.err, res
    assert FeatureStore(features).attrs["slide"]["path"] == read


def test_inputs_without_slides_are_one_line_as_in_infer(tmp_path: Path) -> None:
    """An empty folder used to be counted as a failed slide ("1 slide(s): 0 embedded, 0 up to date, 1 failed")."""
    (tmp_path / "empty").mkdir()
    res = run_cli("embed", tmp_path / "empty", "--encoder", "default", "-o", tmp_path / "emb")
    assert res.code == 1 and res.err_lines[-1] == (
        f"wsi-screen: error: no slides to embed: {tmp_path / 'empty'}: folder holds no slide files"), res
    assert "slide(s)" not in res.err and not (tmp_path / "emb").exists()
    res = run_cli("infer", tmp_path / "empty", "-o", tmp_path / "run")
    assert res.code == 1 and res.err_lines[-1] == (
        f"wsi-screen: error: no slides to screen: {tmp_path / 'empty'}: folder holds no slide files"), res


@pytest.mark.parametrize("command, verb", [("tile", "tile"), ("infer", "screen"), ("embed", "embed")])
def test_a_missing_path_is_one_line_and_exit_1_in_every_slide_command(tmp_path: Path, command: str,
                                                                       verb: str) -> None:
    """Every command taking slides says a missing path the same way, through discovery: one line, exit 1, no OUT.
    embed's was click's usage error (exit 2, "Invalid value for 'SLIDES_OR_STORES...'")."""
    missing = tmp_path / "nope.svs"
    extra = ("--encoder", "default") if command == "embed" else ()
    res = run_cli(command, missing, *extra, "-o", tmp_path / "out")
    errors = [line for line in res.err_lines if "error" in line]  # embed names its encoder first (info)
    assert (res.code, errors, res.err_lines[-1]) == (1, errors[-1:], f"wsi-screen: error: no slides to {verb}: "
                                                     f"{missing}: no such file or folder"), res
    assert not (tmp_path / "out").exists()


def test_embed_goes_on_past_a_missing_path_as_tile_does(example_slide: Path, tmp_path: Path) -> None:
    """Beside a slide, a missing path is one error line and a failure (exit 1), and the slide is embedded."""
    missing = tmp_path / "nope.svs"
    res = run_cli("embed", missing, example_slide, "--encoder", "default", "-o", tmp_path / "emb", "--workers", "0")
    assert res.code == 1, res
    assert [line for line in res.err_lines if line.startswith("wsi-screen: error:")] == [
        f"wsi-screen: error: {missing}: no such file or folder"], res
    assert "2 slide(s): 1 embedded, 0 up to date, 1 failed" in res.err
    assert len(FeatureStore(tmp_path / "emb" / f"{example_slide.stem}.zarr").features) > 10
    res = run_cli("tile", missing, example_slide, "-o", tmp_path / "stores", "--pixels", "none")
    assert res.code == 1 and [line for line in res.err_lines if line.startswith("wsi-screen: error:")] == [
        f"wsi-screen: error: {missing}: no such file or folder"], res


def test_patches_far_from_the_encoders_scale_are_warned_of(example_slide: Path, tmp_path: Path) -> None:
    """`train --encoder` warned of patches at another scale than the encoder's; `embed --mpp` said nothing."""
    res = run_cli("embed", example_slide, "--encoder", "default", "--mpp", "4", "-o", tmp_path / "far",
                  "--workers", "0")
    assert res.code == 0, res
    assert [line for line in res.err_lines if "trained at" in line] == [
        "wsi-screen: warning: the patches are 4 um/px, the encoder default was trained at 0.972 um/px"], res
    # twice the mpp at half the size reach the encoder (resized to 96 px) at its own scale: no warning
    res = run_cli("embed", example_slide, "--encoder", "default", "--mpp", "1.944", "--size", "48", "-o",
                  tmp_path / "near", "--workers", "0")
    assert res.code == 0 and "trained at" not in res.err, res


def test_embed_with_mpp_and_size_reports_the_resolution_it_used(example_slide: Path, tmp_path: Path) -> None:
    """`embed --mpp 2 --size 64` logged 'embeddings of 96 px patches at 0.972 um/px' (the encoder's own) and `info`
    showed 'input 96 px at 2.0 um/px' (the encoder's size beside the patches' mpp): neither was what it did."""
    res = run_cli("embed", example_slide, "--encoder", "default", "--mpp", "2", "--size", "64", "-o", tmp_path / "e",
                  "--workers", "0")
    assert res.code == 0, res
    infos = [line.removeprefix("wsi-screen: info: ") for line in res.err_lines if line.startswith("wsi-screen: info:")]
    assert "encoder default: 512-dim embeddings; its own input 96 px at 0.972 um/px (model pooling)" in infos
    assert "embedding 64 px patches at 2 um/px with default (resized to its 96 px input: 1.333 um/px)" in infos
    assert not any("96 px patches" in line for line in res.err_lines)
    assert "patches of 64 px at 2 um/px -> 512-dim" in res.err  # the summary
    emb = tmp_path / "e" / "CMU-1-Small-Region.zarr"
    attrs = FeatureStore(emb).attrs
    assert (attrs["mpp"], attrs["size"], attrs["preprocessing"]["input_size"]) == (2.0, 64, 96)
    assert attrs["encoder"]["mpp"] == 0.972  # the encoder's own, kept apart from the patches'
    patches = PatchStore.open(tmp_path / "e" / "stores" / "CMU-1-Small-Region.zarr")
    assert (patches.mpp, patches.patch_size) == (2.0, 64)
    lines = run_cli("info", emb).out.splitlines()
    assert any(line.startswith("  input      96 px at 1.333 um/px (from 64 px patches at 2 um/px; the encoder was "
                               "trained at 0.972 um/px), resize ") for line in lines), lines
    assert any(line.startswith("  patches    64 px at 2.0 um/px (") for line in lines), lines


def test_embeddings_record_the_stain_and_an_absolute_patch_store(example_slide: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """An embeddings store recorded its patch store relative to the working directory it was made in, and not the
    stain normalisation of the patches it embedded (`tile --stain macenko`, then `embed STORES`)."""
    monkeypatch.chdir(tmp_path)
    tiled = run_cli("tile", example_slide, "-o", "stores", "--mpp", "0.972", "--size", "96", "--stain", "macenko",
                    "--codec", "lz4", "--quiet")
    assert tiled.code == 0, tiled
    res = run_cli("embed", "stores", "--encoder", "default", "-o", "emb", "--workers", "0")
    assert res.code == 0, res
    name = "CMU-1-Small-Region"
    attrs = FeatureStore(tmp_path / "emb" / f"{name}.zarr").attrs
    assert attrs["patch_store"] == str(tmp_path / "stores" / f"{name}.zarr")
    assert attrs["stain"] == PatchStore.open(tmp_path / "stores" / f"{name}.zarr").attrs["stain"]
    assert attrs["stain"]["method"] == "macenko" and attrs["stain"]["fitted"] is True
    monkeypatch.chdir(example_slide.parent)  # info from elsewhere names the store where it is
    lines = run_cli("info", tmp_path / "emb" / f"{name}.zarr").out.splitlines()
    assert f"  patches    96 px at 0.972 um/px (187 level-0 px) from {tmp_path / 'stores' / f'{name}.zarr'}" in lines
    assert "  stain      macenko (fitted: True)" in lines


def test_a_store_of_other_settings_is_refused_naming_what_matters(example_slide: Path, tmp_path: Path) -> None:
    """`embed --stores` refused a store listing the codec and pixels too (which --stores accepts whatever they are),
    'stain' without saying how, and in infer's words ('a screening run does not replace stores')."""
    tiled = run_cli("tile", example_slide, "-o", tmp_path / "stores", "--mpp", "0.972", "--size", "96",
                    "--min-tissue", "0.9", "--stain", "macenko", "--quiet")
    assert tiled.code == 0, tiled
    res = run_cli("embed", example_slide, "--encoder", "default", "-o", tmp_path / "emb", "--workers", "0",
                  "--stores", tmp_path / "stores", "--quiet")
    assert res.code == 1 and res.err_lines == [
        f"wsi-screen: error: {tmp_path / 'stores' / 'CMU-1-Small-Region.zarr'}: existing store was made from another "
        "slide version or with other settings (min_tissue 0.9 -> 0.5; stain.method 'macenko' -> 'none'); this run "
        "does not replace stores it did not make: tile this slide again with this run's settings and --overwrite, "
        "or leave out --stores"], res


def test_embedding_a_jpeg_store_says_so(example_slide: Path, tmp_path: Path) -> None:
    """`tile`'s default store is JPEG: its features are not quite the slide's, so embed warns and records it."""
    tiled = run_cli("tile", example_slide, "-o", tmp_path / "stores", "--mpp", "0.972", "--size", "96", "--quiet")
    assert tiled.code == 0, tiled
    res = run_cli("embed", example_slide, "--encoder", "default", "-o", tmp_path / "out", "--workers", "0",
                  "--stores", tmp_path / "stores")
    assert res.code == 0, res
    name = "CMU-1-Small-Region"
    assert [line for line in res.err_lines if "compressed" in line] == [
        f"wsi-screen: warning: {name}: embedding the JPEG-compressed patches of a store (quality 90): the results "
        "differ from those of the slide's own pixels, enough to move a result near its threshold; lz4 or "
        "coordinates-only stores give exactly those"]
    assert FeatureStore(tmp_path / "out" / f"{name}.zarr").attrs["patch_pixels"] == {
        "pixels": "store", "codec": {"name": "jpeg", "quality": 90}}
    info = run_cli("info", tmp_path / "out" / f"{name}.zarr")  # and `info` says so, as it does for the store
    assert info.code == 0 and "  pixels     stored, jpeg (quality 90)" in info.out.splitlines(), info


def test_other_tiling_settings_embed_afresh_and_are_not_refused(example_slide: Path, tmp_path: Path) -> None:
    """Only another encoder, patch size, mpp or dtype keeps embeddings and refuses: a run with the patches kept
    (its store tiled again with pixels) was refused, and then so was every plain rerun, until --overwrite; another
    --min-tissue re-tiled the store and then refused, the embeddings no longer of that store."""
    out, args = tmp_path / "emb", ("--encoder", "default", "--mpp", "2.0", "--workers", "0")
    assert run_cli("embed", example_slide, "-o", out, *args).code == 0
    for extra in (("--keep-patches",), (), ("--min-tissue", "0.3")):
        res = run_cli("embed", example_slide, "-o", out, *args, *extra)
        assert res.code == 0 and "made otherwise" not in res.err, (extra, res)
    store = PatchStore.open(out / "stores" / "CMU-1-Small-Region.zarr")
    assert FeatureStore(out / "CMU-1-Small-Region.zarr").features.shape[0] == len(store)


def test_rerun_skips_and_other_settings_are_refused_unless_overwrite(embedded: tuple[Path, object],
                                                                     example_slide: Path) -> None:
    """A rerun with other settings replaced complete embeddings without a word (a foundation encoder's are GPU-hours):
    it is refused in one line naming what differs, the embeddings kept; --overwrite replaces them."""
    out, _ = embedded
    target = out / "CMU-1-Small-Region.zarr" / "zarr.json"
    before = target.stat().st_mtime_ns
    res = run_cli("embed", example_slide, "--encoder", "default", "-o", out, "--workers", "0")
    summary = res.err_lines[-1]
    assert res.code == 0 and "1 up to date" in summary and "patches" not in summary, res  # nothing embedded
    assert target.stat().st_mtime_ns == before
    res = run_cli("embed", example_slide, "--encoder", "default", "-o", out, "--workers", "0", "--dtype", "float32")
    assert res.code == 1 and "0 embedded, 0 up to date, 1 failed" in res.err_lines[-1], res
    assert f"wsi-screen: error: {out / 'CMU-1-Small-Region.zarr'}: holds embeddings made otherwise (dtype float16, " \
           "now float32); set --overwrite to replace them, or embed into another output folder" in res.err_lines, res
    assert target.stat().st_mtime_ns == before
    assert FeatureStore(out / "CMU-1-Small-Region.zarr").features.dtype == np.float16
    patches = out / "stores" / "CMU-1-Small-Region.zarr" / "zarr.json"
    tiled = patches.stat().st_mtime_ns
    res = run_cli("embed", example_slide, "--encoder", "default", "-o", out, "--workers", "0", "--mpp", "1.2")
    assert res.code == 1 and "holds embeddings made otherwise (patches 96 px at 0.972 um/px, now 96 px at 1.2 " \
                              "um/px); set --overwrite" in res.err, res
    assert patches.stat().st_mtime_ns == tiled  # refused before the slide's patch store was tiled again
    res = run_cli("embed", example_slide, "--encoder", "default", "-o", out, "--workers", "0", "--dtype", "float32",
                  "--overwrite")
    assert res.code == 0 and "1 embedded" in res.err, res
    assert FeatureStore(out / "CMU-1-Small-Region.zarr").features.dtype == np.float32


def test_store_with_hub_encoder(embedded: tuple[Path, object], offline_hub: Path, tmp_path: Path) -> None:
    out, _ = embedded
    write_hub_model(offline_hub, "wsi-screen-test/tiny-vit")
    store = out / "stores" / "CMU-1-Small-Region.zarr"
    ref = "hf-hub:wsi-screen-test/tiny-vit"
    res = run_cli("embed", store, "--encoder", ref, "-o", tmp_path / "e")
    assert res.code == 1 and "records no patch resolution; pass --mpp" in res.err, res
    res = run_cli("embed", store, "--encoder", ref, "--mpp", "0.5", "--size", "224", "-o", tmp_path / "e")
    assert res.code == 1 and "set --mpp=0.972 --size=96" in res.err, res
    res = run_cli("embed", store, "--encoder", ref, "--mpp", "0.972", "--size", "96", "-o", tmp_path / "e")
    assert res.code == 0, res
    features = FeatureStore(tmp_path / "e" / "CMU-1-Small-Region.zarr")
    assert features.features.shape == (len(PatchStore.open(store)), 64)
    assert features.attrs["encoder"]["ref"] == ref and features.attrs["preprocessing"]["input_size"] == 160
    # the patches' mpp, though the hub encoder records none of its own
    assert features.attrs["preprocessing"]["mpp"] == 0.972 and features.attrs["encoder"]["mpp"] is None


def test_absent_gpu_is_one_line(example_slide: Path, tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    res = run_cli("embed", example_slide, "--encoder", "default", "--device", "cuda", "-o", tmp_path / "e")
    assert res.code == 1 and len(res.err_lines) == 1 and "cuda" in res.err_lines[0], res
    assert not (tmp_path / "e").exists()


def test_a_ctrl_c_while_embeddings_are_written_leaves_no_partial(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C while a feature store was written left OUT/<slide>.zarr.partial behind: a rerun that finds that
    slide up to date (the Ctrl-C stopped an overwrite of complete embeddings) skips it, so the partial stayed for
    good. It goes with the interrupted write now, and the complete store it was to replace is untouched."""
    import signal

    from wsi_screen.embedding import features

    target = tmp_path / "emb" / "slide.zarr"
    coords = np.arange(6, dtype=np.int64).reshape(3, 2)
    features.write_feature_store(target, np.ones((3, 4), np.float16), coords, {"mpp": 0.5, "size": 224})

    def ctrl_c(_work: Path) -> None:  # a real SIGINT, once the arrays are written and before the rename
        signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(features, "fsync_tree", ctrl_c)
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)  # as at a terminal, whatever runs the test
    try:
        with pytest.raises(KeyboardInterrupt):
            features.write_feature_store(target, np.zeros((3, 4), np.float16), coords, {"mpp": 0.5, "size": 224})
    finally:
        signal.signal(signal.SIGINT, handler)
    assert sorted(p.name for p in target.parent.iterdir()) == ["slide.zarr"]
    kept = FeatureStore(target)
    assert kept.features.tolist() == np.ones((3, 4)).tolist() and kept.coords.tolist() == coords.tolist()


def test_current_embeddings_are_reused_where_their_lock_cannot_be_taken(example_slide: Path, tmp_path: Path) -> None:
    """Embeddings are written under their lock (OUT/.wsi-screen-locks/, as patch stores are). A lock folder this
    user cannot write (a colleague's, in a shared OUT) does not fail a slide whose embeddings are complete and
    current: they are read without it, as a read-only folder's patch stores are; embeddings that would have to be
    written still fail, on one line."""
    from tests.corpus import can_drop_privileges, restore_permissions, unprivileged_cli_runs

    if not can_drop_privileges():
        pytest.skip("running as root without CAP_SETPCAP: permission bits cannot be made to apply")
    out = tmp_path / "emb"
    args = ["embed", str(example_slide), "--encoder", "default", "-o", str(out), "--workers", "0"]
    assert run_cli(*args, "--quiet").code == 0
    locks = out / ".wsi-screen-locks"
    assert (locks / "CMU-1-Small-Region.zarr.lock").exists()
    for path in [locks, *locks.iterdir()]:
        path.chmod(path.stat().st_mode & ~0o222)
    try:
        reused, other = unprivileged_cli_runs([args, [*args, "--dtype", "float32", "--overwrite"]])
    finally:
        restore_permissions(out)
    assert reused.returncode == 0, reused.stderr
    assert "1 slide(s): 0 embedded, 1 up to date, 0 failed" in reused.stderr
    assert other.returncode == 1 and "Traceback" not in other.stderr
    assert "CMU-1-Small-Region.zarr: cannot write the store: Permission denied" in other.stderr, other.stderr
    assert FeatureStore(out / "CMU-1-Small-Region.zarr").features.dtype == np.float16
