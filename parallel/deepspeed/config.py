"""The DeepSpeed engine's checks and its JSON config, both generated from our config sections.

``check_engine`` runs in ``launcher/config.py: validate`` (before any rank starts): every
setting an engine cannot honour fails there, naming the key. ``deepspeed_config`` builds the dict
handed to ``deepspeed.initialize`` (and written to ``<run.dir>/deepspeed_config.json``); nothing
of it is kept by hand. No deepspeed import here: the launcher calls this module too.
"""

from __future__ import annotations

import math

from gptforge.parallel.config import OptimConfig, ParallelConfig, PrecisionConfig
from gptforge.common.errors import ConfigError

ZERO_STAGES = (0, 1, 2, 3)
CONFIG_FILE = "deepspeed_config.json"
# DeepSpeed's defaults for these buckets (elements) suit billion-parameter models on GPUs; a
# bucket is allocated whole, so smaller models get buckets that scale with them (see below).
_DEFAULT_BUCKET_ELEMENTS = 500_000_000
_MIN_BUCKET_ELEMENTS = 1 << 18
_BUCKET_ALIGNMENT = 1 << 10  # DeepSpeed wants multiples of its (small) alignment factor
_DEFAULT_PERSISTENCE_ELEMENTS = 100_000


def check_engine(parallel: ParallelConfig, precision: PrecisionConfig) -> None:
    """Engine-specific checks of the ``parallel`` and ``precision`` sections; each error names
    its key. (The engine name itself is checked against the registry by the caller.)"""
    if parallel.engine == "deepspeed":
        _check_deepspeed(parallel, precision)
        return
    for key, value, default in (("zero_stage", parallel.zero_stage, 0),
                                ("offload_optimizer", parallel.offload_optimizer, "none"),
                                ("offload_param", parallel.offload_param, "none")):
        if value != default:
            raise ConfigError(f"parallel.{key}", f"{value!r} needs parallel.engine=deepspeed (the "
                              f"{parallel.engine} engine shards optimizer state with "
                              f"parallel.use_distributed_optimizer)")


def _check_deepspeed(parallel: ParallelConfig, precision: PrecisionConfig) -> None:
    if parallel.zero_stage not in ZERO_STAGES:
        raise ConfigError("parallel.zero_stage", f"unknown ZeRO stage {parallel.zero_stage} "
                          f"(DeepSpeed has stages {', '.join(map(str, ZERO_STAGES))})")
    if parallel.pipeline_model_parallel_size != 1:
        raise ConfigError("parallel.pipeline_model_parallel_size",
                          f"{parallel.pipeline_model_parallel_size}: pipeline parallelism runs on "
                          f"the megatron engine only; use parallel.engine=megatron or set it to 1")
    vpp = parallel.virtual_pipeline_model_parallel_size
    if vpp is not None and vpp > 1:
        raise ConfigError("parallel.virtual_pipeline_model_parallel_size",
                          "pipeline parallelism runs on the megatron engine only")
    if parallel.sequence_parallel:
        raise ConfigError("parallel.sequence_parallel", "the deepspeed engine does not reduce "
                          "the norm gradients of sequence-parallel layers; use the megatron engine")
    if parallel.use_distributed_optimizer:
        raise ConfigError("parallel.use_distributed_optimizer", "megatron engine only; with "
                          "parallel.engine=deepspeed the optimizer state is sharded by "
                          "parallel.zero_stage >= 1")
    if parallel.offload_optimizer != "none" and parallel.zero_stage < 1:
        raise ConfigError("parallel.offload_optimizer", f"{parallel.offload_optimizer!r} needs "
                          f"parallel.zero_stage >= 1 (got {parallel.zero_stage})")
    if parallel.offload_param != "none" and parallel.zero_stage != 3:
        raise ConfigError("parallel.offload_param", f"{parallel.offload_param!r} needs "
                          f"parallel.zero_stage=3 (got {parallel.zero_stage})")
    if precision.dtype == "fp16":
        power = math.log2(precision.initial_loss_scale) if precision.initial_loss_scale > 0 else 0.5
        if power != int(power):
            raise ConfigError("precision.initial_loss_scale", f"{precision.initial_loss_scale}: "
                              f"the deepspeed engine takes a power of 2")


