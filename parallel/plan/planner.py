"""The planner: which layouts of a model fit a cluster, and how fast each trains.

``plan(request)`` enumerates tensor / pipeline / virtual-pipeline / data parallel sizes, the
optimizer's sharding (megatron's distributed optimizer, or a DeepSpeed ZeRO stage with or without
offload), activation recompute and the micro-batch size, keeping those the request pins
(``Pins``); every candidate goes through ``derive_layout`` (the trainer's own checks), gets a
per-device memory estimate (``memory.py``, ``zero_memory.py``) and a step-time estimate
(``timing.py``, ``compute.py``), and the ones that fit are ranked by step time; layouts of equal
time rank by memory, the one with more to spare first. ``min_nodes`` answers "how many nodes
would it take" when nothing fits.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from gptforge.model.config import ModelConfig, num_query_groups
from gptforge.model.config import default_ffn_hidden_size
from gptforge.model.flops import attention_flops_per_token, flops_per_token, matmul_params_per_layer
from gptforge.parallel.config import DTYPES, ParallelConfig
from gptforge.common.errors import ConfigError
from gptforge.parallel.layout import Layout, derive_layout
from gptforge.parallel.plan.clusters import ClusterShape
from gptforge.parallel.plan.timing import StepShape, TimeEstimate, step_time
from gptforge.parallel.plan.memory import ActivationShape, rank_activation_memory
from gptforge.parallel.plan.params import RankShape, rank_param_count, stage_ranks
from gptforge.parallel.plan.zero_memory import model_state_bytes, model_state_bytes_megatron

RECOMPUTE_MODES = ("none", "selective", "full")
MICRO_BATCH_SIZES = (1, 2, 4, 8, 16)
MAX_VIRTUAL_STAGES = 8


@dataclass(frozen=True)
class Pins:
    """Choices the user fixed (None: the planner picks)."""

    tp: int | None = None
    pp: int | None = None
    vpp: int | None = None  # 1: no interleaving
    micro_batch_size: int | None = None
    recompute: str | None = None
    zero_stage: int | None = None  # deepspeed
    use_distributed_optimizer: bool | None = None  # megatron
    sequence_parallel: bool | None = None
    offload_optimizer: bool | None = None
    offload_param: bool | None = None
    overlap: bool | None = None  # overlap DP communication (the engines' default: on)

    def admit(self, c: "Candidate") -> bool:
        checks = ((self.tp, c.tensor_model_parallel_size),
                  (self.pp, c.pipeline_model_parallel_size),
                  (self.vpp, c.virtual_pipeline_model_parallel_size or 1),
                  (self.micro_batch_size, c.micro_batch_size), (self.recompute, c.recompute),
                  (self.zero_stage, c.zero_stage),
                  (self.use_distributed_optimizer, c.use_distributed_optimizer),
                  (self.sequence_parallel, c.sequence_parallel),
                  (self.offload_optimizer, c.offload_optimizer),
                  (self.offload_param, c.offload_param), (self.overlap, c.overlap))
        return all(want is None or want == got for want, got in checks)


@dataclass(frozen=True)
class PlanRequest:
    model: ModelConfig  # seq_length included
    cluster: ClusterShape
    nodes: int
    gpus_per_node: int
    global_batch_size: int
    engine: str = "megatron"  # or "deepspeed" (ZeRO over DP, TP without SP, no PP)
    dtype: str | None = None  # fp32 / bf16 / fp16; None: the cluster's
    pins: Pins = field(default_factory=Pins)

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
    offload_optimizer: bool = False  # deepspeed, stage >= 1
    offload_param: bool = False  # deepspeed, stage 3
    overlap: bool = True  # DP communication overlapped with compute

    def parallel_config(self, engine: str) -> ParallelConfig:
        extra = {}
        if self.zero_stage is not None:
            extra = {"zero_stage": self.zero_stage,
                     "offload_optimizer": "cpu" if self.offload_optimizer else "none",
                     "offload_param": "cpu" if self.offload_param else "none"}
        return ParallelConfig(
            tensor_model_parallel_size=self.tensor_model_parallel_size,
            pipeline_model_parallel_size=self.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=self.virtual_pipeline_model_parallel_size,
            sequence_parallel=self.sequence_parallel,
            use_distributed_optimizer=self.use_distributed_optimizer,
            recompute=self.recompute, engine=engine, **extra)

    def optimizer_label(self) -> str:
        if self.zero_stage is not None:
            offload = ("+offload-opt" if self.offload_optimizer else "") + \
                      ("+offload-param" if self.offload_param else "")
            return f"zero-{self.zero_stage}{offload}"
        return "distopt" if self.use_distributed_optimizer else "ddp"


MEMORY_TERMS = ("params", "grads", "optimizer", "live", "activations", "working", "allocator",
                "runtime")
TERM_NAMES = {"params": "parameters", "grads": "gradients", "optimizer": "optimizer states",
              "live": "gathered parameters (ZeRO-3)",
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
    live: int = 0  # ZeRO-3: the gathered layer's parameters and gradients
    host: int = 0  # offloaded to CPU memory per device (not counted in total)

    @property
    def tensors(self) -> int:
        """What the model's tensors need at the peak (calibrated against measured memory)."""
        return (self.params + self.grads + self.optimizer + self.live + self.activations
                + self.working)

    @property
    def total(self) -> int:
        return self.tensors + self.allocator + self.runtime

    def largest_term(self) -> str:
        return max(MEMORY_TERMS, key=lambda term: getattr(self, term))


