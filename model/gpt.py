"""build_gpt: this rank's GPT (one module per virtual pipeline chunk) on megatron-core GPTModel."""

from __future__ import annotations

import torch

from gptforge.model.config import ModelConfig
from gptforge.model.init import init_layout_independent
from gptforge.model.specs import chunk_spec
from gptforge.model.vocab_mask import mask_padded_vocab


def gpt_chunks(model: ModelConfig, tcfg, *, padded_vocab_size: int, pp_rank: int, pp_size: int,
               vpp_size: int | None, pg_collection=None) -> list[torch.nn.Module]:
    """The model chunks this rank holds, as megatron builds them (no layout-free init yet).

    ``pg_collection``: megatron's process groups for the chunks (None: its global parallel
    state); the planner passes stand-ins to count another layout's parameters on the meta device.
    """
    from megatron.core.models.gpt import GPTModel

    chunks = []
    num_chunks = vpp_size or 1
    for vp_stage in range(num_chunks):
        first = pp_rank == 0 and vp_stage == 0
        last = pp_rank == pp_size - 1 and vp_stage == num_chunks - 1
        chunks.append(GPTModel(
            config=tcfg,
            transformer_layer_spec=chunk_spec(model, tcfg, pp_rank=pp_rank,
                                              vp_stage=vp_stage if vpp_size else None),
            vocab_size=padded_vocab_size,
            max_sequence_length=model.seq_length,
            pre_process=first,
            post_process=last,
            share_embeddings_and_output_weights=model.tie_embeddings,
            position_embedding_type=model.position_embedding_type,
            rotary_base=model.rotary_base,
            vp_stage=vp_stage if vpp_size else None,
            pg_collection=pg_collection,
        ))
        if last:
            mask_padded_vocab(chunks[-1].output_layer, model.vocab_size, padded_vocab_size)
    return chunks


def build_gpt(model: ModelConfig, tcfg, *, padded_vocab_size: int, pp_rank: int, pp_size: int,
              vpp_size: int | None, seed: int) -> list[torch.nn.Module]:
    """The model chunks this rank holds, initialised from ``seed`` alone (not the layout)."""
    chunks = gpt_chunks(model, tcfg, padded_vocab_size=padded_vocab_size, pp_rank=pp_rank,
                        pp_size=pp_size, vpp_size=vpp_size)
    for chunk in chunks:
        init_layout_independent(chunk, seed=seed, std=model.init_method_std,
                                num_layers=model.num_layers)
    return chunks
