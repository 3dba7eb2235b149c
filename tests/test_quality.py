"""Lint and type checks run inside the test command (ruff, mypy)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO, background


def test_ruff() -> None:
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "wsi_screen", "tests", "scripts", "bench",
                          "notebooks"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy() -> None:
    # started when the session's tests were chosen (conftest.py), so its tens of seconds on one core overlap
    # with the tests before this one
    code, output = background("tests/test_quality.py::test_mypy").result(timeout=900)
    assert code == 0, output