@dataclass(frozen=True)
class PlanEntry:
    candidate: Candidate
    layout: Layout
    memory: MemoryEstimate
    time: TimeEstimate
    fits: bool
    tokens_per_s: float
    mfu: float
    tflops_per_gpu: float  # model FLOPs (recompute not counted), as training reports
    hardware_tflops_per_gpu: float  # recompute counted
    host_fits: bool = True  # offloaded states fit the nodes' host memory


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


def _deepspeed_states():
    """(stage, offload_optimizer, offload_param) the deepspeed engine can run."""
    for stage in (0, 1, 2, 3):
        yield stage, False, False
        if stage >= 1:
            yield stage, True, False
        if stage == 3:
            yield stage, True, True


def _all_candidates(request: PlanRequest):
    m, world = request.model, request.world_size
    overlaps = (True, False) if request.pins.overlap is False else (True,)
    if request.engine == "deepspeed":
        # the deepspeed engine runs TP through megatron's layers, without pipeline or SP
        for tp, mbs, recompute, (stage, off_opt, off_param), overlap in itertools.product(
                _tensor_sizes(request), MICRO_BATCH_SIZES, RECOMPUTE_MODES, _deepspeed_states(),
                overlaps):
            if world % tp == 0:
                yield Candidate(tp, 1, None, mbs, recompute, zero_stage=stage,
                                offload_optimizer=off_opt, offload_param=off_param,
                                overlap=overlap)
        return
    sp_choices = (True, False) if request.pins.sequence_parallel is False else (True,)
    for tp in _tensor_sizes(request):
        for pp in _divisors(m.num_layers):
            if world % (tp * pp):
                continue
            for vpp, mbs, recompute, distopt, sp, overlap in itertools.product(
                    _virtual_sizes(m.num_layers, pp), MICRO_BATCH_SIZES, RECOMPUTE_MODES,
                    (False, True), sp_choices, overlaps):
                if distopt and world // (tp * pp) == 1:
                    continue  # nothing to shard over
                # sequence parallelism whenever TP > 1 unless pinned off: less memory, the
                # same traffic
                yield Candidate(tp, pp, vpp, mbs, recompute, sequence_parallel=sp and tp > 1,
                                use_distributed_optimizer=distopt, overlap=overlap)


def candidates(request: PlanRequest):
    """Every layout the engine could run that the request's pins admit."""
    seen = set()
    for c in _all_candidates(request):
        if c not in seen and request.pins.admit(c):
            seen.add(c)
            yield c


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


def largest_layer_params(model: ModelConfig, tp: int, padded_vocab_size: int) -> int:
    """The most parameters one module holds (what ZeRO-3 gathers at once): the embedding or
    logit layer, or the MLP's first linear layer."""
    h = model.hidden_size
    fc1 = h * default_ffn_hidden_size(model) * (2 if model.activation == "swiglu" else 1)
    return max(padded_vocab_size * h, fc1) // tp


def _state_bytes(request: PlanRequest, candidate: Candidate, layout: Layout,
                 num_params: int) -> dict:
    mixed = request.precision != "fp32"
    if candidate.zero_stage is not None:
        largest = largest_layer_params(request.model, layout.tensor_model_parallel_size,
                                       layout.padded_vocab_size)
        return model_state_bytes(num_params, dp_size=layout.data_parallel_size,
                                 zero_stage=candidate.zero_stage, mixed_precision=mixed,
                                 offload_optimizer=candidate.offload_optimizer,
                                 offload_param=candidate.offload_param,
                                 largest_layer_params=largest)
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
        grads=states["grads"], optimizer=states["optimizer"], live=states["live"],
        activations=acts.stored, working=acts.working,
        allocator=int(tensors * cluster.fragmentation), runtime=cluster.runtime_bytes,
        host=states["host"])


def peak_memory(request: PlanRequest, candidate: Candidate, layout: Layout) -> MemoryEstimate:
    """The pipeline rank that needs the most (first, middle or last stage)."""
    return max((rank_memory(request, candidate, layout, r)
                for r in stage_ranks(layout.pipeline_model_parallel_size)),
               key=lambda est: est.total)


