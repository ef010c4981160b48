"""Core attention on torch's scaled_dot_product_attention (flash/efficient kernels, CPU too).

Same constructor and call as megatron's DotProductAttention, so a ModuleSpec can swap them.
"""

from __future__ import annotations

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
        context = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
            scale=self.softmax_scale, enable_gqa=groups > 1,
        )
        # [b, n, s, d] → [s, b, n*d]
        s, b = context.shape[2], context.shape[0]
        return context.permute(2, 0, 1, 3).reshape(s, b, self.hidden_size_per_partition)
