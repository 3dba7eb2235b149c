"""The bundled model's slide rule does not drift with slide size (issue: slide calls on real-sized slides).

Negatives of ~500 and ~10,000 tissue patches are simulated from the score bank of the bundled model
(``tests/fixtures/score_bank``: its P(tumour) for every PCam valid patch in all 8 orientations, written by
``scripts/calibrate_slide_rule.py``), with the tiler's tissue cut applied to each layout. The false-positive
rate at the calibrated threshold must differ by at most 5 points between the two sizes.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsi_screen.models import default_model_dir, load_model
from wsi_screen.screening.aggregate import diagnose
from wsi_screen.screening.run import InferConfig, model_identity, resolve_aggregate
from wsi_screen.screening.spatial import ScoreGrid
from wsi_screen.synthetic import cohort

BANK = Path(__file__).parents[1] / "fixtures" / "score_bank" / "default"
CELL_MM = 96 * 0.972 / 1000
N_SLIDES = 60


@pytest.fixture(scope="module")
def bank() -> cohort.ScoreBank:
    return cohort.ScoreBank.load(BANK)


def test_bank_belongs_to_the_bundled_model(bank: cohort.ScoreBank, patches_dir: Path) -> None:
    model_dir = default_model_dir()
    classifier = load_model(model_dir, precision="fp32")  # the bank holds float32 scores (the rule is defined on them)
    assert bank.model_sha256 == model_identity(model_dir, classifier)["sha256"], \
        "the bundled model changed: rerun scripts/calibrate_slide_rule.py and copy its bank here"
    # spot check: the bank holds this model's probabilities
    rel = bank.paths["tumour"][:6] + bank.paths["normal"][:6]
    images = [np.asarray(Image.open(patches_dir / "pcam" / p).convert("RGB")) for p in rel]
    batch = np.stack([cohort.dihedral(img, k) for img in images for k in (0, 5)])
    probs = classifier.positive_scores(classifier.predict(batch)).reshape(len(rel), 2)
    expected = np.concatenate([bank.scores["tumour"][:6][:, [0, 5]], bank.scores["normal"][:6][:, [0, 5]]])
    np.testing.assert_allclose(probs, expected, atol=1e-4)


def _false_positives(bank: cohort.ScoreBank, n_patches: int, seed: int) -> tuple[float, float]:
    config = resolve_aggregate(default_model_dir(), load_model(default_model_dir()), InferConfig())
    pools = {k: len(v) for k, v in bank.paths.items()}

    def one(i: int) -> tuple[bool, int]:
        lay = cohort.make_layout(np.random.default_rng([seed, i]), round(n_patches / 0.84), [], cell_mm=CELL_MM,
                                 pools=pools)
        kept = cohort.kept_cells(lay, bank, mpp=0.972, patch_px=96)
        probs = cohort.simulate_probs(lay, bank, kept=kept)
        grid = ScoreGrid(probs, (0, 0), 96, CELL_MM, np.zeros(probs.shape, np.int64))
        result = diagnose(probs[kept], config, positive="tumour", negative="normal", grid=grid)
        return result.diagnosis == "tumour", int(kept.sum())

    # each slide is seeded on its own, so two threads (the tissue detector releases the GIL) give the same slides
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(one, range(N_SLIDES)))
    return sum(c for c, _ in results) / N_SLIDES, float(np.median([n for _, n in results]))


def test_false_positive_rate_does_not_grow_with_slide_size(bank: cohort.ScoreBank) -> None:
    small, n_small = _false_positives(bank, 500, 1)
    large, n_large = _false_positives(bank, 10000, 2)
    assert 400 < n_small < 600 and 8500 < n_large < 11500  # the sizes asked for, after the tissue cut
    assert abs(large - small) <= 0.05, (small, large)
    assert large <= 0.05 and small <= 0.05
