"""common/shutdown.py: a process's end skips the interpreter's last garbage-collection passes and
loses nothing: every other atexit handler runs first, open files are flushed, the exit code kept."""

from __future__ import annotations

import subprocess
import sys

PROGRAM = """
import atexit, gc, sys
from gptforge.common.shutdown import collect_nothing_at_exit
collect_nothing_at_exit()
collect_nothing_at_exit()  # once is enough
import torch  # what makes the passes long
out = open(sys.argv[1], "w")  # never closed: flushed as its last reference goes
out.write("buffered line\\n")
atexit.register(lambda: open(sys.argv[2], "w").write(f"frozen={gc.get_freeze_count()}"))
atexit.register(lambda: print(f"handlers={atexit._ncallbacks()}"))
sys.exit(3)
"""


def test_other_handlers_run_first_files_are_flushed_and_the_exit_code_kept(tmp_path):
    left_open, handler = tmp_path / "left_open.txt", tmp_path / "handler.txt"
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", PROGRAM, str(left_open),
                           str(handler)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert left_open.read_text() == "buffered line\n"
    assert handler.read_text() == "frozen=0"  # the freeze comes after every other handler
    assert "handlers=" in proc.stdout


def test_the_last_handler_freezes_every_object():
    program = ("import atexit, gc, os\n"
               "from gptforge.common.shutdown import collect_nothing_at_exit\n"
               "collect_nothing_at_exit()\n"
               "before = gc.get_freeze_count()\n"
               "atexit._run_exitfuncs()\n"
               "print(before, gc.get_freeze_count() > 1000)\n"
               "os._exit(0)\n")
    proc = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=60)
    assert proc.stdout.split() == ["0", "True"], proc.stderr[-2000:]
