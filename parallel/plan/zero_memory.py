"""Model-state memory per rank: parameters, gradients and optimizer states under data parallelism.

Two families, both for Adam (two moments per parameter):

- DeepSpeed ZeRO (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion
  Parameter Models", section 5). Mixed precision keeps 16 bytes per parameter Ψ: 2Ψ half-precision
  parameters, 2Ψ half-precision gradients and 12Ψ optimizer states (fp32 master weights, momentum,
  variance). Over N data-parallel ranks stage 1 shards the optimizer states (4Ψ + 12Ψ/N), stage 2
  the gradients too (2Ψ + 14Ψ/N), stage 3 everything (16Ψ/N). fp32 training: 4Ψ parameters and
  4Ψ gradients; plain data parallelism (stage 0) keeps 8Ψ optimizer states, but ZeRO 1-3 keep
  their own fp32 master partition even of fp32 parameters (measured: DeepSpeed's ZeRO
  optimizers always hold one), so 12Ψ/N optimizer states, sharded the same way per stage.
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
                      offload_optimizer: bool = False, offload_param: bool = False) -> dict:
    """Per-rank bytes of DeepSpeed ZeRO ``zero_stage`` (0: plain data parallel) for Adam.

    Returns {"params", "grads", "optimizer", "total", "host"}: "total" is device memory,
    "host" what offloading keeps in CPU memory instead (already left out of the terms above).
    ``offload_param`` needs stage 3, ``offload_optimizer`` stage 1 or more (as in DeepSpeed).
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
    terms = {
        "params": _shard(per.params * num_params, dp_size, zero_stage >= 3),
        "grads": _shard(per.grads * num_params, dp_size, zero_stage >= 2),
        "optimizer": _shard(per.optimizer * num_params, dp_size, zero_stage >= 1),
    }
    host = 0
    if offload_optimizer:
        host += terms["optimizer"]
        terms["optimizer"] = 0
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
    }
    return {**terms, "total": sum(terms.values()), "host": 0}
