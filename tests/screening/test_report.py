"""The HTML report: self-contained, escaped, and rendered by a real (headless) Chromium."""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import read_results, run_cli
from wsi_screen.screening.report import render_report, write_report

#: set (to 1) where a missing Chromium must fail the browser test instead of skipping it: CI (.ci/run)
REQUIRE_BROWSER = "WSI_SCREEN_REQUIRE_BROWSER"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--window-size=1280,2000"]


#: a file name of 200 characters without a space: its error row must not widen the table
LONG_NAME = "long-" + "x" * 191 + ".svs"


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory: pytest.TempPathFactory, cmu_svs: Path) -> Path:
    """A run with an ordinary slide, one named to inject markup (<script>x.svs) and two broken ones, one with a
    200-character name, given as a path with ``..`` in it."""
    root = tmp_path_factory.mktemp("hostile")
    src = root / "slides"
    src.mkdir()
    (root / "elsewhere").mkdir()
    shutil.copy(cmu_svs, src / "ordinary.svs")
    shutil.copy(cmu_svs, src / "<script>x.svs")
    (src / "broken & <img src=x onerror=alert(1)>.svs").write_bytes(b"not a slide")
    (src / LONG_NAME).write_bytes(b"not a slide either")
    run = root / "run"
    res = run_cli("infer", root / "elsewhere" / ".." / "slides", "-o", run, "--workers", "0", "--quiet")
    assert res.code == 1  # the broken slides are error rows
    (root / "infer.out").write_text(res.out)  # what the command printed, for the tests of its closing lines
    return run


def test_report_is_self_contained_and_escaped(hostile_run: Path) -> None:
    page = (hostile_run / "report.html").read_text()
    assert page.count("<script>") == 1  # our sorting script only
    assert "&lt;script&gt;x" in page and "<script>x" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page and "<img src=x" not in page
    assert not re.search(r"""(src|href)=["'](https?:)?//""", page)  # nothing fetched from anywhere
    assert "Content-Security-Policy" in page
    assert page.count('src="data:image/webp;base64,') == 2 * (1 + 8)  # heatmap preview + top patches per scored slide


