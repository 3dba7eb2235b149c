"""Synthetic slides with known truth: format, geometry, pixels, determinism, cohorts and the script."""

from __future__ import annotations

import csv
import importlib.util
import itertools
import json
from pathlib import Path

import numpy as np
import openslide
import pytest
from PIL import Image

from wsi_screen.errors import ConfigError, DatasetError
from wsi_screen.slide.slide import Slide
from wsi_screen.synthetic.slides import (
    NEGATIVE,
    POSITIVE,
    SyntheticTruth,
    build_cohort,
    build_slide,
    default_patches_dir,
    load_truth,
)
from wsi_screen.tiling.grid import make_grid, tile_size_l0

REPO = Path(__file__).resolve().parents[2]
GRID = (12, 10)
MPP = 0.972


@pytest.fixture(scope="module")
def pcam(patches_dir: Path) -> Path:
    path = patches_dir / "pcam"
    if not (path / "labels.csv").is_file():
        pytest.fail(f"test data missing: {path}/labels.csv")
    return path


@pytest.fixture(scope="module")
def positive(tmp_path_factory: pytest.TempPathFactory, pcam: Path) -> tuple[Path, SyntheticTruth]:
    out = tmp_path_factory.mktemp("synth") / "pos.tiff"
    truth = build_slide(out, patches_dir=pcam, positive=True, grid=GRID, tumour_fraction=0.15, seed=7)
    return out, truth


def _patch(pcam: Path, rel: str) -> np.ndarray:
    with Image.open(pcam / rel) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16)


