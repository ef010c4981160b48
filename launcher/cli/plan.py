"""``gptforge plan``: will a model fit a cluster, in which layout, and how fast will it train.

The model is a preset (configs/models/NAME.yaml, configs/NAME.yaml) or a YAML file; the cluster a
shape from ``parallel/plan/clusters.py`` times ``--nodes`` x ``--gpus-per-node``. The planner
(``parallel/plan/planner.py``) does the arithmetic; this module reads the preset, prints the
ranked table and writes ``--emit-config``: the preset plus the best layout, a delta
``gptforge train`` takes as it is (checked by loading and validating it before writing).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
GIB = 1024**3


def preset_names() -> list[str]:
    return sorted(p.stem for p in (CONFIGS / "models").glob("*.yaml"))


def preset_path(name: str) -> Path:
    """A preset by name (configs/models/NAME.yaml, then configs/NAME.yaml) or a YAML path."""
    from gptforge.common.errors import ConfigError

    for path in (CONFIGS / "models" / f"{name}.yaml", CONFIGS / f"{name}.yaml", Path(name)):
        if path.is_file():
            return path
    raise ConfigError("--model", f"no preset or file {name!r} (presets: "
                      f"{', '.join(preset_names())})")


def _overrides(args: argparse.Namespace) -> list[str]:
    out = []
    if args.seq_length is not None:
        out.append(f"--model.seq_length={args.seq_length}")
    if args.global_batch_size is not None:
        out.append(f"--train.global_batch_size={args.global_batch_size}")
    return out


def _pins(args: argparse.Namespace, cfg=None):
    """What the flags (or ``--config``'s parallel and train sections) fix."""
    from gptforge.parallel.plan.planner import Pins

    if cfg is not None:  # a training config as written: every choice pinned
        p, deepspeed = cfg.parallel, cfg.parallel.engine == "deepspeed"
        return Pins(tp=p.tensor_model_parallel_size, pp=p.pipeline_model_parallel_size,
                    vpp=p.virtual_pipeline_model_parallel_size or 1,
                    micro_batch_size=cfg.train.micro_batch_size, recompute=p.recompute,
                    zero_stage=p.zero_stage if deepspeed else None,
                    use_distributed_optimizer=p.use_distributed_optimizer,
                    sequence_parallel=p.sequence_parallel,
                    offload_optimizer=p.offload_optimizer != "none",
                    offload_param=p.offload_param != "none",
                    overlap=getattr(p, "overlap_grad_reduce", True))
    return Pins(tp=args.tp, pp=args.pp, vpp=args.vpp, micro_batch_size=args.micro_batch_size,
                recompute=args.recompute, zero_stage=args.zero_stage,
                offload_optimizer=args.offload_optimizer, offload_param=args.offload_param)


def build_request(args: argparse.Namespace):
    from gptforge.common.errors import ConfigError
    from gptforge.launcher.config import load_config
    from gptforge.model.config import validate_model
    from gptforge.parallel.plan.clusters import cluster_shape
    from gptforge.parallel.plan.planner import PlanRequest

    if not args.model and not args.config:
        raise ConfigError("--model", "give --model NAME|MODEL.yaml or --config RUN.yaml")
    if args.model and args.config:
        raise ConfigError("--config", f"give --model {args.model} or --config {args.config}, "
                                      f"not both (--config holds its own model)")
    if args.config:
        cfg = load_config([Path(args.config)], _overrides(args))
        engine, dtype = cfg.parallel.engine, cfg.precision.dtype
    else:
        cfg = load_config([preset_path(args.model)], _overrides(args))
        engine, dtype = args.engine, None
    validate_model(cfg.model)
    cluster = cluster_shape(args.cluster or args.gpu)
    gpus_per_node = args.gpus_per_node or cluster.gpus_per_node
    return PlanRequest(model=cfg.model, cluster=cluster, nodes=args.nodes,
                       gpus_per_node=gpus_per_node, global_batch_size=cfg.train.global_batch_size,
                       engine=engine, dtype=dtype, pins=_pins(args, cfg if args.config else None))


# ---------------------------------------------------------------- printing


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / GIB:.1f}"


