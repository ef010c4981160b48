"""Model FLOPs, peak device FLOP/s and memory: what tokens_per_s, tflops_per_device, mfu report.

Model FLOPs per trained token (PaLM, appendix B; recompute not counted, causal mask not
discounted):  6 * (N_matmul + V * h) + 12 * L * s * h
where N_matmul is the transformer layers' matrix parameters (QKV, output projection, MLP),
V * h the logit layer, and 12 * L * s * h the attention scores and weighted values (fwd + bwd).
MFU = achieved model FLOP/s per device / the device's peak FLOP/s for the run's precision.
"""

from __future__ import annotations

import resource
import time

import torch

from gptforge.model.config import ModelConfig, default_ffn_hidden_size

# Dense peak TFLOP/s (no sparsity), by device name fragment and precision.
_GPU_PEAK_TFLOPS = {"H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
                    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
                    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}}


def matmul_params_per_layer(model: ModelConfig) -> int:
    h = model.hidden_size
    head_dim = h // model.num_attention_heads
    groups = model.num_query_groups or model.num_attention_heads
    qkv = h * (h + 2 * groups * head_dim)
    proj = h * h
    ffn = default_ffn_hidden_size(model)
    mlp = h * ffn * (3 if model.activation == "swiglu" else 2)
    return qkv + proj + mlp


def flops_per_token(model: ModelConfig, padded_vocab_size: int) -> float:
    n_matmul = model.num_layers * matmul_params_per_layer(model)
    return (6.0 * (n_matmul + padded_vocab_size * model.hidden_size)
            + 12.0 * model.num_layers * model.seq_length * model.hidden_size)


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
        for fragment, table in _GPU_PEAK_TFLOPS.items():
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
