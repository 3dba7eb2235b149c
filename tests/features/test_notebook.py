"""The notebooks run top to bottom: heatmap.ipynb on a fresh infer run of the bundled slide, screen_a_slide.ipynb
on the bundled slide through the public API only."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import REPO


@pytest.mark.parametrize("name", ["heatmap.ipynb", "screen_a_slide.ipynb"])
def test_notebook_is_committed_without_outputs(name: str) -> None:
    nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


@pytest.mark.slow
def test_notebook_executes(demo_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As the README starts it: WSI_SCREEN_RUN=runs/demo from the repository, the kernel in notebooks/."""
    import shutil

    shutil.copytree(demo_run, tmp_path / "runs" / "demo")  # a copied run folder opens as the original
    (tmp_path / "notebooks").mkdir()
    monkeypatch.setenv("WSI_SCREEN_RUN", "runs/demo")
    nb = nbformat.read(REPO / "notebooks" / "heatmap.ipynb", as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path / "notebooks")}})
    client.execute()  # raises CellExecutionError if any cell fails
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # heatmap, gallery, distribution
    html = [o for o in outputs if "text/html" in o.get("data", {})]
    assert any("CMU-1-Small-Region" in o["data"]["text/html"] for o in html)
    assert not [o for o in outputs if o.get("output_type") == "error"]


def test_screen_a_slide_uses_only_the_public_api() -> None:
    import re

    import wsi_screen

    nb = nbformat.read(REPO / "notebooks" / "screen_a_slide.ipynb", as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert not re.search(r"from wsi_screen[. ]|import wsi_screen\.", code)  # nothing reached inside the package
    used = set(re.findall(r"wsi_screen\.(\w+)", code))
    assert used <= {*wsi_screen.__all__}, used - {*wsi_screen.__all__}
    assert {"open_slide", "tissue_mask", "tile", "load_model", "score", "call_slide", "heatmap", "screen"} <= used
    # it tiles at the model's settings as docs/api.md says: stain method and its target
    tile_call = re.search(r"wsi_screen\.tile\((.*?)\)\n", code, re.S)
    assert tile_call and "stain=spec.stain_method" in tile_call.group(1), code
    assert "stain_target=spec.stain_target" in tile_call.group(1), tile_call.group(1)


@pytest.mark.slow
def test_screen_a_slide_executes(tmp_path: Path) -> None:
    """From notebooks/, as Jupyter starts it, on the bundled slide."""
    nb = nbformat.read(REPO / "notebooks" / "screen_a_slide.ipynb", as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO / "notebooks")}})
    client.execute()  # raises CellExecutionError if any cell fails
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 6  # slide, mask, patches, histogram, heatmap, top patches
    text = "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in outputs)
    assert "SlideCall('CMU-1-Small-Region': normal" in text and "in domain" in text
