"""``gptforge plan --calibrate RUN_DIR...``: fit the device's speed to measured runs.

A run directory holds the config it trained with (``config.yaml``) and its steps' times and peak
memory (``metrics.jsonl``). For each run the planner's layout is rebuilt exactly (TP, PP, VPP,
micro-batch, recompute, optimizer, dtype; the world size follows from the logged tokens/s and
TFLOP/s per device) and its step time predicted. Two numbers of the cluster shape are fitted:

- the achievable fraction: one factor k on everything the device computes or streams (GEMM and
  attention efficiency, memory bandwidth), and
- the fixed cost per micro-batch (``microbatch_overhead_s``), when the runs differ in micro-batches
  per step (with one run, or all alike, it keeps the shape's value),

by least squares on log(predicted / measured) over the runs' median step times (the first
``WARMUP_STEPS`` steps of each run left out). The result is a complete cluster shape, written as
YAML for ``gptforge plan --cluster FILE``.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from gptforge.common.errors import ConfigError
from gptforge.common.metrics_file import read_records, step_records
from gptforge.parallel.plan.clusters import ClusterShape

WARMUP_STEPS = 2


@dataclass(frozen=True)
class MeasuredRun:
    run_dir: Path
    request: object  # PlanRequest
    candidate: object  # Candidate
    step_s: float  # median measured
    peak_memory_bytes: int
    num_steps: int


def _world_size(record: dict, flops_per_token: float) -> int:
    world = flops_per_token * record["tokens_per_s"] / (record["tflops_per_device"] * 1e12)
    return max(1, round(world))


def read_run(run_dir: str | Path, cfg, cluster: ClusterShape, gpus_per_node: int | None):
    """The run's planner request and candidate, its median step time and peak memory.

    ``cfg``: the run's config.yaml as loaded (the caller loads it; ``parallel`` does not read
    configs)."""
    from gptforge.model.flops import flops_per_token
    from gptforge.parallel.layout import padded_vocab_size
    from gptforge.parallel.plan.planner import Candidate, PlanRequest, Pins

    run_dir = Path(run_dir)
    steps = [r for r in step_records(read_records(run_dir))
             if "step_time_s" in r and not r.get("skipped")]
    steady = steps[WARMUP_STEPS:]
    if len(steady) < 3:
        raise ConfigError("--calibrate", f"{run_dir}/metrics.jsonl has {len(steps)} timed steps; "
                                         f"need at least {WARMUP_STEPS + 3} (log_interval 1)")
    m, p, t = cfg.model, cfg.parallel, cfg.train
    vocab = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by,
                              p.tensor_model_parallel_size)
    world = _world_size(steady[-1], flops_per_token(m, vocab))
    per_node = gpus_per_node or min(world, cluster.gpus_per_node)
    request = PlanRequest(model=m, cluster=cluster, nodes=max(1, world // per_node),
                          gpus_per_node=min(per_node, world), global_batch_size=t.global_batch_size,
                          engine=p.engine, dtype=cfg.precision.dtype, pins=Pins())
    deepspeed = p.engine == "deepspeed"
    candidate = Candidate(
        p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
        p.virtual_pipeline_model_parallel_size, t.micro_batch_size, p.recompute,
        sequence_parallel=p.sequence_parallel,
        use_distributed_optimizer=p.use_distributed_optimizer,
        zero_stage=p.zero_stage if deepspeed else None,
        offload_optimizer=deepspeed and p.offload_optimizer != "none",
        offload_param=deepspeed and p.offload_param != "none",
        overlap=getattr(p, "overlap_grad_reduce", True))
    return MeasuredRun(run_dir=run_dir, request=request, candidate=candidate,
                       step_s=statistics.median(r["step_time_s"] for r in steady),
                       peak_memory_bytes=max(int(r.get("mem_bytes", 0)) for r in steady),
                       num_steps=len(steady))


def scaled(cluster: ClusterShape, factor: float, overhead_s: float) -> ClusterShape:
    """``cluster`` with its device speed scaled by ``factor`` and the given micro-batch cost."""
    return dataclasses.replace(
        cluster, gemm_efficiency=cluster.gemm_efficiency * factor,
        attention_efficiency=cluster.attention_efficiency * factor,
        memory_gbps=cluster.memory_gbps * factor, microbatch_overhead_s=overhead_s)


def predict(run: MeasuredRun, cluster: ClusterShape):
    from gptforge.parallel.plan.planner import evaluate

    return evaluate(dataclasses.replace(run.request, cluster=cluster), run.candidate)


def _error(runs, cluster, factor, overhead) -> float:
    shape = scaled(cluster, factor, overhead)
    return sum(math.log(predict(r, shape).time.step_s / r.step_s) ** 2 for r in runs)


def fit(runs: list[MeasuredRun], cluster: ClusterShape) -> tuple[ClusterShape, dict]:
    """The fitted cluster shape and what was fitted (factor, overhead, per-run predictions)."""
    vary = len({r.request.global_batch_size // r.candidate.micro_batch_size for r in runs}) > 1
    overheads = [cluster.microbatch_overhead_s]
    if vary:
        top = max(r.step_s for r in runs)
        overheads = [top * i / 200 for i in range(0, 101)]
    best = (float("inf"), 1.0, cluster.microbatch_overhead_s)
    for overhead in overheads:
        low, high = math.log(1e-3), math.log(1e3)
        for _ in range(40):  # golden-section search on log(factor)
            a, b = low + 0.382 * (high - low), low + 0.618 * (high - low)
            if _error(runs, cluster, math.exp(a), overhead) < \
                    _error(runs, cluster, math.exp(b), overhead):
                high = b
            else:
                low = a
        factor = math.exp((low + high) / 2)
        err = _error(runs, cluster, factor, overhead)
        if err < best[0]:
            best = (err, factor, overhead)
    _, factor, overhead = best
    shape = dataclasses.replace(scaled(cluster, factor, overhead),
                                name=f"{cluster.name}-calibrated")
    report = {"factor": factor, "microbatch_overhead_s": overhead, "overhead_fitted": vary,
              "runs": [_run_report(r, predict(r, shape)) for r in runs]}
    return shape, report


def _run_report(run: MeasuredRun, predicted) -> dict:
    return {"run_dir": str(run.run_dir), "measured_step_s": run.step_s,
            "predicted_step_s": predicted.time.step_s,
            "measured_peak_memory_bytes": run.peak_memory_bytes,
            "predicted_memory_bytes": predicted.memory.total}


def cluster_yaml(shape: ClusterShape, report: dict) -> str:
    import yaml

    head = [f"# gptforge plan --calibrate: device speed x{report['factor']:.3f}, "
            f"micro-batch overhead {report['microbatch_overhead_s'] * 1e3:.2f} ms"
            + ("" if report["overhead_fitted"] else " (kept: one micro-batch count measured)")]
    for run in report["runs"]:
        head.append(f"# {run['run_dir']}: measured {run['measured_step_s']:.4g} s/step, "
                    f"predicted {run['predicted_step_s']:.4g} s/step")
    return "\n".join(head) + "\n" + yaml.safe_dump(dataclasses.asdict(shape), sort_keys=False)
