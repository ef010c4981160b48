"""The planner: which layouts of a model fit a cluster, and how fast each trains.

``plan(request)`` enumerates tensor / pipeline / virtual-pipeline / data parallel sizes, the
optimizer's sharding (megatron's distributed optimizer, or a DeepSpeed ZeRO stage), activation
recompute and the micro-batch size; every candidate goes through ``derive_layout`` (the trainer's
own checks), gets a per-device memory estimate (``plan_memory.py``, ``zero_memory.py``) and a
step-time estimate, and the ones that fit are ranked by step time.

Step time, per step and device, assumes no overlap of communication with compute (the megatron
engine runs with overlap_grad_reduce off):
- compute: model FLOPs (``model/flops.py``) plus recompute's extra forward, over the device's
  dense peak times its achievable fraction, spread evenly over all devices;
- pipeline bubble: compute × (p - 1) / (v·m);
- TP: per layer and micro-batch 4 all-reduces of s·b·h (2 forward, 2 backward; with sequence
  parallelism all-gather + reduce-scatter pairs of the same volume; 2 more with full recompute),
  each moving 2·(t - 1)/t of its size per device, over the intra-node bandwidth (TP stays
  inside a node);
- PP: per micro-batch and chunk, the activation forward and its gradient backward (s·b·h/t with
  SP), over the intra-node bandwidth when a whole model replica fits in a node, else inter-node;
- DP: megatron DDP all-reduces the fp32 grad buffer (2·(d - 1)/d·4Ψ); the distributed optimizer
  reduce-scatters it and all-gathers the parameters ((d - 1)/d·(4 + param bytes)·Ψ); ZeRO 1/2
  reduce-scatter and all-gather half-precision tensors, ZeRO 3 gathers parameters twice (forward
  and backward); inter-node when TP × DP spans more than one node (megatron's rank order puts TP
  innermost, then DP, then PP);
- a fixed cost per micro-batch and chunk where the cluster shape states one (CPU).
Layouts of equal time rank by memory, the one with more to spare first.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from gptforge.model.config import ModelConfig, num_query_groups
from gptforge.model.flops import attention_flops_per_token, flops_per_token, matmul_params_per_layer
from gptforge.parallel.config import DTYPES, ParallelConfig
from gptforge.common.errors import ConfigError
from gptforge.parallel.layout import Layout, derive_layout
from gptforge.parallel.plan.clusters import ClusterShape
from gptforge.parallel.plan.memory import ActivationShape, rank_activation_memory
from gptforge.parallel.plan.params import RankShape, rank_param_count, stage_ranks
from gptforge.parallel.plan.zero_memory import model_state_bytes, model_state_bytes_megatron

RECOMPUTE_MODES = ("none", "selective", "full")
MICRO_BATCH_SIZES = (1, 2, 4, 8, 16)
MAX_VIRTUAL_STAGES = 8


@dataclass(frozen=True)
class PlanRequest:
    model: ModelConfig  # seq_length included
    cluster: ClusterShape
    nodes: int
    gpus_per_node: int
    global_batch_size: int
    engine: str = "megatron"  # or "deepspeed" (ZeRO over DP, TP without SP, no PP)
    dtype: str | None = None  # fp32 / bf16 / fp16; None: the cluster's

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def precision(self) -> str:
        return self.dtype or self.cluster.dtype


@dataclass(frozen=True)
class Candidate:
    """One way to train: what ``gptforge train`` would be told."""

    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    virtual_pipeline_model_parallel_size: int | None
    micro_batch_size: int
    recompute: str
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False  # megatron
    zero_stage: int | None = None  # deepspeed

    def parallel_config(self, engine: str) -> ParallelConfig:
        return ParallelConfig(
            tensor_model_parallel_size=self.tensor_model_parallel_size,
            pipeline_model_parallel_size=self.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=self.virtual_pipeline_model_parallel_size,
            sequence_parallel=self.sequence_parallel,
            use_distributed_optimizer=self.use_distributed_optimizer,
            recompute=self.recompute, engine=engine)

    def optimizer_label(self) -> str:
        if self.zero_stage is not None:
            return f"zero-{self.zero_stage}"
        return "distopt" if self.use_distributed_optimizer else "ddp"


MEMORY_TERMS = ("params", "grads", "optimizer", "activations", "working", "allocator", "runtime")
TERM_NAMES = {"params": "parameters", "grads": "gradients", "optimizer": "optimizer states",
              "activations": "activations", "working": "backward working set",
              "allocator": "allocator overhead", "runtime": "runtime"}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on the device that needs the most (``pipeline_rank``)."""

    pipeline_rank: int
    num_params: int  # parameters that rank holds
    params: int
    grads: int
    optimizer: int
    activations: int  # stored for backward by the in-flight micro-batches
    working: int  # transient peak of the backward beyond the stored activations
    allocator: int
    runtime: int
    host: int = 0  # offloaded to CPU memory (not counted in total)

    @property
    def tensors(self) -> int:
        """What the model's tensors need at the peak (calibrated against measured memory)."""
        return self.params + self.grads + self.optimizer + self.activations + self.working

    @property
    def total(self) -> int:
        return self.tensors + self.allocator + self.runtime

    def overflow(self, capacity: int) -> tuple[str, int]:
        """The term whose addition first exceeds ``capacity``, and the total's excess."""
        running = 0
        for term in MEMORY_TERMS:
            running += getattr(self, term)
            if running > capacity:
                return term, self.total - capacity
        return "", 0


