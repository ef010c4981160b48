"""CPU decoding: the few-token matrix products of megatron's linear layers in the layout the CPU
BLAS does fastest.

While decoding, each linear layer multiplies one or a few token vectors by its whole weight,
which is memory-bound. megatron computes ``x @ W.T`` with W stored [out, in]; on CPU
(MKL/oneDNN, measured on this project's 2-core machine, 24 GPT-2 layer matrices) that costs
4.2 ms for one token, against 2.8 ms for ``x @ Wt`` with a [in, out] copy, and 5.9 ms for 8
tokens against 4.7 ms for ``(W @ x.T).T``. ``decode_layout`` switches every linear layer of a
model to those forms for inputs of at most ``MAX_TOKENS`` tokens (the transposed copies exist
only inside the block, and only for one-token inputs); longer inputs (prefill) and everything on
GPU keep megatron's path. The arithmetic is the same product in another order of summation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from gptforge.common.patching import TESTED, Patches
from gptforge.model.quantize import QUANTIZED

MAX_TOKENS = 32
_ACTIVE = "_gptforge_decode_layout"
# The per-instance wrap shadows megatron's method: a rename upstream would leave it unused.
UPSTREAM = Patches("decode layout", "megatron-core", TESTED["megatron-core"])
for _cls in ("ColumnParallelLinear", "RowParallelLinear"):
    UPSTREAM.add(_cls, f"megatron.core.tensor_parallel.layers:{_cls}._forward_impl")


def _fast_impl(original, transposed: dict):
    def forward_impl(*, input, weight, bias, **kwargs):  # noqa: A002 (megatron's keyword)
        tokens = input.numel() // input.shape[-1]
        if tokens > MAX_TOKENS or torch.is_grad_enabled():
            return original(input=input, weight=weight, bias=bias, **kwargs)
        flat = input.reshape(tokens, input.shape[-1])
        if tokens == 1:
            if id(weight) not in transposed:
                transposed[id(weight)] = weight.t().contiguous()
            out = flat @ transposed[id(weight)]
        else:
            out = (weight @ flat.t()).t().contiguous()  # (a later all-reduce needs it so)
        if bias is not None:
            out = out + bias
        return out.reshape(*input.shape[:-1], weight.shape[0])

    return forward_impl


@contextmanager
def decode_layout(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, ``model``'s linear layers use the fast few-token forms (CPU only).
    Nested blocks share the outer one's copies (generate several batches in one block)."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    if next(model.parameters()).device.type != "cpu" or getattr(model, _ACTIVE, False):
        yield
        return
    UPSTREAM.check()
    transposed: dict[int, torch.Tensor] = {}
    patched = [m for m in model.modules()  # (int8 layers have their own forward)
               if isinstance(m, (ColumnParallelLinear, RowParallelLinear))
               and not getattr(m, QUANTIZED, False)]
    for module in patched:
        module._forward_impl = _fast_impl(module._forward_impl, transposed)
    setattr(model, _ACTIVE, True)
    try:
        yield
    finally:
        for module in patched:
            del module._forward_impl  # the class's method again
        delattr(model, _ACTIVE)
        transposed.clear()
