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
    """[s, b, heads, head_dim] q/k/v → [s, b, heads*head_dim], causal or with a boolean mask.

    ``window_size`` (sliding-window attention): query i attends to keys i - window_size + 1 .. i
    only, on every layer but each ``window_size_every_n``-th (layer numbers 1-based over the
    model). The queries are the last of the keys (prefill, training: as many; decoding with a KV
    cache: one, which then reads only the window's last keys)."""

    def __init__(self, *args, window_size: int | None = None,
                 window_size_every_n: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.window_size = layer_window(self.layer_number, window_size, window_size_every_n)

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
        window = self.window_size
        if window is not None and q.shape[2] == 1 and mask is None and not causal:
            k, v = k[:, :, -window:], v[:, :, -window:]  # the one query's window
        elif window is not None and k.shape[2] > window:  # else the window holds every key
            mask = band_mask(q.shape[2], k.shape[2], window, q.device, mask, causal)
            causal = False
        if q.shape[2] == 1 and mask is None and not causal and dropout == 0.0:
            return _one_query(q, k, v, self.softmax_scale, self.hidden_size_per_partition)
        context = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
            scale=self.softmax_scale, enable_gqa=groups > 1,
        )
        # [b, n, s, d] → [s, b, n*d]
        s, b = context.shape[2], context.shape[0]
        return context.permute(2, 0, 1, 3).reshape(s, b, self.hidden_size_per_partition)


def layer_window(layer_number: int, window_size: int | None,
                 window_size_every_n: int | None) -> int | None:
    """The window of layer ``layer_number`` (1-based over the model): ``window_size`` on every
    layer but each ``window_size_every_n``-th, which attends to every key (None)."""
    if window_size is None:
        return None
    if window_size_every_n is not None and layer_number % window_size_every_n == 0:
        return None
    return window_size


def band_mask(num_queries: int, num_keys: int, window: int, device, mask=None, causal=True):
    """[q, k] True where query i (the last ``num_queries`` of the keys' positions) may attend to
    key j: j <= i (when ``causal``) and j > i - window; and-ed with ``mask`` (True: allowed)."""
    offset = num_keys - num_queries
    i = torch.arange(num_queries, device=device)[:, None] + offset
    j = torch.arange(num_keys, device=device)[None, :]
    allowed = j > i - window
    if causal:
        allowed = allowed & (j <= i)
    return allowed if mask is None else allowed & mask


def _one_query(q, k, v, scale: float | None, hidden: int):
    """[b, n, 1, d] query, [b, g, s, d] keys/values → [1, b, n*d]; query head i reads key/value
    head i // (n/g), as SDPA's enable_gqa."""
    b, n, _, d = q.shape
    groups = k.shape[1]
    grouped = q.reshape(b, groups, n // groups, d)
    scores = torch.matmul(grouped, k.transpose(-1, -2)) * (scale or d ** -0.5)
    probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    return torch.matmul(probs, v).reshape(b, 1, hidden).transpose(0, 1)
