"""The public API (docs/api.md), called only through ``wsi_screen.<name>``, on the bundled example slide."""

from __future__ import annotations

import doctest
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import wsi_screen
from tests.conftest import REPO, read_results
from tests.corpus import corrupt_tiles, truncate
from wsi_screen.errors import (
    ConfigError,
    ModelMismatchError,
    SlideOpenError,
    SlideReadError,
    StoreError,
    UnknownModelError,
)

PUBLIC = ("open_slide", "Slide", "tissue_mask", "tile", "PatchStore", "load_model", "create_model", "score",
          "Scores", "call_slide", "SlideCall", "heatmap", "screen")


@pytest.fixture(scope="module")
def model() -> Any:
    return wsi_screen.load_model()


@pytest.fixture(scope="module")
def scores(example_slide: Path, model: Any) -> Any:
    with wsi_screen.open_slide(example_slide) as slide:
        return wsi_screen.score(slide, model)


# ------------------------------------------------------------------------------------------------ the names
def test_the_public_names_are_exported_lazily_and_documented() -> None:
    assert set(PUBLIC) <= set(wsi_screen.__all__) and set(PUBLIC) <= set(dir(wsi_screen))
    code = ("import sys, wsi_screen\n"
            "print(sorted(m for m in ('torch', 'zarr', 'openslide', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"  # importing the package loads none of the heavy libraries
    api_md = (REPO / "docs" / "api.md").read_text(encoding="utf-8")
    for name in PUBLIC:
        doc = getattr(wsi_screen, name).__doc__ or ""
        assert ">>> " in doc and "wsi_screen." in doc, f"{name}: no example through wsi_screen"
        assert f"`{name}" in api_md, f"docs/api.md does not describe {name}"
    for name in ("open_slide", "tissue_mask", "tile", "load_model", "score", "call_slide", "heatmap", "screen"):
        doc = getattr(wsi_screen, name).__doc__ or ""
        assert re.search(r"Parameters\n\s*-+\n", doc) and re.search(r"Examples\n\s*-+\n", doc), name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        wsi_screen.nope  # noqa: B018



def test_type_checkers_see_every_public_name_from_where_it_loads() -> None:
    """The names load lazily (``_LAZY``), which a type checker cannot follow: each was ``Any`` to mypy, pyright and
    editors. ``__init__`` imports each under ``TYPE_CHECKING`` from the module it loads from at run time (mypy
    checks their types in tests/api_types.py); the two lists agree, so no name is left ``Any``."""
    import ast

    from wsi_screen import _LAZY

    tree = ast.parse((REPO / "wsi_screen" / "__init__.py").read_text(encoding="utf-8"))
    (block,) = [n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"]
    typed = {}
    for node in block.body:
        assert isinstance(node, ast.ImportFrom) and node.module
        for alias in node.names:
            assert alias.asname == alias.name, f"{alias.name}: re-export it as itself (`as {alias.name}`)"
            typed[alias.name] = node.module
    assert typed == _LAZY
    assert "tests/api_types.py" in (REPO / "pyproject.toml").read_text(encoding="utf-8")  # mypy checks it

@pytest.mark.slow
def test_every_docstring_example_runs(monkeypatch: pytest.MonkeyPatch, example_slide: Path) -> None:
    """The ``>>>`` examples of the public names (and of the Slide methods) give what they show."""
    monkeypatch.chdir(REPO)  # the examples name examples/CMU-1-Small-Region.svs
    objects = [getattr(wsi_screen, n) for n in PUBLIC] + [
        wsi_screen.Slide.read_region, wsi_screen.Slide.read_at, wsi_screen.Slide.thumbnail]
    finder, runner = doctest.DocTestFinder(recurse=False), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    ran = 0
    for obj in objects:
        for test in finder.find(obj, getattr(obj, "__qualname__", str(obj)), globs={}):
            ran += len(test.examples)
            runner.run(test)
    assert runner.failures == 0, f"{runner.failures} docstring example(s) failed (see the output above)"
    assert ran >= 40


# ------------------------------------------------------------------------------------------------ the slide
def test_read_region_matches_openslide_pixel_for_pixel(example_slide: Path) -> None:
    import openslide

    ref = openslide.OpenSlide(str(example_slide))
    try:
        with wsi_screen.open_slide(example_slide) as slide:
            assert isinstance(slide, wsi_screen.Slide)
            assert slide.dimensions == ref.dimensions and len(slide.levels) == ref.level_count
            for location, size in [((0, 0), (300, 200)), ((1017, 1531), (512, 384)), ((1900, 2700), (320, 267))]:
                ours = slide.read_region(location, 0, size)
                rgba = np.asarray(ref.read_region(location, 0, size))
                assert ours.shape == (size[1], size[0], 3) and ours.dtype == np.uint8
                assert (rgba[..., 3] == 255).all()
                assert np.array_equal(ours, rgba[..., :3]), location
            with pytest.raises(ConfigError, match="`level` 1 does not exist"):
                slide.read_region((0, 0), 1, (8, 8))
    finally:
        ref.close()


def test_read_at_thumbnail_and_levels(example_slide: Path) -> None:
    with wsi_screen.open_slide(example_slide) as slide:
        assert slide.mpp == pytest.approx(0.499) and slide.levels[0].mpp == slide.mpp
        assert slide.levels[0].dimensions == slide.dimensions == (2220, 2967)
        # at level 0's own resolution read_at is read_region
        same = slide.read_at((500, 600), (64, 48), slide.mpp)
        assert np.array_equal(same, slide.read_region((500, 600), 0, (64, 48)))
        coarse = slide.read_at((500, 600), (100, 50), 4 * slide.mpp)  # 400 x 200 level-0 px, reduced 4 x
        assert coarse.shape == (50, 100, 3)
        full = slide.read_region((500, 600), 0, (400, 200)).reshape(50, 4, 100, 4, 3).mean(axis=(1, 3))
        assert np.abs(coarse - full).mean() < 4.0
        thumb = slide.thumbnail(8.0)
        assert thumb.shape == (round(2967 * 0.499 / 8), round(2220 * 0.499 / 8), 3)
        with pytest.raises(ConfigError, match="`mpp` must be a positive"):
            slide.read_at((0, 0), (8, 8), 0)


def test_impossible_resolutions_are_refused_and_clamps_are_warned_once(example_slide: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """thumbnail(0), tissue_mask(mpp=0.01), read_at finer than the scan and TissueSettings(min_od=-1) were clamped
    or accepted without a word."""
    import logging

    from wsi_screen.tiling.tissue import TissueSettings

    with wsi_screen.open_slide(example_slide) as slide, caplog.at_level(logging.WARNING, logger="wsi_screen"):
        for bad in (0, -1.0, float("nan"), "8"):
            with pytest.raises(ConfigError, match=r"^`mpp` must be a positive number of microns per pixel, got "):
                slide.thumbnail(bad)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match=r"got 0$"):
            wsi_screen.tissue_mask(slide, mpp=0)
        with pytest.raises(ConfigError, match=r"got -2$"):
            slide.read_at((0, 0), (8, 8), -2)
        assert caplog.records == []
        fine = slide.thumbnail(0.1)  # clamped to level 0, as documented, and warned of once
        assert fine.shape == (2967, 2220, 3) and slide.thumbnail(0.2).shape == fine.shape
        mask = wsi_screen.tissue_mask(slide, mpp=0.01)
        assert mask.mpp == slide.mpp and mask.labels.shape == (2967, 2220)
        up = slide.read_at((0, 0), (8, 8), 0.1)  # upsampled from level 0, as documented, and warned of once
        slide.read_at((8, 8), (8, 8), 0.1)
        assert up.shape == (8, 8, 3)
        assert slide.thumbnail(slide.mpp * 0.9999).shape == fine.shape  # rounding: level 0, no warning
    assert [r.getMessage() for r in caplog.records] == [
        f"{example_slide}: a thumbnail at 0.1 um/px would be finer than the slide's level 0; it is made at level 0's "
        "0.499 um/px",
        f"{example_slide}: a tissue mask at 0.01 um/px would be finer than the slide's level 0; it is made at level "
        "0's 0.499 um/px",
        f"{example_slide}: read_at at 0.1 um/px is finer than the slide's level 0 (0.499 um/px): the region is "
        "upsampled from level 0, which adds no detail"]
    with pytest.raises(ConfigError, match=r"^tissue setting `min_od` must be a number >= 0, got -1$"):
        TissueSettings(min_od=-1)
    with pytest.raises(ConfigError, match=r"^tissue setting `pen_min_saturation` must be a number from 0 to 1, got 2$"):
        TissueSettings(pen_min_saturation=2)
    with pytest.raises(ConfigError, match=r"`smooth_um` must be a number >= 0, got inf$"):
        TissueSettings(smooth_um=float("inf"))
    with pytest.raises(ConfigError, match="`min_od`"):
        TissueSettings.of({"min_od": -0.5})


# ------------------------------------------------------------------------------------------ tissue and tiles
def test_tile_in_memory_is_a_sequence_and_a_dataset(example_slide: Path) -> None:
    import torch

    with wsi_screen.open_slide(example_slide) as slide:
        mask = wsi_screen.tissue_mask(slide)
        store = wsi_screen.tile(slide, mpp=2.0, size=64)
        # patches are read_at of the slide at their coordinates (no stain normalisation)
        for i in (0, len(store) // 2, len(store) - 1):
            assert np.array_equal(store[i], slide.read_at(tuple(store.coords[i]), (64, 64), 2.0))
    assert mask.labels.shape == store.mask.shape and np.array_equal(mask.labels, store.mask)
    assert 0.2 < mask.tissue_fraction < 0.6
    assert store.location.startswith("memory://") and len(store) == 34
    assert store[3].shape == (64, 64, 3) and store[3].dtype == np.uint8
    patches = list(store)
    assert len(patches) == len(store) and np.array_equal(np.stack(patches), store[:])
    assert np.array_equal(store[[5, 1]], np.stack([store[5], store[1]]))
    assert store.coords.shape == (34, 2)

    data = store.as_dataset(transform=lambda p: torch.from_numpy(p).permute(2, 0, 1).float() / 255)
    batches = list(torch.utils.data.DataLoader(data, batch_size=16))
    assert [tuple(b.shape) for b in batches] == [(16, 3, 64, 64), (16, 3, 64, 64), (2, 3, 64, 64)]
    assert torch.equal(batches[0][2], torch.from_numpy(store[2]).permute(2, 0, 1).float() / 255)
    with pytest.raises(StoreError, match="in memory cannot be sent to another process"):
        import pickle

        pickle.dumps(data)

    import fsspec

    fs = fsspec.filesystem("memory")
    where = store.location.removeprefix("memory://")
    assert fs.exists(where)
    del store, data, patches, batches
    import gc

    gc.collect()
    assert not fs.exists(where)  # the store in memory goes with the last reference to it


def test_tile_can_keep_coordinates_only_as_the_cli_does(example_slide: Path, model: Any, scores: Any,
                                                         tmp_path: Path) -> None:
    """`wsi-screen tile --pixels none` had no API counterpart; tile(pixels=False) is it (TileConfig.pixels)."""
    with wsi_screen.open_slide(example_slide) as slide:
        kept = wsi_screen.tile(slide, mpp=2.0, size=64)
        coords_only = wsi_screen.tile(slide, mpp=2.0, size=64, pixels=False)
        on_disk = wsi_screen.tile(slide, tmp_path / "coords", mpp=2.0, size=64, pixels=False)
        with pytest.raises(ConfigError, match=r"^`pixels` is True \(the patches are kept\) or False \(coordinates "
                                              r"only\), not 'none'$"):
            wsi_screen.tile(slide, mpp=2.0, size=64, pixels="none")  # type: ignore[arg-type]
        # how pixels are kept, given for a store that keeps none: refused as `tile --pixels none --codec` is
        # (both were accepted and ignored here), nothing written
        with pytest.raises(ConfigError, match=r"^`codec` says how patch pixels are kept, and `pixels=False` keeps "
                                              r"none \(a coordinates-only store\): drop it, or use `pixels=True`$"):
            wsi_screen.tile(slide, tmp_path / "refused", mpp=2.0, size=64, pixels=False, codec="lz4")
        with pytest.raises(ConfigError, match=r"^`codec` and `quality` say how .* drop them, or use `pixels=True`$"):
            wsi_screen.tile(slide, mpp=2.0, size=64, pixels=False, codec="jpeg", quality=90)
        with pytest.raises(ConfigError, match=r"^`quality` says how "):
            wsi_screen.tile(slide, mpp=2.0, size=64, pixels=False, quality=80)
        assert not (tmp_path / "refused").exists()
        for_model = wsi_screen.tile(slide, mpp=model.spec.mpp, size=model.spec.input_size, pixels=False)
    assert kept.has_pixels and not coords_only.has_pixels and not on_disk.has_pixels
    assert coords_only.attrs["settings"]["pixels"] == "none" and coords_only.codec is None
    assert not (Path(on_disk.location) / "patches").exists()
    assert np.array_equal(coords_only.coords, kept.coords)
    with coords_only, on_disk:  # close() closes the slide reader a coordinates-only store opened to read
        assert np.array_equal(coords_only[:], kept[:]) and np.array_equal(on_disk[:], kept[:])  # from the slide
    # its patches are the slide's: the scores are score(slide)'s
    with for_model:
        assert np.array_equal(wsi_screen.score(for_model, model).probabilities, scores.probabilities)


def test_a_slide_without_tissue_gives_an_empty_store_and_says_so_without_writing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An in-memory tile logged "writing an empty store" though nothing was written to disk."""
    import logging

    from tests.factory import block_image, write_tiled_tiff

    glass = write_tiled_tiff(tmp_path / "glass.tif", block_image((1024, 1024), []), 0.5)
    with caplog.at_level(logging.WARNING, logger="wsi_screen"), wsi_screen.open_slide(glass) as slide:
        store = wsi_screen.tile(slide, mpp=2.0, size=64)
    assert len(store) == 0
    assert [r.getMessage() for r in caplog.records] == [
        "glass: no tissue found (min tissue 0.50); the store holds no patches"]


def test_tile_into_a_folder_reuses_and_pickles(example_slide: Path, tmp_path: Path) -> None:
    import pickle

    with wsi_screen.open_slide(example_slide) as slide:
        store = wsi_screen.tile(slide, tmp_path / "stores", mpp=2.0, size=64, stain="macenko")
        again = wsi_screen.tile(slide, tmp_path / "stores", mpp=2.0, size=64, stain="macenko")  # reused
        assert store.location == again.location == str(tmp_path / "stores" / "CMU-1-Small-Region.zarr")
        with pytest.raises(StoreError, match="other settings"):
            wsi_screen.tile(slide, tmp_path / "stores", mpp=2.0, size=64)
    assert store.attrs["stain"]["method"] == "macenko" and len(store) == 34
    data = pickle.loads(pickle.dumps(store.as_dataset()))
    assert np.array_equal(data[7], store[7])


def test_tile_raises_on_a_corrupt_file(slides_dir: Path, tmp_path: Path) -> None:
    svs = slides_dir / "CMU-1-Small-Region.svs"
    bad = corrupt_tiles(svs, tmp_path / "corrupt-tiles.svs", range(40, 80))
    with wsi_screen.open_slide(bad) as slide, pytest.raises(SlideReadError, match="corrupt"):
        wsi_screen.tile(slide, tmp_path / "stores", mpp=1.0, size=64)
    assert not list((tmp_path / "stores").glob("*.zarr"))  # nothing that looks finished
    cut = truncate(svs, tmp_path / "cut.svs", svs.stat().st_size * 2 // 3)
    with pytest.raises(SlideOpenError):
        wsi_screen.open_slide(cut)


def test_tile_slide_raises_unless_told_to_record(slides_dir: Path, tmp_path: Path) -> None:
    from wsi_screen.slide.discovery import SlideSource
    from wsi_screen.tiling.grid import TileSpec
    from wsi_screen.tiling.pipeline import TileConfig, tile_slide

    bad = corrupt_tiles(slides_dir / "CMU-1-Small-Region.svs", tmp_path / "corrupt.svs", range(40, 80))
    source, config = SlideSource(bad, "corrupt"), TileConfig(spec=TileSpec(mpp=1.0, size_px=64))
    with pytest.raises(SlideReadError, match="corrupt"):
        tile_slide(source, str(tmp_path / "out"), config)  # the library's default
    recorded = tile_slide(source, str(tmp_path / "out"), config, on_error="record")  # a command's batch policy
    assert recorded.status == "failed" and "corrupt" in recorded.message
    with pytest.raises(ConfigError, match="on_error"):
        tile_slide(source, str(tmp_path / "out"), config, on_error="ignore")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ model and scores
def test_load_model_by_name_or_folder(model: Any) -> None:
    from wsi_screen.models import default_model_dir

    assert model.model_dir == default_model_dir()
    named = wsi_screen.load_model("default", precision="fp32")
    assert named.model_dir == default_model_dir() and named.precision == "fp32"
    assert wsi_screen.load_model(default_model_dir()).spec == model.spec


def test_create_model_builds_an_untrained_architecture() -> None:
    import torch

    net = wsi_screen.create_model("screen_cnn32", num_classes=3)
    assert tuple(net(torch.zeros(2, 3, 32, 32)).shape) == (2, 3)
    with pytest.raises(UnknownModelError, match="resnet18"):
        wsi_screen.create_model("resnet18x", num_classes=2)


def test_score_is_aligned_with_the_store(scores: Any, model: Any) -> None:
    assert isinstance(scores, wsi_screen.Scores) and isinstance(scores.store, wsi_screen.PatchStore)
    assert len(scores) == len(scores.store) == 66
    assert scores.probabilities.shape == (66, 2) and scores.probabilities.dtype == np.float32
    assert np.allclose(scores.probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert np.array_equal(scores.coords, scores.store.coords)
    assert scores.domain_distance is not None and scores.domain_distance.shape == (66,)
    top = scores.top(5)
    assert scores.positive[top[0]] == scores.positive.max()
    assert list(scores.positive[top]) == sorted(scores.positive[top], reverse=True)
    # scoring the store again gives the same numbers; the model keeps its own decision thresholds
    before = model.decision_thresholds
    again = wsi_screen.score(scores.store, model)
    assert np.array_equal(again.probabilities, scores.probabilities) and model.decision_thresholds == before


def test_scoring_a_jpeg_store_says_its_scores_are_not_the_slides(example_slide: Path, model: Any, scores: Any,
                                                                  tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A store written to a folder is JPEG by default: its scores differ from the slide's, and score() says so in
    one log record (the in-memory store of score(slide) is lz4: silent)."""
    import logging

    with wsi_screen.open_slide(example_slide) as slide:
        store = wsi_screen.tile(slide, tmp_path / "stores", mpp=0.972, size=96)
    with caplog.at_level(logging.WARNING, logger="wsi_screen"):
        jpeg = wsi_screen.score(store, model)
        wsi_screen.score(scores.store, model)
    lossy = [r.getMessage() for r in caplog.records if "compressed" in r.getMessage()]
    assert lossy == [f"{store.location}: scoring the JPEG-compressed patches of a store (quality 90): the results "
                     "differ from those of the slide's own pixels, enough to move a result near its threshold; lz4 or "
                     "coordinates-only stores give exactly those"]
    assert np.array_equal(jpeg.coords, scores.coords)  # the same patch grid, not the same pixels
    # docs/api.md shows this warning as it is logged, and by which logger
    api_md = (REPO / "docs" / "api.md").read_text(encoding="utf-8")
    assert f"<store>: {store.lossy_note('scoring')}\n" in api_md
    assert {r.name for r in caplog.records if "compressed" in r.getMessage()} == {"wsi_screen.screening.api"}
    assert "logger `wsi_screen.screening.api`, level `WARNING`" in api_md
    assert 0 < np.abs(jpeg.positive - scores.positive).max() < 0.2


def test_score_refuses_a_store_cut_for_another_model(example_slide: Path, model: Any) -> None:
    with wsi_screen.open_slide(example_slide) as slide:
        store = wsi_screen.tile(slide, mpp=2.0, size=64)
    with pytest.raises(ModelMismatchError, match=r"2 um/px instead of 0\.972"):
        wsi_screen.score(store, model)
    with pytest.raises(ConfigError, match="PatchStore or an open Slide"):
        wsi_screen.score(str(example_slide), model)


def test_bad_api_input_is_one_clear_error(example_slide: Path, slides_dir: Path, scores: Any, model: Any,
                                          tmp_path: Path) -> None:
    """Each of these raised a raw Python error (ValueError, AttributeError, KeyError, ZeroDivision...) from inside
    the package; now a WsiScreenError of one line naming the parameter, or the call is accepted."""
    from wsi_screen.embedding.features import write_feature_store
    from wsi_screen.errors import MissingMppError, WsiScreenError
    from wsi_screen.tiling.tissue import TissueSettings

    def one_line(exc: pytest.ExceptionInfo[WsiScreenError]) -> str:
        text = str(exc.value)
        assert "\n" not in text
        return text

    with wsi_screen.open_slide(example_slide) as slide:
        with pytest.raises(ConfigError) as png:
            wsi_screen.tile(slide, mpp=2.0, size=64, codec="png")
        assert one_line(png) == "`codec` 'png' is not a patch codec; choose one of lz4, jpeg, jpegxl"
        with pytest.raises(ConfigError) as quality:
            wsi_screen.tile(slide, mpp=2.0, size=64, codec="jpeg", quality=500)
        assert one_line(quality) == "`quality` 500 is not a quality of JPEG: give a whole number from 1 to 100"
        by_slide = wsi_screen.tile(slide, mpp=2.0, size=64)
        # tissue settings as a dict of some fields, as TissueSettings
        as_dict = wsi_screen.tissue_mask(slide, settings={"min_od": 0.15})
        faint = wsi_screen.tissue_mask(slide, settings=TissueSettings(min_od=0.15))
        assert np.array_equal(as_dict.labels, faint.labels)
        with pytest.raises(ConfigError) as unknown:
            wsi_screen.tissue_mask(slide, settings={"min_odd": 0.15})
        assert one_line(unknown).startswith("no tissue setting is called 'min_odd'; they are min_chroma, min_od, ")
        with pytest.raises(ConfigError) as not_settings:
            wsi_screen.tile(slide, mpp=2.0, size=64, tissue=0.15)  # type: ignore[arg-type]
        assert one_line(not_settings) == ("tissue settings are a TissueSettings or a dict of its fields "
                                          "({'min_od': 0.15}), not 0.15 (float)")
        # score takes a model by name, as screen does
        assert np.array_equal(wsi_screen.score(slide, "default").probabilities, scores.probabilities)
    # tile takes a path as screen does (AttributeError: 'str' object has no attribute 'name')
    by_path = wsi_screen.tile(str(example_slide), mpp=2.0, size=64)
    assert np.array_equal(by_path.coords, by_slide.coords) and np.array_equal(by_path[:], by_slide[:])
    with pytest.raises(ConfigError, match=r"^`tile` takes an open Slide or a slide's path, not 7 \(int\)$"):
        wsi_screen.tile(7, mpp=2.0, size=64)  # type: ignore[arg-type]
    with pytest.raises(MissingMppError) as no_mpp:
        wsi_screen.tile(slides_dir / "TCGA-CR-7395-01A-01-TS1.svs", mpp=2.0, size=64)
    assert one_line(no_mpp).endswith("set `mpp` (e.g. `mpp`=0.25 for a 40x scan); `tile`'s own `mpp` is the patches' "
                                     "resolution: pass `tile` the slide opened with "
                                     "`wsi_screen.open_slide(path, mpp=...)`")
    with pytest.raises(ConfigError) as batch:
        wsi_screen.score(scores.store, model, batch_size=0)
    assert one_line(batch) == "`batch_size` must be a whole number of patches, at least 1; got 0"
    # an embeddings store opened as a patch store (KeyError: 'patch_size')
    features = write_feature_store(tmp_path / "emb" / "slide.zarr", np.zeros((2, 4), np.float16),
                                   np.zeros((2, 2), np.int64), {"mpp": 0.5, "size": 224})
    with pytest.raises(StoreError) as embeddings:
        wsi_screen.PatchStore.open(features)
    assert one_line(embeddings) == (f"{features}: an embeddings store (the features `wsi-screen embed` writes), not a "
                                    "patch store; open it with `wsi_screen.embedding.features.FeatureStore(path)`")


# ---------------------------------------------------------------------------------------- call and heatmap
def test_screen_gives_infer_s_call(demo_run: Path, example_slide: Path, scores: Any, model: Any) -> None:
    """screen(path) and `wsi-screen infer` on the same slide: the same row of results.csv."""
    row = read_results(demo_run)["CMU-1-Small-Region"]
    call = wsi_screen.screen(example_slide)
    assert isinstance(call, wsi_screen.SlideCall)
    assert call.diagnosis == row["diagnosis"] and f"{call.score:.6f}" == row["score"]
    assert call.aggregate.rule == row["rule"] and f"{call.threshold:.6g}" == row["threshold"]
    assert call.metastasis == row["metastasis"] and str(call.n_patches) == row["n_patches"]
    assert str(len(call.foci)) == row["n_foci"] == str(call.result.n_foci)
    assert f"{call.in_domain_fraction:.4f}" == row["in_domain_fraction"]
    assert str(call.out_of_domain).lower() == row["out_of_domain"]
    # the steps give the same call as screen()
    steps = wsi_screen.call_slide(scores, model)
    assert steps.to_json() == call.to_json()


def test_call_slide_overrides_and_foci(scores: Any, model: Any) -> None:
    call = wsi_screen.call_slide(scores, model, rule="max", threshold=0.01)
    assert call.rule == "max" and call.threshold == 0.01 and call.diagnosis == "tumour"
    assert call.score == pytest.approx(float(scores.positive.max()), abs=1e-6)
    # foci are regions of >= min_focus_patches (6) at p >= 0.8 whatever the rule: this slide's largest has 5, so
    # the max call has none; its evidence is the highest patch
    assert call.aggregate.call_patch_threshold == 0.8 and call.aggregate.min_focus_patches == 6
    assert call.foci == () and call.metastasis == "none" and call.largest_focus_mm == 0.0
    assert call.result.evidence_indices == (int(np.argmax(scores.positive)),)
    # patch counts: at the call's patch threshold (the pictures' tumour tiles), and at the model's own
    p = np.round(scores.positive, 6)
    assert call.result.n_call_positive == int(np.sum(p >= 0.8))
    assert call.result.n_positive_patches == int(np.sum(p >= call.aggregate.patch_threshold))
    assert call.aggregate.patch_threshold == pytest.approx(0.2133, abs=1e-4)
    region = wsi_screen.call_slide(scores, model, rule="region", threshold=0.01)  # the largest region always counts
    assert region.diagnosis == "tumour" and region.foci and region.foci[0].n_patches == 5
    assert region.foci[0].n_patches == max(f.n_patches for f in region.foci)
    assert region.metastasis in ("itc", "micro", "macro")
    assert region.largest_focus_mm == pytest.approx(region.foci[0].longest_axis_mm)
    assert region.tumour_area_mm2 == pytest.approx(sum(f.area_mm2 for f in region.foci))
    assert region.result.evidence_indices == ()  # its evidence is its largest focus
    assert repr(region).endswith(f", {region.metastasis}, {len(region.foci)} "
                                 f"{'focus' if len(region.foci) == 1 else 'foci'}, 35% in domain)")
    topk = wsi_screen.call_slide(scores, model, rule="topk", k=3)
    assert topk.rule == "topk (k = 3)" and topk.score == pytest.approx(np.sort(scores.positive)[-3:].mean(), abs=1e-6)
    assert "SlideCall('CMU-1-Small-Region': tumour" in repr(call)
    from wsi_screen.models import PatchClassifier

    in_memory = PatchClassifier(model.module, model.spec)  # no folder: the fallback rule, overrides still apply
    assert wsi_screen.call_slide(scores, in_memory).rule == "topk (k = 5)"
    fallback = wsi_screen.call_slide(scores, in_memory, rule="max", threshold=0.01)
    assert (fallback.rule, fallback.threshold, fallback.diagnosis) == ("max", 0.01, "tumour")
    assert fallback.score == call.score


def test_call_slide_refuses_scores_of_another_model(scores: Any, model: Any, tmp_path: Path) -> None:
    """Scores carry the sha256 of the model that made them: model B's rule on model A's scores was a silently
    wrong call."""
    import shutil

    from wsi_screen.models import default_model_dir
    from wsi_screen.screening.run import model_identity

    assert scores.model_sha256 == model_identity(default_model_dir(), model)["sha256"]
    assert scores.model_dir == default_model_dir()
    same = wsi_screen.load_model(default_model_dir())  # another load of the same folder: the same identity
    assert wsi_screen.call_slide(scores, same).to_json() == wsi_screen.call_slide(scores, model).to_json()
    folder = tmp_path / "other"
    shutil.copytree(default_model_dir(), folder)
    config = folder / "config.json"
    config.write_text(config.read_text(encoding="utf-8") + "\n", encoding="utf-8")  # other bytes, other model
    other = wsi_screen.load_model(folder)
    found = model_identity(folder, other)["sha256"]
    with pytest.raises(ModelMismatchError) as caught:
        wsi_screen.call_slide(scores, other)
    message = str(caught.value)
    assert message == (f"these scores of CMU-1-Small-Region were made by the model {default_model_dir()} (sha256 "
                       f"{scores.model_sha256[:12]}), not by {folder} (sha256 {found[:12]}): pass `call_slide` the "
                       "model that scored them, or score the slide again with this one")
    assert "\n" not in message and found[:12] != scores.model_sha256[:12]


def test_call_slide_refuses_a_bad_k_before_warning_about_it(scores: Any, model: Any,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """k=0 was warned of (not the calibrated k) and then refused; now only refused, naming `k` as a parameter."""
    import logging

    with caplog.at_level(logging.WARNING, logger="wsi_screen"), pytest.raises(ConfigError) as bad:
        wsi_screen.call_slide(scores, model, rule="topk", k=0)
    assert str(bad.value) == "top-k `k` must be a whole count >= 1 or a share in (0, 1), got 0"
    assert caplog.records == []
    with caplog.at_level(logging.WARNING, logger="wsi_screen"):
        wsi_screen.call_slide(scores, model, rule="topk", k=3)  # a good k other than the calibrated one: warned
    assert [r.getMessage()[:40] for r in caplog.records] == ["`k`=3 is not the k the slide threshold 0"]


def test_call_slide_refuses_k_for_a_rule_that_reads_none(scores: Any, model: Any) -> None:
    """call_slide(rule="max", k=3) ignored k without a word, as `infer --aggregate region --k 3` did."""
    for rule in ("max", None):  # None: the bundled model's calibrated rule, region
        with pytest.raises(ConfigError) as bad:
            wsi_screen.call_slide(scores, model, rule=rule, k=3)
        assert str(bad.value) == (f"`k` is read by the topk rule only, and the slide rule is {rule or 'region'}: drop "
                                  "`k`, or set `rule` to topk")


def test_a_fallback_rule_is_warned_of_once_per_model_folder(scores: Any, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """A model folder without slide_rule.json: the API said so on every call (five times in one script)."""
    import logging
    import shutil

    from wsi_screen.models import default_model_dir

    folder = tmp_path / "uncalibrated"
    shutil.copytree(default_model_dir(), folder, ignore=shutil.ignore_patterns("slide_rule.json"))
    uncalibrated = wsi_screen.load_model(folder)
    with caplog.at_level(logging.WARNING, logger="wsi_screen"):
        calls = [wsi_screen.call_slide(scores, uncalibrated) for _ in range(3)]
    assert {c.rule for c in calls} == {"topk (k = 5)"}
    assert [r.getMessage() for r in caplog.records if "fallback" in r.getMessage()] == [
        f"{folder}: no slide_rule.json; using the fallback rule topk with slide threshold 0.50"]


def test_slide_call_to_json_is_a_dict_of_json_values(scores: Any, model: Any) -> None:
    """docs/api.md: `to_json()` gives a dict (not a string); json.dumps of it is the text."""
    import json

    call = wsi_screen.call_slide(scores, model, rule="max", threshold=0.01)
    data = call.to_json()
    text = json.dumps(data)
    assert isinstance(data, dict) and set(json.loads(text)) == set(data)
    assert data["slide"] == "CMU-1-Small-Region" and len(data["foci"]) == len(call.foci)
    assert data["in_domain_fraction"] == call.in_domain_fraction and data["out_of_domain"] == call.out_of_domain
    # the keys that the attributes name otherwise, as the docstring and docs/api.md state them (keys unchanged)
    assert data["slide_threshold"] == data["aggregate"]["slide_threshold"] == call.threshold == call.slide_threshold
    assert data["rule"] == call.aggregate.rule == "max" and call.rule == "max"
    assert "``slide_threshold`` is :attr:`threshold`" in " ".join((type(call).to_json.__doc__ or "").split())
    api_md = " ".join((REPO / "docs" / "api.md").read_text(encoding="utf-8").split())
    assert '`"slide_threshold"` is `call.threshold`' in api_md


def test_tissue_mask_repr_is_short(example_slide: Path) -> None:
    """The repr printed both whole label arrays (thousands of lines in a notebook)."""
    with wsi_screen.open_slide(example_slide) as slide:
        mask = wsi_screen.tissue_mask(slide)
    assert repr(mask) == "TissueMask(shape=(1024, 766), mpp=1.44583, tissue_fraction=0.383)"


def test_tissue_settings_live_where_the_docs_say() -> None:
    """docs/api.md: `TissueSettings` is imported from wsi_screen.tiling.tissue (not a name of wsi_screen)."""
    from wsi_screen.tiling.tissue import TissueSettings

    api_md = (REPO / "docs" / "api.md").read_text(encoding="utf-8")
    assert "from wsi_screen.tiling.tissue import TissueSettings" in api_md and "TissueSettings()" not in api_md
    assert TissueSettings(min_od=0.15).min_od == 0.15



def test_heatmap_is_a_figure_of_the_slide(example_slide: Path, scores: Any, model: Any, tmp_path: Path) -> None:
    from matplotlib.figure import Figure

    call = wsi_screen.call_slide(scores, model, rule="max", threshold=0.01)  # positive by its highest patch
    with wsi_screen.open_slide(example_slide) as slide:
        fig = wsi_screen.heatmap(slide, scores, call)
        finer = wsi_screen.heatmap(slide, scores, call, mpp=4.0)
        # the region rule at 0.01 mm^2: its largest region (5 patches at p >= 0.8) is its score and its focus
        by_region = wsi_screen.heatmap(slide, scores, wsi_screen.call_slide(scores, model, rule="region",
                                                                            threshold=0.01))
    assert isinstance(fig, Figure)
    assert fig.axes[1].get_title() == "P(tumour) overlay"
    # as infer's heatmap.png: the call in the title, the focus threshold (never the model's 0.213), the call's
    # evidence; a region of 5 patches at p >= 0.8 is no focus (min_focus_patches 6) under the max rule
    assert fig.texts[0].get_text().startswith("CMU-1-Small-Region: TUMOUR | no focus (P(tumour) >= 0.8, >= 6")
    assert "score 0.967 >= 0.010 (rule: max)" in fig.texts[0].get_text()
    assert call.foci == () and call.metastasis == "none" and len(call.result.evidence_indices) == 1
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "inside cyan: P(tumour) >= 0.8 (the focus threshold)" in labels, labels
    assert "call evidence: highest patch, P(tumour) 0.967 >= 0.010" in labels, labels
    assert not any("0.213" in text for text in labels), labels
    region_labels = [t.get_text() for t in by_region.legends[0].get_texts()]
    # the outlined focus has 5 patches: the legend says it counts as the largest region, under the focus size
    assert "1 focus counted (largest bold): P(tumour) >= 0.8, >= 6 patches, and the largest region (5 patches)" \
        in region_labels, region_labels
    assert "inside cyan: P(tumour) >= 0.8 (the call's patch threshold)" in region_labels, region_labels
    assert finer.axes[0].get_images()[0].get_array().shape[:2] != fig.axes[0].get_images()[0].get_array().shape[:2]
    fig.savefig(tmp_path / "heatmap.png")
    assert (tmp_path / "heatmap.png").stat().st_size > 10_000
    store_only = wsi_screen.heatmap(None, scores, call)  # the store's thumbnail
    assert np.array_equal(store_only.axes[0].get_images()[0].get_array(), fig.axes[0].get_images()[0].get_array())


def test_heatmap_refuses_another_slide(slides_dir: Path, scores: Any, model: Any) -> None:
    call = wsi_screen.call_slide(scores, model)
    with wsi_screen.open_slide(slides_dir / "camelyon-lowres.dcm") as other, \
            pytest.raises(ConfigError, match="scores are of another slide"):
        wsi_screen.heatmap(other, scores, call)


def test_heatmap_refuses_another_slides_call(slides_dir: Path, example_slide: Path, scores: Any, model: Any) -> None:
    """The call of another slide was drawn over these scores without a word: its title, its foci and evidence at
    its own patch indices."""
    with wsi_screen.open_slide(slides_dir / "TCGA-CR-7395-01A-01-TS1.svs", mpp=0.25) as other:
        theirs = wsi_screen.call_slide(wsi_screen.score(other, model), model)
    assert theirs.n_patches == 73 and len(scores) == 66
    with wsi_screen.open_slide(example_slide) as slide:
        for background in (slide, None):
            with pytest.raises(ConfigError) as bad:
                wsi_screen.heatmap(background, scores, theirs)
            assert str(bad.value) == ("`call` is another slide's (TCGA-CR-7395-01A-01-TS1, 73 patches; these scores "
                                      "are CMU-1-Small-Region's, 66 patches): pass call_slide(scores) of these scores")


def test_a_failed_tile_leaves_nothing_in_memory(example_slide: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fsspec

    from wsi_screen.tiling import pipeline

    def unreadable(*args: object, **kwargs: object) -> None:
        raise SlideReadError("a tile that cannot be decoded")  # after the thumbnail was written to the store

    monkeypatch.setattr(pipeline, "read_patches", unreadable)
    fs = fsspec.filesystem("memory")
    before = set(fs.find("/wsi-screen"))
    with wsi_screen.open_slide(example_slide) as slide, pytest.raises(SlideReadError, match="cannot be decoded"):
        wsi_screen.tile(slide, mpp=2.0, size=64)
    assert set(fs.find("/wsi-screen")) == before


def test_a_closed_slide_refuses_every_read(example_slide: Path, slides_dir: Path, model: Any) -> None:
    """A closed Slide's reader had freed its file descriptor: a read went to whatever file took it next (another
    slide, blamed as "corrupt JPEG data"), or failed with EBADF; tile and score of it ran on. Now every read refuses."""
    from wsi_screen.errors import SlideClosedError

    slide = wsi_screen.open_slide(example_slide)
    slide.close()
    slide.close()  # twice is harmless
    message = f"{example_slide} is closed; open it again with open_slide"
    with wsi_screen.open_slide(slides_dir / "CMU-1-Small-Region.pyramid.tif"):  # may take the freed descriptor
        reads = (lambda: slide.read_region((1500, 2000), 0, (256, 256)), lambda: slide.read_at((0, 0), (96, 96), 1.0),
                 lambda: slide.thumbnail(8.0), lambda: wsi_screen.tissue_mask(slide),
                 lambda: wsi_screen.tile(slide, mpp=2.0, size=64), lambda: wsi_screen.score(slide, model))
        for read in reads:
            with pytest.raises(SlideClosedError) as closed:
                read()
            assert str(closed.value) == message
    assert slide.closed and repr(slide).endswith(", aperio, closed)") and slide.dimensions == (2220, 2967)


@pytest.mark.parametrize("kwargs, message", [
    ({"mpp": 0}, "`mpp` must be a positive number of microns per pixel, got 0"),
    ({"mpp": -1}, "`mpp` must be a positive number of microns per pixel, got -1"),
    ({"mpp": float("nan")}, "`mpp` must be a positive number of microns per pixel, got nan"),
    ({"mpp": "0.5"}, "`mpp` must be a positive number of microns per pixel, got '0.5'"),
    ({"mpp": True}, "`mpp` must be a positive number of microns per pixel, got True"),
    ({"force_mpp": 0}, "`force_mpp` must be a positive number of microns per pixel, got 0"),
    ({"reader": "bogus"}, "`reader` must be one of auto, openslide, tifffile; got 'bogus'"),
    ({"reader": 5}, "`reader` must be one of auto, openslide, tifffile; got 5"),
])
@pytest.mark.parametrize("declares", [True, False])
def test_open_slide_checks_mpp_and_reader_up_front(example_slide: Path, slides_dir: Path, declares: bool,
                                                   kwargs: dict[str, Any], message: str) -> None:
    """These were accepted silently on a slide that declares its resolution (and taken as 1.0, or a MissingMppError,
    on one that does not): api.md says every mpp must be a positive number."""
    path = example_slide if declares else slides_dir / "TCGA-CR-7395-01A-01-TS1.svs"
    with pytest.raises(ConfigError) as bad:
        wsi_screen.open_slide(path, **kwargs)
    assert str(bad.value) == message


BAD_ARGUMENTS: list[tuple[str, Any, str]] = [
    # (what, the call given slide, scores and store, the message); each raised a raw Python error before
    ("tissue_mask(3)", lambda sl, sc, st: wsi_screen.tissue_mask(3),
     "`tissue_mask` takes an open Slide or a slide's path, not 3 (int)"),
    ("open_slide(3)", lambda sl, sc, st: wsi_screen.open_slide(3),
     "`path` must be a path (a str or a pathlib.Path), not 3 (int)"),
    ("open_slide(None)", lambda sl, sc, st: wsi_screen.open_slide(None),
     "`path` must be a path (a str or a pathlib.Path), not None (NoneType)"),
    # a name that is no str was taken as the slide's name
    ("open_slide name=3", lambda sl, sc, st: wsi_screen.open_slide(sl.path, name=3),
     "`name` must be a str (or None: the file's), not 3 (int)"),
    ("load_model(5)", lambda sl, sc, st: wsi_screen.load_model(5),
     "`path_or_name` must be a model folder (or its config.json), a model name or None, not 5 (int)"),
    ("screen(5)", lambda sl, sc, st: wsi_screen.screen(5),
     "`path` must be a slide's path or an open Slide, not 5 (int)"),
    ("tile size=96.5", lambda sl, sc, st: wsi_screen.tile(sl, mpp=1, size=96.5),
     "`size` must be a whole number of pixels, at least 8; got 96.5"),
    ("tile size='96'", lambda sl, sc, st: wsi_screen.tile(sl, mpp=1, size="96"),
     "`size` must be a whole number of pixels, at least 8; got '96'"),
    ("tile mpp='1'", lambda sl, sc, st: wsi_screen.tile(sl, mpp="1", size=96),
     "`mpp` must be a positive number of microns per pixel, got '1'"),
    ("tile overlap=1.5", lambda sl, sc, st: wsi_screen.tile(sl, mpp=1, size=96, overlap=1.5),
     "`overlap` must be a whole number of pixels, at least 0; got 1.5"),
    ("tile min_tissue='x'", lambda sl, sc, st: wsi_screen.tile(sl, mpp=1, size=96, min_tissue="x"),
     "`min_tissue` must be a number in [0, 1], got 'x'"),
    ("call_slide('x')", lambda sl, sc, st: wsi_screen.call_slide("x"),
     "`scores` must be the Scores of wsi_screen.score, not 'x' (str)"),
    ("heatmap(sl, sc, None)", lambda sl, sc, st: wsi_screen.heatmap(sl, sc, None),
     "`call` must be the SlideCall of wsi_screen.call_slide, not None (NoneType)"),
    ("heatmap('x', sc, call)", lambda sl, sc, st: wsi_screen.heatmap("x", sc, None),
     "`slide` must be the open Slide the scores come from, or None, not 'x' (str)"),
    ("call_slide threshold='0.5'", lambda sl, sc, st: wsi_screen.call_slide(sc, threshold="0.5"),
     "the region rule's `threshold` is an area in mm² >= 0, got '0.5'"),
    ("score('x')", lambda sl, sc, st: wsi_screen.score("x"),
     "`store_or_slide` must be a PatchStore or an open Slide, not 'x' (str)"),
    # named as call_slide's parameter, not as the rule's field (slide_threshold)
    ("call_slide max threshold=2", lambda sl, sc, st: wsi_screen.call_slide(sc, rule="max", threshold=2),
     "`threshold` must be a number in [0, 1], got 2"),
    # a store's index: "a" was a ValueError; 1.5 and True were cast to patch 1
    ("store['a']", lambda sl, sc, st: st["a"],
     "`index` of a store's patches is an integer, a slice or a list of integers, not 'a' (str)"),
    ("store[1.5]", lambda sl, sc, st: st[1.5],
     "`index` of a store's patches is an integer, a slice or a list of integers, not 1.5 (float)"),
    ("store[True]", lambda sl, sc, st: st[True],
     "`index` of a store's patches is an integer, a slice or a list of integers, not True (bool)"),
    ("store[[0.5]]", lambda sl, sc, st: st[[0.5]],
     "`index` of a store's patches is an integer, a slice or a list of integers, not [0.5] (list)"),
]


@pytest.mark.parametrize("what, call, message", BAD_ARGUMENTS, ids=[b[0] for b in BAD_ARGUMENTS])
def test_a_wrong_argument_type_is_a_config_error_naming_it(example_slide: Path, scores: Any, what: str, call: Any,
                                                           message: str) -> None:
    """These escaped as TypeError, AttributeError or ValueError from inside the package (or were cast silently);
    each public entry point now checks its arguments (the checks of wsi_screen/errors.py) and names the one at fault."""
    with wsi_screen.open_slide(example_slide) as slide, pytest.raises(ConfigError) as bad:
        call(slide, scores, scores.store)
    assert str(bad.value) == message


def test_the_right_argument_types_still_work(example_slide: Path, scores: Any, model: Any) -> None:
    """What the checks let through: a path for tissue_mask (as tile takes it), an open Slide for screen (left open),
    numpy integers and integer lists for a store."""
    with wsi_screen.open_slide(example_slide) as slide:
        by_slide = wsi_screen.tissue_mask(slide)
        assert wsi_screen.screen(slide, model).score == wsi_screen.screen(example_slide, model).score
        assert not slide.closed
        with pytest.raises(ConfigError, match=r"an open slide has its resolution: pass `mpp` or `force_mpp` to "):
            wsi_screen.screen(slide, model, mpp=0.5)
    assert np.array_equal(wsi_screen.tissue_mask(str(example_slide)).labels, by_slide.labels)
    store = scores.store
    assert np.array_equal(store[np.int64(3)], store[3]) and store[np.array([3, 1])].shape[0] == 2
    assert store[[]].shape[0] == 0 and np.array_equal(store[range(2)], store[:2])


def test_a_run_records_the_call_where_the_docs_say(demo_run: Path, example_slide: Path) -> None:
    """api.md said a run's slide.json has to_json()'s keys; it holds how the slide was scored. The call is results.csv's
    row (the same keys, threshold for slide_threshold), run.json's aggregate and patches.geojson's foci."""
    import json

    from wsi_screen.screening.runfolder import RESULT_COLUMNS

    call = wsi_screen.screen(example_slide).to_json()
    row = read_results(demo_run)["CMU-1-Small-Region"]
    same = ("slide", "status", "n_patches", "score", "diagnosis", "rule", "metastasis", "largest_focus_mm",
            "tumour_area_mm2", "n_foci", "in_domain_fraction", "out_of_domain")
    assert set(same) <= set(call) and set(same) | {"threshold"} <= set(RESULT_COLUMNS)
    for key in same:
        value = call[key]
        if isinstance(value, bool):
            assert row[key] == str(value).lower(), key
        elif isinstance(value, int | float):
            assert float(row[key]) == pytest.approx(value, abs=1e-4), key
        else:
            assert row[key] == ("" if value is None else value), key
    assert float(row["threshold"]) == pytest.approx(call["slide_threshold"])
    recorded = json.loads((demo_run / "run.json").read_text())["aggregate"]
    assert {k: v for k, v in recorded.items() if k != "source"} == call["aggregate"]
    geojson = json.loads((demo_run / "CMU-1-Small-Region" / "patches.geojson").read_text())
    foci = [f for f in geojson["features"] if f["properties"].get("objectType") == "annotation"
            and f["properties"].get("name") != "call evidence"]
    assert len(foci) == len(call["foci"])
    slide_json = json.loads((demo_run / "CMU-1-Small-Region" / "slide.json").read_text())
    assert not {"diagnosis", "score", "foci", "aggregate"} & set(slide_json)  # as the docs now say
    assert "not in a slide's `slide.json`" in (REPO / "docs" / "api.md").read_text()


def test_absurd_reads_are_refused_or_bounded(example_slide: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """thumbnail(1e6) was a MemoryError of 43.9 TiB (its resampling margin grew with the mpp), as were
    tissue_mask(mpp=1e5), read_at(..., 1e5) and read_region of 100000 x 100000 px. The margin is now at most the
    level, and a read beyond MAX_READ_PIXELS is a ConfigError naming its size."""
    import tracemalloc

    from wsi_screen.slide import slide as slide_module

    with wsi_screen.open_slide(example_slide) as slide:
        tracemalloc.start()
        try:
            assert slide.thumbnail(1e6).shape == (1, 1, 3)
            assert wsi_screen.tissue_mask(slide, mpp=1e5).labels.shape == (1, 1)
            assert tracemalloc.get_traced_memory()[1] < 200 << 20
        finally:
            tracemalloc.stop()
        with pytest.raises(ConfigError) as region:
            slide.read_region((0, 0), 0, (100000, 100000))
        assert str(region.value) == (f"{example_slide}: a read_region of 100000 x 100000 px (27.9 GiB of RGB) is "
                                     "more than one read gives (268,435,456 px); read a smaller `size`, or a coarser "
                                     "`level`")
        with pytest.raises(ConfigError, match=r": the region \(at level 0\) of 2004008 x 2004008 px \(11,220.7 GiB of "
                                              r"RGB\) is more than one read gives .*; read a smaller `size`, or at a "
                                              "finer `mpp`$"):
            slide.read_at((0, 0), (10, 10), 1e5)
        with pytest.raises(ConfigError, match=r": a read_at of 20000 x 20000 px .* at a coarser `mpp`$"):
            slide.read_at((0, 0), (20000, 20000), 1.0)
        monkeypatch.setattr(slide_module, "MAX_READ_PIXELS", 1000)
        with pytest.raises(ConfigError, match=r": a thumbnail of 277 x 370 px .*; make it at a coarser `mpp`$"):
            slide.thumbnail(4.0)


def test_scores_top_refuses_a_negative_n(scores: Any) -> None:
    """top(-1) gave all but one index, as a slice [:-1] would."""
    assert scores.top(0) == [] and len(scores.top(1000)) == len(scores)
    for n in (-1, 2.5, "3"):
        with pytest.raises(ConfigError) as bad:
            scores.top(n)
        assert str(bad.value) == f"`n` must be a whole number, at least 0; got {n!r}"


def test_the_api_table_gives_each_parameter_its_real_kind() -> None:
    """api.md's table listed load_model(path_or_name=None, device="cpu"), but device is keyword-only: each signature
    there names real parameters, those after its `*` keyword-only and those before it not."""
    import inspect

    rows = re.findall(r"^\| \[`(\w+)\((.*?)\)`\]", (REPO / "docs" / "api.md").read_text(encoding="utf-8"),
                      flags=re.M)
    assert len(rows) >= 9
    for name, args in rows:
        params = inspect.signature(getattr(wsi_screen, name)).parameters
        keyword_only = False
        for arg in (a.strip() for a in args.split(",")):
            if arg == "*":
                keyword_only = True
            elif arg != "...":
                real = params[arg.split("=")[0]]
                assert (real.kind is inspect.Parameter.KEYWORD_ONLY) == keyword_only, f"{name}: {arg}"


@pytest.mark.parametrize("what, call, message", [
    ("create_model 0 classes", lambda sl: wsi_screen.create_model("screen_cnn32", 0),
     "`num_classes` must be a whole number, at least 1; got 0"),
    ("tile workers=-1", lambda sl: wsi_screen.tile(sl, mpp=2.0, size=64, workers=-1),
     "`workers` must be a whole number, at least 1; got -1"),
    ("tissue_mask workers=0", lambda sl: wsi_screen.tissue_mask(sl, workers=0),
     "`workers` must be a whole number, at least 1; got 0"),
    ("tile lz4 quality", lambda sl: wsi_screen.tile(sl, mpp=2.0, size=64, codec="lz4", quality=50),
     "lz4 is lossless and has no quality; use `codec` jpeg or jpegxl (or drop `quality`)"),
    ("score workers=0", lambda sl: wsi_screen.score(sl, workers=0),
     "`workers` must be a whole number, at least 1; got 0"),
    ("screen workers=-3", lambda sl: wsi_screen.screen(sl, workers=-3),
     "`workers` must be a whole number, at least 1; got -3"),
    ("screen workers=1.5", lambda sl: wsi_screen.screen(sl, workers=1.5),
     "`workers` must be a whole number, at least 1; got 1.5"),
])
def test_invalid_values_are_refused_not_taken(example_slide: Path, what: str, call: Any, message: str) -> None:
    """Each was accepted silently: a model of zero classes, a negative or zero number of threads (score and screen
    tiled with them all the same; 1.5 was a TypeError from the tissue detector), a quality for the lossless codec
    (which the tile command already refused: the same rule now)."""
    with wsi_screen.open_slide(example_slide) as slide, pytest.raises(ConfigError) as bad:
        call(slide)
    assert str(bad.value) == message


def test_numpy_numbers_tile_as_python_numbers(example_slide: Path, tmp_path: Path) -> None:
    """A notebook's numbers are often numpy's (a DataFrame column, an array's element): tile(mpp=np.float32(2),
    size=np.int64(64)) passed every check and then failed writing the store's settings, "TypeError: Object of type
    float32 is not JSON serializable", in memory as on disk."""
    with wsi_screen.open_slide(example_slide) as slide:
        plain = wsi_screen.tile(slide, tmp_path / "plain", mpp=2.0, size=64, overlap=8, min_tissue=0.5, codec="lz4")
        for out in (None, tmp_path / "numpy"):
            store = wsi_screen.tile(slide, out, mpp=np.float32(2.0), size=np.int64(64), overlap=np.int32(8),
                                    min_tissue=np.float32(0.5), codec="lz4")
            assert len(store) == len(plain) == 48 and np.array_equal(store.coords, plain.coords)
            assert np.array_equal(store[:], plain[:])
            assert store.attrs["settings"] == plain.attrs["settings"]
        # the store on disk was made with the same settings: reused by plain numbers, not refused
        again = wsi_screen.tile(slide, tmp_path / "numpy", mpp=2.0, size=64, overlap=8, min_tissue=0.5, codec="lz4")
        assert np.array_equal(again.coords, plain.coords)

def test_numpy_numbers_set_the_slide_rule_and_the_tissue_detector(example_slide: Path, scores: Any,
                                                                    model: Any) -> None:
    """call_slide(threshold=np.float32(0.01)) was refused as "an area in mm² >= 0, got np.float32(0.01)", k=np.int64(3)
    as "must be a count >= 1", tissue={"min_od": np.float32(0.15)} as "must be a number >= 0": numbers all, and
    now taken as the Python numbers they equal (the call's JSON and the store's settings hold them)."""
    import json

    for numpy, plain in [(dict(threshold=np.float32(0.01)), dict(threshold=0.01)),
                         (dict(rule="topk", k=np.int64(3), threshold=np.float32(0.5)), dict(rule="topk", k=3,
                                                                                           threshold=0.5))]:
        call = wsi_screen.call_slide(scores, model, **numpy)
        assert call.diagnosis == "tumour" and call.to_json() == wsi_screen.call_slide(scores, model, **plain).to_json()
        json.dumps(call.to_json())
    with wsi_screen.open_slide(example_slide) as slide:
        numbers = {"min_od": np.float32(0.15), "min_chroma": np.int64(20)}  # recorded as 0.15, not 0.15000000596
        store = wsi_screen.tile(slide, mpp=2.0, size=64, tissue=numbers)
        same = wsi_screen.tile(slide, mpp=2.0, size=64, tissue={"min_od": 0.15, "min_chroma": 20})
        assert len(store) == len(same) and store.attrs["settings"] == same.attrs["settings"]
        mask = wsi_screen.tissue_mask(slide, settings={"min_od": np.float32(0.25)})
        assert mask.tissue_fraction == wsi_screen.tissue_mask(slide, settings={"min_od": 0.25}).tissue_fraction


def test_a_dataset_says_what_it_holds(scores: Any) -> None:
    """repr(store.as_dataset()) was the default <wsi_screen.tiling.store.PatchDataset object at 0x...>."""
    store = scores.store

    def to_float(patch: np.ndarray) -> np.ndarray:
        return patch / 255.0

    assert repr(store.as_dataset()) == f"PatchDataset({store!r}, uint8 patches)"
    assert repr(store.as_dataset(to_float)) == f"PatchDataset({store!r}, transform=to_float)"
    assert repr(store).startswith("PatchStore('memory://wsi-screen/") and "66 patches of 96 px" in repr(store)

def test_a_patch_past_the_end_is_one_index_error_for_every_store(example_slide: Path, tmp_path: Path) -> None:
    """A store in memory (and one without tissue) answered store[len(store)] with zarr's "index out of bounds for
    dimension with length 0"; the stores on disk said "patch 34 out of range for 34 patches". One rule now."""
    with wsi_screen.open_slide(example_slide) as slide:
        stores = {"memory": wsi_screen.tile(slide, mpp=2.0, size=64),
                  "lz4 on disk": wsi_screen.tile(slide, tmp_path / "lz4", mpp=2.0, size=64, codec="lz4"),
                  "coordinates only": wsi_screen.tile(slide, tmp_path / "coords", mpp=2.0, size=64, pixels=False),
                  "no tissue": wsi_screen.tile(slide, mpp=2.0, size=64, tissue={"min_object_um2": 1e12})}
        first = stores["memory"][0]
        for kind, store in stores.items():
            n = len(store)
            assert n == (0 if kind == "no tissue" else 34), kind
            for bad in (n, -n - 1):
                with pytest.raises(IndexError) as past:
                    store[bad]
                assert str(past.value) == f"patch {bad} out of range for {n} patches", kind
            with pytest.raises(IndexError, match=f"^patch index out of range for {n} patches$"):
                store[[0, n]]
            if n:
                assert np.array_equal(store[-n], first) and np.array_equal(store[[-n]][0], first), kind
            store.close()

def test_a_call_prints_its_score_against_its_threshold_as_infer_does(scores: Any, model: Any) -> None:
    """The repr gave the score with 4 decimals and the threshold with 6 digits: a normal call by max at 0.96718
    read "normal, score 0.9672 by max vs 0.96718", at or above its threshold. Now as infer's table and the heatmap
    title put them (aggregate.score_against): with the decimals that keep them apart, and the rule's unit."""
    top = float(scores.positive.max())
    assert round(top, 6) == 0.967177
    assert repr(wsi_screen.call_slide(scores, model, rule="max", threshold=0.96718)) == (
        "SlideCall('CMU-1-Small-Region': normal, score 0.967177 < 0.967180 by max, 35% in domain)")
    assert repr(wsi_screen.call_slide(scores, model, rule="max", threshold=0.96717)) == (
        "SlideCall('CMU-1-Small-Region': tumour, score 0.967 >= 0.967 by max, 35% in domain)")
    assert repr(wsi_screen.call_slide(scores, model)) == (
        "SlideCall('CMU-1-Small-Region': normal, score 0.0435 mm² < 0.0479 mm² by region, 35% in domain)")

def test_progress_bars_are_off_and_one_call_turns_them_on(example_slide: Path, model: Any,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A notebook scoring a large slide saw nothing for minutes: the bars are the commands' and api.md did not say
    how to have them. The call it names shows a bar for tiling and one for scoring, on stderr."""
    from wsi_screen import progress

    assert "`wsi_screen.progress.set_enabled(True)`" in (REPO / "docs" / "api.md").read_text(encoding="utf-8")
    with wsi_screen.open_slide(example_slide) as slide:
        wsi_screen.score(slide, model)
        assert capsys.readouterr().err == ""  # off by default: the library prints nothing
        assert not progress.enabled()
        progress.set_enabled(True)
        try:
            wsi_screen.score(slide, model)
        finally:
            progress.set_enabled(False)
    err = capsys.readouterr().err
    assert "CMU-1-Small-Region:   0%| " in err and "0/66 [" in err, err  # tiling (a bar it clears when done)
    assert "scoring: 100%|" in err and "66/66 [" in err, err

def test_reprs_are_short_and_a_missing_feature_store_says_so(model: Any, tmp_path: Path) -> None:
    """repr(model.domain) was 5,762 characters of tensors, repr(model.spec) 3,073 (the whole metrics dict), a Focus
    printed its MultiPolygon and patch indices, FeatureStore had the default object repr; FeatureStore("nope.zarr")
    said "not a wsi-screen embeddings store"."""
    from wsi_screen.embedding.features import FeatureStore, write_feature_store
    from wsi_screen.screening.spatial import Focus

    assert repr(model.domain) == ("DomainModel(views={stem: View(128 features, 2 classes, scale=109.9, weight=1), "
                                  "penultimate: View(512 features, 2 classes, scale=469.6, weight=0.25)}, "
                                  "threshold=3.68, slide_min_in_domain=0.5)")
    spec = repr(model.spec)
    assert len(spec) < 600 and "metrics" not in spec and "train_config" not in spec and "mpp=0.972" in spec
    focus = Focus(rank=1, n_patches=400, area_mm2=3.5, longest_axis_mm=2.5, mean_prob=0.9, max_prob=0.99,
                  category="macro", centre_l0=(10, 20), indices=tuple(range(400)),
                  outline_l0={"type": "MultiPolygon", "coordinates": [[[[0, 0], [1, 0], [1, 1], [0, 0]]]] * 100})
    assert repr(focus) == ("Focus(rank=1, n_patches=400, area_mm2=3.5, longest_axis_mm=2.5, mean_prob=0.9, "
                           "max_prob=0.99, category='macro', centre_l0=(10, 20))")
    path = write_feature_store(tmp_path / "emb" / "slide.zarr", np.zeros((3, 4), np.float16),
                               np.zeros((3, 2), np.int64), {"mpp": 0.5, "size": 224})
    assert repr(FeatureStore(path)) == f"FeatureStore({str(path)!r}, 3 patches x 4 features)"
    with pytest.raises(StoreError) as missing:
        FeatureStore(tmp_path / "nope.zarr")
    assert str(missing.value) == f"{tmp_path / 'nope.zarr'}: no such embeddings store"