@dataclass(frozen=True)
class TimeEstimate:
    compute_s: float
    bubble_s: float
    tp_comm_s: float
    pp_comm_s: float
    dp_comm_s: float
    overhead_s: float = 0.0  # the cluster's fixed cost per micro-batch (and chunk)

    @property
    def step_s(self) -> float:
        return (self.compute_s + self.bubble_s + self.tp_comm_s + self.pp_comm_s + self.dp_comm_s
                + self.overhead_s)


@dataclass(frozen=True)
class PlanEntry:
    candidate: Candidate
    layout: Layout
    memory: MemoryEstimate
    time: TimeEstimate
    fits: bool
    tokens_per_s: float
    mfu: float


@dataclass
class PlanResult:
    request: PlanRequest
    fitting: list[PlanEntry] = field(default_factory=list)  # best first
    closest: PlanEntry | None = None  # the least memory of all, when none fits
    considered: int = 0


# ---------------------------------------------------------------- enumeration


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _tensor_sizes(request: PlanRequest) -> list[int]:
    """TP stays inside a node and must split the heads and the query groups."""
    m = request.model
    return [t for t in _divisors(request.gpus_per_node)
            if m.num_attention_heads % t == 0 and num_query_groups(m) % t == 0]


def _virtual_sizes(num_layers: int, pp: int) -> list[int | None]:
    if pp == 1:
        return [None]
    per_stage = num_layers // pp
    return [None] + [v for v in range(2, min(per_stage, MAX_VIRTUAL_STAGES) + 1)
                     if per_stage % v == 0]


def candidates(request: PlanRequest):
    m, world = request.model, request.world_size
    if request.engine == "deepspeed":
        # the deepspeed engine runs TP through megatron's layers, without pipeline or SP
        for tp, mbs, recompute, stage in itertools.product(
                _tensor_sizes(request), MICRO_BATCH_SIZES, RECOMPUTE_MODES, (0, 1, 2, 3)):
            if world % tp == 0:
                yield Candidate(tp, 1, None, mbs, recompute, zero_stage=stage)
        return
    for tp in _tensor_sizes(request):
        for pp in _divisors(m.num_layers):
            if world % (tp * pp):
                continue
            for vpp, mbs, recompute, distopt in itertools.product(
                    _virtual_sizes(m.num_layers, pp), MICRO_BATCH_SIZES, RECOMPUTE_MODES,
                    (False, True)):
                if distopt and world // (tp * pp) == 1:
                    continue  # nothing to shard over
                # sequence parallelism whenever TP > 1: less memory, the same traffic
                yield Candidate(tp, pp, vpp, mbs, recompute, sequence_parallel=tp > 1,
                                use_distributed_optimizer=distopt)


def derive(request: PlanRequest, candidate: Candidate) -> Layout:
    """The trainer's own layout checks; raises ConfigError for a layout it would refuse."""
    m = request.model
    return derive_layout(
        candidate.parallel_config(request.engine), world_size=request.world_size,
        num_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_query_groups=num_query_groups(m), vocab_size=m.vocab_size,
        make_vocab_size_divisible_by=m.make_vocab_size_divisible_by,
        micro_batch_size=candidate.micro_batch_size,
        global_batch_size=request.global_batch_size)


# ---------------------------------------------------------------- memory


def _dtype_bytes(dtype: str) -> int:
    return DTYPES[dtype].itemsize


