"""notebooks/heatmap.ipynb runs top to bottom on a fresh infer run of the bundled slide."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import REPO


def test_notebook_is_committed_without_outputs() -> None:
    nb = nbformat.read(REPO / "notebooks" / "heatmap.ipynb", as_version=4)
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
