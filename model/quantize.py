"""int8 weight-only inference: torchao's ``Int8WeightOnlyConfig`` on megatron's linear layers.

Every linear layer that owns its weight (QKV, projection, fc1, fc2; the logit layer when it is
not tied to the embedding) gets its weight replaced by torchao's ``Int8Tensor``: int8 values with
one fp32 scale per output row (symmetric, per channel), dequantized inside ``F.linear``. The
embedding (and a logit layer tied to it), norms and biases stay fp32. megatron's layers compute
through ``_forward_impl`` (its autograd function, which transposes the weight); a quantized
layer computes through ``F.linear`` instead, which torchao implements for its tensor. At
inference that is the same product: the TP communication of column/row-parallel layers happens
outside ``_forward_impl`` (no sequence parallelism at inference layouts), so any TP works.

The replaced fp32 weights are emptied (the engine's optimizer still references them), so the
process really gives their memory back. Inference only: there is no gradient through it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

QUANTIZE_MODES = ("none", "int8")
QUANTIZED = "_gptforge_int8"  # marks a layer quantized here (decode_linears leaves it alone)


def _int8_forward_impl(*, input, weight, bias, **_):  # noqa: A002 (megatron's keyword)
    return F.linear(input, weight, bias)


def _quantizable(module: torch.nn.Module) -> bool:
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    return (isinstance(module, (ColumnParallelLinear, RowParallelLinear))
            and getattr(module, "weight", None) is not None and not getattr(module, QUANTIZED,
                                                                             False))


def _torchao_quantization():
    """torchao.quantization, imported without its import-time notices (on a CPU-only torch it
    logs that its CUDA kernel libraries do not load; int8 weight-only does not use them)."""
    import logging

    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        import torchao.quantization
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)
    return torchao.quantization


def quantize_int8_weight_only(model: torch.nn.Module) -> int:
    """Quantize ``model``'s linear layers in place; returns how many were quantized."""
    tq = _torchao_quantization()
    Int8WeightOnlyConfig, quantize_ = tq.Int8WeightOnlyConfig, tq.quantize_

    layers = [m for m in model.modules() if _quantizable(m)]
    originals = [m.weight for m in layers]
    with torch.no_grad():
        quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, _fqn: _quantizable(m))
    for module, original in zip(layers, originals):
        module._forward_impl = _int8_forward_impl
        setattr(module, QUANTIZED, True)
        original.data = torch.empty(0, dtype=original.dtype, device=original.device)
    return len(layers)


def _tensor_bytes(t: torch.Tensor) -> int:
    names = getattr(t, "tensor_data_names", None)  # torchao's tensor subclasses
    if names:
        return sum(_tensor_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of ``model``'s parameters as stored (int8 data and scales where quantized)."""
    seen, total = set(), 0
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            total += _tensor_bytes(param)
    return total


def apply_quantize(model: torch.nn.Module, mode: str) -> int:
    """``mode``: none or int8 (the ``--quantize`` of generate, eval and serve)."""
    if mode == "none":
        return 0
    if mode != "int8":
        raise ValueError(f"quantize mode must be one of {QUANTIZE_MODES}, got {mode!r}")
    return quantize_int8_weight_only(model)