def _state_bytes(request: PlanRequest, candidate: Candidate, layout: Layout,
                 num_params: int) -> dict:
    mixed = request.precision != "fp32"
    if candidate.zero_stage is not None:
        return model_state_bytes(num_params, dp_size=layout.data_parallel_size,
                                 zero_stage=candidate.zero_stage, mixed_precision=mixed)
    return model_state_bytes_megatron(num_params, dp_size=layout.data_parallel_size,
                                      use_distributed_optimizer=candidate.use_distributed_optimizer,
                                      mixed_precision=mixed)


def rank_memory(request: PlanRequest, candidate: Candidate, layout: Layout,
                pipeline_rank: int) -> MemoryEstimate:
    """Memory of the device at ``pipeline_rank`` (every TP and DP rank of a stage is alike)."""
    m, cluster = request.model, request.cluster
    pp = layout.pipeline_model_parallel_size
    vpp = layout.virtual_pipeline_model_parallel_size
    shape = RankShape(layout.tensor_model_parallel_size, pp, vpp, pipeline_rank,
                      layout.padded_vocab_size)
    num_params = rank_param_count(m, shape)
    states = _state_bytes(request, candidate, layout, num_params)
    act_bytes = _dtype_bytes(request.precision)
    backend = "local" if m.attention_backend == "local" else "sdpa"
    acts = rank_activation_memory(
        m, ActivationShape(m.seq_length, layout.micro_batch_size,
                           layout.tensor_model_parallel_size, candidate.sequence_parallel,
                           candidate.recompute, act_bytes, backend),
        pipeline_rank=pipeline_rank, pp=pp, vpp=vpp, num_microbatches=layout.num_microbatches,
        padded_vocab_size=layout.padded_vocab_size, param_bytes=act_bytes)
    tensors = states["total"] + acts.stored + acts.working
    return MemoryEstimate(
        pipeline_rank=pipeline_rank, num_params=num_params, params=states["params"],
        grads=states["grads"], optimizer=states["optimizer"], activations=acts.stored,
        working=acts.working, allocator=int(tensors * cluster.fragmentation),
        runtime=cluster.runtime_bytes, host=states["host"])


def peak_memory(request: PlanRequest, candidate: Candidate, layout: Layout) -> MemoryEstimate:
    """The pipeline rank that needs the most (first, middle or last stage)."""
    return max((rank_memory(request, candidate, layout, r)
                for r in stage_ranks(layout.pipeline_model_parallel_size)),
               key=lambda est: est.total)


# ---------------------------------------------------------------- time


def _ring_fraction(n: int) -> float:
    return (n - 1) / n


def hardware_flops_per_token(model: ModelConfig, padded_vocab_size: int, recompute: str) -> float:
    """Model FLOPs plus what recompute runs again (a forward of the layers, or of attention)."""
    extra = 0.0
    if recompute == "full":
        extra = 2.0 * model.num_layers * matmul_params_per_layer(model)
        extra += attention_flops_per_token(model) / 3
    elif recompute == "selective":
        extra = attention_flops_per_token(model) / 3
    return flops_per_token(model, padded_vocab_size) + extra


