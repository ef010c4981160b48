"""Padded vocabulary columns take no probability mass.

The embedding and output layer have ``padded_vocab_size`` rows (a multiple of
``make_vocab_size_divisible_by`` and of TP); the rows past the tokenizer's ``vocab_size`` stand
for no token. Left alone their logits (0 for zero rows) take a share of every softmax, so a
converted model's loss would differ from the original's and a trained one would spend gradient
pushing them down. A forward hook on the output layer sets those columns to a large negative
value (exp underflows to exactly 0), in place: on this rank's vocabulary slice during training,
on the gathered logits in inference. It costs one slice fill per forward.
"""

from __future__ import annotations

import torch

PADDED_LOGIT = -1.0e4


def mask_padded_vocab(output_layer: torch.nn.Module, vocab_size: int,
                      padded_vocab_size: int) -> None:
    """Register the hook on megatron's ``ColumnParallelLinear`` output layer."""
    if padded_vocab_size <= vocab_size:
        return

    def hook(module, args, output):
        logits = output[0]
        width = logits.shape[-1]
        start = 0 if width == padded_vocab_size else module.tp_group.rank() * width
        first_pad = max(vocab_size - start, 0)
        if first_pad < width:
            logits[..., first_pad:] = PADDED_LOGIT
        return output

    output_layer.register_forward_hook(hook)
