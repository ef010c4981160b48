"""One LR rule on resume, for both engines: the config in force defines the schedule, evaluated
at the resumed step (README "Resuming"). A run resumed with a longer train_iters follows the LR
of a run started with that train_iters, step for step, and says which schedule keys changed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY, metrics

GPTFORGE = str(Path(sys.executable).parent / "gptforge")


def _train(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [GPTFORGE, "train", "--config", str(TINY), "--run.dir", str(run_dir),
         "--train.eval_interval=0", "--optim.lr_warmup_iters=1", *extra],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def _lrs(run_dir: Path, after: int = 0) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in metrics(run_dir) if "lr" in r and r["step"] > after}


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["megatron", "deepspeed"])
def test_a_resumed_run_follows_the_schedule_of_its_config(tmp_path, engine):
    common = [f"--parallel.engine={engine}"]
    fresh = tmp_path / "fresh"
    _train(fresh, *common, "--train.train_iters=9")
    resumed = tmp_path / "resumed"
    _train(resumed, *common, "--train.train_iters=3")
    proc = _train(resumed, *common, "--train.train_iters=9", "--optim.min_lr=1e-5")
    assert "the LR schedule changed since the checkpoint (train.train_iters 3 -> 9, " \
           "optim.min_lr 0.0001 -> 1e-05)" in proc.stderr
    fresh_with_min = tmp_path / "fresh_min"
    _train(fresh_with_min, *common, "--train.train_iters=9", "--optim.min_lr=1e-5")
    want = _lrs(fresh_with_min, after=3)
    assert sorted(want) == list(range(4, 10))
    assert _lrs(resumed, after=3) == want
    assert want != _lrs(fresh, after=3)  # (min_lr matters at these steps: a real change)
