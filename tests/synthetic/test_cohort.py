"""Calibration cohorts: dihedral orientations, slide layouts, and the tiler simulated on them."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from wsi_screen.screening.spatial import label_regions, size_class
from wsi_screen.synthetic import cohort
from wsi_screen.synthetic.slides import build_layout_slide, load_pool

CELL_MM = 96 * 0.972 / 1000
POOLS = {"normal": 1500, "tumour": 1500}


def test_dihedral_group_has_eight_distinct_elements() -> None:
    img = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    seen = {cohort.dihedral(img, k).tobytes() for k in range(8)}
    assert len(seen) == 8
    for k in range(8):  # closed: transforming again stays in the group
        for j in range(8):
            assert cohort.dihedral(cohort.dihedral(img, k), j).tobytes() in seen
    assert np.array_equal(cohort.dihedral(img, 1), np.rot90(img))
    assert np.array_equal(cohort.dihedral(img, 4), img[:, ::-1])


def test_layouts_have_the_planned_tissue_and_foci() -> None:
    rng = np.random.default_rng(5)
    lay = cohort.make_layout(rng, 3000, ["macro", "micro", "itc"], cell_mm=CELL_MM, pools=POOLS)
    assert lay.n_tissue == 3000 and lay.positive
    assert not (lay.tumour & ~lay.tissue).any()
    assert [f.size_class for f in lay.foci] == ["macro", "micro", "itc"]
    assert lay.size_class == "macro" and lay.largest_focus_mm > 2.0
    for focus in lay.foci:  # each focus is one connected piece
        m = np.zeros_like(lay.tissue)
        m[focus.cells[:, 0], focus.cells[:, 1]] = True
        assert label_regions(m)[1] == 1
    # every tissue cell has a patch of its pool and an orientation; glass cells none
    assert (lay.patch[lay.tissue] >= 0).all() and (lay.patch[lay.tissue] < 1500).all()
    assert set(np.unique(lay.orient[lay.tissue])) == set(range(8))
    assert (lay.patch[~lay.tissue] == -1).all()
    # patches are drawn as whole permutations: no repeat within a pool's size
    normals = lay.patch[lay.tissue & ~lay.tumour]
    assert len(np.unique(normals[:1500])) == 1500
    again = cohort.make_layout(np.random.default_rng(5), 3000, ["macro", "micro", "itc"], cell_mm=CELL_MM,
                               pools=POOLS)
    assert np.array_equal(again.patch, lay.patch) and np.array_equal(again.tumour, lay.tumour)


def test_focus_sizes_follow_their_class() -> None:
    matches = 0
    for seed in range(30):
        cls = ("itc", "micro", "macro")[seed % 3]
        lay = cohort.make_layout(np.random.default_rng(seed), 6000, [cls], cell_mm=CELL_MM, pools=POOLS)
        matches += size_class(lay.largest_focus_mm) == cls
    assert matches >= 27


def test_plan_covers_sizes_and_classes() -> None:
    plan = cohort.plan_cohort(0, 120, min_patches=500, max_patches=20000)
    sizes = np.array([s.n_tissue for s in plan])
    assert sizes.min() >= 500 and sizes.max() <= 20000 and sizes.min() < 1000 and sizes.max() > 10000
    neg = [s for s in plan if not s.positive]
    assert len(neg) == 60 and min(s.n_tissue for s in neg) < 1500 and max(s.n_tissue for s in neg) > 8000
    firsts = [s.foci[0] for s in plan if s.positive]
    assert {c: firsts.count(c) for c in set(firsts)}["itc"] >= 15
    assert cohort.plan_cohort(0, 120) == cohort.plan_cohort(0, 120)
    assert cohort.plan_cohort(1, 120) != cohort.plan_cohort(0, 120)


@pytest.fixture(scope="module")
def thumbs_bank(patches_dir) -> cohort.ScoreBank:
    """A bank of the PCam valid split with patch thumbnails (scores unused here)."""
    pcam = patches_dir / "pcam"
    pool = load_pool(pcam, "valid")
    thumbs = {k: np.stack([np.asarray(Image.open(pcam / p).convert("RGB").reduce(cohort.THUMB_FACTOR)) for p in v])
              for k, v in pool.items()}
    return cohort.ScoreBank(scores={k: np.zeros((len(v), 8), np.float32) for k, v in pool.items()}, paths=pool,
                            model_sha256="none", split="valid", thumbs=thumbs)


def test_kept_cells_match_the_tiler_on_the_written_slide(thumbs_bank: cohort.ScoreBank, patches_dir, tmp_path) -> None:
    from tests.conftest import run_cli
    from wsi_screen.tiling.store import PatchStore

    lay = cohort.make_layout(np.random.default_rng(11), 700, ["micro"], cell_mm=CELL_MM,
                             pools={k: len(v) for k, v in thumbs_bank.paths.items()})
    slide = tmp_path / "slides" / "s.tiff"
    build_layout_slide(slide, lay, patches_dir=patches_dir / "pcam", seed=3)
    assert run_cli("tile", slide.parent, "-o", tmp_path / "stores", "--mpp", "0.972", "--size", "96",
                   "--quiet").code == 0
    coords = PatchStore.open(tmp_path / "stores" / "s.zarr").coords
    real = np.zeros(lay.tissue.shape, bool)
    real[coords[:, 1] // 96, coords[:, 0] // 96] = True
    assert not (real & ~lay.tissue).any()  # no patch on glass
    kept = cohort.kept_cells(lay, thumbs_bank, mpp=0.972, patch_px=96)
    agree = (kept == real)[lay.tissue].mean()
    assert agree >= 0.95, agree
    assert 0.7 < real.sum() / lay.n_tissue < 0.95  # pale and fatty lymph-node patches fall under --min-tissue