def test_opens_as_generic_tiff_with_mpp_and_pyramid(positive: tuple[Path, SyntheticTruth]) -> None:
    path, truth = positive
    margin = 2 * 96
    assert truth.dimensions_l0 == (GRID[0] * 96 + 2 * margin, GRID[1] * 96 + 2 * margin)
    osr = openslide.OpenSlide(str(path))
    try:
        assert osr.properties[openslide.PROPERTY_NAME_VENDOR] == "generic-tiff"
        assert float(osr.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(MPP, rel=1e-9)
        assert float(osr.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(MPP, rel=1e-9)
        dims = osr.level_dimensions
        assert dims[0] == truth.dimensions_l0
        for (w0, h0), (w1, h1) in itertools.pairwise(dims):
            assert (w1, h1) == ((w0 + 1) // 2, (h0 + 1) // 2)
        assert max(dims[-1]) <= 256 < max(dims[-2])
    finally:
        osr.close()
    with Slide(path) as slide:  # the toolkit's own reader: OpenSlide's metadata, JPEG tiles decoded directly
        assert slide.vendor == "generic-tiff" and slide.reader_name == "tifffile"
        assert slide.mpp == pytest.approx(MPP, rel=1e-9)


def test_tumour_cell_pixels_are_the_source_patch(positive: tuple[Path, SyntheticTruth], pcam: Path) -> None:
    path, truth = positive
    assert truth.label == POSITIVE and truth.tumour_cells
    with Slide(path) as slide:
        tumour_sources = {truth.source_at(c, r) for c, r in truth.tumour_cells}
        for c, r in truth.tumour_cells[:6]:
            rel = truth.source_at(c, r)
            assert "/tumour/" in rel
            got = slide.read((c * 96, r * 96), 96, 96).astype(np.int16)
            diff = np.abs(got - _patch(pcam, rel))
            assert diff.mean() < 4.0 and np.percentile(diff, 99) < 30  # JPEG q90 re-encoding of a JPEG
            other = next(s for s in sorted(tumour_sources) if s != rel) if len(tumour_sources) > 1 else None
            if other is not None:  # and it really is that patch, not just any tissue
                assert np.abs(got - _patch(pcam, other)).mean() > 3 * diff.mean()
        # a normal tissue cell holds a normal patch; glass is glass
        m = truth.tissue_box_l0[0] // 96
        normal = next((c, r) for r in range(m, m + GRID[1]) for c in range(m, m + GRID[0])
                      if (c, r) not in set(truth.tumour_cells))
        assert "/normal/" in truth.source_at(*normal)
        got = slide.read((normal[0] * 96, normal[1] * 96), 96, 96).astype(np.int16)
        assert np.abs(got - _patch(pcam, truth.source_at(*normal))).mean() < 4.0
        glass = slide.read((0, 0), 96, 96).astype(np.int16)
        assert np.abs(glass - 242).max() <= 8


def test_truth_geometry(positive: tuple[Path, SyntheticTruth]) -> None:
    _, truth = positive
    w, h = truth.dimensions_l0
    x0, y0, x1, y1 = truth.tissue_box_l0
    n = GRID[0] * GRID[1]
    assert len(truth.tumour_cells) == round(0.15 * n)
    assert len(set(truth.tumour_cells)) == len(truth.tumour_cells)
    assert len(truth.sources) == n
    covered = set()
    for bx0, by0, bx1, by1 in truth.tumour_boxes_l0:
        assert 0 <= bx0 < bx1 <= w and 0 <= by0 < by1 <= h
        assert x0 <= bx0 and bx1 <= x1 and y0 <= by0 and by1 <= y1
        assert all(v % 96 == 0 for v in (bx0, by0, bx1, by1))
        covered |= {(c, r) for c in range(bx0 // 96, bx1 // 96) for r in range(by0 // 96, by1 // 96)}
    assert covered == set(truth.tumour_cells)  # boxes tile the tumour region exactly
    # compact: the blob's bounding box is not much bigger than a disc of that area
    cols = [c for c, _ in truth.tumour_cells]
    rows = [r for _, r in truth.tumour_cells]
    assert (max(cols) - min(cols) + 1) * (max(rows) - min(rows) + 1) <= 2.5 * len(truth.tumour_cells)
    # patch-level truth for any footprint
    cells = np.array(truth.tumour_cells, dtype=np.int64) * 96
    assert np.all(truth.tumour_overlap(cells, 96) == 1.0)
    assert truth.tumour_overlap(np.array([[0, 0]]), 96)[0] == 0.0
    assert SyntheticTruth.from_json(json.loads(json.dumps(truth.to_json()))) == truth


def test_tiler_at_slide_mpp_sees_the_cells(positive: tuple[Path, SyntheticTruth]) -> None:
    path, truth = positive
    with Slide(path) as slide:
        t = tile_size_l0(MPP, 96, slide.mpp)
        assert t == 96
        x0, y0, x1, y1 = truth.tissue_box_l0
        mask = np.zeros((slide.dimensions[1] // 8, slide.dimensions[0] // 8), dtype=bool)
        mask[y0 // 8:y1 // 8, x0 // 8:x1 // 8] = True
        grid = make_grid(mask, slide.dimensions, t, t, 0.99)
        assert len(grid) == GRID[0] * GRID[1]
        cells = {(int(x) // 96, int(y) // 96) for x, y in grid.coords}
        assert set(truth.tumour_cells) <= cells
        assert np.all(grid.coords % 96 == 0)


def test_deterministic_bytes(tmp_path: Path, pcam: Path) -> None:
    kw = dict(patches_dir=pcam, positive=True, grid=(6, 5), seed=3, name="same")
    a = build_slide(tmp_path / "a.tiff", **kw)  # type: ignore[arg-type]
    b = build_slide(tmp_path / "b.tiff", **kw)  # type: ignore[arg-type]
    c = build_slide(tmp_path / "c.tiff", **{**kw, "seed": 4})  # type: ignore[arg-type]
    assert a == b
    assert (tmp_path / "a.tiff").read_bytes() == (tmp_path / "b.tiff").read_bytes()
    assert (tmp_path / "a.tiff").read_bytes() != (tmp_path / "c.tiff").read_bytes()
    assert a.sources != c.sources
    assert not list(tmp_path.glob(".*partial"))


def test_negative_slide_has_no_tumour(tmp_path: Path, pcam: Path) -> None:
    truth = build_slide(tmp_path / "neg.tiff", patches_dir=pcam, positive=False, grid=(5, 4), seed=1,
                        margin_px=96)
    assert truth.label == NEGATIVE and truth.tumour_cells == () and truth.tumour_boxes_l0 == ()
    assert truth.dimensions_l0 == (5 * 96 + 192, 4 * 96 + 192)
    assert all("/normal/" in s for s in truth.sources)


@pytest.mark.parametrize("split", ["test", "Test", "heldout_test", "TESTING"])
def test_refuses_test_splits(tmp_path: Path, pcam: Path, split: str) -> None:
    with pytest.raises(ConfigError, match="test"):
        build_slide(tmp_path / "x.tiff", patches_dir=pcam, positive=True, split=split)
    with pytest.raises(ConfigError, match="test"):
        build_cohort(tmp_path, n_pos=1, n_neg=0, seed=0, patches_dir=pcam, split=split)
    assert not list(tmp_path.iterdir())


def test_bad_settings(tmp_path: Path, pcam: Path) -> None:
    with pytest.raises(ConfigError, match="margin_px"):
        build_slide(tmp_path / "x.tiff", patches_dir=pcam, positive=True, margin_px=100)
    with pytest.raises(ConfigError, match="tumour_fraction"):
        build_slide(tmp_path / "x.tiff", patches_dir=pcam, positive=True, tumour_fraction=0.0)
    with pytest.raises(DatasetError, match=r"labels\.csv"):
        build_slide(tmp_path / "x.tiff", patches_dir=tmp_path, positive=True)
    with pytest.raises(DatasetError, match="no 'normal' patches"):
        build_slide(tmp_path / "x.tiff", patches_dir=pcam, positive=True, split="nosuchsplit")


def test_cohort_and_script(tmp_path: Path, pcam: Path) -> None:
    out = tmp_path / "cohort"
    truths = build_cohort(out, n_pos=2, n_neg=1, seed=5, patches_dir=pcam, grid=(4, 4))
    assert sorted(t.label for t in truths) == [NEGATIVE, POSITIVE, POSITIVE]
    with (out / "slides.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["slide"], r["label"]) for r in rows] == [(t.name, t.label) for t in truths]
    assert all((out / f"{t.name}.tiff").is_file() for t in truths)
    assert load_truth(out / "truth.json") == truths

    spec = importlib.util.spec_from_file_location("make_synthetic_slides",
                                                  REPO / "scripts" / "make_synthetic_slides.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out2 = tmp_path / "cohort2"
    rc = script.main([str(out2), "--pos", "2", "--neg", "1", "--seed", "5", "--grid", "4x4",
                      "--patches", str(pcam)])
    assert rc == 0
    for t in truths:  # the script is the same builder: same seed, same bytes
        assert (out2 / f"{t.name}.tiff").read_bytes() == (out / f"{t.name}.tiff").read_bytes()
    assert script.main([str(tmp_path / "bad"), "--split", "test", "--patches", str(pcam)]) == 1


def test_default_patches_dir_is_pcam(patches_dir: Path) -> None:
    assert default_patches_dir().resolve() == (patches_dir / "pcam").resolve()


def test_default_patches_dir_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Installed (no source checkout beside it) the data folder comes from WSI_SCREEN_DATA, or a clear error."""
    from wsi_screen.synthetic import slides

    monkeypatch.setattr(slides, "__file__", str(tmp_path / "site-packages" / "wsi_screen" / "synthetic" / "slides.py"))
    monkeypatch.delenv("WSI_SCREEN_DATA", raising=False)
    with pytest.raises(DatasetError, match="set WSI_SCREEN_DATA"):
        slides.default_patches_dir()
    monkeypatch.setenv("WSI_SCREEN_DATA", str(tmp_path / "data"))
    assert slides.default_patches_dir() == tmp_path / "data" / "patches" / "pcam"
