"""bench/bench_gpu.py runs: its CPU smoke mode trains both rows and prints the table.

The GPU numbers themselves come from running it on a GPU (docs/PERFORMANCE.md); this keeps the
script from rotting between the sessions that have one.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT


def test_bench_gpu_smoke_on_cpu_prints_both_rows():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_gpu.py"), "--device", "cpu",
                           "--tiny"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {m.group(1): m for m in re.finditer(
        r"^tiny\s+(gptforge|plain \(SDPA\))\s+2\s+([\d.]+)\s+([\d,]+)\s+\S+\s+([\d.]+)\s+-\s+"
        r"([\d.]+)x$", proc.stdout, re.M)}
    assert set(rows) == {"gptforge", "plain (SDPA)"}, proc.stdout
    for row in rows.values():
        step_ms, tokens_per_s, mfu = float(row.group(2)), float(row.group(3).replace(",", "")), \
            float(row.group(4))
        # 2 x 64 tokens per step: tokens/s must follow from the step time the row prints (to 0.1 ms)
        assert abs(tokens_per_s - 128 / (step_ms / 1000)) / tokens_per_s < 0.051 / step_ms + 1e-3
        assert 0 < mfu < 1
    assert float(rows["plain (SDPA)"].group(5)) == 1.0
    # both rows trained: each prints a first and last loss near ln(512) = 6.24
    losses = re.findall(r"tiny (?:gptforge|plain \(SDPA\)): loss ([\d.]+) -> ([\d.]+)",
                        proc.stdout)
    assert len(losses) == 2 and all(5.5 < float(x) < 7.0 for pair in losses for x in pair)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal exists only without a GPU")
def test_bench_gpu_refuses_cuda_without_a_gpu():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_gpu.py")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--device cpu --tiny" in proc.stderr
