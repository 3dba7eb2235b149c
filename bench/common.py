"""Shared helpers for the benchmarks: measured subprocesses, machine description, markdown tables."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "bench" / "data"
OUT = REPO / "bench" / "out"


@dataclass
class Measured:
    """Wall time and peak resident memory of one child process, plus what it printed."""

    seconds: float
    peak_rss_mb: float
    stdout: str


def run(cmd: Sequence[str], *, env: dict[str, str] | None = None) -> Measured:
    """Run ``cmd`` to completion; wall time and the child's own peak RSS (from ``wait4``)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=err, env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    return Measured(seconds, usage.ru_maxrss / 1024, stdout)


def run_median(cmd: Sequence[str], repeats: int, *, own_seconds: bool = False,
               env: dict[str, str] | None = None, before: Callable[[], object] | None = None) -> Measured:
    """The median of ``repeats`` runs of ``cmd`` (by wall time), each after ``os.sync()`` so that one run's
    dirty pages are not written back during the next. ``own_seconds``: the time is the first number the
    child prints (its own loop, start-up excluded) rather than the process's wall time. ``before`` runs
    before each repetition, untimed (e.g. removing the previous run's output)."""
    results = []
    for _ in range(max(1, repeats)):
        if before is not None:
            before()
        os.sync()
        m = run(cmd, env=env)
        if own_seconds:
            m = Measured(float(m.stdout.split()[0]), m.peak_rss_mb, m.stdout)
        results.append(m)
    results.sort(key=lambda m: m.seconds)
    return results[len(results) // 2]


def python() -> str:
    return sys.executable


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, Python {platform.python_version()}, {platform.system()}"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table."""
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:,.2f}" if v < 100 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def header(title: str) -> str:
    return f"## {title}\n\n{time.strftime('%Y-%m-%d %H:%M')} on {machine()}\n"
