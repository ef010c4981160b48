"""Non-finite training is stopped, not trained on: a non-finite loss or grad norm skips the step
(bf16 and fp32 as fp16 always did), too many in a row stop the run with one line naming the step,
and no checkpoint is ever written from non-finite weights (``latest`` loads and is finite)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptforge.launcher.modelio.inference import load_checkpoint, one_process
from gptforge.launcher.run.checkpoint import format as ck
from tests.conftest import ROOT, TINY, metrics

GPTFORGE = str(Path(sys.executable).parent / "gptforge")


def _train(run_dir: Path, dtype: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [GPTFORGE, "train", "--config", str(TINY), "--run.dir", str(run_dir),
         f"--precision.dtype={dtype}", "--precision.initial_loss_scale=4",
         "--train.eval_interval=0", "--checkpoint.save_interval=1", *extra],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"})


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_lr_1e6_stops_in_one_line_and_latest_holds_finite_weights(tmp_path, dtype):
    """Two good steps, then the same run resumed with lr=1e6 (the config in force sets the
    schedule): it diverges, stops with exit 2 and one line naming the step; latest loads."""
    run_dir = tmp_path / "run"
    good = _train(run_dir, dtype, "--train.train_iters=3")
    assert good.returncode == 0, good.stderr[-2000:]
    proc = _train(run_dir, dtype, "--train.train_iters=40", "--optim.lr=1e6")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("gptforge: error:")]
    assert len(errors) == 1, proc.stderr
    records = [r for r in metrics(run_dir) if "loss" in r]
    counted = [r["step"] for r in records if r.get("skip_reason") == "non-finite"]
    assert len(counted) >= 3 and f"step {counted[-1]}:" in errors[0], errors[0]
    assert "train.max_skipped_steps" in errors[0], errors[0]
    assert records[-1]["step"] < 40  # it stopped
    latest = ck.read_latest(run_dir / "checkpoints")
    assert latest is not None and ck.read_manifest(latest)["step"] >= 3
    with one_process():
        loaded = load_checkpoint(latest)
        for name, param in loaded.model.named_parameters():
            assert torch.isfinite(param).all(), f"{latest}: {name} is not finite"