def step_time(request: PlanRequest, candidate: Candidate, layout: Layout,
              memory: MemoryEstimate) -> TimeEstimate:
    m, cluster = request.model, request.cluster
    world, gpn = request.world_size, request.gpus_per_node
    t, p = layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size
    v, d = layout.virtual_pipeline_model_parallel_size or 1, layout.data_parallel_size
    mbs, micro = layout.micro_batch_size, layout.num_microbatches
    act_bytes = _dtype_bytes(request.precision)
    rate = cluster.peak_tflops * 1e12 * cluster.achievable_fraction
    tokens = request.global_batch_size * m.seq_length
    compute = hardware_flops_per_token(m, layout.padded_vocab_size, candidate.recompute)
    compute_s = compute * tokens / world / rate
    bubble_s = compute_s * (p - 1) / (v * micro)

    def seconds(nbytes: float, inside_node: bool) -> float:
        gbps = cluster.intra_node_gbps if inside_node else cluster.inter_node_gbps
        return nbytes / (gbps * 1e9)

    hidden = m.seq_length * mbs * m.hidden_size * act_bytes  # one s·b·h tensor
    tp_s = 0.0
    if t > 1:
        collectives = 4 + (2 if candidate.recompute == "full" else 0)
        volume = micro * (m.num_layers // p) * collectives * 2 * _ring_fraction(t) * hidden
        tp_s = seconds(volume, t <= gpn)
    pp_s = 0.0
    if p > 1:
        sp = t if candidate.sequence_parallel else 1
        pp_s = seconds(micro * v * 2 * hidden / sp, t * d * p <= gpn)
    dp_s = 0.0
    if d > 1:
        psi = memory.num_params
        frac = _ring_fraction(d)
        if candidate.zero_stage is None:
            volume = (frac * psi * (4 + act_bytes) if candidate.use_distributed_optimizer
                      else 2 * frac * psi * 4)
        elif candidate.zero_stage == 0:
            volume = 2 * frac * psi * act_bytes
        else:
            gathers = 2 if candidate.zero_stage == 3 else 1
            volume = frac * psi * act_bytes * (1 + gathers)
        dp_s = seconds(volume, t * d <= gpn)
    return TimeEstimate(compute_s=compute_s, bubble_s=bubble_s, tp_comm_s=tp_s, pp_comm_s=pp_s,
                        dp_comm_s=dp_s, overhead_s=cluster.microbatch_overhead_s * micro * v)


# ---------------------------------------------------------------- the plan


def evaluate(request: PlanRequest, candidate: Candidate) -> PlanEntry:
    """Memory and time of one candidate (ConfigError when the trainer would refuse it)."""
    layout = derive(request, candidate)
    memory = peak_memory(request, candidate, layout)
    time = step_time(request, candidate, layout, memory)
    tokens_per_s = request.global_batch_size * request.model.seq_length / time.step_s
    model_flops = flops_per_token(request.model, layout.padded_vocab_size)
    mfu = model_flops * tokens_per_s / request.world_size / (request.cluster.peak_tflops * 1e12)
    return PlanEntry(candidate=candidate, layout=layout, memory=memory, time=time,
                     fits=memory.total <= request.cluster.memory_bytes,
                     tokens_per_s=tokens_per_s, mfu=mfu)


def check_request(request: PlanRequest) -> None:
    for key, value in (("--nodes", request.nodes), ("--gpus-per-node", request.gpus_per_node),
                       ("--global-batch-size", request.global_batch_size),
                       ("--seq-length", request.model.seq_length)):
        if value < 1:
            raise ConfigError(key, f"must be >= 1, got {value}")
    if request.engine not in ("megatron", "deepspeed"):
        raise ConfigError("--engine", f"must be megatron or deepspeed, got {request.engine!r}")


def plan(request: PlanRequest) -> PlanResult:
    check_request(request)
    result = PlanResult(request=request)
    entries = []
    for candidate in candidates(request):
        try:
            entries.append(evaluate(request, candidate))
        except ConfigError:
            continue  # a layout the trainer refuses (divisibility, micro-batches)
    result.considered = len(entries)
    # equal times: the layout with more memory to spare first
    result.fitting = sorted((e for e in entries if e.fits),
                            key=lambda e: (round(e.time.step_s, 9), e.memory.total))
    if entries and not result.fitting:
        result.closest = min(entries, key=lambda e: e.memory.total)
    return result


def meta_param_count(request: PlanRequest, entry: PlanEntry) -> int:
    """The parameters of ``entry``'s peak rank, counted on a meta-device build of the model."""
    from gptforge.parallel.plan.params import meta_rank_param_count

    layout = entry.layout
    return meta_rank_param_count(request.model, RankShape(
        layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size,
        layout.virtual_pipeline_model_parallel_size, entry.memory.pipeline_rank,
        layout.padded_vocab_size))


def layout_delta(request: PlanRequest, entry: PlanEntry) -> dict:
    """The config sections (``parallel``, ``precision``, ``train``) that select ``entry``."""
    c = entry.candidate
    parallel = {
        "tensor_model_parallel_size": c.tensor_model_parallel_size,
        "pipeline_model_parallel_size": c.pipeline_model_parallel_size,
        "virtual_pipeline_model_parallel_size": c.virtual_pipeline_model_parallel_size,
        "sequence_parallel": c.sequence_parallel,
        "use_distributed_optimizer": c.use_distributed_optimizer,
        "recompute": c.recompute,
        "engine": request.engine,
    }
    if c.zero_stage is not None:
        parallel["zero_stage"] = c.zero_stage
    return {"parallel": parallel, "precision": {"dtype": request.precision},
            "train": {"micro_batch_size": c.micro_batch_size,
                      "global_batch_size": request.global_batch_size}}