def bucket_elements(num_parameters: int) -> dict:
    """ZeRO bucket sizes (elements) for a model of ``num_parameters`` on this rank.

    DeepSpeed allocates its gradient-reduction bucket whole (ZeRO-2/3 with contiguous
    gradients): at the default 5e8 elements that is 2 GB in fp32, more than a small model's own
    state. A tenth of the model (at least 2^18, at most the default, a multiple of 1024) keeps
    buckets a few percent of the model state. ZeRO-3 keeps parameters below the persistence
    threshold whole on every rank; it scales the same way, capped at DeepSpeed's default.
    """
    bucket = min(_DEFAULT_BUCKET_ELEMENTS, max(_MIN_BUCKET_ELEMENTS, num_parameters // 10))
    bucket -= bucket % _BUCKET_ALIGNMENT
    return {"bucket": bucket,
            "persistence": min(_DEFAULT_PERSISTENCE_ELEMENTS, max(1, num_parameters // 1000))}


def _zero_section(parallel: ParallelConfig, num_parameters: int) -> dict:
    sizes = bucket_elements(num_parameters)
    zero: dict = {"stage": parallel.zero_stage}
    if parallel.zero_stage >= 1:
        # overlap_comm: megatron's overlap_grad_reduce (reductions on a side stream during the
        # backward). DeepSpeed's CPU accelerator has no streams and runs the same collectives
        # in order (the same result; no concurrency on CPU).
        zero.update(reduce_bucket_size=sizes["bucket"], allgather_bucket_size=sizes["bucket"],
                    contiguous_gradients=True, overlap_comm=parallel.overlap_grad_reduce,
                    round_robin_gradients=False)
    if parallel.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=sizes["bucket"],
                    stage3_param_persistence_threshold=sizes["persistence"],
                    stage3_max_live_parameters=max(sizes["bucket"], 1_000_000_000),
                    stage3_gather_16bit_weights_on_model_save=False)
        del zero["allgather_bucket_size"]
    if parallel.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": parallel.offload_optimizer, "pin_memory": False}
    if parallel.offload_param != "none":
        zero["offload_param"] = {"device": parallel.offload_param, "pin_memory": False}
    return zero


def _precision_sections(precision: PrecisionConfig) -> dict:
    # bf16: ZeRO 1/2 skip an update whose grad norm is non-finite (as fp32 and fp16 do)
    out = {"bf16": {"enabled": True, "check_grad_overflow": True}
           if precision.dtype == "bf16" else {"enabled": False}}
    if precision.dtype == "fp16":
        out["fp16"] = {"enabled": True, "loss_scale": 0,  # 0: dynamic
                       "initial_scale_power": int(math.log2(precision.initial_loss_scale)),
                       "loss_scale_window": precision.loss_scale_window,
                       "hysteresis": precision.loss_scale_hysteresis,
                       "min_loss_scale": precision.min_loss_scale}
    else:
        out["fp16"] = {"enabled": False}
    return out


def deepspeed_config(parallel: ParallelConfig, precision: PrecisionConfig, optim: OptimConfig, *,
                     micro_batch_size: int, num_microbatches: int, data_parallel_size: int,
                     num_parameters: int) -> dict:
    """The dict for ``deepspeed.initialize(config=...)``.

    The optimizer (torch AdamW with megatron's param groups) and the LR schedule
    (``parallel/optim.py``) are passed in as objects, so DeepSpeed builds neither (no fused or
    CPU Adam to compile); ``zero_force_ds_cpu_optimizer: false`` lets optimizer offload run with
    that torch optimizer.
    """
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": num_microbatches,
        "train_batch_size": micro_batch_size * num_microbatches * data_parallel_size,
        "gradient_clipping": optim.clip_grad,
        **_precision_sections(precision),
        "zero_optimization": _zero_section(parallel, num_parameters),
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # the trainer logs; DeepSpeed's own progress line is off
        "wall_clock_breakdown": False,
        "dump_state": False,
    }
