"""Launches that do not race for a port and do not hang on a stalled rank.

- The local launcher hosts the ranks' rendezvous store itself (as torchrun's agent does): the port
  the ranks are given is held from before they start, so concurrent launches cannot take it.
- ``parallel.distributed_timeout_minutes`` reaches every process group (torch's default process
  group, megatron's groups, the control group, groups made later): a rank stopped mid-run ends the
  job in about that time, with one line naming where the other ranks waited.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY, child_pids, metrics

GPTFORGE = str(Path(sys.executable).parent / "gptforge")


def test_the_ranks_port_is_held_before_they_start():
    from gptforge.launcher.local import _rendezvous_store

    store = _rendezvous_store()
    with socket.socket() as other:  # another launch choosing the same port now: refused
        with pytest.raises(OSError):
            other.bind(("127.0.0.1", store.port))


def _train(run_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [GPTFORGE, "train", "--config", str(TINY), "--nproc-per-node", "2",
         "--run.dir", str(run_dir), "--train.eval_interval=0", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_eight_concurrent_two_rank_launches_all_succeed(tmp_path):
    procs = [_train(tmp_path / f"run{i}", "--train.train_iters=3", "--checkpoint.enabled=false")
             for i in range(8)]
    outcomes = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    for i, (code, err) in enumerate(outcomes):
        assert code == 0, f"launch {i}: {err[-2000:]}"
        assert [r["step"] for r in metrics(tmp_path / f"run{i}") if "loss" in r] == [1, 2, 3]


@pytest.mark.slow
def test_a_stopped_rank_ends_the_job_after_the_timeout_in_one_line(tmp_path):
    run_dir = tmp_path / "run"
    proc = _train(run_dir, "--train.train_iters=100000",
                  "--parallel.distributed_timeout_minutes=0.25", "--checkpoint.enabled=false")
    deadline = time.monotonic() + 120
    while not ((run_dir / "metrics.jsonl").exists() and metrics(run_dir)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    ranks = child_pids(proc.pid)
    assert len(ranks) == 2
    os.kill(ranks[1], signal.SIGSTOP)  # rank 1 hangs (a stuck filesystem, a debugger)
    try:
        _, err = proc.communicate(timeout=120)  # 15 s timeout + start-up + grace: not a hang
    finally:
        for pid in ranks:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert proc.returncode == 2, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("gptforge:")]
    assert len(lines) == 1, err[-3000:]
    assert "waited parallel.distributed_timeout_minutes=0.25" in lines[0]
    assert lines[0].endswith("(rank 0)") and "a collective in " in lines[0], lines[0]
