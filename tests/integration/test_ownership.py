"""One owner per run dir and checkpoint directory; every place a run writes checked up front.

Each test runs the installed ``gptforge`` as a user would (one process, CPU, tiny model).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gptforge.launcher.run.checkpoint import format as ck
from tests.conftest import ROOT, TINY, metrics

GPTFORGE = str(Path(sys.executable).parent / "gptforge")
pytestmark = pytest.mark.slow  # every test starts ranks


def _args(run_dir: Path, *extra: str) -> list[str]:
    return [GPTFORGE, "train", "--config", str(TINY), "--run.dir", str(run_dir),
            "--train.eval_interval=0", "--train.train_iters=3", *extra]


def gptforge(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(_args(run_dir, *extra), capture_output=True, text=True, cwd=ROOT,
                          timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def one_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("gptforge:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "building the model" not in proc.stdout  # refused before any model
    return lines[0]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_second_run_on_a_run_dir_in_use_is_refused_naming_the_first(tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen(_args(run_dir, "--train.train_iters=100000",
                                   "--checkpoint.enabled=false"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                             env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        deadline = time.monotonic() + 120
        while not ((run_dir / "metrics.jsonl").exists() and metrics(run_dir)):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.1)
        line = one_error(gptforge(run_dir, "--checkpoint.enabled=false"))
        assert f"run.dir: {run_dir} is in use by another gptforge run (pid {first.pid} " in line
        steps = [r["step"] for r in metrics(run_dir) if "loss" in r]
        assert steps == sorted(set(steps))  # one run's records, not two interleaved
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)


def test_another_runs_checkpoints_are_refused_and_loading_them_is_read_only(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert gptforge(a).returncode == 0
    latest = ck.read_latest(a / "checkpoints")
    before = (latest.name, _sha(a / "checkpoints" / ck.LATEST))
    line = one_error(gptforge(b, f"--checkpoint.save={a / 'checkpoints'}"))
    assert f"holds the checkpoints of the run in {a}; this run is {b}" in line
    loaded = gptforge(b, f"--checkpoint.load={a / 'checkpoints'}", "--checkpoint.load_optim=false")
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert (ck.read_latest(a / "checkpoints").name, _sha(a / "checkpoints" / ck.LATEST)) == before
    assert ck.read_latest(b / "checkpoints") is not None
    assert [r["event"] for r in metrics(b) if "event" in r] == ["loaded"]


def test_a_step_dir_without_manifest_is_moved_aside_and_saving_goes_on(tmp_path):
    run_dir = tmp_path / "run"
    assert gptforge(run_dir, "--checkpoint.save_interval=1").returncode == 0
    copy = run_dir / "checkpoints" / "step-0000005"
    copy.mkdir()  # an interrupted copy: a step dir without its manifest
    (copy / "state").mkdir()
    proc = gptforge(run_dir, "--checkpoint.save_interval=1", "--train.train_iters=6")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "step-0000005: no manifest.json" in proc.stderr and "moved aside" in proc.stderr
    save = run_dir / "checkpoints"
    assert ck.read_latest(save).name == "step-0000006"
    assert (save / "step-0000005" / ck.MANIFEST).is_file()  # saved, not skipped
    assert [p.name for p in save.glob("step-0000005.incomplete-*")]


def test_checkpoint_load_in_a_run_with_its_own_checkpoints_is_its_start_or_refused(tmp_path):
    base, other, run_dir = tmp_path / "base", tmp_path / "other", tmp_path / "run"
    assert gptforge(base).returncode == 0 and gptforge(other).returncode == 0
    start = [f"--checkpoint.load={base / 'checkpoints'}", "--checkpoint.load_optim=false"]
    assert gptforge(run_dir, *start).returncode == 0  # a fine-tune of base: steps 1-3
    again = gptforge(run_dir, *start, "--train.train_iters=6")  # the same command, restarted
    assert again.returncode == 0, again.stderr[-2000:]
    assert "is where this run started; it resumes from its own step-0000003" in again.stdout
    assert [r["step"] for r in metrics(run_dir) if r.get("event") == "restart"] == [3]
    line = one_error(gptforge(run_dir, f"--checkpoint.load={other / 'checkpoints'}",
                              "--train.train_iters=9"))
    assert f"checkpoint.load={other / 'checkpoints'}: this run already has its own " in line


def test_an_unwritable_checkpoint_dir_is_refused_before_the_model(tmp_path):
    line = one_error(gptforge(tmp_path / "run", "--checkpoint.save=/proc/gptforge-ckpt"))
    assert "checkpoint.save: /proc/gptforge-ckpt is not a writable directory" in line


def test_a_full_disk_under_metrics_ends_in_one_line_naming_it(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").symlink_to("/dev/full")  # every write: ENOSPC
    proc = gptforge(run_dir, "--checkpoint.enabled=false")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("gptforge:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{run_dir / 'metrics.jsonl'}: No space left on device" in lines[0]
