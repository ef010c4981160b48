"""A KV cache bounded to the window, for the sliding-window layers of a model decoding with
megatron's static inference engine.

megatron keeps, per layer, keys and values for ``max_sequence_length`` positions
(``Attention._adjust_key_value_for_inference``). A layer that attends to a window of W tokens
needs only the last W: ``WindowedSelfAttention`` keeps those (the oldest dropped as each new one
comes, so its cache never holds more than W positions, whatever the length generated) and hands
the core attention exactly them, with the rotary embeddings of their positions. Layers without
the window (``window_size_every_n``) keep megatron's cache. Keys are kept as megatron keeps them
(before the rotary embedding, which is applied to them by position afterwards), so the attention
sees the same keys as with the whole cache.
"""

from __future__ import annotations

import weakref

import torch
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType

from gptforge.common.patching import TESTED, Patches
from gptforge.model.attention import layer_window

# Overridden below: a rename upstream would leave the whole cache in place, silently.
UPSTREAM = Patches("windowed KV cache", "megatron-core", TESTED["megatron-core"])
UPSTREAM.add("Attention._adjust_key_value_for_inference",
             "megatron.core.transformer.attention:Attention._adjust_key_value_for_inference")


class WindowedSelfAttention(SelfAttention):
    """megatron's SelfAttention whose static-batching KV cache keeps the last ``window_size``
    positions (on the windowed layers; ``window_size_every_n`` as in ``SDPAttention``)."""

    def __init__(self, *args, window_size: int, window_size_every_n: int | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        UPSTREAM.check()
        self.kv_window = layer_window(self.layer_number, window_size, window_size_every_n)
        self.kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self.kv_cache_owner = None  # (a weak reference to) the inference context it belongs to

    def _adjust_key_value_for_inference(self, inference_context, query, key, value,
                                        rotary_pos_emb, *args, **kwargs):
        if (self.kv_window is None or inference_context is None
                or not inference_context.is_static_batching()):
            return super()._adjust_key_value_for_inference(
                inference_context, query, key, value, rotary_pos_emb, *args, **kwargs)
        if inference_context.batch_size_offset != 0:
            raise NotImplementedError("windowed KV cache: the batch in one piece only "
                                      "(batch_size_offset 0), as model/generate.py runs it")
        start = inference_context.sequence_len_offset
        end = start + key.size(0)
        owner = self.kv_cache_owner() if self.kv_cache_owner is not None else None
        if owner is not inference_context or start == 0:  # a new generation
            self.kv_cache, self.kv_cache_owner = None, weakref.ref(inference_context)
        if self.kv_cache is not None:
            key = torch.cat([self.kv_cache[0], key])
            value = torch.cat([self.kv_cache[1], value])
        # keep the window's last positions
        self.kv_cache = (key[-self.kv_window:].detach(), value[-self.kv_window:].detach())
        mask_type = AttnMaskType.no_mask if start > 0 else self.attn_mask_type
        if rotary_pos_emb is not None:
            q_pos, k_pos = rotary_pos_emb
            rotary_pos_emb = (q_pos[start:end], k_pos[end - key.size(0):end])
        return query, key, value, rotary_pos_emb, mask_type, None

    def cached_positions(self) -> int:
        """Positions this layer's cache holds now (0 when it uses megatron's)."""
        return 0 if self.kv_cache is None else self.kv_cache[0].size(0)
