"""The training loss: cross entropy over the loss-carrying tokens, weighted by token.

A step's loss is the sum of the per-token losses over every loss-carrying token of the global
batch, divided by their global count: the same number, and the same gradient, whatever the
micro-batch size, the number of micro-batches or the TP/PP/DP layout (an SFT batch with short
and long responses included). Each engine sums per micro-batch (``masked_token_loss_sum``) and
divides once per step by the global count (megatron: ``calculate_per_token_loss``; DeepSpeed:
the count all-reduced before the backward passes).
"""

from __future__ import annotations

import torch


def masked_token_loss_sum(per_token_loss: torch.Tensor,
                          loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of ``per_token_loss`` where ``loss_mask`` is 1, how many such tokens), in fp32."""
    mask = loss_mask.reshape(-1).float()
    return (per_token_loss.float().reshape(-1) * mask).sum(), mask.sum()


def masked_token_loss(per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``per_token_loss`` where ``loss_mask`` is 1 (prompt/padding tokens carry 0)."""
    total, tokens = masked_token_loss_sum(per_token_loss, loss_mask)
    return total / tokens.clamp(min=1)


def token_weighted_mean(total, tokens) -> float:
    """A loss from a (global) sum and token count (floats or 0-dim tensors); 0 when no token
    carries loss."""
    return float(total) / max(float(tokens), 1.0)
