"""`gptforge train` end to end: local ranks via --nproc-per-node, the run dir's contents.

(That TP=2, PP=2 and DP=2 reproduce one process's losses is tests/distributed/test_parity.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, TINY, metrics

GPTFORGE = str(Path(sys.executable).parent / "gptforge")  # the venv running the tests


def gptforge(*args, timeout=300):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([GPTFORGE, *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env=env)


def test_gptforge_is_installed_and_lists_its_verbs():
    proc = gptforge("--help")
    assert proc.returncode == 0
    listed = [line.split()[0] for line in proc.stdout.splitlines() if line.startswith("    ")]
    assert {"train", "config", "tokenizer", "data"} <= set(listed), listed


@pytest.mark.slow
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
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(val) == 2 and val[1] < val[0]
    losses = [r["loss"] for r in steps]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses
    assert "step     20" in proc.stdout  # one readable console line per log step
    assert "deprecated" not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_bad_layout_fails_before_any_rank_starts(tmp_path):
    proc = gptforge("train", "--config", str(TINY), "--nproc-per-node", "2",
                    "--parallel.tensor_model_parallel_size=4", "--run.dir", str(tmp_path))
    assert proc.returncode == 2
    assert "gptforge: error: parallel: world size 2" in proc.stderr
    assert "[gptforge] building the model" not in proc.stdout
    assert not (tmp_path / "metrics.jsonl").exists()
