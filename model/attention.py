"""Core attention on torch's scaled_dot_product_attention (flash/efficient kernels, CPU too).

Same constructor and call as megatron's DotProductAttention, so a ModuleSpec can swap them.
One query against a KV cache (decoding: megatron passes no mask) takes two small matmuls
instead: SDPA's CPU kernel costs 1-8 ms on such shapes for some key lengths (measured: 33 keys
7.7 ms, 64 keys 8 us), the matmuls 15-30 us for any length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPAttention(DotProductAttention):
    """[s, b, heads, head_dim] q/k/v → [s, b, heads*head_dim], causal or with a boolean mask."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        assert packed_seq_params is None and attention_bias is None
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        # [s, b, n, d] → [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask_type = attn_mask_type or self.attn_mask_type
        causal = attention_mask is None and mask_type == AttnMaskType.causal
        # megatron masks are True where attention is NOT allowed; SDPA's bool mask is the opposite.
        mask = None if attention_mask is None else ~attention_mask
        dropout = self.config.attention_dropout if self.training else 0.0
        if q.shape[2] == 1 and mask is None and not causal and dropout == 0.0:
            return _one_query(q, k, v, self.softmax_scale, self.hidden_size_per_partition)
        context = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
            scale=self.softmax_scale, enable_gqa=groups > 1,
        )
        # [b, n, s, d] → [s, b, n*d]
        s, b = context.shape[2], context.shape[0]
        return context.permute(2, 0, 1, 3).reshape(s, b, self.hidden_size_per_partition)


def _one_query(q, k, v, scale: float | None, hidden: int):
    """[b, n, 1, d] query, [b, g, s, d] keys/values → [1, b, n*d]; query head i reads key/value
    head i // (n/g), as SDPA's enable_gqa."""
    b, n, _, d = q.shape
    groups = k.shape[1]
    grouped = q.reshape(b, groups, n // groups, d)
    scores = torch.matmul(grouped, k.transpose(-1, -2)) * (scale or d ** -0.5)
    probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    return torch.matmul(probs, v).reshape(b, 1, hidden).transpose(0, 1)
