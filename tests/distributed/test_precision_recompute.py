"""Activation recompute gives the same gradients; bf16 trains; fp16 survives an overflow."""

from __future__ import annotations

import pytest

import os
import subprocess
import sys

import torch

from tests.conftest import ROOT, TINY, metrics

pytestmark = pytest.mark.slow  # several real processes


def _run(*args, cwd=ROOT, timeout=300):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_full_and_selective_recompute_give_the_same_gradients(tmp_path):
    out = tmp_path / "grads.pt"
    _run("tests/distributed/grads_worker.py", str(out))
    grads = torch.load(out)
    reference = grads["none"]
    assert len(reference) > 10 and all(g.abs().sum() > 0 for g in reference.values())
    for mode in ("full", "selective"):
        assert grads[mode].keys() == reference.keys()
        for name, g in reference.items():
            torch.testing.assert_close(grads[mode][name], g, rtol=0, atol=0, msg=f"{mode}: {name}")


def _train(run_dir, *overrides):
    _run("-m", "gptforge.launcher.run", "--config", str(TINY), f"--run.dir={run_dir}",
         "--train.eval_interval=0", *overrides)
    return metrics(run_dir)


def test_bf16_on_cpu_lowers_the_loss(tmp_path):
    records = _train(tmp_path, "--precision.dtype=bf16", "--train.train_iters=15")
    losses = [r["loss"] for r in records]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses


def test_fp16_skips_an_overflow_step_and_lowers_the_scale(tmp_path):
    # 2^40 overflows fp16 gradients at once; hysteresis 1 lowers the scale on each overflow.
    records = _train(tmp_path, "--precision.dtype=fp16", "--train.train_iters=40",
                     "--precision.initial_loss_scale=1099511627776",
                     "--precision.loss_scale_hysteresis=1")
    skipped = [r for r in records if r["skipped"]]
    assert skipped and records[0]["skipped"], "the first step should overflow"
    assert records[0]["loss_scale"] < 2.0**40
    for before, after in zip(records, records[1:]):
        if after["skipped"]:
            assert after["loss_scale"] < before["loss_scale"]
            assert after["lr"] == before["lr"], "the LR schedule must not advance on a skipped step"
    applied = [r for r in records if not r["skipped"]]
    assert len(applied) >= 10
    losses = [r["loss"] for r in applied]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
