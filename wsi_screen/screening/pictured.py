"""Which slides the report shows with pictures (heatmap preview and top patches), the rule written once.

A run of a thousand slides with every slide's pictures in one page is over a hundred megabytes that a browser opens
slowly if at all, and most of it would be slides nobody needs to look at. The page shows the pictures of

* every slide that needs a look: called positive, out of domain, called otherwise than its label says, or without
  tissue (:func:`needs_a_look`), however many there are; and
* the ``report_top`` highest-scoring of the other scored slides (:data:`REPORT_TOP` unless the run says
  otherwise), the calls closest to the threshold first.

Every other slide is a row of the page's table whose name links to its full-size heatmap.png; failed and busy slides
are rows with their error, as always. A run of up to ``report_top`` slides besides those that need a look has every
picture, as before the rule. This module imports nothing heavy: the command line shows :data:`REPORT_TOP` in its help.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TypeGuard

from wsi_screen.errors import ConfigError

#: how many scored slides besides those that need a look get their pictures in the report: the highest-scoring
REPORT_TOP = 50


def needs_a_look(row: Mapping[str, str], positive_class: str) -> bool:
    """Whether a results.csv row is a slide a pathologist should see in the report whatever the run's size: called
    ``positive_class``, out of domain, its call not its label, or no tissue found (the detector may have missed it).
    A slide without results (failed, or busy in another process) has no pictures to show."""
    from wsi_screen.screening.aggregate import NO_RESULT, STATUS_NO_TISSUE

    if row.get("status") in NO_RESULT:
        return False
    return (row.get("status") == STATUS_NO_TISSUE or row.get("diagnosis") == positive_class
            or row.get("out_of_domain") == "true" or row.get("label_agrees") == "false")


def valid_top(value: object) -> TypeGuard[int]:
    """Whether ``value`` is a number of slides to show: a whole number >= 0."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_report_top(value: object) -> None:
    """Refuse a ``report_top`` that is not a whole number >= 0, in one :class:`ConfigError` line."""
    if not valid_top(value):
        raise ConfigError(f"`report_top`={value!r}: the number of other slides shown with pictures must be a whole "
                          "number >= 0")


def _score(row: Mapping[str, str]) -> float:
    try:
        value = float(row.get("score") or "nan")
    except ValueError:
        return -math.inf
    return value if math.isfinite(value) else -math.inf


def pictured_rows(rows: Sequence[Mapping[str, str]], positive_class: str,
                  report_top: int = REPORT_TOP) -> list[int]:
    """The indices of the results.csv ``rows`` whose slides the report shows with pictures, in table order: every
    slide that :func:`needs_a_look`, and the ``report_top`` highest-scoring others (ties in table order). Raises
    :class:`ConfigError` for a ``report_top`` that is not a whole number >= 0."""
    check_report_top(report_top)
    from wsi_screen.screening.aggregate import NO_RESULT

    look = {i for i, r in enumerate(rows) if needs_a_look(r, positive_class)}
    others = [i for i, r in enumerate(rows) if r.get("status") not in NO_RESULT and i not in look]
    best = sorted(others, key=lambda i: -_score(rows[i]))[:report_top]  # sorted is stable: ties stay in table order
    return sorted([*look, *best])
