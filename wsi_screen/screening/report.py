"""``RUN/report.html``: one self-contained page per run (images inlined, no network, no external scripts).

The page stays small whatever the number of slides: each slide's heatmap is inlined as a preview
(:mod:`wsi_screen.screening.preview`: at most 800 px wide, WebP, a few tens of KB where the full picture is about a
megabyte; cached beside the heatmap, so a rewritten report encodes only the previews of heatmaps that changed) that
links to the full-size ``heatmap.png`` in the slide's folder (a relative link: it opens while the page sits in its run
folder), and its top patches as WebP at :data:`PATCH_QUALITY` (about 5 KB each, where PNG took over 20: the same
pixels to the eye at the gallery's size). Everything the heatmap's title says is in the page's text too. A large
run's page pictures only the slides that need a look and the highest-scoring others
(:mod:`wsi_screen.screening.pictured`); every other slide is a table row linking to its full-size heatmap.

Everything printed is escaped with :func:`html.escape` (slide names come from file names, which anyone can
choose); element ids are generated, never taken from data. A Content-Security-Policy meta tag forbids any
network access from the page. The one inline script only sorts the table.

Shown for people: numbers rounded (:func:`people_number`; each sortable cell keeps the full value for sorting,
run.json and results.csv keep them all), paths normalised (:func:`tidy_paths`: no ``a/../b``), long error messages
folded under their first words, and the slides table fits a 1,400 px window whatever its cells hold (they wrap).
The header names two patch thresholds apart: the call patch threshold, the one the heatmaps, GeoJSON and foci
show (:func:`wsi_screen.screening.aggregate.call_patch_threshold`, named for what it is to the rule), and the model's
operating point (its own patch threshold, run.json's ``aggregate.patch_threshold``); the provenance block's note
says which run.json key holds which.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import re
from collections.abc import Collection
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any
from urllib.parse import quote

from wsi_screen import __version__
from wsi_screen._safe_write import atomic_write_text
from wsi_screen.errors import WsiScreenError
from wsi_screen.metrics import auc_words, rate_words
from wsi_screen.screening import runfolder
from wsi_screen.screening.aggregate import (
    NO_RESULT,
    call_comparison,
    call_counts,
    call_patch_threshold,
    call_patch_threshold_name,
    foci_count,
    out_of_domain_words,
    recorded_rule_label,
    score_decimals,
)
from wsi_screen.screening.pictured import REPORT_TOP, needs_a_look, pictured_rows, valid_top
from wsi_screen.screening.preview import build_started, cached_heatmap_preview, prune_previews, webp
from wsi_screen.screening.runview import RunView, open_run, top_patches
from wsi_screen.screening.spatial import mm_words

log = logging.getLogger(__name__)

N_TOP = 8
#: WebP quality of the top patches
PATCH_QUALITY = 90
#: where run.json records the call patch threshold (the pictures' and foci's) and the model's operating point
PROVENANCE_CALL = "aggregate.call_patch_threshold"
PROVENANCE_MODEL = "aggregate.patch_threshold (and model.patch_threshold)"

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;
color:#222;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem} h2{font-size:1.25rem;margin-top:2.2rem;border-bottom:1px solid #ddd}
.muted{color:#666} table{border-collapse:collapse;width:100%;margin:1rem 0}
th,td{padding:.35rem .45rem;border-bottom:1px solid #e5e5e5;text-align:left}
#slides td:first-child,#slides td.dx{overflow-wrap:anywhere}
#slides td:first-child{min-width:8rem;max-width:16rem} #slides td.dx{min-width:9rem;max-width:20rem}
#slides td.num{white-space:nowrap}
details.err summary{cursor:pointer} details.err div{margin-top:.3rem;font-size:.85rem}
th{cursor:pointer;background:#f4f4f6;user-select:none} th.num,td.num{text-align:right}
th[aria-sort=ascending]::after{content:" \\25B2"} th[aria-sort=descending]::after{content:" \\25BC"}
tr.pos td.dx{color:#b00020;font-weight:600} tr.error td{color:#8a6d00} tr.busy td{color:#555}
tr.ood td{background:#fff4e0} .ood-flag{color:#9a5b00;font-weight:600}
.disagree-flag{background:#b00020;color:#fff;border-radius:3px;padding:0 .3em;font-size:.8rem;font-weight:600}
.modelcard{border-left:4px solid #3b6ea5;padding:.4em .8em;background:#f3f7fb;margin:.6em 0}
.cards{display:flex;gap:1rem;flex-wrap:wrap} .card{background:#f7f7f9;border-radius:6px;padding:.6rem 1rem}
.card b{display:block;font-size:1.4rem} img.heat{max-width:100%;border:1px solid #ddd}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:.6rem}
.gallery figure{margin:0;font-size:.8rem} .gallery img{width:100%;image-rendering:pixelated;border:1px solid #ccc}
pre{background:#f7f7f9;padding:1rem;overflow:auto;font-size:.8rem;white-space:pre-wrap;overflow-wrap:anywhere}
"""