def test_report_embeds_small_heatmaps_linked_to_the_full_ones(hostile_run: Path) -> None:
    """Each slide's full heatmap.png (about 0.8 MB, 1.1 MB as base64) was inlined, so a 1,000-slide run wrote a
    report of over a gigabyte that no browser opens; the page now holds a small preview linking to the file."""
    from html.parser import HTMLParser
    from urllib.parse import urljoin, urlparse
    from urllib.request import url2pathname

    class Heatmaps(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.href = ""
            self.found: list[tuple[str, str, str]] = []  # (link around the picture, alt, src)

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            a = {k: v or "" for k, v in attrs}
            if tag == "a":
                self.href = a["href"]
            elif tag == "img" and a.get("class") == "heat":
                self.found.append((self.href, a["alt"], a["src"]))

        def handle_endtag(self, tag: str) -> None:
            if tag == "a":
                self.href = ""

    report = hostile_run / "report.html"
    parser = Heatmaps()
    parser.feed(report.read_text(encoding="utf-8"))
    assert sorted(alt for _, alt, _ in parser.found) == ["heatmap of <script>x", "heatmap of ordinary"]
    for href, alt, src in parser.found:
        name = alt.removeprefix("heatmap of ")
        full = hostile_run / name / "heatmap.png"
        assert full.stat().st_size > 300_000
        head, data = src.split(",", 1)
        preview = base64.b64decode(data)
        assert head == "data:image/webp;base64" and len(preview) < 150_000, (head, len(preview))
        with Image.open(io.BytesIO(preview)) as image, Image.open(full) as original:
            assert image.format == "WEBP" and image.width <= 800 and image.width >= 0.7 * min(original.width, 800)
        # the link, followed as a browser follows it from the page, opens this slide's full heatmap
        target = Path(url2pathname(urlparse(urljoin(report.resolve().as_uri(), href)).path))
        assert target.is_file() and target.samefile(full), (href, target)


def test_a_slides_pictures_in_the_report_are_bounded(hostile_run: Path) -> None:
    """With the heatmap a preview, the 8 top patches as PNG (over 20 KB each, 96 px of tissue that PNG hardly
    compresses) were most of a slide's ~300 KB in the page; as WebP a slide's pictures together stay under 150 KB."""
    page = (hostile_run / "report.html").read_text(encoding="utf-8")
    size_px = json.loads((hostile_run / "run.json").read_text())["model"]["input_size"]
    sections = page.split('<section class="slide"')[1:]
    assert len(sections) == 2
    for section in sections:
        pictures = re.findall(r'src="data:(image/\w+);base64,([^"]*)"', section.split("</section>")[0])
        assert len(pictures) == 1 + 8  # the heatmap and the top patches
        assert {mime for mime, _ in pictures} == {"image/webp"}
        sizes = [len(base64.b64decode(data)) for _, data in pictures]
        assert sum(sizes) < 150_000, sizes
        for _, data in pictures[1:]:
            with Image.open(io.BytesIO(base64.b64decode(data))) as patch:
                assert patch.size == (size_px, size_px)  # the patch's own pixels, not shrunk


def test_report_is_written_for_people(hostile_run: Path) -> None:
    page = (hostile_run / "report.html").read_text()
    results = (hostile_run / "results.csv").read_text()
    assert "/../" in results  # the error rows name the slides as given...
    assert "/../" not in page  # ...the report normalises every path it shows
    assert "/elsewhere/" not in page and "/slides/broken &amp; &lt;img" in page
    # thresholds and scores rounded: 0.0479, not 0.04788921139199999
    assert "score &ge; 0.0479 mm&sup2;" in page and "0.04788921139199999" not in page
    assert not re.search(r"\d\.\d{7,}", page.split("<h2>Provenance")[0])
    assert not re.search(r"(?<![\w.])\d\.\d{6,}(?!\w)", page.split("<h2>Provenance")[1])
    # two patch thresholds, each named: the call's (region rule: 0.8), the one the heatmaps and GeoJSON show, and the
    # model's operating point (0.213), and which run.json key holds which
    assert "call patch threshold 0.8 (the call&#x27;s patch threshold: " in page
    assert "the foci) &middot; model operating point 0.213 (the model's own patch threshold" in page
    assert "aggregate.call_patch_threshold is the call patch threshold, aggregate.patch_threshold (and " \
           "model.patch_threshold) the model's operating point" in page
    assert re.findall(r"(?<!call )patch threshold 0\.\d+", page.split("<h2>Provenance")[0]) == []
    # the long error folds under its first words; every cell may wrap, so the table fits its page
    assert page.count('<details class="err">') >= 1 and "overflow-wrap:anywhere" in page
    folded = re.findall(r'<details class="err"><summary>(.*?)</summary><div>(.*?)</div>', page)
    assert folded and all(len(html.unescape(s)) <= 70 for s, _ in folded)
    summary = next(s for s, f in folded if LONG_NAME in html.unescape(f))
    assert html.unescape(summary).startswith("error: not a slide format")  # the reason; the row names the slide


def test_a_number_from_results_csv_is_rounded_as_its_digits_read() -> None:
    """The tumour phantom's tumour area is 174 patches of 93.312 um, 1.51504 mm²: results.csv writes 1.5150, and the
    report showed 1.51 (the float 1.515 is 1.51499...) where the table, read by a person, and the area itself give
    1.52."""
    from wsi_screen.screening.report import people_number

    area = 174 * 0.093312 ** 2
    assert people_number(f"{area:.4f}") == people_number(area) == "1.52"
    assert people_number("1.704") == "1.7" and people_number("0.0478892") == "0.0479"
    assert people_number("0.000") == "0" and people_number("3550") == "3550" and people_number("nan") == "nan"
    assert people_number("n/a") == "n/a" and people_number("") == "" and people_number("true") == "true"


def test_the_header_counts_one_slide_in_the_singular(demo_run: Path, hostile_run: Path) -> None:
    """A run of one slide was headed "1 slides"."""
    one = (demo_run / "report.html").read_text(encoding="utf-8")
    assert '<p class="muted">1 slide &middot; model resnet10t' in one
    assert f'<p class="muted">{len(read_results(hostile_run))} slides &middot; model ' in \
        (hostile_run / "report.html").read_text(encoding="utf-8")


def test_a_region_score_is_shown_with_its_unit(demo_run: Path, example_slide: Path, tmp_path: Path) -> None:
    """The heatmap's title and the header's rule say "score 0.0435 mm² < 0.0479 mm²"; the slide's line and the table
    gave "score 0.0435", a bare number for an area. Another rule's score is a probability, without a unit."""
    page = (demo_run / "report.html").read_text(encoding="utf-8")
    assert "<b>normal</b> &middot; score 0.0435 mm&sup2; &middot; metastasis" in page
    assert '<th scope="col" class="num">score (mm&sup2;)</th>' in page
    run = tmp_path / "run"
    shutil.copytree(demo_run, run, ignore=shutil.ignore_patterns("stores"))
    res = run_cli("infer", example_slide, "-o", run, "--stores", demo_run / "stores", "--aggregate", "max", "--quiet")
    assert res.code == 0, res
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "<b>normal</b> &middot; score 0.967 &middot; metastasis" in page
    assert '<th scope="col" class="num">score</th>' in page and "mm&sup2; &middot; metastasis" not in page


def test_a_focus_size_reads_as_on_the_heatmap_and_in_the_geojson(synthetic_run: Path) -> None:
    """The report gave the largest focus in three significant digits (0.596 mm, 1.7 mm) where the heatmap's title and
    label, the GeoJSON's annotation name and infer's table give two decimals (0.60 mm, 1.70 mm)."""
    page = (synthetic_run / "report.html").read_text(encoding="utf-8")
    rows = read_results(synthetic_run)
    positives = [name for name, r in rows.items() if int(r["n_foci"])]
    assert len(positives) == 3
    for name in positives:
        fc = json.loads((synthetic_run / name / "patches.geojson").read_text())
        first = next(f["properties"]["name"] for f in fc["features"] if f["properties"].get("rank") == 1)
        shown = f"{float(rows[name]['largest_focus_mm']):.2f}"
        assert first.endswith(f", {shown} mm") and rows[name]["largest_focus_mm"] != shown, (first, shown)
        assert f"(largest focus {shown} mm, 1 focus, " in page
        assert f'data-v="{rows[name]["largest_focus_mm"]}">{shown}</td>' in page
    assert "(largest focus 0 mm, 0 foci, 0 mm&sup2;)" in page  # the normal slides'


def test_a_focus_size_is_rounded_once_as_on_the_heatmap(synthetic_run: Path, tmp_path: Path) -> None:
    """results.csv keeps a focus size to 3 decimals (a focus of 1.2349 mm: 1.235) and the report rounded that text
    again (1.24) where the heatmap rounds the measurement once (1.23): ~2 % of foci read 0.01 mm apart (the area
    likewise: 1.23496 mm², 1.2350, 1.24 against 1.23). run.json records each slide's sizes as measured, and the
    report rounds those, once, as the heatmap does."""
    import csv
    import dataclasses

    from wsi_screen.screening.callview import focus_label, title
    from wsi_screen.screening.runview import open_run, slide_call

    view = open_run(synthetic_run)
    recorded = {s["slide"]: s for s in json.loads((synthetic_run / "run.json").read_text())["slides"]}
    positives = [r for r in view.results if r["n_foci"] not in ("", "0")]
    assert len(positives) == 3
    for row in positives:  # run.json holds the heatmap's measurement, which results.csv rounds
        result = slide_call(view, row["slide"]).result
        assert result is not None and result.largest_focus_mm is not None and result.tumour_area_mm2 is not None
        assert recorded[row["slide"]]["largest_focus_mm"] == result.largest_focus_mm
        assert recorded[row["slide"]]["tumour_area_mm2"] == result.tumour_area_mm2
        assert f"{result.largest_focus_mm:.3f}" == row["largest_focus_mm"]

    name = positives[0]["slide"]  # now measured 1.2349 mm, 1.23496 mm², as a run records it
    ctx = slide_call(view, name)
    assert ctx.result is not None
    largest = dataclasses.replace(ctx.result.foci[0], longest_axis_mm=1.2349)
    ctx = dataclasses.replace(ctx, result=dataclasses.replace(
        ctx.result, largest_focus_mm=1.2349, tumour_area_mm2=1.23496, foci=(largest, *ctx.result.foci[1:])))
    assert "largest focus 1.23 mm" in title(ctx) and focus_label(largest).startswith("1: 1.23 mm")
    run = tmp_path / "run"
    shutil.copytree(synthetic_run, run, ignore=shutil.ignore_patterns("stores"))
    with (run / "results.csv").open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        columns, rows = list(reader.fieldnames or ()), list(reader)
    for row in rows:
        if row["slide"] == name:
            row.update(largest_focus_mm=f"{1.2349:.3f}", tumour_area_mm2=f"{1.23496:.4f}")  # as results.csv rounds
    with (run / "results.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, columns)
        writer.writeheader()
        writer.writerows(rows)
    info = json.loads((run / "run.json").read_text())
    for entry in info["slides"]:
        if entry["slide"] == name:
            entry.update(largest_focus_mm=1.2349, tumour_area_mm2=1.23496)
    (run / "run.json").write_text(json.dumps(info))
    page = render_report(run)
    assert "(largest focus 1.23 mm, " in page and "(largest focus 1.24 mm, " not in page
    assert 'data-v="1.235">1.23</td>' in page and 'data-v="1.2350">1.23</td>' in page  # the table: the same
    assert ", 1.23 mm&sup2;)" in page

    info["slides"] = [{k: v for k, v in s.items() if k not in ("largest_focus_mm", "tumour_area_mm2")}
                      for s in info["slides"]]
    (run / "run.json").write_text(json.dumps(info))  # a run.json from before it recorded them: results.csv's text
    assert "(largest focus 1.24 mm, " in render_report(run)


def test_out_of_domain_slides_are_counted_apart(hostile_run: Path) -> None:
    """Both scored slides are skin (the CMU slide), called normal and out of domain: the report's summary boxes said
    "2 normal" as for lymph node; they and infer's closing lines say how many of them are out of domain."""
    rows = [r for r in read_results(hostile_run).values() if r["status"] == "ok"]
    assert [(r["diagnosis"], r["out_of_domain"]) for r in rows] == [("normal", "true")] * 2
    page = (hostile_run / "report.html").read_text()
    cards = re.findall(r'<div class="card"><b>(\d+)</b>(.*?)</div>', page)
    assert cards == [("2", "error"), ("2", "normal (2 out of domain)")]
    printed = (hostile_run.parent / "infer.out").read_text().splitlines()
    assert "calls: 2 error, 2 normal (2 out of domain)" in printed
    assert printed[printed.index("calls: 2 error, 2 normal (2 out of domain)") + 1].endswith(
        "; 2 (re)computed; 2 failed")


def test_report_command_rewrites(hostile_run: Path) -> None:
    (hostile_run / "report.html").unlink()
    res = run_cli("report", hostile_run)
    assert res.code == 0 and (hostile_run / "report.html").exists()
    assert render_report(hostile_run).startswith("<!doctype html>")


def test_report_shows_scores_with_the_digits_that_keep_them_apart(hostile_run: Path, tmp_path: Path) -> None:
    """A threshold a hair above a slide's score: the report printed both at 3 significant digits ("0.0435" against
    ">= 0.0435"), as the terminal and heatmaps did before they shared one rule (aggregate.score_decimals)."""
    run = Path(shutil.copytree(hostile_run, tmp_path / "run"))
    score = min(float(r["score"]) for r in read_results(run).values() if r["status"] == "ok")
    info = json.loads((run / "run.json").read_text())
    info["aggregate"]["slide_threshold"] = score + 1e-6
    (run / "run.json").write_text(json.dumps(info))
    assert run_cli("report", run).code == 0
    page = (run / "report.html").read_text()
    digits = next(d for d in range(3, 7) if round(score, d) < round(score + 1e-6, d))
    assert digits >= 5 and f"score {score:.{digits}f} mm&sup2; &middot;" in page
    assert f"score &ge; {score + 1e-6:.{digits}f} mm&sup2;" in page
    assert f">{score:.{digits}f}</td>" in page  # the slides table's score cell


def test_a_damaged_heatmap_costs_its_preview_not_the_page(hostile_run: Path, tmp_path: Path) -> None:
    """A truncated heatmap.png made `wsi-screen report` (and infer's closing report) fail in one line that named no
    file, with no page at all: the preview of that slide is now said to be unavailable, its link kept."""
    run = Path(shutil.copytree(hostile_run, tmp_path / "run"))
    (run / "report.html").unlink()
    heat = run / "ordinary" / "heatmap.png"
    heat.write_bytes(heat.read_bytes()[:2000])
    res = run_cli("report", run)
    assert res.code == 0 and any(f"{heat}: unreadable heatmap" in line for line in res.err_lines), res
    page = (run / "report.html").read_text(encoding="utf-8")
    assert page.count("heatmap preview unavailable") == 1 and 'alt="heatmap of &lt;script&gt;x"' in page
    assert 'href="ordinary/heatmap.png"' in page


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
        assert len(rows) == 4
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
        # in a 1,400 px window the table, error rows and all, fits: the domain columns stay in view
        driver.set_window_size(1400, 1000)
        width = driver.execute_script("return window.innerWidth")
        assert width <= 1400
        right = driver.execute_script(
            "return Array.from(document.querySelectorAll('#slides th, #slides td'))"
            ".map(c => c.getBoundingClientRect().right)")
        assert max(right) <= width, (max(right), width)
        assert driver.execute_script("return document.documentElement.scrollWidth") <= width
        headers = [h.text for h in driver.find_elements(By.CSS_SELECTOR, "#slides th")]
        assert "out of domain" in headers
        # the provenance block wraps its long lines (the model card's, paths): none is cut off at its right edge
        pre = driver.find_element(By.CSS_SELECTOR, "pre")
        longest = driver.execute_script("return Math.max(...arguments[0].textContent.split('\\n').map(l => l.length))",
                                        pre)
        assert "Research use only" in pre.text and longest > 150
        assert driver.execute_script("var p = arguments[0]; return p.scrollWidth <= p.clientWidth", pre)
        assert driver.execute_script("return document.documentElement.scrollWidth") <= width
        # a heatmap preview's link, clicked, opens that slide's full-size heatmap.png (a name with < and > in it)
        full = hostile_run / "<script>x" / "heatmap.png"
        section = next(s for s in driver.find_elements(By.CSS_SELECTOR, "section.slide")
                       if s.find_element(By.TAG_NAME, "h2").text == "<script>x")
        section.find_element(By.CSS_SELECTOR, "a img.heat").click()
        assert driver.current_url.endswith("/heatmap.png"), driver.current_url
        with Image.open(full) as original:
            assert driver.execute_script("var i = document.images[0]; return [i.naturalWidth, i.naturalHeight]") \
                == list(original.size)
    finally:
        driver.quit()


def test_chromium_flags_are_the_documented_ones() -> None:
    run = Path(__file__).parents[2] / ".ci" / "run"
    assert "chromium chromium-driver" in run.read_text()
    assert f"export {REQUIRE_BROWSER}=1" in run.read_text()  # CI never skips the browser test
    assert subprocess.run(["bash", "-n", str(run)]).returncode == 0


def test_a_fallback_rule_is_recorded_and_named_in_the_report(demo_run: Path, example_slide: Path,
                                                           tmp_path: Path) -> None:
    """Without slide_rule.json the rule is the fallback: once said only on the terminal, now in run.json and the
    report beside the rule."""
    import json

    from wsi_screen.models import default_model_dir

    model = tmp_path / "uncalibrated"
    shutil.copytree(default_model_dir(), model, ignore=shutil.ignore_patterns("slide_rule.json"))
    run = tmp_path / "run"
    shutil.copytree(demo_run, run)  # the same weights: the scores are reused, the rule applied afresh
    res = run_cli("infer", example_slide.parent, "-o", run, "--model", model, "--stores", demo_run / "stores",
                  "--workers", "0", "--quiet")
    assert res.code == 0, res
    agg = json.loads((run / "run.json").read_text())["aggregate"]
    assert (agg["source"], agg["rule"], agg["k"], agg["slide_threshold"]) == ("fallback", "topk", 5, 0.5)
    note = "(fallback rule: the model has no calibrated slide rule; choose one on labelled slides with wsi-screen " \
           "calibrate)"
    assert note in (run / "report.html").read_text()
    assert json.loads((demo_run / "run.json").read_text())["aggregate"]["source"] == "slide_rule.json"
    assert "fallback rule" not in (demo_run / "report.html").read_text()


def _page_body(page: str) -> str:
    """A report without its writing time (the one line that differs between two builds of one run)."""
    return re.sub(r"Written by wsi-screen .*? on [^<]*\.", "", page)


def test_a_rewritten_report_encodes_only_the_previews_of_changed_heatmaps(demo_run: Path, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Every report build encoded every slide's heatmap preview again (~0.1 s a slide: minutes at 1,000 slides on
    each `wsi-screen report` or rerun of infer): the preview is cached in RUN/.previews under the sha256 of the
    heatmap's bytes and the preview's settings, so an unchanged heatmap is read from the cache, a changed one is
    encoded (and its old entry dropped by the next report written), and a damaged entry is rebuilt. The slide
    folders hold their results only."""
    from wsi_screen.screening import preview, runfolder

    run = Path(shutil.copytree(demo_run, tmp_path / "run"))  # infer's own report cached the preview
    heat = next(run.glob(f"*/{runfolder.HEATMAP_PNG}"))
    assert {p.name for p in heat.parent.iterdir()} == set(runfolder.SLIDE_FILES)
    cache_dir = run / runfolder.PREVIEW_DIR
    (cache,) = cache_dir.iterdir()
    assert cache == preview.cache_path(cache_dir, preview.preview_key(heat.read_bytes()))
    encoded: list[bytes] = []
    encode = preview.heatmap_preview
    monkeypatch.setattr(preview, "heatmap_preview", lambda png: encoded.append(encode(png)) or encoded[-1])
    ino = cache.stat().st_ino
    cached_page = render_report(run)
    assert encoded == [] and cache.stat().st_ino == ino  # nothing encoded or written
    cache.unlink()
    assert _page_body(render_report(run)) == _page_body(cached_page) and len(encoded) == 1  # the same page
    assert cache.is_file()
    first = encoded[0]
    # a damaged entry (cut short, or another file in its place) is encoded again, never fatal
    for damaged in (cache.read_bytes()[:-100], b"not a cache"):
        cache.write_bytes(damaged)
        assert preview.cached_heatmap_preview(heat, cache_dir) == first
    assert len(encoded) == 3 and preview.cached_heatmap_preview(heat, cache_dir) == first and len(encoded) == 3
    # a redrawn heatmap gets a new preview; the report written next keeps only the entry it used, and drops a
    # killed build's temporary file
    with Image.open(heat) as image:
        redrawn = image.convert("RGB").rotate(180)
    redrawn.save(heat)
    new = preview.cached_heatmap_preview(heat, cache_dir)
    assert len(encoded) == 4 and new != first
    assert preview.cached_heatmap_preview(heat, cache_dir) == new and len(encoded) == 4
    killed = cache_dir / f".{cache.name}.killed.tmp"
    killed.write_bytes(b"half a cache")
    old = time.time() - 3600
    for entry in cache_dir.iterdir():
        os.utime(entry, (old, old))
    write_report(run)
    assert [p.name for p in cache_dir.iterdir()] == [preview.cache_path(cache_dir, preview.preview_key(
        heat.read_bytes())).name] and len(encoded) == 4


def _sections(page: str) -> list[str]:
    return [html.unescape(h) for h in re.findall(r'<section class="slide" id="s\d+"><h2>(.*?)</h2>', page)]


def test_a_large_runs_report_pictures_the_slides_that_need_a_look_and_the_top_others(
        demo_run: Path, tmp_path: Path) -> None:
    """Every scored slide's pictures were in the page (~0.12 MB a slide: ~120 MB for 1,000 slides): the page now
    pictures every slide called tumour, out of domain, called against its label or without tissue, and the
    report_top highest-scoring others; every other slide is a table row linking to its full heatmap.png."""
    from tests.runs import copied_run

    changes = [{"slide": "tumour-call", "diagnosis": "tumour", "score": "0.5"},
               {"slide": "odd-tissue", "out_of_domain": "true", "score": "0.001"},
               {"slide": "against-label", "label": "tumour", "label_agrees": "false", "score": "0.002"},
               {"slide": "failed", "status": "error", "error": "not a slide format", "score": "", "diagnosis": ""},
               *({"slide": f"normal-{i}", "score": f"0.0{i}"} for i in range(1, 5))]
    for change in changes:
        change.setdefault("out_of_domain", "false")
    run = copied_run(demo_run, tmp_path / "run", changes)
    assert json.loads((run / "run.json").read_text())["settings"]["report_top"] == 50  # infer records its choice
    look = ["tumour-call", "odd-tissue", "against-label"]
    page = render_report(run, report_top=2)
    assert sorted(_sections(page)) == sorted([*look, "normal-4", "normal-3"])
    assert page.count('src="data:image/webp;base64,') == 5 * (1 + 8)
    assert ("Pictures (heatmap preview and top patches) below for 5 of 7 scored slides: the 3 that need a look "
            "(called tumour, out of domain, called otherwise than their label, or without tissue) and the 2 "
            "highest-scoring others.") in page
    for name in ("normal-1", "normal-2"):  # a row linking to the full heatmap, no picture
        assert f'<a href="{name}/heatmap.png" title="full-size heatmap">{name}</a>' in page
        assert f"heatmap of {name}" not in page
    assert '<a href="#s' in page.split("normal-4</a>")[0].rsplit("<tr", 1)[1]  # pictured: a link to its section
    # report without report_top: infer's choice, as run.json records it; a run within it is pictured whole, as before
    page = render_report(run)
    assert sorted(_sections(page)) == sorted(c["slide"] for c in changes if c.get("status") != "error")
    assert "Pictures (heatmap preview" not in page and 'title="full-size heatmap"' not in page
    info = json.loads((run / "run.json").read_text())
    info["settings"]["report_top"] = 0
    (run / "run.json").write_text(json.dumps(info))
    res = run_cli("report", run)
    assert res.code == 0 and sorted(_sections((run / "report.html").read_text())) == sorted(look)
    res = run_cli("report", run, "--report-top", "1")
    assert res.code == 0 and sorted(_sections((run / "report.html").read_text())) == sorted([*look, "normal-4"])
    res = run_cli("report", run, "--report-top", "-1")
    assert res.code == 2 and res.err_lines == [
        "wsi-screen: error: Invalid value for '--report-top': -1 is not in the range x>=0. (see wsi-screen report "
        "--help)"]
