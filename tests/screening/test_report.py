"""The HTML report: self-contained, escaped, and rendered by a real (headless) Chromium."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_cli
from wsi_screen.screening.report import render_report

#: set (to 1) where a missing Chromium must fail the browser test instead of skipping it: CI (.ci/run)
REQUIRE_BROWSER = "WSI_SCREEN_REQUIRE_BROWSER"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--window-size=1280,2000"]


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory: pytest.TempPathFactory, cmu_svs: Path) -> Path:
    """A run with an ordinary slide and one named to inject markup: <script>x.svs."""
    root = tmp_path_factory.mktemp("hostile")
    src = root / "slides"
    src.mkdir()
    shutil.copy(cmu_svs, src / "ordinary.svs")
    shutil.copy(cmu_svs, src / "<script>x.svs")
    (src / "broken & <img src=x onerror=alert(1)>.svs").write_bytes(b"not a slide")
    run = root / "run"
    res = run_cli("infer", src, "-o", run, "--workers", "0", "--quiet")
    assert res.code == 1  # the broken slide is an error row
    return run


def test_report_is_self_contained_and_escaped(hostile_run: Path) -> None:
    page = (hostile_run / "report.html").read_text()
    assert page.count("<script>") == 1  # our sorting script only
    assert "&lt;script&gt;x" in page and "<script>x" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page and "<img src=x" not in page
    assert not re.search(r"""(src|href)=["'](https?:)?//""", page)  # nothing fetched from anywhere
    assert "Content-Security-Policy" in page
    assert page.count("data:image/png;base64,") >= 2 * (1 + 8)  # heatmap + top patches per scored slide


def test_report_command_rewrites(hostile_run: Path) -> None:
    (hostile_run / "report.html").unlink()
    res = run_cli("report", hostile_run)
    assert res.code == 0 and (hostile_run / "report.html").exists()
    assert render_report(hostile_run).startswith("<!doctype html>")


def _driver(tmp_path: Path):  # type: ignore[no-untyped-def]
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_bin = shutil.which("chromedriver")
    if not chromium or not driver_bin:
        missing = "headless Chromium is not installed (apt-get install chromium chromium-driver)"
        if os.environ.get(REQUIRE_BROWSER, "") not in ("", "0"):
            pytest.fail(f"{missing}, and {REQUIRE_BROWSER}=1 makes this test mandatory (as .ci/run does)")
        pytest.skip(f"{missing}; .ci/run installs it and sets {REQUIRE_BROWSER}=1")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver_bin), options=options)


@pytest.mark.browser
def test_report_renders_in_chromium(hostile_run: Path, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    driver = _driver(tmp_path)
    try:
        driver.get((hostile_run / "report.html").resolve().as_uri())
        rows = driver.find_elements(By.CSS_SELECTOR, "#slides tbody tr")
        assert len(rows) == 3
        names = [r.find_elements(By.TAG_NAME, "td")[0].text for r in rows]
        assert "<script>x" in names  # shown as text, not run
        images = driver.find_elements(By.TAG_NAME, "img")
        assert len(images) >= 18
        widths = driver.execute_script("return Array.from(document.images).map(i => i.complete && i.naturalWidth)")
        assert all(w and w > 0 for w in widths), widths
        assert driver.execute_script("return document.scripts.length") == 1
        # sorting by score puts the error row (no score) first when ascending
        header = driver.find_elements(By.CSS_SELECTOR, "#slides th")[3]
        header.click()
        first = driver.find_elements(By.CSS_SELECTOR, "#slides tbody tr")[0].text
        assert "error" in first
        png = driver.get_screenshot_as_png()
        (tmp_path / "report.png").write_bytes(png)
        shot = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32)
        assert shot.shape[1] >= 1000 and shot.std() > 20  # not a blank page
        severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert severe == [], severe
    finally:
        driver.quit()


def test_chromium_flags_are_the_documented_ones() -> None:
    run = Path(__file__).parents[2] / ".ci" / "run"
    assert "chromium chromium-driver" in run.read_text()
    assert f"export {REQUIRE_BROWSER}=1" in run.read_text()  # CI never skips the browser test
    assert subprocess.run(["bash", "-n", str(run)]).returncode == 0
