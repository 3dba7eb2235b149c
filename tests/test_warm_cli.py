"""tests/warm_cli.py: a warm ``wsi-screen`` process is set up as a fresh interpreter is."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from tests.warm_cli import PRELOAD, warm_processes

#: what a process reports of itself: the start method multiprocessing gives it, and its stdin
_REPORT = """
import json, multiprocessing, os, sys
print(json.dumps({"start_method": multiprocessing.get_start_method(), "stdin_fd": sys.stdin.fileno(),
                  "stdin_null": os.path.samestat(os.fstat(0), os.stat(os.devnull)), "stdin_read": sys.stdin.read()}),
      file=sys.stderr)
"""


def _report() -> None:
    exec(_REPORT, {})


def test_a_warm_process_has_the_start_method_and_stdin_of_a_fresh_interpreter(tmp_path: Path) -> None:
    fresh = subprocess.run([sys.executable, "-c", _REPORT], stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, check=True)
    with warm_processes(preload=["tests.warm_cli"]) as cli:  # no torch preloaded: the setup is what is tested
        proc = cli._start(_report, [], tmp_path / "stderr")
        assert proc.wait(60) == 0
    warm = json.loads((tmp_path / "stderr").read_text())
    assert warm == json.loads(fresh.stderr)
    assert warm["start_method"] == "fork"  # Linux, Python < 3.14: what a `wsi-screen` gets


#: a thread that is not a daemon, still running when the main thread is done, and an exit function
_EXIT = """
import atexit, sys, threading, time
atexit.register(lambda: print("exit function", file=sys.stderr))
threading.Thread(target=lambda: (time.sleep(0.3), print("thread done", file=sys.stderr))).start()
"""


def _exit() -> None:
    exec(_EXIT, {})  # as a script: its own globals


def test_a_warm_process_exits_as_a_fresh_interpreter_does(tmp_path: Path) -> None:
    """Threads that are not daemons are joined, then the exit functions run."""
    fresh = subprocess.run([sys.executable, "-c", _EXIT], capture_output=True, text=True, check=True)
    assert fresh.stderr == "thread done\nexit function\n"
    with warm_processes(preload=["tests.warm_cli"]) as cli:
        assert cli._start(_exit, [], tmp_path / "stderr").wait(60) == 0
    assert (tmp_path / "stderr").read_text() == fresh.stderr


def test_the_fork_server_preloads_only_what_a_real_wsi_screen_imports() -> None:
    """A preloaded library's import-time state (matplotlib.pyplot's backend, say) is one a real run would not have
    unless it imports the module too."""
    package = Path(__file__).parents[1] / "wsi_screen"
    source = "\n".join(p.read_text(encoding="utf-8") for p in package.rglob("*.py"))
    imported = set(re.findall(r"^\s*(?:import|from) ([\w.]+)", source, re.MULTILINE))
    others = [m for m in PRELOAD if not m.startswith(("wsi_screen.", "tests."))]  # the commands load lazily
    assert others and [m for m in others if m not in imported] == []
