"""Heatmap rendering time from scores: 10k, 100k and 400k patches (a large slide at 96 px and 0.97 um/px).

    python bench/heatmap.py

Times the pure rasterisation (`heatmap_array`) and the PNG rendering (`render_overlay`) separately, after one
warm-up render (matplotlib's per-process import cost); the target is under 2 s per slide for 100k patches.
Baseline: one matplotlib `imshow` + `savefig` of the raw per-patch grid with no thumbnail, the least any
heatmap PNG costs.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, table


def main() -> int:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from wsi_screen.screening.heatmap import heatmap_array, render_overlay

    rows = []
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        # warm-up: matplotlib's first figure imports fonts and mathtext machinery (once per process)
        render_overlay(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.float32), title="warm-up",
                       out_path=Path(tmp) / "warm.png", threshold=0.5)
        for n in (10_000, 100_000, 400_000):
            side = int(np.ceil(np.sqrt(n / 0.6)))  # 60 % of the grid is tissue
            tile = 187  # 96 px at 0.972 um/px on a 0.499 um/px scan
            cells = rng.choice(side * side, n, replace=False)
            coords = np.stack([(cells % side) * tile, (cells // side) * tile], axis=1).astype(np.int64)
            values = rng.random(n).astype(np.float32)
            dims = (side * tile, side * tile)
            thumb_side = min(8192, max(1024, round(side * tile * 0.499 / 8)))
            thumb = np.full((thumb_side, thumb_side, 3), 235, dtype=np.uint8)
            t0 = time.perf_counter()
            heat = heatmap_array(coords, values, tile, tile, dims, (thumb_side, thumb_side))
            t_array = time.perf_counter() - t0
            t0 = time.perf_counter()
            render_overlay(thumb, heat, title="bench", out_path=Path(tmp) / f"h{n}.png", threshold=0.5,
                           dimensions_l0=dims, mpp=0.499)
            t_render = time.perf_counter() - t0
            grid = np.full((side, side), np.nan, dtype=np.float32)
            grid.flat[cells] = values
            t0 = time.perf_counter()
            fig = Figure(figsize=(6, 6), dpi=100)
            FigureCanvasAgg(fig)
            fig.add_subplot().imshow(grid)
            fig.savefig(Path(tmp) / f"b{n}.png")
            t_base = time.perf_counter() - t0
            total = t_array + t_render
            rows.append([f"{n:,} patches ({dims[0]:,} px slide, {thumb_side} px thumbnail)", t_array, t_render,
                         total, n / total, t_base, t_base / total])
    print(header("Heatmap rendering"))
    print(table(["slide", "array s", "render s", "total s", "patches/s", "baseline imshow s", "x baseline"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
