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


def build_request(args: argparse.Namespace):
    from gptforge.launcher.config import load_config
    from gptforge.common.errors import ConfigError
    from gptforge.model.config import validate_model
    from gptforge.parallel.plan.planner import PlanRequest
    from gptforge.parallel.plan.clusters import CLUSTERS

    cfg = load_config([preset_path(args.model)], _overrides(args))
    validate_model(cfg.model)
    if args.gpu not in CLUSTERS:
        raise ConfigError("--gpu", f"unknown cluster shape {args.gpu!r} (known: "
                          f"{', '.join(CLUSTERS)})")
    return PlanRequest(model=cfg.model, cluster=CLUSTERS[args.gpu], nodes=args.nodes,
                       gpus_per_node=args.gpus_per_node,
                       global_batch_size=cfg.train.global_batch_size, engine=args.engine)


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
    terms = ", ".join(f"{TERM_NAMES[k]} {_gib(getattr(mem, k))}" for k in MEMORY_TERMS)
    lines = [f"  memory (GiB, pipeline rank {mem.pipeline_rank}): {terms}; "
             f"total {_gib(mem.total)}"]
    if mem.host:
        lines.append(f"  offloaded to host memory: {_gib(mem.host)} GiB")
    lines.append(f"  step time (s): compute {t.compute_s:.3g}, pipeline bubble {t.bubble_s:.3g}, "
                 f"TP comm {t.tp_comm_s:.3g}, PP comm {t.pp_comm_s:.3g}, "
                 f"DP comm {t.dp_comm_s:.3g}"
                 + (f", per-micro-batch overhead {t.overhead_s:.3g}" if t.overhead_s else "")
                 + f"; total {t.step_s:.3g}")
    return lines


def _none_fits(request, result) -> list[str]:
    from gptforge.parallel.plan.planner import TERM_NAMES

    cap = request.cluster.memory_bytes
    where = (f"{request.nodes} x {request.gpus_per_node} {request.cluster.name} "
             f"({_gib(cap)} GiB per device)")
    if result.closest is None:
        return [f"no layout of the model is possible on {where} with global batch "
                f"{request.global_batch_size}: see the divisibility rules of "
                f"`gptforge train --help` (parallel, train.global_batch_size)"]
    entry = result.closest
    term, excess = entry.memory.overflow(cap)
    return [f"no layout fits on {where}; the closest, {_layout_text(entry)}, needs "
            f"{_gib(entry.memory.total)} GiB per device: {TERM_NAMES[term]} "
            f"({_gib(getattr(entry.memory, term))} GiB) overflow the memory, "
            f"{_gib(excess)} GiB too much in all",
            *_breakdown(entry)]


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

    delta = yaml.safe_load(preset_path(args.model).read_text()) or {}
    layout = layout_delta(request, entry)
    if args.seq_length is not None:
        layout["model"] = {"seq_length": args.seq_length}
    out = Path(args.emit_config)
    layout["run"] = {"dir": f"runs/{out.stem}"}  # its own run, not the preset's
    for section, values in layout.items():
        delta[section] = {**delta.get(section, {}), **values}
    head = [f"# gptforge plan --model {args.model} --nodes {args.nodes} --gpus-per-node "
            f"{args.gpus_per_node} --gpu {args.gpu} --engine {args.engine}",
            f"# best layout: {_layout_text(entry)}",
            f"# predicted: {_gib(entry.memory.total)} GiB per device, step "
            f"{entry.time.step_s:.3g} s, {_count(entry.tokens_per_s)} tokens/s, "
            f"MFU {entry.mfu:.2f}",
            f"# run: gptforge train --config {out.name} --nproc-per-node {args.gpus_per_node}"
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


def _plan(args: argparse.Namespace) -> int:
    from gptforge.common.errors import ConfigError
    from gptforge.parallel.plan.planner import plan

    request = build_request(args)
    result = plan(request)
    m, cluster = request.model, request.cluster
    print(f"model {args.model}: {m.num_layers} layers, hidden {m.hidden_size}, "
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
    if args.emit_config:
        print(f"wrote {emit_config(args, request, shown[0])}")
    return 0


def register(verbs) -> None:
    from gptforge.parallel.plan.clusters import CLUSTERS

    p = verbs.add_parser(
        "plan", help="which layouts of a model fit a cluster, and how fast each trains",
        description="Enumerate TP/PP/VPP/DP, optimizer sharding, recompute and micro-batch size; "
                    "predict per-device memory and step time; print the layouts that fit, best "
                    f"first. Presets: {', '.join(preset_names())}.")
    p.add_argument("--model", required=True, metavar="PRESET",
                   help="a preset name (configs/models/) or a config YAML file")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=8, metavar="N",
                   help="devices per node (default 8)")
    p.add_argument("--gpu", default="h100-80gb", metavar="SHAPE",
                   help=f"device shape: {', '.join(CLUSTERS)} (default h100-80gb)")
    p.add_argument("--seq-length", type=int, default=None, metavar="T",
                   help="tokens per sequence (default: the preset's)")
    p.add_argument("--global-batch-size", type=int, default=None, metavar="B",
                   help="sequences per step (default: the preset's train.global_batch_size)")
    p.add_argument("--engine", choices=("megatron", "deepspeed"), default="megatron",
                   help="megatron (TP/PP/VPP/DP, distributed optimizer) or deepspeed (ZeRO "
                        "stages over DP, TP without sequence parallelism, no PP)")
    p.add_argument("--top", type=int, default=10, metavar="N", help="rows to print (default 10)")
    p.add_argument("--emit-config", default=None, metavar="OUT.yaml",
                   help="write the best layout as a config for `gptforge train --config`")
    p.set_defaults(func=_plan)
