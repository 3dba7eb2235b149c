"""The tiler against seeded corrupt variants of the real slides (tests/fuzz.py builds and classifies them).

Every variant must be refused on exactly one ``wsi-screen:`` line naming it, or tiled into a complete store
with no one-colour patch; no batch may abort, hang, write stray stderr lines or change the good slide's
patches. The fast test runs a 50-variant subset covering every family and format; ``-m fuzz`` runs the full
corpus (about 520 variants).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fuzz import DICOM_FORMATS, FORMATS, PLAN, TIFF_FORMATS, FuzzReport, build_variants, run_fuzz


def _check(report: FuzzReport) -> None:
    summary = report.markdown()
    assert not [b.index for b in report.batches if "aborted" in b.failures], summary
    assert not [b.index for b in report.batches if "hang" in b.failures], summary
    assert not [b.index for b in report.batches if "good-changed" in b.failures], summary
    assert not [b.index for b in report.batches if "unattributed" in b.failures], summary
    assert not [r.variant.name for r in report.results if r.outcome == "blank"], summary
    assert not report.bad_results, summary


def test_subset_covers_every_family_and_format(tmp_path: Path, slides_dir: Path) -> None:
    variants = build_variants(tmp_path / "a", slides_dir, seed=0, n=50)
    again = build_variants(tmp_path / "b", slides_dir, seed=0, n=50)
    assert variants == again
    assert {(tmp_path / "a" / v.name).read_bytes() == (tmp_path / "b" / v.name).read_bytes()
            for v in variants if v.fmt != "dicom-series"} == {True}
    assert len(variants) == 50 and len({v.name for v in variants}) == 50
    assert {v.fmt for v in variants} == set(FORMATS)
    assert {v.family for v in variants} == {f for plan in PLAN.values() for f in plan}
    assert {v.fmt for v in variants if v.family == "ifd-loop"} <= set(TIFF_FORMATS)
    assert {v.fmt for v in variants if v.family.startswith("dicom-")} <= set(DICOM_FORMATS)


def test_fuzz_subset(tmp_path: Path, slides_dir: Path) -> None:
    report = run_fuzz(tmp_path, slides_dir, seed=0, n=50, batch_size=60, timeout=600)
    assert len(report.results) == 50
    _check(report)


@pytest.mark.fuzz
def test_fuzz_full_corpus(tmp_path: Path, slides_dir: Path, request: pytest.FixtureRequest) -> None:
    if "fuzz" not in str(request.config.getoption("markexpr", "")):
        pytest.skip("the full fuzz corpus runs only when asked for: pytest -m fuzz")
    report = run_fuzz(tmp_path, slides_dir, seed=0, n=None, batch_size=60, timeout=600)
    assert len(report.results) >= 520
    _check(report)
