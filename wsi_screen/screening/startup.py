"""How long a command took to start: from the process's start to a moment of the run (``stages.start_up`` of
``run.json``), on one clock.

It used to be ``time.time()`` minus psutil's process create time. That mixes two clocks: the create time is the
boot time (a whole second, fixed when the machine booted) plus the process's start on the clock since boot, and
the wall clock moves apart from them whenever it is set (NTP at start, a virtual machine or container resumed from
a snapshot). The figure was then off by the whole jump: 82 s for a run that began about 8 s after install. It also
counted from the start of whichever process called, so a notebook kernel's or a test runner's age.

Now the entry point (:func:`wsi_screen.cli.main`) marks when it is entered, and start-up is measured from there with
``time.perf_counter``; when the entry point is what the process runs (the ``wsi-screen`` command, ``python -m
wsi_screen.cli``), the process's age at that mark is added, read on the kernel's clock since boot on both sides
(Linux: ``/proc/self/stat``'s start time against ``CLOCK_BOOTTIME``), so no wall clock is involved. Called as a
library (no entry point), start-up is None: nothing of the caller's can be told apart.
"""

from __future__ import annotations

import os
import time

_entry: tuple[float, float] | None = None  # (perf_counter at the entry point, process age then)


def process_age() -> float | None:
    """Seconds since this process started, on the clock since boot (None where it cannot be read)."""
    try:
        with open("/proc/self/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time, in ticks since boot
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, IndexError, ValueError, AttributeError):  # not Linux
        return None


def mark_entry(*, whole_process: bool) -> None:
    """The entry point starts here; ``whole_process``: it is what this process was started to run (its own
    start-up, the interpreter's and the first imports', counts too)."""
    global _entry
    age = process_age() if whole_process else None
    _entry = (time.perf_counter(), age or 0.0)


def seconds_until(now: float) -> float | None:
    """Start-up up to ``now`` (a ``time.perf_counter`` value): from the process's start where the entry point is
    the process, else from the entry point; None without an entry point (a library call)."""
    if _entry is None:
        return None
    entered, before = _entry
    return max(0.0, now - entered + before)