def _count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def _layout_text(entry) -> str:
    lay, c = entry.layout, entry.candidate
    return (f"{lay.describe()} mbs={lay.micro_batch_size} x{lay.num_microbatches}"
            f"{' SP' if c.sequence_parallel else ''} recompute={c.recompute} "
            f"{c.optimizer_label()}")


HEADER = (f"{'#':>3} {'TP':>3} {'PP':>3} {'VPP':>3} {'DP':>5} {'mbs':>3} {'mb/step':>7} "
          f"{'SP':>3} {'recompute':>9} {'optimizer':>9} {'params/GPU':>10} {'mem GiB':>8} "
          f"{'states':>7} {'activ.':>7} {'step s':>8} {'tokens/s':>9} {'MFU':>5}")


def _row(i: int, entry) -> str:
    lay, c, mem = entry.layout, entry.candidate, entry.memory
    states = mem.params + mem.grads + mem.optimizer
    return (f"{i:>3} {lay.tensor_model_parallel_size:>3} {lay.pipeline_model_parallel_size:>3} "
            f"{lay.virtual_pipeline_model_parallel_size or '-':>3} {lay.data_parallel_size:>5} "
            f"{lay.micro_batch_size:>3} {lay.num_microbatches:>7} "
            f"{'on' if c.sequence_parallel else '-':>3} {c.recompute:>9} "
            f"{c.optimizer_label():>9} {_count(mem.num_params):>10} {_gib(mem.total):>8} "
            f"{_gib(states):>7} {_gib(mem.activations + mem.working):>7} "
            f"{entry.time.step_s:>8.3g} {_count(entry.tokens_per_s):>9} {entry.mfu:>5.2f}")


def _breakdown(entry) -> list[str]:
    from gptforge.parallel.plan.planner import MEMORY_TERMS, TERM_NAMES

    mem, t = entry.memory, entry.time
    terms = ", ".join(f"{TERM_NAMES[k]} {_gib(getattr(mem, k))}" for k in MEMORY_TERMS
                      if getattr(mem, k) or k != "live")
    lines = [f"  memory (GiB, pipeline rank {mem.pipeline_rank}): {terms}; "
             f"total {_gib(mem.total)}"]
    if mem.host:
        lines.append(f"  offloaded to host memory: {_gib(mem.host)} GiB per device")
    parts = [("compute", t.compute_s), ("pipeline bubble", t.bubble_s), ("TP comm", t.tp_comm_s),
             ("PP comm", t.pp_comm_s), ("DP comm (exposed)", t.dp_comm_s),
             ("optimizer", t.optimizer_s), ("offload (CPU Adam, PCIe)", t.offload_s),
             ("per-micro-batch overhead", t.overhead_s)]
    lines.append("  step time (s): " + ", ".join(f"{k} {v:.3g}" for k, v in parts if v)
                 + f"; total {t.step_s:.3g}")
    return lines


def _where(request) -> str:
    return (f"{request.nodes} x {request.gpus_per_node} {request.cluster.name} "
            f"({_gib(request.cluster.memory_bytes)} GiB per device)")


def refusal(request, result) -> dict:
    """Why nothing fits: the closest layout, its largest term, the nodes that would do."""
    from gptforge.parallel.plan.planner import TERM_NAMES, min_nodes

    if result.closest is None:
        return {"reason": "no layout of the model is possible with these pins and global batch "
                          f"{request.global_batch_size} (divisibility rules: gptforge train "
                          "--help, parallel and train.global_batch_size)",
                "min_nodes": None}
    entry = result.closest
    mem, cap = entry.memory, request.cluster.memory_bytes
    term = mem.largest_term()
    if mem.total <= cap:  # it is the host memory that overflows
        reason = (f"offloaded states need {_gib(mem.host * request.gpus_per_node)} GiB of host "
                  f"memory per node, the node has {_gib(request.cluster.host_memory_bytes)}")
    else:
        reason = (f"needs {_gib(mem.total)} GiB per device, {_gib(mem.total - cap)} more than "
                  f"{_gib(cap)}; the largest term is {TERM_NAMES[term]} "
                  f"({_gib(getattr(mem, term))} GiB)")
    return {"reason": reason, "largest_term": term, "largest_term_name": TERM_NAMES[term],
            "largest_term_gib": getattr(mem, term) / GIB, "closest": entry,
            "min_nodes": min_nodes(request)}


