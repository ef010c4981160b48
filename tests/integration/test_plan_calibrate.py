"""``gptforge plan --calibrate``: two measured CPU runs (the tiny preset, 1 and 4 micro-batches
per step) fit the device's speed and the per-micro-batch cost; the calibrated planner then
predicts each run's step time within 15%, and a third run, not used in the fit, within 25%."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY, metrics

GPTFORGE = str(Path(sys.executable).parent / "gptforge")
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def _run(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([GPTFORGE, *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def _train(run_dir: Path, micro_batch_size: int) -> float:
    _run("train", "--config", str(TINY), "--run.dir", str(run_dir), "--train.train_iters=14",
         "--train.eval_interval=0", "--checkpoint.save_interval=0", "--model.hidden_size=128",
         "--model.seq_length=128", f"--train.micro_batch_size={micro_batch_size}")
    steps = [r["step_time_s"] for r in metrics(run_dir) if "step_time_s" in r]
    return statistics.median(steps[2:])


def _predicted(run_dir: Path, cluster: Path) -> float:
    proc = _run("plan", "--config", str(run_dir / "config.yaml"), "--cluster", str(cluster),
                "--gpus-per-node", "1", "--json")
    (layout,) = json.loads(proc.stdout)["layouts"]
    return layout["step_time_s"]


@pytest.mark.slow
def test_calibrated_planner_predicts_the_measured_step_time(tmp_path):
    runs = {mbs: tmp_path / f"mbs{mbs}" for mbs in (8, 2, 4)}
    measured = {mbs: _train(run_dir, mbs) for mbs, run_dir in runs.items()}
    cluster = tmp_path / "cpu-calibrated.yaml"
    out = _run("plan", "--calibrate", str(runs[8]), str(runs[2]), "--gpu", "cpu",
               "--gpus-per-node", "1", "--out", str(cluster)).stdout
    assert "wrote" in out and cluster.is_file(), out
    assert "micro-batch overhead" in cluster.read_text()
    for mbs in (8, 2):
        predicted = _predicted(runs[mbs], cluster)
        assert abs(predicted / measured[mbs] - 1) <= 0.15, (mbs, predicted, measured, out)
    held_out = _predicted(runs[4], cluster)
    assert abs(held_out / measured[4] - 1) <= 0.25, (held_out, measured)
