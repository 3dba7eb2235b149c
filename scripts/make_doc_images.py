"""Regenerate the README's pictures from fresh runs: docs/img/{heatmap,heatmap-normal,heatmap-tumour,report,
notebook}.png.

    python scripts/make_doc_images.py [--run runs/demo] [--phantoms runs/phantoms]

Runs `wsi-screen infer examples/ -o RUN` if RUN has no results yet, copies the example slide's heatmap,
screenshots RUN/report.html in headless Chromium, and executes notebooks/heatmap.ipynb on RUN, renders it
to HTML (nbconvert, a documentation-only extra: `pip install nbconvert`) and screenshots that.

The phantoms: two slides of PCam *valid* patches at realistic size (4,200 tissue cells, irregular tissue; one
normal, one with a macro- and a micro-metastasis; seeds 3 and 4), screened with the bundled model; their
heatmaps become heatmap-normal.png and heatmap-tumour.png.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMG = REPO / "docs" / "img"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def screenshot(html: Path, png: Path, width: int = 1280, height: int = 1600) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium is needed (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
                        f"--screenshot={png}", html.resolve().as_uri()], check=True, capture_output=True,
                       timeout=120)


def phantoms(run: Path) -> None:
    """Build the two phantom slides (once) and screen them into ``run``; copy their heatmaps."""
    import numpy as np

    from wsi_screen.synthetic.cohort import make_layout
    from wsi_screen.synthetic.slides import PCAM_MPP, build_layout_slide, default_patches_dir, load_pool

    slides = run.parent / f"{run.name}-slides"
    pcam = default_patches_dir()
    sizes = {k: len(v) for k, v in load_pool(pcam, "valid").items()}
    for name, seed, foci in (("normal", 3, []), ("tumour", 4, ["macro", "micro"])):
        if not (slides / f"{name}.tiff").exists():
            layout = make_layout(np.random.default_rng(seed), 4200, foci, cell_mm=96 * PCAM_MPP / 1000, pools=sizes)
            build_layout_slide(slides / f"{name}.tiff", layout, patches_dir=pcam, seed=seed)
    if not (run / "results.csv").exists():
        subprocess.run([sys.executable, "-m", "wsi_screen.cli", "infer", str(slides), "-o", str(run), "--quiet"],
                       check=True)
    for name in ("normal", "tumour"):
        shutil.copy(run / name / "heatmap.png", IMG / f"heatmap-{name}.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=REPO / "runs" / "demo")
    parser.add_argument("--phantoms", type=Path, default=REPO / "runs" / "phantoms")
    args = parser.parse_args(argv)
    IMG.mkdir(parents=True, exist_ok=True)
    phantoms(args.phantoms)
    if not (args.run / "results.csv").exists():
        subprocess.run([sys.executable, "-m", "wsi_screen.cli", "infer", str(REPO / "examples"), "-o", str(args.run),
                        "--quiet"], check=True)
    shutil.copy(args.run / "CMU-1-Small-Region" / "heatmap.png", IMG / "heatmap.png")
    screenshot(args.run / "report.html", IMG / "report.png")

    import nbformat
    from nbclient import NotebookClient
    from nbconvert import HTMLExporter

    nb = nbformat.read(REPO / "notebooks" / "heatmap.ipynb", as_version=4)
    os.environ["WSI_SCREEN_RUN"] = str(args.run.resolve())
    NotebookClient(nb, timeout=600, kernel_name="python3").execute()
    body, _ = HTMLExporter().from_notebook_node(nb)
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "notebook.html"
        page.write_text(body)
        screenshot(page, IMG / "notebook.png", height=2200)
    print(f"wrote {', '.join(str(p.relative_to(REPO)) for p in sorted(IMG.glob('*.png')))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