# ---------------------------------------------------------------- time


def hardware_flops_per_token(model: ModelConfig, padded_vocab_size: int, recompute: str) -> float:
    """Model FLOPs plus what recompute runs again (a forward of the layers, or of attention)."""
    extra = 0.0
    if recompute == "full":
        extra = 2.0 * model.num_layers * matmul_params_per_layer(model)
        extra += attention_flops_per_token(model) / 3
    elif recompute == "selective":
        extra = attention_flops_per_token(model) / 3
    return flops_per_token(model, padded_vocab_size) + extra


def step_shape(request: PlanRequest, candidate: Candidate, layout: Layout) -> StepShape:
    return StepShape(
        tp=layout.tensor_model_parallel_size, pp=layout.pipeline_model_parallel_size,
        vpp=layout.virtual_pipeline_model_parallel_size or 1, dp=layout.data_parallel_size,
        micro_batch_size=layout.micro_batch_size, num_microbatches=layout.num_microbatches,
        sequence_parallel=candidate.sequence_parallel, recompute=candidate.recompute,
        activation_bytes=_dtype_bytes(request.precision),
        padded_vocab_size=layout.padded_vocab_size, gpus_per_node=request.gpus_per_node,
        optimizer=candidate.optimizer_label().split("+")[0], overlap=candidate.overlap,
        offload_optimizer=candidate.offload_optimizer, offload_param=candidate.offload_param)


# ---------------------------------------------------------------- the plan


def evaluate(request: PlanRequest, candidate: Candidate) -> PlanEntry:
    """Memory and time of one candidate (ConfigError when the trainer would refuse it)."""
    layout = derive(request, candidate)
    memory = peak_memory(request, candidate, layout)
    time = step_time(request.model, request.cluster, step_shape(request, candidate, layout),
                     memory.num_params)
    m, world = request.model, request.world_size
    tokens_per_s = request.global_batch_size * m.seq_length / time.step_s
    model_flops = flops_per_token(m, layout.padded_vocab_size)
    hardware = hardware_flops_per_token(m, layout.padded_vocab_size, candidate.recompute)
    tflops = model_flops * tokens_per_s / world / 1e12
    ranks_per_node = min(request.gpus_per_node, world)
    host_fits = memory.host * ranks_per_node <= request.cluster.host_memory_bytes
    return PlanEntry(candidate=candidate, layout=layout, memory=memory, time=time,
                     fits=memory.total <= request.cluster.memory_bytes and host_fits,
                     tokens_per_s=tokens_per_s, mfu=tflops / request.cluster.peak_tflops,
                     tflops_per_gpu=tflops,
                     hardware_tflops_per_gpu=hardware * tokens_per_s / world / 1e12,
                     host_fits=host_fits)


def check_request(request: PlanRequest) -> None:
    for key, value in (("--nodes", request.nodes), ("--gpus-per-node", request.gpus_per_node),
                       ("--global-batch-size", request.global_batch_size),
                       ("--seq-length", request.model.seq_length)):
        if value < 1:
            raise ConfigError(key, f"must be >= 1, got {value}")
    if request.engine not in ("megatron", "deepspeed"):
        raise ConfigError("--engine", f"must be megatron or deepspeed, got {request.engine!r}")
    pins = request.pins
    if request.engine == "deepspeed" and (pins.pp or 1) > 1:
        raise ConfigError("--pp", "the deepspeed engine has no pipeline parallelism")
    if request.engine == "megatron" and (pins.zero_stage is not None or pins.offload_optimizer
                                         or pins.offload_param):
        raise ConfigError("--zero-stage", "ZeRO stages and offload need --engine deepspeed")


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


def min_nodes(request: PlanRequest, limit: int = 4096) -> int | None:
    """The fewest nodes (same shape, same global batch, pins kept) on which some layout fits."""
    from dataclasses import replace

    nodes = request.nodes + 1
    while nodes <= limit:
        if plan(replace(request, nodes=nodes)).fitting:
            # the smallest: step back over the doubling
            low = max(request.nodes + 1, nodes // 2 + 1)
            for n in range(low, nodes):
                if plan(replace(request, nodes=n)).fitting:
                    return n
            return nodes
        nodes *= 2
    return None


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
        parallel["offload_optimizer"] = "cpu" if c.offload_optimizer else "none"
        parallel["offload_param"] = "cpu" if c.offload_param else "none"
    if not c.overlap:
        parallel["overlap_grad_reduce"] = False
        parallel["overlap_param_gather"] = False
    return {"parallel": parallel, "precision": {"dtype": request.precision},
            "train": {"micro_batch_size": c.micro_batch_size,
                      "global_batch_size": request.global_batch_size}}
