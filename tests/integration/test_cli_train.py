"""`gptforge train` end to end: local ranks via --nproc-per-node, run dir contents, layouts agree."""

from __future__ import annotations

import os
import sys
from pathlib import Path
import subprocess

import pytest
import yaml

from tests.conftest import ROOT, TINY, assert_close_losses, metrics, train_losses

GPTFORGE = str(Path(sys.executable).parent / "gptforge")  # the venv running the tests


def gptforge(*args, timeout=300):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([GPTFORGE, *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env=env)
    return proc


def test_gptforge_is_installed_with_verbs():
    proc = gptforge("--help")
    assert proc.returncode == 0 and "train" in proc.stdout


def test_two_rank_tp2_run_writes_config_and_falling_metrics(tmp_path):
    run_dir = tmp_path / "R"
    proc = gptforge("train", "--config", str(TINY), "--nproc-per-node", "2",
                    "--parallel.tensor_model_parallel_size=2", "--run.dir", str(run_dir))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["parallel"]["tensor_model_parallel_size"] == 2
    records = metrics(run_dir)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 21))
    for r in steps:
        for key in ("lr", "grad_norm", "tokens_per_s", "tflops_per_device", "mfu", "mem_bytes"):
            assert r[key] is not None and r[key] >= 0, (key, r)
    assert any("val_loss" in r for r in records)
    losses = [r["loss"] for r in steps]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses
    assert "step     20" in proc.stdout  # one readable console line per log step


@pytest.fixture(scope="module")
def single_process_losses(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    proc = gptforge("train", "--config", str(TINY), "--train.train_iters=5",
                    "--train.eval_interval=0", "--run.dir", str(run_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return train_losses(run_dir)


@pytest.mark.parametrize("layout", [
    "--parallel.tensor_model_parallel_size=2",
    "--parallel.pipeline_model_parallel_size=2",
    "dp2",  # no override: two ranks are plain data parallel
])
def test_layout_changes_keep_the_run(layout, single_process_losses, tmp_path):
    """Same seed, data and global batch: TP=2, PP=2 or DP=2 give TP=1's first 5 losses."""
    extra = [] if layout == "dp2" else [layout]
    proc = gptforge("train", "--config", str(TINY), "--nproc-per-node", "2",
                    "--train.train_iters=5", "--train.eval_interval=0",
                    "--run.dir", str(tmp_path), *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_close_losses(train_losses(tmp_path), single_process_losses)


def test_bad_config_fails_before_any_rank_starts(tmp_path):
    proc = gptforge("train", "--config", str(TINY), "--nproc-per-node", "2",
                    "--parallel.tensor_model_parallel_size=4", "--run.dir", str(tmp_path))
    assert proc.returncode == 2
    assert "parallel: world size 2" in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()
