"""``wsi-screen report``: (re)write a run's self-contained HTML report."""

from __future__ import annotations

import click

from wsi_screen.commands._options import common_options, configure_output, report_top_option


@click.command(short_help="Write RUN/report.html: sortable slide table, heatmaps, top patches, provenance.")
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@report_top_option("default: the number infer recorded in run.json, else")
@common_options
def report(run: str, report_top: int | None) -> None:
    """Write RUN/report.html for a run folder made by `wsi-screen infer`.

    The report is one self-contained file (images inlined, no network access, no external scripts) that
    opens in any browser: a sortable table of slides, each slide's heatmap and highest-scoring patches,
    slide-level metrics when the run had --labels, and the run's provenance. `infer` writes it too.
    In a large run only the slides that need a look and the --report-top highest-scoring others have their
    pictures in the page; each heatmap preview is cached beside its heatmap, so a rewrite encodes only those
    that changed.
    """
    configure_output()
    from wsi_screen.screening.report import write_report

    click.echo(str(write_report(run, report_top)))
