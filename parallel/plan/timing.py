"""Step time of a layout: pipeline stages with their real loads, collectives over the links they
use, the overlap the engines do, the optimizer step and ZeRO-Offload's host side.

- Per micro-batch, each pipeline rank runs its chunks' layers (``compute.py``), its TP collectives
  and its point-to-point sends; the first stage also the embedding, the last the logit layer and
  the cross entropy. The schedule's time is m × the slowest rank's plus the fill and drain of the
  others, divided by the chunks per rank (interleaving): m·T_max + (ΣT − T_max)/v, which is the
  usual (p − 1)/(v·m) bubble when the stages are balanced.
- TP: per layer and micro-batch 4 all-reduces of s·b·h (2 forward, 2 backward; with sequence
  parallelism all-gather + reduce-scatter pairs of the same volume; 2 more under full recompute),
  ring volume 2(t − 1)/t, over NVLink (TP stays in a node); not overlapped.
- PP: the activation forward and its gradient backward per micro-batch and chunk (s·b·h/t with
  SP); inside a node over NVLink, else over the GPU's share of the node's NICs.
- DP: megatron DDP all-reduces the fp32 grad buffer; the distributed optimizer reduce-scatters it
  and all-gathers the half-precision parameters; DeepSpeed ZeRO 0/1 reduce at the accumulation
  boundary, ZeRO-2 reduce-scatters every micro-batch, ZeRO-3 also gathers the parameters for each
  micro-batch's forward and backward. A DP group spanning nodes runs as NCCL's rings do, over
  all NICs of a node: each of the node's g/j groups (j of its GPUs per node) gets j/g of the
  node's network bandwidth. Overlap (megatron ``overlap_grad_reduce`` / ``overlap_param_gather``,
  DeepSpeed ``overlap_comm``) hides the traffic behind the backward (forward) it runs under,
  except the last bucket's.
- Optimizer step: fused Adam streams ~34 bytes per parameter it updates (fp32 master, gradient,
  moments, half-precision copy, the norm's read); offloaded, CPU Adam streams 30 bytes per
  parameter at the node's host bandwidth shared by its ranks, and the gradients and parameters
  cross PCIe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gptforge.model.config import ModelConfig
from gptforge.parallel.plan.clusters import ClusterShape
from gptforge.parallel.plan.compute import (ChunkShape, embedding_s, layer_s, logit_s,
                                            with_launches)

ADAM_BYTES_PER_PARAM = 34
CPU_ADAM_BYTES_PER_PARAM = 30
MEGATRON_BUCKET_PARAMS = 40_000_000  # megatron DDP: bucket_size = max(40M, 1M x dp)


@dataclass(frozen=True)
class TimeEstimate:
    compute_s: float  # m x the slowest rank's compute per micro-batch
    bubble_s: float  # the pipeline's fill and drain
    tp_comm_s: float
    pp_comm_s: float
    dp_comm_s: float  # what overlap leaves exposed
    optimizer_s: float = 0.0
    offload_s: float = 0.0  # CPU Adam and PCIe copies (ZeRO-Offload)
    overhead_s: float = 0.0  # the cluster's fixed cost per micro-batch (and chunk)

    @property
    def step_s(self) -> float:
        return (self.compute_s + self.bubble_s + self.tp_comm_s + self.pp_comm_s + self.dp_comm_s
                + self.optimizer_s + self.offload_s + self.overhead_s)


@dataclass(frozen=True)
class StepShape:
    """The layout and engine settings step time depends on."""

    tp: int
    pp: int
    vpp: int
    dp: int
    micro_batch_size: int
    num_microbatches: int
    sequence_parallel: bool
    recompute: str
    activation_bytes: int
    padded_vocab_size: int
    gpus_per_node: int
    optimizer: str  # ddp / distopt / zero-0..3
    overlap: bool  # the engine overlaps DP communication with compute
    offload_optimizer: bool = False
    offload_param: bool = False


def _ring(n: int) -> float:
    return (n - 1) / n


def dp_bus_gbps(cluster: ClusterShape, s: StepShape) -> float:
    """Bus bandwidth of one DP group's collectives, per GPU (TP innermost, then DP, then PP)."""
    if s.tp * s.dp <= s.gpus_per_node:
        return cluster.nvlink_gbps
    per_node = max(1, s.gpus_per_node // s.tp)  # this group's GPUs in one node
    return min(cluster.nvlink_gbps,
               cluster.node_network_gbps * per_node / s.gpus_per_node)


def p2p_gbps(cluster: ClusterShape, s: StepShape) -> float:
    if s.tp * s.dp * s.pp <= s.gpus_per_node:
        return cluster.nvlink_gbps
    return cluster.node_network_gbps / s.gpus_per_node


def _rank_microbatch_s(model: ModelConfig, cluster: ClusterShape, s: StepShape,
                       rank: int) -> tuple[float, float, float]:
    """(compute, TP, PP) seconds of one micro-batch through pipeline rank ``rank``'s chunks."""
    c = ChunkShape(s.micro_batch_size, s.tp, s.sequence_parallel, s.recompute, s.activation_bytes)
    layers = model.num_layers // s.pp
    device = layers * layer_s(model, c, cluster)
    if rank == 0:
        device += embedding_s(model, c, cluster)
    last = rank == s.pp - 1
    if last:
        device += logit_s(model, c, cluster, s.padded_vocab_size)
    compute = with_launches(device, layers * cluster.launch_s_per_layer, cluster)
    hidden = model.seq_length * s.micro_batch_size * model.hidden_size * s.activation_bytes
    tp = 0.0
    if s.tp > 1:
        per_layer = 4 + (2 if s.recompute == "full" else 0)
        count = layers * per_layer + (2 if last else 0)
        tp = count * 2 * _ring(s.tp) * hidden / (cluster.nvlink_gbps * 1e9)
    pp = 0.0
    if s.pp > 1:
        shard = s.tp if s.sequence_parallel else 1
        sends = 2 * s.vpp - (1 if last else 0) - (1 if rank == 0 else 0)
        pp = sends * hidden / shard / (p2p_gbps(cluster, s) * 1e9)
    return compute, tp, pp


def _dp_s(cluster: ClusterShape, s: StepShape, num_params: int, fwd_s: float,
          bwd_s: float) -> float:
    """Exposed DP communication per step. ``fwd_s``/``bwd_s``: one micro-batch on this rank."""
    if s.dp == 1:
        return 0.0
    bw, frac, half = dp_bus_gbps(cluster, s) * 1e9, _ring(s.dp), s.activation_bytes
    m = s.num_microbatches
    if s.optimizer in ("ddp", "distopt"):
        grads = (2 if s.optimizer == "ddp" else 1) * frac * 4 * num_params / bw
        gather = frac * half * num_params / bw if s.optimizer == "distopt" else 0.0
        if not s.overlap:
            return grads + gather
        buckets = max(1, math.ceil(num_params / max(MEGATRON_BUCKET_PARAMS, 1_000_000 * s.dp)))
        return (max(grads - bwd_s, grads / buckets)
                + (max(gather - fwd_s, gather / buckets) if gather else 0.0))
    stage = int(s.optimizer.split("-")[1])
    once = frac * half * num_params / bw  # one reduce-scatter or all-gather of the model
    if stage == 0:
        return 2 * once  # all-reduce after the last backward
    if stage == 1:
        reduce, window = once, bwd_s
    elif stage == 2:
        reduce, window = m * once, m * bwd_s
    else:
        reduce, window = 3 * m * once, m * (fwd_s + bwd_s)
    gather = once if stage in (1, 2) else 0.0  # the updated partitions, after the step
    if not s.overlap:
        return reduce + gather
    return max(reduce - window, reduce / 8) + gather


def _optimizer_s(cluster: ClusterShape, s: StepShape, num_params: int) -> tuple[float, float]:
    """(device optimizer step, host side of ZeRO-Offload) seconds."""
    sharded = num_params / s.dp if s.optimizer not in ("ddp", "zero-0") else num_params
    if not s.offload_optimizer:
        return sharded * ADAM_BYTES_PER_PARAM / (cluster.memory_gbps * 1e9), 0.0
    ranks_per_node = min(s.gpus_per_node, s.tp * s.dp * s.pp)
    adam = sharded * CPU_ADAM_BYTES_PER_PARAM / (cluster.host_adam_gbps * 1e9 / ranks_per_node)
    crossings = s.num_microbatches + 1  # gradient partitions down, parameters back up
    if s.offload_param:
        crossings += 2 * s.num_microbatches  # the partitions up for each forward and backward
    pcie = crossings * sharded * s.activation_bytes / (cluster.pcie_gbps * 1e9)
    return 0.0, adam + pcie


def step_time(model: ModelConfig, cluster: ClusterShape, s: StepShape,
              num_params: int) -> TimeEstimate:
    """Seconds per step of layout ``s``; ``num_params``: parameters of the busiest rank."""
    # ranks differ only as first, middle or last: each kind once, counted as often as it occurs
    kinds = {r: _rank_microbatch_s(model, cluster, s, r) for r in sorted({0, s.pp // 2, s.pp - 1})}
    counts = {r: 1 for r in kinds}
    if s.pp > 2:
        counts[s.pp // 2] = s.pp - 2
    totals = {r: sum(times) for r, times in kinds.items()}
    slowest = max(kinds, key=lambda r: totals[r])
    m = s.num_microbatches
    compute, tp, pp = kinds[slowest]
    bubble = (sum(totals[r] * counts[r] for r in kinds) - totals[slowest]) / s.vpp
    per_mb = compute / (4 if s.recompute == "full" else 3)  # a forward's share
    fwd, bwd = per_mb, compute - per_mb
    optimizer, offload = _optimizer_s(cluster, s, num_params)
    return TimeEstimate(
        compute_s=m * compute, bubble_s=bubble, tp_comm_s=m * tp, pp_comm_s=m * pp,
        dp_comm_s=_dp_s(cluster, s, num_params, fwd, bwd), optimizer_s=optimizer,
        offload_s=offload, overhead_s=cluster.microbatch_overhead_s * m * s.vpp)
