"""Parameters held by one rank of a TP/PP/VPP layout: a closed form, and a meta-device build.

``rank_param_count`` is the planner's arithmetic (fast enough to enumerate thousands of
layouts); ``meta_rank_param_count`` builds the rank's megatron GPTModel chunks on the meta
device (shapes only, no memory) through the same code path as training (``model/gpt.py``), with
stand-in process groups of the layout's sizes in place of real ones. The tests hold the two
equal for every preset and every layout the planner proposes.

Counts are of parameters a rank *holds*: with tied embeddings and PP > 1 the last stage keeps its
own copy of the word embeddings (megatron keeps the two in sync), and row-parallel biases and
norms are replicated on every TP rank.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from gptforge.model.config import ModelConfig, default_ffn_hidden_size, num_query_groups


@dataclass(frozen=True)
class RankShape:
    """Where a rank sits in a layout: enough to know which parameters it holds."""

    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    virtual_pipeline_model_parallel_size: int | None
    pipeline_rank: int
    padded_vocab_size: int

    @property
    def num_chunks(self) -> int:
        return self.virtual_pipeline_model_parallel_size or 1


def _norm_params(model: ModelConfig) -> int:
    return model.hidden_size * (2 if model.normalization == "LayerNorm" else 1)


def layer_param_count(model: ModelConfig, tp: int) -> int:
    """One transformer layer's parameters on one TP rank."""
    h, ffn = model.hidden_size, default_ffn_hidden_size(model)
    qkv_out = h + 2 * num_query_groups(model) * (h // model.num_attention_heads)
    fc1_out = ffn * (2 if model.activation == "swiglu" else 1)
    weights = (h * qkv_out + h * h + h * fc1_out + ffn * h) // tp
    # column-parallel biases are split over TP; row-parallel biases (proj, fc2) are replicated
    biases = (qkv_out + fc1_out) // tp + 2 * h if model.add_bias_linear else 0
    return weights + biases + 2 * _norm_params(model)


def embedding_param_count(model: ModelConfig, tp: int, padded_vocab_size: int) -> int:
    """Word embeddings (split over TP by vocabulary) and learned positions (replicated)."""
    positions = (model.seq_length * model.hidden_size
                 if model.position_embedding_type == "learned_absolute" else 0)
    return padded_vocab_size * model.hidden_size // tp + positions


def output_param_count(model: ModelConfig, tp: int, padded_vocab_size: int, *,
                       holds_embedding: bool) -> int:
    """Final norm and the logit layer (absent when tied to the embedding on the same chunk)."""
    tied_here = model.tie_embeddings and holds_embedding
    return _norm_params(model) + (0 if tied_here else padded_vocab_size * model.hidden_size // tp)


def rank_param_count(model: ModelConfig, shape: RankShape) -> int:
    """Parameters held by the rank at ``shape`` (all its virtual chunks)."""
    tp, pp = shape.tensor_model_parallel_size, shape.pipeline_model_parallel_size
    chunks = shape.num_chunks
    first = shape.pipeline_rank == 0
    last = shape.pipeline_rank == pp - 1
    count = chunks * (model.num_layers // (pp * chunks)) * layer_param_count(model, tp)
    if first:
        count += embedding_param_count(model, tp, shape.padded_vocab_size)
    if last:
        # (pp == 1 without VPP: embedding and output on one chunk)
        same_chunk = first and chunks == 1
        count += output_param_count(model, tp, shape.padded_vocab_size, holds_embedding=same_chunk)
    return count


def stage_ranks(pipeline_model_parallel_size: int) -> list[int]:
    """Pipeline ranks that differ in what they hold: first, one middle, last."""
    pp = pipeline_model_parallel_size
    return sorted({0, pp // 2, pp - 1})


# ---------------------------------------------------------------- meta-device build


class _StandInGroup:
    """What megatron's layers ask a process group while being built: its size and our rank."""

    def __init__(self, size: int, rank: int = 0):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


@contextlib.contextmanager
def _process_group():
    """megatron reads group sizes only when torch.distributed is initialised: in a process that
    has no default group, a 1-rank gloo group on an in-memory store (no ports) for the build."""
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        if created:
            dist.destroy_process_group()


def _stand_in_groups(shape: RankShape):
    from megatron.core.process_groups_config import ProcessGroupCollection

    tp, pp = shape.tensor_model_parallel_size, shape.pipeline_model_parallel_size
    groups = ProcessGroupCollection()
    groups.tp = _StandInGroup(tp)
    groups.tp_cp = _StandInGroup(tp)
    groups.pp = _StandInGroup(pp, shape.pipeline_rank)
    groups.mp = _StandInGroup(tp * pp, shape.pipeline_rank * tp)
    for name in ("cp", "dp", "dp_cp", "tp_dp_cp"):
        setattr(groups, name, _StandInGroup(1))
    # No embedding groups: they only sync the tied copy's initial values (a collective).
    groups.embd = None
    groups.pos_embd = None
    return groups


def meta_rank_param_count(model: ModelConfig, shape: RankShape) -> int:
    """Build the rank's chunks on the meta device with megatron and count their parameters."""
    import torch

    from gptforge.model.config import transformer_config
    from gptforge.model.gpt import gpt_chunks

    vpp = shape.virtual_pipeline_model_parallel_size
    tcfg = transformer_config(model, params_dtype=torch.float32, layout_fields=dict(
        tensor_model_parallel_size=shape.tensor_model_parallel_size,
        pipeline_model_parallel_size=shape.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=vpp))
    tcfg.perform_initialization = False  # (use_cpu_initialization: shapes come from the device)
    with _process_group(), torch.device("meta"):
        chunks = gpt_chunks(model, tcfg, padded_vocab_size=shape.padded_vocab_size,
                            pp_rank=shape.pipeline_rank,
                            pp_size=shape.pipeline_model_parallel_size, vpp_size=vpp,
                            pg_collection=_stand_in_groups(shape))
    return sum(p.numel() for chunk in chunks for p in chunk.parameters())
