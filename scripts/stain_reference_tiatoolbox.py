"""Write ``tests/fixtures/stain_reference.json``: tiatoolbox's stain normalisers on a few real patches.

tiatoolbox pins old torch/zarr, so it lives in its own virtual environment, never in the project's::

    python3 -m venv /work/tiatoolbox-venv && /work/tiatoolbox-venv/bin/pip install tiatoolbox
    /work/tiatoolbox-venv/bin/python scripts/stain_reference_tiatoolbox.py [--data ../shared/data]

The script imports nothing from wsi_screen. For each image (three CRC-VAL-HE-7K tiles and the bundled
target) it records what tiatoolbox.tools.stainnorm fits on that single image with its defaults (luminosity
threshold 0.8 after a 2-98 % contrast stretch; Macenko angle percentile 99; Vahadane regulariser 0.1;
Reinhard on OpenCV 8-bit L*a*b* of all pixels), and summary statistics of each image normalised to the
bundled target. ``tests/tiling/test_stain.py`` compares wsi_screen.tiling.stain against these numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TARGET = "wsi_screen/resources/stain_target.png"  # relative to the repository
PATCHES = [  # relative to <data>/patches; tissue-rich tiles of three tissue types
    "crc-7class-sample/images/TUM/TUM___TUM-TCGA-CMMHPWHP_106.jpg",
    "crc-7class-sample/images/STR/STR___STR-TCGA-WDEKNSDQ_110.jpg",
    "crc-7class-sample/images/LYM/LYM___LYM-TCGA-TQRMNAKF_101.jpg",
]


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def _floats(a: Any, digits: int = 6) -> Any:
    arr = np.asarray(a, dtype=np.float64)
    return np.round(arr, digits).tolist()


def _stats(img: np.ndarray) -> dict[str, Any]:
    px = img.reshape(-1, 3).astype(np.float64)
    return {"mean_rgb": _floats(px.mean(axis=0), 3), "std_rgb": _floats(px.std(axis=0), 3)}


def _fit_one(img: np.ndarray) -> dict[str, Any]:
    from tiatoolbox.tools import stainnorm
    from tiatoolbox.utils.misc import get_luminosity_tissue_mask

    out: dict[str, Any] = {
        "luminosity_tissue_fraction": round(float(get_luminosity_tissue_mask(img.copy(), 0.8).mean()), 4)}
    for method in ("macenko", "vahadane"):
        norm = stainnorm.get_normalizer(method)
        norm.fit(img.copy())
        out[method] = {"stain_matrix": _floats(norm.stain_matrix_target),
                       "max_concentrations": _floats(np.asarray(norm.maxC_target).reshape(-1))}
    rein = stainnorm.get_normalizer("reinhard")
    rein.fit(img.copy())
    out["reinhard"] = {"lab_mean": _floats(rein.target_means), "lab_std": _floats(rein.target_stds)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data",
                        help="the shared data folder (holding patches/)")
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures" / "stain_reference.json")
    args = parser.parse_args(argv)

    from tiatoolbox.tools import stainnorm

    logging.getLogger("tiatoolbox").setLevel(logging.ERROR)  # its Vahadane warns on every construction

    target = _read(REPO / TARGET)
    images = {"target": (TARGET, "repo", target)}
    for rel in PATCHES:
        images[Path(rel).stem] = (rel, "patches", _read(args.data / "patches" / rel))

    fitted = {name: {"path": rel, "root": root, "shape": list(img.shape), **_fit_one(img)}
              for name, (rel, root, img) in images.items()}

    # each patch normalised to the bundled target by tiatoolbox (source fitted on the patch itself)
    normalised: dict[str, dict[str, Any]] = {}
    for method in ("macenko", "vahadane", "reinhard"):
        norm = stainnorm.get_normalizer(method)
        norm.fit(target.copy())
        normalised[method] = {}
        for name, (_, _, img) in images.items():
            if name != "target":
                normalised[method][name] = _stats(np.asarray(norm.transform(img.copy())))

    # tiatoolbox's Vahadane has no random state: record whether a second fit repeats the first
    again = stainnorm.get_normalizer("vahadane")
    again.fit(target.copy())
    repeatable = bool(np.allclose(again.stain_matrix_target, fitted["target"]["vahadane"]["stain_matrix"],
                                  atol=1e-6))

    result: dict[str, Any] = {
        "generated_by": "scripts/stain_reference_tiatoolbox.py",
        "versions": {"tiatoolbox": version("tiatoolbox"), "scikit-learn": version("scikit-learn"),
                     "numpy": np.__version__, "opencv-python": version("opencv-python"),
                     "python": platform.python_version()},
        "settings": {"macenko": "MacenkoExtractor(luminosity_threshold=0.8, angular_percentile=99)",
                     "vahadane": "VahadaneExtractor(luminosity_threshold=0.8, regularizer=0.1)",
                     "reinhard": "ReinhardNormalizer (OpenCV 8-bit RGB2LAB, all pixels)",
                     "max_concentrations": "99th percentile of lstsq concentrations over all pixels"},
        "vahadane_repeatable": repeatable,
        "images": fitted,
        "normalised_to_target": normalised,
        "input_stats": {name: _stats(img) for name, (_, _, img) in images.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out} (tiatoolbox {result['versions']['tiatoolbox']})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