def _none_fits(request, result) -> list[str]:
    why = refusal(request, result)
    if why.get("closest") is None:
        return [f"no layout fits on {_where(request)}: {why['reason']}"]
    nodes = why["min_nodes"]
    advice = (f"the smallest that fits: {nodes} nodes of {request.gpus_per_node}"
              if nodes else "no node count up to 4096 fits")
    return [f"no layout fits on {_where(request)}; the closest, {_layout_text(why['closest'])}, "
            f"{why['reason']}; {advice}", *_breakdown(why["closest"])]


def entry_json(entry, request, tokens: float | None) -> dict:
    from gptforge.parallel.plan.planner import MEMORY_TERMS

    lay, c, mem, t = entry.layout, entry.candidate, entry.memory, entry.time
    out = {"tp": lay.tensor_model_parallel_size, "pp": lay.pipeline_model_parallel_size,
           "vpp": lay.virtual_pipeline_model_parallel_size or 1, "dp": lay.data_parallel_size,
           "micro_batch_size": lay.micro_batch_size, "num_microbatches": lay.num_microbatches,
           "recompute": c.recompute, "engine": request.engine, "zero_stage": c.zero_stage,
           "sequence_parallel": c.sequence_parallel,
           "use_distributed_optimizer": c.use_distributed_optimizer,
           "offload_optimizer": c.offload_optimizer, "offload_param": c.offload_param,
           "overlap": c.overlap, "fits": entry.fits,
           "memory_gib": {**{k: getattr(mem, k) / GIB for k in MEMORY_TERMS},
                          "total": mem.total / GIB, "host_per_device": mem.host / GIB},
           "step_time_s": t.step_s,
           "step_time_parts_s": {k: getattr(t, k) for k in (
               "compute_s", "bubble_s", "tp_comm_s", "pp_comm_s", "dp_comm_s", "optimizer_s",
               "offload_s", "overhead_s")},
           "tokens_per_s": entry.tokens_per_s, "tflops_per_gpu": entry.tflops_per_gpu,
           "hardware_tflops_per_gpu": entry.hardware_tflops_per_gpu, "mfu": entry.mfu}
    if tokens:
        out["time_to_train_s"] = tokens / entry.tokens_per_s
        out["time_to_train_days"] = out["time_to_train_s"] / 86400
    return out


def _json(args, request, result) -> int:
    import json

    m = request.model
    doc = {"model": args.model or args.config, "cluster": request.cluster.name,
           "nodes": request.nodes, "gpus_per_node": request.gpus_per_node,
           "engine": request.engine, "precision": request.precision,
           "global_batch_size": request.global_batch_size, "seq_length": m.seq_length,
           "considered": result.considered, "fits": bool(result.fitting),
           "layouts": [entry_json(e, request, args.tokens) for e in result.fitting[:args.top]]}
    if not result.fitting:
        why = refusal(request, result)
        closest = why.pop("closest", None)
        doc["refusal"] = {**why, "closest": entry_json(closest, request, args.tokens)
                          if closest is not None else None}
    print(json.dumps(doc, indent=1))
    return 0


def _check_meta_counts(request, entries) -> None:
    """Every printed layout's parameter count, built on the meta device, must match."""
    from gptforge.parallel.plan.planner import meta_param_count

    for entry in entries:
        counted = meta_param_count(request, entry)
        if counted != entry.memory.num_params:
            raise RuntimeError(f"parameter count of {_layout_text(entry)}: planner "
                               f"{entry.memory.num_params}, meta-device build {counted}")


# ---------------------------------------------------------------- emitting


