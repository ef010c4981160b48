"""The norm layer of the local and SDPA specs: torch's LayerNorm / RMSNorm that also runs under
sequence parallelism.

megatron's own torch norm (``WrappedTorchNorm``) refuses ``sequence_parallel``: under it each
tensor-parallel rank normalises its own slice of the sequence, so the norm's weight and bias
receive only that slice's gradient. megatron's ``finalize_model_grads`` sums over the TP group the
gradients of every parameter marked ``sequence_parallel = True`` (its linear layers mark their
replicated biases the same way); marking ours is all that is missing. The arithmetic is torch's,
so losses are the same as with megatron's norm, and so are the parameter names (checkpoints).
"""

from __future__ import annotations

import torch


def _norm_class(normalization: str) -> type[torch.nn.Module]:
    classes = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
    if normalization not in classes:
        raise ValueError(f"model.normalization: {normalization!r} is not one of {list(classes)}")
    return classes[normalization]


class SequenceParallelTorchNorm:
    """Builds a ``torch.nn.LayerNorm`` or ``torch.nn.RMSNorm`` (as ``WrappedTorchNorm`` does) with
    its parameters marked for megatron's sequence-parallel gradient all-reduce.

    A class with ``__new__`` rather than a function: megatron's ``build_module`` calls classes
    and returns plain functions uncalled.
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                zero_centered_gamma: bool = False, normalization: str | None = None):
        if config.layernorm_zero_centered_gamma or zero_centered_gamma:
            raise ValueError("zero-centered gamma is not supported by the torch norm")
        norm = _norm_class(normalization or config.normalization)(hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm
