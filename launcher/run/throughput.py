"""Model FLOPs, peak device FLOP/s and memory: what tokens_per_s, tflops_per_device, mfu report.

Model FLOPs per trained token: ``gptforge.model.flops`` (the planner uses the same formula).
MFU = achieved model FLOP/s per device / the device's peak FLOP/s for the run's precision.
"""

from __future__ import annotations

import resource
import time

import torch

from gptforge.model.flops import flops_per_token, matmul_params_per_layer
# Dense peak TFLOP/s (no sparsity) by device-name fragment and precision; the planner's too.
from gptforge.parallel.plan.clusters import GPU_PEAK_TFLOPS

__all__ = ["flops_per_token", "matmul_params_per_layer", "peak_tflops_per_device", "memory_bytes"]



def _measured_cpu_peak_tflops(dtype: torch.dtype) -> float:
    """CPUs have no spec sheet: the best of a few 1024^3 matmuls with this process's threads."""
    a = torch.randn(1024, 1024, dtype=dtype)
    b = torch.randn(1024, 1024, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 1024**3 / best / 1e12


def peak_tflops_per_device(precision: str, configured: float = 0.0) -> float:
    if configured > 0:
        return configured
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for fragment, table in GPU_PEAK_TFLOPS.items():
            if fragment in name:
                return table[precision]
        return 0.0
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float32}[precision]
    return _measured_cpu_peak_tflops(dtype)


def memory_bytes() -> int:
    """Peak GPU memory allocated, or this process's peak resident set on CPU."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
