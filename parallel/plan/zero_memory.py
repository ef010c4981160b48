"""Model-state memory per rank: parameters, gradients and optimizer states under data parallelism.

Two families, both for Adam (two moments per parameter):

- DeepSpeed ZeRO (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion
  Parameter Models", section 5), counted as DeepSpeed's own estimators count it
  (``estimate_zero2_model_states_mem_needs``, ``estimate_zero3_...``; a test calls them). Mixed
  precision: 2Ψ half-precision parameters, 12Ψ optimizer states (fp32 master weights, momentum,
  variance) and, from stage 2 on, gradient partitions of 2Ψ/N half-precision plus 4Ψ/N fp32 (the
  fp32 copy the optimizer steps on; stage 3 converts one sub-group at a time, counted as
  DeepSpeed's estimator does, 2Ψ/N): stage 2 is 2Ψ + 18Ψ/N, stage 3 18Ψ/N plus the parameters a
  layer gathers while it runs (``live``: the largest layer's half-precision parameters and their
  gradients, 4 bytes each; our generated config sets stage3_max_live_parameters to at least 1e9,
  above any one layer here). Stage 1 keeps the half-precision gradients whole until the step
  (DeepSpeed reduces them only at the accumulation boundary; stage_1_and_2.py), 4Ψ + 12Ψ/N;
  DeepSpeed has no stage-1 estimator, and a test holds this against the tensors DeepSpeed holds.
  fp32 training: 4Ψ parameters and 4Ψ gradients; plain data parallelism (stage 0) keeps 8Ψ
  optimizer states, but ZeRO 1-3 keep their own fp32 master partition even of fp32 parameters
  (measured: DeepSpeed's ZeRO optimizers always hold one), so 12Ψ/N optimizer states.
  Offloading the optimizer moves the optimizer states and the gradient partitions to host memory
  (DeepSpeed copies each reduced bucket into pinned fp32 buffers); offloading the parameters
  (stage 3) moves their partitions too: 16Ψ/N and 18Ψ/N of host memory per rank.
- megatron-core DistributedDataParallel (``model_state_bytes_megatron``). Its gradient buffer is
  fp32 whatever the parameter dtype (``grad_reduce_in_fp32=True`` in our engine) and is never
  sharded: the distributed optimizer reduce-scatters into the full buffer. Only the optimizer
  states (fp32 master weights in mixed precision, the two moments) are divided over DP. Per
  parameter: bf16 6 + 12/N bytes, fp32 8 + 8/N; without the distributed optimizer 18 and 16.

Offloaded terms (ZeRO-Offload / ZeRO-Infinity to CPU) live in host memory: they are returned
under ``"host"`` and left out of ``"total"`` (device memory).
"""

from __future__ import annotations

from dataclasses import dataclass

# Bytes per parameter in each state, by precision.
_HALF, _FULL = 2, 4


@dataclass(frozen=True)
class StateBytes:
    """Bytes per parameter before sharding."""

    params: int
    grads: int
    optimizer: int  # master weights (mixed precision only) + Adam's two moments


def state_bytes_per_param(mixed_precision: bool, *, fp32_grads: bool = False) -> StateBytes:
    """ZeRO's per-parameter constants; ``fp32_grads`` for megatron's fp32 grad buffer."""
    if mixed_precision:
        return StateBytes(params=_HALF, grads=_FULL if fp32_grads else _HALF,
                          optimizer=3 * _FULL)
    return StateBytes(params=_FULL, grads=_FULL, optimizer=2 * _FULL)


def _check(num_params: int, dp_size: int) -> None:
    if num_params < 0:
        raise ValueError(f"num_params must be >= 0, got {num_params}")
    if dp_size < 1:
        raise ValueError(f"dp_size must be >= 1, got {dp_size}")


def _shard(total_bytes: int, dp_size: int, sharded: bool) -> int:
    return -(-total_bytes // dp_size) if sharded else total_bytes


def model_state_bytes(num_params: int, *, dp_size: int, zero_stage: int, mixed_precision: bool,
                      offload_optimizer: bool = False, offload_param: bool = False,
                      largest_layer_params: int = 0) -> dict:
    """Per-rank bytes of DeepSpeed ZeRO ``zero_stage`` (0: plain data parallel) for Adam.

    Returns {"params", "grads", "optimizer", "live", "total", "host"}: "total" is device memory
    (the four terms), "host" what offloading keeps in CPU memory instead (already left out of
    the terms). "live" is ZeRO-3's gathered parameters (``largest_layer_params``), held only
    while a layer runs. ``offload_param`` needs stage 3, ``offload_optimizer`` stage 1 or more
    (as in DeepSpeed).
    """
    _check(num_params, dp_size)
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
    if offload_param and zero_stage != 3:
        raise ValueError("offload_param needs zero_stage 3")
    if offload_optimizer and zero_stage == 0:
        raise ValueError("offload_optimizer needs zero_stage >= 1")
    per = state_bytes_per_param(mixed_precision)
    if zero_stage >= 1:  # ZeRO's optimizers keep an fp32 master partition, fp32 params or not
        per = StateBytes(params=per.params, grads=per.grads, optimizer=3 * _FULL)
    grads = _shard(per.grads * num_params, dp_size, zero_stage >= 2)
    # stage 2 converts the whole gradient partition to fp32 for the step (4Ψ/N). Stage 3 steps
    # sub-group by sub-group (sub_group_size, 1e9 elements), so between none and all of it is
    # fp32 at once; DeepSpeed's stage-3 estimator counts 18Ψ/N in all, i.e. 2Ψ/N here
    fp32_grads = 0
    if mixed_precision and zero_stage == 0:  # DeepSpeed's bf16/fp16 optimizer: an fp32 copy
        fp32_grads = _FULL * num_params      # of the gradients for the step (measured)
    if zero_stage >= 2:  # in fp32 too: the flattened copy is a new tensor (measured)
        per_param = _HALF if zero_stage == 3 and mixed_precision else _FULL
        fp32_grads = _shard(per_param * num_params, dp_size, True)
    terms = {
        "params": _shard(per.params * num_params, dp_size, zero_stage >= 3),
        "grads": grads + fp32_grads,
        "optimizer": _shard(per.optimizer * num_params, dp_size, zero_stage >= 1),
        "live": 2 * _HALF * largest_layer_params if zero_stage == 3 else 0,
    }
    host = 0
    if offload_optimizer:
        host += terms["optimizer"]
        terms["optimizer"] = 0
        if zero_stage >= 2:  # reduced gradients go straight to the host's fp32 partition
            host += _shard(_FULL * num_params, dp_size, True)
            terms["grads"] = 0
    if offload_param:
        host += terms["params"]
        terms["params"] = 0
    return {**terms, "total": sum(terms.values()), "host": host}


def model_state_bytes_megatron(num_params: int, *, dp_size: int, use_distributed_optimizer: bool,
                               mixed_precision: bool) -> dict:
    """Per-rank bytes of megatron DDP (+ distributed optimizer) for Adam, fp32 grad buffer.

    Same keys as ``model_state_bytes`` ("host" is always 0).
    """
    _check(num_params, dp_size)
    per = state_bytes_per_param(mixed_precision, fp32_grads=True)
    terms = {
        "params": per.params * num_params,
        "grads": per.grads * num_params,
        "optimizer": _shard(per.optimizer * num_params, dp_size, use_distributed_optimizer),
        "live": 0,
    }
    return {**terms, "total": sum(terms.values()), "host": 0}