def emit_config(args: argparse.Namespace, request, entry) -> Path:
    """Write the preset plus ``entry``'s layout; refuse what ``gptforge train`` would refuse."""
    from gptforge.common.durable import Durability, publish, temp_path
    from gptforge.launcher.config import load_config, validate
    from gptforge.parallel.plan.planner import layout_delta

    source = Path(args.config) if args.config else preset_path(args.model)
    delta = yaml.safe_load(source.read_text()) or {}
    layout = layout_delta(request, entry)
    if args.seq_length is not None:
        layout["model"] = {"seq_length": args.seq_length}
    out = Path(args.emit_config)
    layout["run"] = {"dir": f"runs/{out.stem}"}  # its own run, not the preset's
    for section, values in layout.items():
        delta[section] = {**delta.get(section, {}), **values}
    head = [f"# gptforge plan --model {args.model or args.config} --nodes {args.nodes} "
            f"--gpus-per-node "
            f"{request.gpus_per_node} --gpu {args.cluster or args.gpu} --engine {request.engine}",
            f"# best layout: {_layout_text(entry)}",
            f"# predicted: {_gib(entry.memory.total)} GiB per device, step "
            f"{entry.time.step_s:.3g} s, {_count(entry.tokens_per_s)} tokens/s, "
            f"MFU {entry.mfu:.2f}",
            f"# run: gptforge train --config {out.name} --nproc-per-node {request.gpus_per_node}"
            + (f" (on each of {args.nodes} nodes: torchrun or srun)" if args.nodes > 1 else "")]
    text = "\n".join(head) + "\n" + yaml.safe_dump(delta, sort_keys=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(out)
    tmp.write_text(text)
    try:
        validate(load_config([tmp]), request.world_size)  # the file as written must train
        publish(tmp, out, Durability.FILE)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _days(seconds: float) -> str:
    return f"{seconds / 86400:.1f} days" if seconds >= 86400 else f"{seconds / 3600:.1f} hours"


def _run_config(run_dir: str):
    from gptforge.common.errors import ConfigError
    from gptforge.launcher.config import load_config

    config = Path(run_dir) / "config.yaml"
    if not config.is_file():
        raise ConfigError("--calibrate", f"{run_dir} has no config.yaml (not a run directory)")
    return load_config([config])


def _calibrate(args: argparse.Namespace) -> int:
    from gptforge.parallel.plan.calibrate import cluster_yaml, fit, read_run
    from gptforge.parallel.plan.clusters import cluster_shape
    from gptforge.common.durable import Durability, publish, temp_path

    cluster = cluster_shape(args.cluster or args.gpu)
    runs = [read_run(d, _run_config(d), cluster, args.gpus_per_node) for d in args.calibrate]
    shape, report = fit(runs, cluster)
    for run in report["runs"]:
        print(f"{run['run_dir']}: measured {run['measured_step_s']:.4g} s/step, calibrated "
              f"prediction {run['predicted_step_s']:.4g} s/step; peak memory measured "
              f"{_gib(run['measured_peak_memory_bytes'])} GiB, predicted "
              f"{_gib(run['predicted_memory_bytes'])} GiB")
    out = Path(args.out or Path(args.calibrate[0]) / "plan-cluster.yaml")
    tmp = temp_path(out)
    tmp.write_text(cluster_yaml(shape, report))
    publish(tmp, out, Durability.FILE)
    print(f"device speed x{report['factor']:.3f} of {cluster.name}'s, micro-batch overhead "
          f"{report['microbatch_overhead_s'] * 1e3:.2f} ms; wrote {out} "
          f"(use: gptforge plan --cluster {out} ...)")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from gptforge.common.errors import ConfigError
    from gptforge.parallel.plan.planner import plan

    if args.calibrate:
        return _calibrate(args)
    request = build_request(args)
    result = plan(request)
    if args.json:
        return _json(args, request, result)
    m, cluster = request.model, request.cluster
    print(f"model {args.model or args.config}: {m.num_layers} layers, hidden {m.hidden_size}, "
          f"{m.num_attention_heads} heads, seq {m.seq_length}, global batch "
          f"{request.global_batch_size} ({_count(request.global_batch_size * m.seq_length)} "
          f"tokens); cluster {request.nodes} x {request.gpus_per_node} {cluster.name} "
          f"({_gib(cluster.memory_bytes)} GiB, {cluster.peak_tflops:g} TFLOP/s {request.precision}"
          f" each); engine {request.engine}")
    if not result.fitting:
        for line in _none_fits(request, result):
            print(line)
        if args.emit_config:
            raise ConfigError("--emit-config", "no layout fits, nothing written")
        return 0
    shown = result.fitting[:args.top]
    _check_meta_counts(request, shown)
    print(f"{len(result.fitting)} of {result.considered} layouts fit; the best {len(shown)} "
          f"(parameter counts per GPU checked on a meta-device build):")
    print(HEADER)
    for i, entry in enumerate(shown, start=1):
        print(_row(i, entry))
    print(f"best: {_layout_text(shown[0])}")
    for line in _breakdown(shown[0]):
        print(line)
    if args.tokens:
        print(f"  time to train {_count(args.tokens)} tokens: "
              f"{_days(args.tokens / shown[0].tokens_per_s)}")
    if args.emit_config:
        print(f"wrote {emit_config(args, request, shown[0])}")
    return 0


def _tokens(text: str) -> float:
    """1e12, 300B, 2T, 500M."""
    units = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}
    text = text.strip()
    try:
        if text[-1:].upper() in units:
            return float(text[:-1]) * units[text[-1].upper()]
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tokens: not a count: {text!r} (e.g. 300B, 1e12)")