_JS = """
document.querySelectorAll('table.sortable th').forEach(function(th, col){
  th.addEventListener('click', function(){
    var table = th.closest('table'), body = table.tBodies[0];
    var asc = th.getAttribute('aria-sort') !== 'ascending';
    table.querySelectorAll('th').forEach(function(h){ h.removeAttribute('aria-sort'); });
    th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
    var num = th.classList.contains('num');
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function(a, b){
      var x = a.cells[col].getAttribute('data-v'), y = b.cells[col].getAttribute('data-v');
      if (num) { x = x === '' ? -Infinity : parseFloat(x); y = y === '' ? -Infinity : parseFloat(y); }
      return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1);
    });
    rows.forEach(function(r){ body.appendChild(r); });
  });
});
"""

_CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
        "base-uri 'none'; form-action 'none'")


def people_number(value: Any, digits: int = 3) -> Any:
    """A number as people read it: ``digits`` significant digits (0.0479, not 0.04788921139199999; 0.8; 12.3);
    text holding a number likewise, rounded as its decimal digits read (results.csv's ``1.5150`` is 1.52, as a
    reader of the table rounds it; through a float, 1.51499..., it was 1.51); anything else unchanged."""
    if isinstance(value, str):
        try:
            number = Decimal(value.strip())
        except ArithmeticError:
            return value
        if not number.is_finite():
            return value
        if number and abs(number) < 10 ** digits:
            number = number.quantize(Decimal(1).scaleb(number.adjusted() - digits + 1), rounding=ROUND_HALF_EVEN)
        return people_number(float(number), digits)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return value
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"


#: ``x/../`` in a path, where x is a folder name (not ``..`` itself)
_UP = re.compile(r"(?:(?<=/)|(?<![^\s'\"(=]))(?!\.\./)[^/\s'\"()=]+/\.\./")
_HERE = re.compile(r"(?<=/)\./")


def tidy_paths(text: str) -> str:
    """Paths in ``text`` normalised for reading: ``runs/../shared/a/./b`` -> ``shared/a/b`` (as
    :func:`os.path.normpath`, on every path in a message)."""
    out = _HERE.sub("", str(text))
    while True:
        shorter = _UP.sub("", out)
        if shorter == out:
            return out
        out = shorter


