"""What follows from the config and the world size: the layout every part agrees on.

``derive_layout`` is the one place that checks a layout and computes the data-parallel size,
the micro-batch count and the padded vocabulary; the trainer, the planner and the job writers
all call it, so they never disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gptforge.parallel.config import ParallelConfig
from gptforge.common.errors import ConfigError


@dataclass(frozen=True)
class Layout:
    world_size: int
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    virtual_pipeline_model_parallel_size: int | None  # None: one chunk per stage
    data_parallel_size: int
    micro_batch_size: int
    global_batch_size: int
    num_microbatches: int  # per step and data-parallel rank (gradient accumulation)
    padded_vocab_size: int

    def describe(self) -> str:
        vpp = self.virtual_pipeline_model_parallel_size
        return (f"TP={self.tensor_model_parallel_size} PP={self.pipeline_model_parallel_size}"
                + (f" VPP={vpp}" if vpp else "") + f" DP={self.data_parallel_size}")


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_model_parallel_size: int) -> int:
    """Pad to a multiple of ``divisible_by`` and of TP.

    The multiple does not depend on TP while TP divides ``divisible_by``, so the padded
    vocabulary (which enters the softmax) is the same for every layout.
    """
    multiple = math.lcm(divisible_by, tensor_model_parallel_size)
    return -(-vocab_size // multiple) * multiple


def _check_positive(pairs) -> None:
    for key, value in pairs:
        if value < 1:
            raise ConfigError(key, f"must be >= 1, got {value}")


def derive_layout(parallel: ParallelConfig, *, world_size: int, num_layers: int,
                  num_attention_heads: int, num_query_groups: int, vocab_size: int,
                  make_vocab_size_divisible_by: int, micro_batch_size: int,
                  global_batch_size: int) -> Layout:
    """Check ``parallel`` against the model shape and ``world_size``; every error names a key."""
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    vpp = parallel.virtual_pipeline_model_parallel_size
    _check_positive([("parallel.tensor_model_parallel_size", tp),
                     ("parallel.pipeline_model_parallel_size", pp),
                     ("world size (--nproc-per-node x nodes)", world_size)])
    if not parallel.distributed_timeout_minutes > 0:
        raise ConfigError("parallel.distributed_timeout_minutes",
                          f"must be > 0 (fractions allowed: 0.5 is 30 s), got "
                          f"{parallel.distributed_timeout_minutes}")
    if num_attention_heads % tp:
        raise ConfigError("model.num_attention_heads", f"{num_attention_heads} heads are not "
                          f"divisible by parallel.tensor_model_parallel_size={tp}")
    if num_query_groups % tp:
        raise ConfigError("model.num_query_groups", f"{num_query_groups} query groups are not "
                          f"divisible by parallel.tensor_model_parallel_size={tp}")
    if world_size % (tp * pp):
        raise ConfigError("parallel", f"world size {world_size} is not a multiple of "
                          f"tensor_model_parallel_size={tp} x pipeline_model_parallel_size={pp}")
    dp = world_size // (tp * pp)
    if vpp is not None:
        if vpp < 1:
            raise ConfigError("parallel.virtual_pipeline_model_parallel_size",
                              f"must be >= 1, got {vpp}")
        if pp < 2 and vpp > 1:
            raise ConfigError("parallel.virtual_pipeline_model_parallel_size",
                              "needs parallel.pipeline_model_parallel_size >= 2")
        vpp = vpp if vpp > 1 else None
    chunks = pp * (vpp or 1)
    if num_layers % chunks:
        raise ConfigError("model.num_layers", f"{num_layers} layers are not divisible by "
                          f"pipeline_model_parallel_size x virtual_pipeline_model_parallel_size"
                          f" = {chunks}")
    if global_batch_size % (micro_batch_size * dp):
        raise ConfigError("train.global_batch_size", f"{global_batch_size} is not divisible by "
                          f"train.micro_batch_size={micro_batch_size} x data-parallel size {dp}")
    num_microbatches = global_batch_size // (micro_batch_size * dp)
    if vpp and num_microbatches % pp:
        raise ConfigError("train.global_batch_size", f"interleaved pipeline needs the number of "
                          f"micro-batches ({num_microbatches}) to be a multiple of "
                          f"parallel.pipeline_model_parallel_size={pp}")
    if parallel.sequence_parallel and tp == 1:
        raise ConfigError("parallel.sequence_parallel", "needs tensor_model_parallel_size > 1")
    return Layout(world_size=world_size, tensor_model_parallel_size=tp,
                  pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp,
                  data_parallel_size=dp, micro_batch_size=micro_batch_size,
                  global_batch_size=global_batch_size, num_microbatches=num_microbatches,
                  padded_vocab_size=padded_vocab_size(vocab_size, make_vocab_size_divisible_by, tp))


def transformer_layout_fields(parallel: ParallelConfig, *, on_cpu: bool) -> dict:
    """The TransformerConfig fields that come from the layout (model/config.py adds the rest)."""
    vpp = parallel.virtual_pipeline_model_parallel_size
    fields = dict(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=vpp if vpp and vpp > 1 else None,
        sequence_parallel=parallel.sequence_parallel,
        # gloo matches sends/receives by arrival order: batched p2p with VPP gives wrong results.
        batch_p2p_comm=not on_cpu,
        batch_p2p_sync=not on_cpu,
    )
    if parallel.recompute == "full":
        fields.update(recompute_granularity="full", recompute_method="uniform",
                      recompute_num_layers=1)
    elif parallel.recompute == "selective":
        fields.update(recompute_granularity="selective")
    return fields
