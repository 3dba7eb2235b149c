"""Drawing one slide's heatmap.png from a real run: the figure, the draw and the PNG, before and after.

    wsi-screen infer examples/ -o RUN && PYTHONPATH=. python bench/heatmap_draw.py RUN [--repeats 7]
    git show REV:wsi_screen/screening/heatmap.py > /tmp/heatmap_before.py
    PYTHONPATH=. python bench/heatmap_draw.py RUN --before /tmp/heatmap_before.py

Each slide of RUN is drawn from its run folder (its call, its store's thumbnail) as ``infer`` draws it, in one
process, the variants alternating (one untimed warm-up of each first): "before" writes the figure with
``Figure.savefig``, or with ``--before`` draws and writes it with that file's ``overlay_figure`` and ``save_png``
(an earlier revision of the heatmap module); "after" as :func:`wsi_screen.screening.callview.draw_heatmap` draws
and writes it now. Seconds per slide (process CPU time, the median over the repeats) and the PNG's bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import inspect
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--before", type=Path, help="an earlier revision's wsi_screen/screening/heatmap.py")
    args = parser.parse_args()

    from wsi_screen.screening import runview
    from wsi_screen.screening.callview import heatmap_figure, views_key
    from wsi_screen.screening.heatmap import save_png

    view = runview.open_run(args.run)
    slides = []
    for s in view.slides:
        ctx = runview.slide_call(view, s)
        sc = view.scores(s)
        slides.append((s, ctx, runview._store(view, s), sc.coords, sc.probs[:, ctx.positive_index]))

    old = None
    if args.before is not None:
        spec = importlib.util.spec_from_file_location("heatmap_before", args.before)
        assert spec is not None and spec.loader is not None
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)

    @contextlib.contextmanager
    def drawn_by(module: Any) -> Iterator[None]:
        """heatmap_figure imports its drawing from wsi_screen.screening.heatmap when called: point it at ``module``
        (whose overlay_figure may predate ``exact_pixels``)."""
        current = sys.modules["wsi_screen.screening.heatmap"]
        shim = types.ModuleType(module.__name__)
        shim.__dict__.update(vars(module))
        if "exact_pixels" not in inspect.signature(module.overlay_figure).parameters:
            shim.overlay_figure = lambda *a, exact_pixels=False, **k: module.overlay_figure(*a, **k)
        sys.modules["wsi_screen.screening.heatmap"] = shim
        try:
            yield
        finally:
            sys.modules["wsi_screen.screening.heatmap"] = current

    def before(draw: Callable[[], object], out: Path, key: str) -> None:
        if old is None:
            draw().savefig(out, format="png", metadata={"wsi-screen": key})  # type: ignore[attr-defined]
        else:
            with drawn_by(old):
                old.save_png(draw(exact_pixels=True), out, key=key)  # as its draw_heatmap drew it (if it could)

    def after(draw: Callable[..., object], out: Path, key: str) -> None:
        save_png(draw(exact_pixels=True), out, key=key)  # as callview.draw_heatmap draws it

    base_name = "before (savefig)" if old is None else f"before ({args.before.name})"
    variants: dict[str, Callable[[Callable[[], object], Path, str], None]] = {base_name: before, "after": after}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, ctx, store, coords, probs in slides:
            times: dict[str, list[float]] = {v: [] for v in variants}
            sizes: dict[str, int] = {}
            for rep in range(args.repeats + 1):
                for v, write in variants.items():
                    out = Path(tmp) / f"{name}-{len(sizes)}-{v[:5]}.png"
                    t0 = time.process_time()
                    write(functools.partial(heatmap_figure, store, coords, probs, ctx), out, views_key(ctx))
                    if rep:  # the first round warms matplotlib up
                        times[v].append(time.process_time() - t0)
                    sizes[v] = out.stat().st_size
            base = statistics.median(times[base_name])
            for v in variants:
                t = statistics.median(times[v])
                rows.append([f"{name} ({len(probs)} patches, {len(ctx.foci)} foci)", v, t, sizes[v],
                             t / base, sizes[v] / sizes[base_name]])
    print(header("heatmap.png drawing"))
    print(table(["slide", "variant", "CPU s per slide", "PNG bytes", "time x before", "bytes x before"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
