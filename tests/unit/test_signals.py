"""StopRequest: the first signal asks for a stop; a second ends the process, except mid-save."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from gptforge.launcher.signals import StopRequest
    stop = StopRequest().install()
    os.kill(os.getpid(), signal.SIGUSR1)
    assert stop.requested and stop.signal_name == "SIGUSR1"
    with stop.saving():
        os.kill(os.getpid(), signal.SIGTERM)  # during a save: noted, the save goes on
        print("save finished", flush=True)
    print("outside", flush=True)
    if sys.argv[1] == "again":
        os.kill(os.getpid(), signal.SIGINT)  # outside a save: ends the process at once
        print("not reached", flush=True)
""")


def _run(mode):
    return subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True,
                          timeout=60)


def test_second_signal_waits_for_the_save_and_a_third_outside_ends_the_process():
    calm = _run("calm")
    assert calm.returncode == 0, calm.stderr
    assert calm.stdout.split("\n")[:2] == ["save finished", "outside"]
    again = _run("again")
    assert again.returncode == 128 + 2  # SIGINT
    assert "not reached" not in again.stdout and "save finished" in again.stdout


ADOPTED = textwrap.dedent("""
    import os, signal
    from gptforge.launcher.signals import StopRequest
    stop = StopRequest().install()
    stop.adopt(signal.SIGUSR1)  # another rank got it first (the ranks agreed on a stop)
    assert stop.requested and stop.signal_name == "SIGUSR1"
    os.kill(os.getpid(), signal.SIGUSR1)  # this rank's own copy, late: the same stop
    print("still running", flush=True)
    os.kill(os.getpid(), signal.SIGUSR1)  # a real second signal: ends the process
    print("not reached", flush=True)
""")


def test_a_stop_adopted_from_another_rank_survives_its_own_late_copy():
    proc = subprocess.run([sys.executable, "-c", ADOPTED], capture_output=True, text=True,
                          timeout=60)
    assert proc.stdout.split("\n")[0] == "still running", proc.stderr
    assert proc.returncode == 128 + 10 and "not reached" not in proc.stdout