def _layout_flags(p) -> None:
    pins = p.add_argument_group("pin a layout (any pin alone; the planner picks the rest)")
    pins.add_argument("--tp", type=int, default=None, help="tensor parallel size")
    pins.add_argument("--pp", type=int, default=None, help="pipeline parallel size")
    pins.add_argument("--vpp", type=int, default=None,
                      help="model chunks per pipeline stage (1: no interleaving)")
    pins.add_argument("--micro-batch-size", type=int, default=None, metavar="M")
    pins.add_argument("--recompute", choices=("none", "selective", "full"), default=None)
    pins.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=None,
                      help="DeepSpeed ZeRO stage (--engine deepspeed)")
    pins.add_argument("--offload-optimizer", action=argparse.BooleanOptionalAction, default=None,
                      help="DeepSpeed: optimizer states in host memory (or --no-...)")
    pins.add_argument("--offload-param", action=argparse.BooleanOptionalAction, default=None,
                      help="DeepSpeed ZeRO-3: parameters in host memory (or --no-...)")


def register(verbs) -> None:
    from gptforge.parallel.plan.clusters import CLUSTERS

    p = verbs.add_parser(
        "plan", help="which layouts of a model fit a cluster, and how fast each trains",
        description="Enumerate TP/PP/VPP/DP, optimizer sharding and offload, recompute and "
                    "micro-batch size; predict per-device memory and step time; print the "
                    "layouts that fit, best first. Presets: " + ", ".join(preset_names()) + ".")
    p.add_argument("--model", default=None, metavar="PRESET",
                   help="a preset name (configs/models/) or a config YAML file")
    p.add_argument("--config", default=None, metavar="RUN.yaml",
                   help="score a training config as written (its model, layout, engine, dtype)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=None, metavar="N",
                   help="devices per node (default: the shape's, 8 for GPUs)")
    p.add_argument("--gpu", default="h100-80gb", metavar="SHAPE",
                   help=f"device shape: {', '.join(CLUSTERS)} (default h100-80gb)")
    p.add_argument("--cluster", default=None, metavar="FILE.yaml",
                   help="your own node shape (fields of parallel/plan/clusters.py, or "
                        "`base: SHAPE` plus changes); overrides --gpu")
    p.add_argument("--seq-length", type=int, default=None, metavar="T",
                   help="tokens per sequence (default: the preset's)")
    p.add_argument("--global-batch-size", type=int, default=None, metavar="B",
                   help="sequences per step (default: the preset's train.global_batch_size)")
    p.add_argument("--engine", choices=("megatron", "deepspeed"), default="megatron",
                   help="megatron (TP/PP/VPP/DP, distributed optimizer) or deepspeed (ZeRO "
                        "stages and offload over DP, TP without sequence parallelism, no PP)")
    _layout_flags(p)
    p.add_argument("--tokens", type=_tokens, default=None, metavar="N",
                   help="training tokens (300B, 1e12): adds the time to train")
    p.add_argument("--json", action="store_true", help="print the ranked layouts as JSON")
    p.add_argument("--top", type=int, default=10, metavar="N", help="rows to print (default 10)")
    p.add_argument("--emit-config", default=None, metavar="OUT.yaml",
                   help="write the best layout as a config for `gptforge train --config`")
    p.add_argument("--calibrate", nargs="+", default=None, metavar="RUN_DIR",
                   help="fit the device's speed to measured runs; writes a cluster file")
    p.add_argument("--out", default=None, metavar="FILE.yaml",
                   help="--calibrate's output (default RUN_DIR/plan-cluster.yaml)")
    p.set_defaults(func=_plan)
