"""The training loss: mean per-token cross entropy over the unmasked tokens of a micro-batch.

Every engine calls this one function, so losses agree across engines and layouts.
"""

from __future__ import annotations

import torch


def masked_token_loss(per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``per_token_loss`` where ``loss_mask`` is 1 (prompt/padding tokens carry 0)."""
    mask = loss_mask.reshape(-1).float()
    return (per_token_loss.float().reshape(-1) * mask).sum() / mask.sum().clamp(min=1)