def _for_people(value: Any) -> Any:
    """Provenance as people read it: floats rounded, paths normalised (run.json keeps the exact values)."""
    if isinstance(value, dict):
        return {k: _for_people(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_for_people(v) for v in value]
    if isinstance(value, float):
        return float(people_number(value, 4))
    return tidy_paths(value) if isinstance(value, str) else value


def _html(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _img(data: bytes, alt: str, cls: str = "", mime: str = "image/png") -> str:
    b64 = base64.b64encode(data).decode("ascii")
    return f'<img class="{cls}" alt="{_html(alt)}" src="data:{mime};base64,{b64}">'


def _href(run: Path, path: Path) -> str:
    """A relative link from the run folder's report to ``path`` inside it, each part percent-encoded (names are
    data: ``#``, ``?`` or ``"`` in a slide's name stay part of the path)."""
    return "/".join(quote(part, safe="") for part in path.relative_to(run).parts)


def _rule_comparison(agg: dict[str, Any], digits: int | None) -> str:
    """``&ge; 0.9848`` (the run's score digits), or ``> 0`` for the region rule at 0: the terminal's and heatmaps'
    words (:func:`wsi_screen.screening.aggregate.call_comparison`); ``>= ?`` where run.json records none."""
    threshold = agg.get("slide_threshold")
    words = ">= ?" if threshold is None else call_comparison(agg.get("rule"), float(threshold), digits)
    return _html(words).replace("&gt;=", "&ge;")


def _region_unit(agg: dict[str, Any]) -> str:
    """The region rule's score is an area: say so, and at which patch probability."""
    if agg.get("rule") != "region":
        return ""
    return f" mm&sup2; (largest region at p &ge; {_html(people_number(agg.get('region_threshold')))})"


def _overrides(info: dict[str, Any]) -> str:
    """The slide-rule settings given on `infer`'s command line, named as overrides of the model's own rule."""
    given = (info.get("settings") or {}).get("overrides") or {}
    flags = " ".join(f"--{k} {v:g}" if isinstance(v, float) else f"--{k} {v}" for k, v in given.items())
    return f" <b>(override: {_html(flags)}; not the model's calibrated rule)</b>" if flags else ""


def _fallback(agg: dict[str, Any]) -> str:
    """A note beside a rule that rests on no calibration (run.json's ``aggregate.source``)."""
    if agg.get("source") != runfolder.FALLBACK_SOURCE:
        return ""
    return (" <b>(fallback rule: the model has no calibrated slide rule; choose one on labelled slides with "
            "wsi-screen calibrate)</b>")


def _model_card(model: dict[str, Any]) -> str:
    """The model card's two-line summary and what the table's columns mean."""
    lines = model.get("card") or [f"Model {model.get('arch')}: no model card (wsi_screen.models.card writes one).",
                                  "Research use only, not for diagnosis."]
    return (f'<div class="modelcard"><p>{"<br>".join(_html(line) for line in lines)}</p>'
            '<p class="muted"><b>diagnosis</b> is the model\'s slide call from its patch scores (the rule below), '
            "for screening research: not a pathologist's diagnosis. <b>in domain fraction</b>: share of the slide's "
            "patches that resemble the training data; <b>out of domain</b> slides get a call that should not be "
            "trusted.</p></div>")


def score_digits(view: RunView) -> int | None:
    """The decimals a run's slide scores and their threshold are shown with: the terminal table's and the heatmaps'
    rule (:func:`wsi_screen.screening.aggregate.score_decimals`), so 0.9846 < 0.9848 reads as it is called; None
    where run.json records no threshold."""
    threshold = (view.info.get("aggregate") or {}).get("slide_threshold")
    if threshold is None:
        return None
    scores = [float(r["score"]) for r in view.results if r.get("score") not in (None, "")]
    return score_decimals(float(threshold), scores)


def _score(value: Any, digits: int | None) -> str:
    """A slide score with the run's :func:`score_digits` (three significant digits without them)."""
    if digits is None or value in (None, ""):
        return _html(people_number(value if value not in (None, "") else "-"))
    return _html(f"{float(value):.{digits}f}")


def _focus_mm(value: Any) -> str:
    """A slide's ``largest_focus_mm`` (:meth:`RunView.unrounded`) as the heatmap and the GeoJSON write it (``1.70``;
    ``0`` without a focus, ``-`` without a value)."""
    try:
        mm = float(value)
    except (TypeError, ValueError):
        return _html(people_number(value or "-"))
    return _html(mm_words(mm) if mm > 0 else people_number(value))


def _score_unit(rule: str | None) -> str:
    """The unit of a slide score by ``rule``, as HTML: the region rule's is an area (`` mm&sup2;``), the others'
    none."""
    return " mm&sup2;" if rule == "region" else ""


def slides_table(view: RunView, pictured: Collection[int] | None = None) -> str:
    """The sortable HTML table of a run's slides (also shown by the notebook). A scored slide's name links to its
    section of the page when its row index is in ``pictured`` (all of them when None), else to its full-size
    heatmap.png."""
    digits = score_digits(view)
    cols = [("slide", False), ("status", False), ("n_patches", True), ("score", True), ("diagnosis", False),
            ("metastasis", False), ("largest_focus_mm", True), ("tumour_area_mm2", True), ("n_foci", True),
            ("slide_mpp", True), ("mpp_source", False), ("in_domain_fraction", True), ("out_of_domain", False),
            ("label", False)]
    has_labels = any(r.get("label") for r in view.results)
    cols = [c for c in cols if c[0] != "label" or has_labels]
    unit = _score_unit((view.info.get("aggregate") or {}).get("rule")).strip()
    titles = {"score": f"score ({unit})" if unit else "score"}
    head = "".join(f'<th scope="col" class="{"num" if num else ""}">'
                   f'{titles.get(name) or _html(name.replace("_", " "))}</th>' for name, num in cols)
    body = []
    for i, r in enumerate(view.results):
        cls = (r["status"] if r["status"] in NO_RESULT  # "error", "busy"
               else ("pos" if r["diagnosis"] == view.positive_class else ""))
        cls += " ood" if r.get("out_of_domain") == "true" else ""
        disagrees = r.get("label_agrees") == "false"
        cls += " disagree" if disagrees else ""
        cells = []
        for name, num in cols:
            value = r.get(name, "")
            if name == "slide" and r["status"] not in NO_RESULT:
                shown = _slide_link(view, i, value, pictured)
            elif name == "diagnosis" and r["status"] in NO_RESULT:
                shown = _error(r.get("error", ""), r.get("source", ""), r["status"])
            elif name == "label" and disagrees:
                shown = (f'{_html(value)} <span class="disagree-flag" title="the call is not the label">'
                         "disagrees</span>")
            elif name == "score":
                shown = _score(value, digits)
            elif name == "largest_focus_mm":
                shown = _focus_mm(view.unrounded(r, name))
            elif name == "tumour_area_mm2":
                shown = _html(people_number(view.unrounded(r, name)))
            elif num:
                shown = _html(people_number(value))
            else:
                shown = _html(value)
            klass = "num" if num else ("dx" if name == "diagnosis" else "")
            cells.append(f'<td class="{klass}" data-v="{_html(value)}">{shown}</td>')
        body.append(f'<tr class="{cls}">{"".join(cells)}</tr>')
    return (f'<table class="sortable" id="slides"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


def _slide_link(view: RunView, i: int, name: str, pictured: Collection[int] | None) -> str:
    """A scored slide's name in the table: a link to its section, or, for a slide shown without pictures, to its
    full-size heatmap.png (plain text where there is none)."""
    if pictured is None or i in pictured:
        return f'<a href="#s{i}">{_html(name)}</a>'
    heat = runfolder.slide_dir(view.path, name) / runfolder.HEATMAP_PNG
    if not heat.exists():
        return _html(name)
    return f'<a href="{_html(_href(view.path, heat))}" title="full-size heatmap">{_html(name)}</a>'


def _pictures_note(view: RunView, pictured: Collection[int]) -> str:
    """What a large run's page leaves out, by which rule (:mod:`wsi_screen.screening.pictured`); nothing where every
    scored slide has its pictures."""
    scored = sum(r["status"] not in NO_RESULT for r in view.results)
    if len(pictured) == scored:
        return ""
    look = sum(needs_a_look(r, view.positive_class) for r in view.results)
    return (f'<p class="muted">Pictures (heatmap preview and top patches) below for {len(pictured)} of {scored} '
            f"scored slides: the {look} that need a look (called {_html(view.positive_class)}, out of domain, "
            f"called otherwise than their label, or without tissue) and the {len(pictured) - look} "
            "highest-scoring others. Every other slide's name links to its full-size "
            f"{_html(runfolder.HEATMAP_PNG)}.</p>")


#: error messages longer than this fold away under their first words
ERROR_SHOWN = 60


def _error(message: str, source: str = "", status: str = "error") -> str:
    """A row without results: its cell, the ``status`` (``error``; ``busy``, a slide another process was writing,
    not a failure) and the message (paths normalised); a long one folds under the first words of its reason (the
    message without the slide's path, which the row names already)."""
    text = tidy_paths(message)
    if len(text) <= ERROR_SHOWN:
        return f"{_html(status)}: {_html(text)}"
    path = tidy_paths(source)
    reason = text[len(path) + 2:] if path and text.startswith(f"{path}: ") else text
    head = reason[:ERROR_SHOWN].rsplit(" ", 1)[0] if " " in reason[:ERROR_SHOWN] else reason[:ERROR_SHOWN]
    return (f'<details class="err"><summary>{_html(status)}: {_html(head)} &hellip;</summary>'
            f"<div>{_html(text)}</div></details>")


def _slide_section(view: RunView, i: int, row: dict[str, str], digits: int | None) -> str:
    name = row["slide"]
    ood = ""
    if row.get("out_of_domain") == "true":
        ood = (f'<p class="ood-flag">Out of domain: only {100 * float(row.get("in_domain_fraction") or 0):.0f} % of '
               "its patches resemble the model's training data; the call is shown but unreliable.</p>")
    def shown(key: str) -> str:
        return _html(people_number(row.get(key) or "-"))

    def size(key: str) -> Any:  # measured, rounded once (results.csv rounds it: :meth:`RunView.unrounded`)
        value = view.unrounded(row, key)
        return "-" if value == "" else value

    parts = [f'<section class="slide" id="s{i}"><h2>{_html(name)}</h2>', ood,
             f'<p><b>{_html(row["diagnosis"])}</b> &middot; score {_score(row.get("score"), digits)}'
             f'{_score_unit(row.get("rule")) if row.get("score") else ""} &middot; '
             f'metastasis {_html(row.get("metastasis") or "-")} '
             f'(largest focus {_focus_mm(size("largest_focus_mm"))} mm, '
             f'{_html(foci_count(int(row.get("n_foci") or 0)))}, {_html(people_number(size("tumour_area_mm2")))} '
             'mm&sup2;) &middot; '
             f'{_html(row["n_patches"])} patches &middot; top patch at level-0 ({_html(row.get("top_x"))}, '
             f'{_html(row.get("top_y"))}), P = {shown("top_score")}</p>']
    heat = runfolder.slide_dir(view.path, name) / runfolder.HEATMAP_PNG
    if heat.exists():
        href = _html(_href(view.path, heat))
        try:
            small = cached_heatmap_preview(heat, view.path / runfolder.PREVIEW_DIR)
            preview = _img(small, f"heatmap of {name}", "heat", "image/webp")
        except (OSError, ValueError, SyntaxError) as exc:  # a damaged picture costs its preview, not the page
            log.warning("%s: unreadable heatmap (%s); the report shows its link only", heat, exc)
            preview = f'<span class="muted">heatmap preview unavailable ({_html(exc)})</span>'
        parts.append(f'<p><a href="{href}">{preview}</a><br><a class="muted" href="{href}">full-size heatmap '
                     f"({_html(runfolder.HEATMAP_PNG)} in the slide's folder)</a></p>")
    try:
        patches = top_patches(view, name, N_TOP)
    except WsiScreenError as exc:
        patches = []
        parts.append(f'<p class="muted">top patches unavailable: {_html(exc)}</p>')
    if patches:
        figs = []
        for p in patches:
            img = (_img(webp(p.image, PATCH_QUALITY), f"patch {p.index} of {name}", mime="image/webp")
                   if p.image is not None else "")
            figs.append(f"<figure>{img}<figcaption>#{p.index} ({p.x}, {p.y})<br>P = {p.probability:.3f}"
                        "</figcaption></figure>")
        parts.append(f'<h3>Top patches</h3><div class="gallery">{"".join(figs)}</div>')
    parts.append("</section>")
    return "".join(parts)


def _lossy_note(info: dict[str, Any]) -> str:
    """A flag when some slides were scored from lossy (JPEG) patches of reused stores (run.json's
    ``tiling.scored_from``): their scores differ from a run on the slides, enough to change a flag or a call near its
    threshold."""
    lossy = [s for s in (info.get("tiling") or {}).get("scored_from") or () if runfolder.lossy_pixels(s)]
    if not lossy:
        return ""
    how = ", ".join(f"{s['codec'].get('name')} quality {s['codec'].get('quality')} ({s.get('n_slides')} slide(s))"
                    for s in lossy)
    return (f'<p class="ood-flag">Scored from lossy patches of reused stores: {_html(how)}. Their scores differ '
            "from a run on the slides, and an out-of-domain flag or a call near its threshold can differ too; lz4 "
            "or coordinates-only stores give the exact ones (each slide's "
            f"store_pixels in {runfolder.RUN_JSON}).</p>")


def recorded_report_top(view: RunView) -> int:
    """How many slides besides those that need a look the run's report shows with pictures: the number infer
    recorded in run.json (``settings.report_top``), else :data:`REPORT_TOP`."""
    recorded = (view.info.get("settings") or {}).get("report_top")
    return recorded if valid_top(recorded) else REPORT_TOP


def render_report(run: str | Path, report_top: int | None = None) -> str:
    """The report of a run folder as an HTML string. Slides are shown with pictures (heatmap preview, top patches)
    by :func:`wsi_screen.screening.pictured.pictured_rows`: every one that needs a look and the ``report_top``
    highest-scoring others (None: :func:`recorded_report_top`); the rest are table rows linking to their heatmap."""
    view = open_run(run)
    pictured = set(pictured_rows(view.results, view.positive_class,
                                 recorded_report_top(view) if report_top is None else report_top))
    digits = score_digits(view)  # the header's threshold and every slide's score
    info = view.info
    model = info.get("model", {})
    agg = info.get("aggregate", {})
    counts = call_counts((r["status"] if r["status"] in NO_RESULT else r["diagnosis"],
                          r.get("out_of_domain") == "true") for r in view.results)
    cards = "".join(f'<div class="card"><b>{n}</b>{_html(k + out_of_domain_words(ood))}</div>'
                    for k, n, ood in counts)
    patch_threshold = call_patch_threshold(agg)
    threshold_name = call_patch_threshold_name(agg.get("rule"))
    title = f"wsi-screen report: {Path(run).resolve().name}"
    n_slides = f"{len(view.results)} slide{'' if len(view.results) == 1 else 's'}"
    parts = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_html(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_html(title)}</h1>",
        f'<p class="muted">{n_slides} &middot; model {_html(model.get("arch"))} '
        f'({_html(model.get("positive_class"))} vs rest, {_html(model.get("mpp"))} um/px, '
        f'{_html(model.get("input_size"))} px) '
        f'&middot; slide call: {_html(recorded_rule_label(agg))} score '
        f'{_rule_comparison(agg, digits)}'
        f'{_region_unit(agg)}{_fallback(agg)}{_overrides(info)} '
        f'&middot; call patch threshold {_html(people_number(patch_threshold))} ({_html(threshold_name)}: the '
        f"heatmaps' cyan line, the GeoJSON's tile classes and the foci) "
        f"&middot; model operating point {_html(people_number(model.get('patch_threshold')))} (the model's own patch "
        "threshold, which predict and evaluate use)</p>",
        _lossy_note(info),
        _model_card(model),
        f'<div class="cards">{cards}</div>',
        "<h2>Slides</h2><p class=\"muted\">Click a column to sort.</p>", slides_table(view, pictured),
        _pictures_note(view, pictured),
    ]
    metrics_path = view.path / runfolder.SLIDE_METRICS_JSON
    if metrics_path.exists():
        m = runfolder.read_json(metrics_path)
        auc = auc_words(m.get("auc"), m.get("auc_ci95"))
        parts.append(f"<h2>Slide-level evaluation</h2><p>AUC {_html(auc)} &middot; sensitivity "
                     f"{_html(rate_words(m, 'sensitivity'))} &middot; specificity "
                     f"{_html(rate_words(m, 'specificity'))} "
                     f"at threshold {_html(people_number(m.get('threshold')))}{_score_unit(m.get('rule'))} "
                     f"({_html(m.get('n_positive'))} positive, "
                     f"{_html(m.get('n_negative'))} "
                     "negative slides)</p>")
        parts.extend(f'<p class="ood-flag">{_html(w)}</p>' for w in m.get("warnings") or ())
        roc = view.path / runfolder.SLIDE_ROC_PNG
        if roc.exists():
            parts.append(_img(roc.read_bytes(), "slide-level ROC curve"))
    parts.extend(_slide_section(view, i, view.results[i], digits) for i in sorted(pictured))
    provenance = json.dumps(_for_people(info), indent=2, default=str)
    parts.append(f'<h2>Provenance</h2><p class="muted">Numbers rounded and paths normalised for reading; '
                 f"{runfolder.RUN_JSON} holds them exactly. Two patch thresholds: {PROVENANCE_CALL} is the call "
                 f"patch threshold, {PROVENANCE_MODEL} the model's operating point.</p><pre>{_html(provenance)}</pre>")
    parts.append(f'<p class="muted">Written by wsi-screen {_html(__version__)} on '
                 f"{_html(datetime.now(UTC).replace(microsecond=0).isoformat())}.</p>")
    parts.append(f"<script>{_JS}</script></body></html>")
    return "\n".join(parts)


def write_report(run: str | Path, report_top: int | None = None) -> Path:
    """Write ``RUN/report.html`` atomically (see :func:`render_report`), then drop the cached previews it did not use
    (:func:`wsi_screen.screening.preview.prune_previews`); returns its path."""
    out = Path(run) / runfolder.REPORT_HTML
    started = build_started()
    atomic_write_text(out, render_report(run, report_top))
    prune_previews(Path(run) / runfolder.PREVIEW_DIR, started)
    log.debug("report written to %s", out)
    return out
