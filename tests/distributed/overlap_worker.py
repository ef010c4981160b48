"""One rank of the overlap test: each case trains a few steps with parallel.overlap_grad_reduce
and parallel.overlap_param_gather off, then on, and records what the communication did.

argv[1]: a JSON file {"steps": N, "cases": {name: [overrides]}}; rank 0 writes
<its dir>/results.json {name: {"off": run, "on": run}}. A run holds the step losses and grad
norms, the flags the built engine holds, and a log of the gradient reductions and parameter
all-gathers as they were issued (spies on the real calls; every collective runs as it would):

- megatron: each bucket group's ``start_grad_sync`` -- inside the backward (autograd's graph
  task is running) or not, asynchronous (a handle left to wait on) or not, and whether
  ``finish_grad_sync`` later found it in flight; each ``start_param_sync`` -- in which part of
  the step (the forward/backward schedule or the optimizer step), asynchronous or not.
- deepspeed: ZeRO's ``overlap_comm`` as built, and each bucket reduction (``average_tensor``)
  -- inside the backward or not.
"""

from __future__ import annotations

import functools
import gc
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from gptforge.common.shutdown import collect_nothing_at_exit
from gptforge.launcher.config import load_config, validate
from gptforge.launcher.run.build import build_batches, build_engine
from gptforge.parallel.deepspeed import config as ds_config
from gptforge.parallel.context import (destroy_model_parallel, destroy_parallel, init_parallel,
                                       world_size_from_env)
from gptforge.parallel.seeding import set_seed

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1  # -1: no autograd graph task running


class _Log:
    def __init__(self):
        self.step, self.phase, self.events = 0, "", []

    def add(self, **event):
        self.events.append({"step": self.step, "phase": self.phase, **event})


def _wrap(obj, name: str, after):
    """obj.name runs as before; ``after(obj)`` records what the call left behind."""
    original = getattr(obj, name)

    @functools.wraps(original)
    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        after(obj)
        return out

    setattr(obj, name, spy)


def _spy_megatron(engine, log: _Log) -> dict:
    for attr in ("_run", "_step_optimizer"):  # the phase of the step a call comes from
        original = getattr(engine, attr)

        def phased(*args, _original=original, _phase=attr.strip("_"), **kwargs):
            log.phase = _phase
            try:
                return _original(*args, **kwargs)
            finally:
                log.phase = ""

        setattr(engine, attr, phased)
    for chunk in engine.model_chunks:
        for group in chunk.bucket_groups:
            _wrap(group, "start_grad_sync", lambda g: log.add(
                call="start_grad_sync", in_backward=_in_backward(),
                is_async=g.grad_reduce_handle is not None))
            finish = group.finish_grad_sync

            def finish_spy(*args, _group=group, _finish=finish, **kwargs):
                log.add(call="finish_grad_sync",
                        in_flight=_group.grad_reduce_handle is not None)
                return _finish(*args, **kwargs)

            group.finish_grad_sync = finish_spy
            _wrap(group, "start_param_sync", lambda g: log.add(
                call="start_param_sync", is_async=g.param_gather_handle is not None))
    ddp = engine.model_chunks[0].ddp_config
    return {"overlap_grad_reduce": ddp.overlap_grad_reduce,
            "overlap_param_gather": ddp.overlap_param_gather}


def _spy_deepspeed(engine, log: _Log) -> dict:
    zero = engine.engine.optimizer
    _wrap(zero, "average_tensor", lambda z: log.add(call="average_tensor",
                                                     in_backward=_in_backward()))
    return {"overlap_comm": bool(engine.engine.zero_overlap_comm()),
            "zero_overlap_comm": bool(zero.overlap_comm)}


def run_case(overrides: list[str], steps: int, overlap: bool, run_dir: Path) -> dict:
    flags = [f"--parallel.overlap_grad_reduce={str(overlap).lower()}",
             f"--parallel.overlap_param_gather={str(overlap).lower()}", f"--run.dir={run_dir}"]
    cfg = load_config([TINY], [*overrides, *flags])
    layout = validate(cfg, world_size_from_env())
    ctx = init_parallel(cfg.parallel)
    set_seed(cfg.train.seed, ctx.pp_rank)
    batches = iter(build_batches(cfg, layout, ctx, "train"))
    # ZeRO buckets of ~a tenth of the tiny model (the floor of 2^18 elements would make one):
    # buckets fill during the backward and overlap_comm's double buffer is used
    floor, ds_config._MIN_BUCKET_ELEMENTS = ds_config._MIN_BUCKET_ELEMENTS, 1 << 12
    try:
        engine = build_engine(cfg, layout, ctx)
    finally:
        ds_config._MIN_BUCKET_ELEMENTS = floor
    log = _Log()
    spy = _spy_deepspeed if cfg.parallel.engine == "deepspeed" else _spy_megatron
    built = spy(engine, log)
    losses, grad_norms = [], []
    for step in range(1, steps + 1):
        log.step = step
        result = engine.train_step([next(batches) for _ in range(layout.num_microbatches)])
        losses.append(result.loss)
        grad_norms.append(result.grad_norm)
    destroy_model_parallel()
    gc.collect()
    return {"losses": losses, "grad_norms": grad_norms, "built": built, "events": log.events}


def main() -> None:
    spec_path = Path(sys.argv[1])
    spec = json.loads(spec_path.read_text())
    results = {}
    try:
        for name, overrides in spec["cases"].items():
            results[name] = {key: run_case(overrides, spec["steps"], overlap,
                                           spec_path.parent / f"{name}_{key}")
                             for key, overlap in (("off", False), ("on", True))}
            dist.barrier()
        if dist.get_rank() == 0:
            (spec_path.parent / "results.json").write_text(json.dumps(results, indent=1))
    finally:
        destroy_parallel()


if __name__ == "__main__":
    collect_nothing_at_exit()  # as a rank ends (common/shutdown.py)
    torch.set_num_threads(1)
    main()
