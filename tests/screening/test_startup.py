"""run.json's start-up seconds: measured on one clock, from the process's start only where wsi-screen is the process."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from wsi_screen.screening import startup


def test_process_age_ignores_the_wall_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """It was time.time() minus psutil's create time: a wall clock set (or resumed from a snapshot) 74 s ahead of
    the boot clock made a run that began 8 s after install report 82 s of start-up."""
    before = startup.process_age()
    assert before is not None and before > 0
    monkeypatch.setattr(time, "time", lambda: 1e10)  # the wall clock jumps; the process did not age
    after = startup.process_age()
    assert after is not None and 0 <= after - before < 5


def test_a_fresh_process_starts_young() -> None:
    code = "import time; time.sleep(0.5); from wsi_screen.screening import startup; print(startup.process_age())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert 0.5 <= float(out.stdout) < 0.5 + 10  # the sleep, the interpreter's start and one import


def test_start_up_counts_from_the_entry_point_in_a_longer_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Called with arguments (a test, a notebook), the process is not the command: its age is not start-up."""
    monkeypatch.setattr(startup, "_entry", None)
    assert startup.seconds_until(time.perf_counter()) is None  # a library call: no entry point
    startup.mark_entry(whole_process=False)
    assert 0 <= startup.seconds_until(time.perf_counter()) < 1
    startup.mark_entry(whole_process=True)
    age = startup.process_age()
    assert age is not None and age - 1 < startup.seconds_until(time.perf_counter()) < age + 1
