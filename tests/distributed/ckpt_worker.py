"""One rank of a checkpoint test launch: runs several cases in one process group, in turn.

argv[1]: a JSON file {"dir": out_dir, "common": [overrides], "cases": [{"name", "kind", ...}]}.
Rank 0 writes <dir>/results.json: {case name: result}. Cases (see ``CASES``):

- reference: train ``steps`` steps uninterrupted; the losses.
- resume:    train ``save_at`` steps in layout ``save``, save (sync or async), go on training to
  ``steps`` (the uninterrupted losses, "continued"); then a fresh engine in layout ``load`` loads
  the checkpoint and trains to ``steps`` ("losses"). Also the save/load times and files. Without
  ``save``, loads an earlier case's checkpoint (``from``).
- fix_*:     one megatron fix switched off, then on (see megatron_fixes).
- bad_input: corrupted/hostile copies of a checkpoint; the CheckpointError messages.

``build`` is the one place that constructs an engine from config overrides.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import pickle
import shutil
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from gptforge.common.shutdown import collect_nothing_at_exit
from gptforge.launcher.config import load_config, validate
from gptforge.launcher.run.build import build_batches, build_engine
from gptforge.parallel.megatron import checkpoint as mc
from gptforge.parallel.megatron import fixes as megatron_fixes
from gptforge.parallel.context import (destroy_model_parallel, destroy_parallel, init_parallel,
                                       world_size_from_env)
from gptforge.parallel.seeding import set_seed

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


class Run:
    """An engine, its train batch iterator and what a step needs."""

    def __init__(self, engine, batches, num_microbatches: int, ctx, cfg):
        self.engine, self.batches, self.num_microbatches = engine, batches, num_microbatches
        self.ctx, self.cfg = ctx, cfg

    def skip_to(self, step: int) -> None:
        """Position the batches after ``step`` global batches (mock data: layout-independent)."""
        self.batches.load_state_dict({"kind": "mock",
                                      "global_samples": step * self.cfg.train.global_batch_size})

    def step(self) -> float:
        result = self.engine.train_step([next(self.batches) for _ in range(self.num_microbatches)])
        return _shared_loss(result.loss)

    def state(self):
        e = self.engine
        return e.model_chunks, e.optimizer, e.scheduler


def build(overrides: list[str]) -> Run:
    """Config overrides → process groups → engine and batches (adapt here when train.py moves)."""
    megatron_fixes.apply()
    cfg = load_config([TINY], overrides)
    derived = validate(cfg, world_size_from_env())
    ctx = init_parallel(cfg.parallel)
    set_seed(cfg.train.seed, ctx.pp_rank)
    engine = build_engine(cfg, derived, ctx)
    batches = build_batches(cfg, derived, ctx, "train")
    return Run(engine, batches, derived.num_microbatches, ctx, cfg)


def _shared_loss(loss: float | None) -> float:
    """The loss lives on the last pipeline stage; every rank gets it."""
    box = [None] * dist.get_world_size()
    dist.all_gather_object(box, loss)
    return next(v for v in box if v is not None)


def _finish(run: Run | None) -> None:
    del run
    destroy_model_parallel()


# --------------------------------------------------------------------------------------------

def case_reference(spec, out: Path, common):
    run = build(common + spec.get("layout", []))
    losses = [run.step() for _ in range(spec["steps"])]
    _finish(run)
    return {"losses": losses}


def _save_and_continue(spec, out, common):
    """Train to save_at in the save layout, save; returns the checkpoint dir and save info."""
    ckpt = out / spec["name"]
    run = build(common + spec["save"])
    for _ in range(spec["save_at"]):
        run.step()
    with megatron_fixes.disabled(*spec.get("disable", [])):
        handle = mc.save_state(*run.state(), ckpt, async_save=spec.get("async", False),
                               own_distopt=not spec.get("megatron_save", False))
    info = {"blocked_s": handle.blocked_s}
    # The uninterrupted run: the same engine goes on. With an async save it trains while the
    # writer runs, so the checkpoint must hold the step-k state, not what training does next.
    info["continued"] = [run.step() for _ in range(spec["steps"] - spec["save_at"])]
    if spec.get("async"):
        info["done_before_wait"] = handle.done
        handle.wait()
    info["total_s"] = handle.total_s
    box = [None] * dist.get_world_size()
    dist.all_gather_object(box, [tuple(f) for f in handle.files])
    info["files"] = sorted({tuple(f) for files in box for f in files})
    _finish(run)
    return ckpt, info


def case_resume(spec, out: Path, common):
    if "save" in spec:
        ckpt, info = _save_and_continue(spec, out, common)
    else:
        ckpt, info = out / spec["from"], {}
    run = build(common + spec["load"])
    t = time.perf_counter()
    record = mc.load_state(*run.state(), ckpt, load_optim=spec.get("load_optim", True))
    info["load_s"] = time.perf_counter() - t
    info["record"] = record
    run.skip_to(spec["save_at"])
    info["losses"] = [run.step() for _ in range(spec["steps"] - spec["save_at"])]
    if spec.get("resave"):  # a loaded engine saves again: the step it records
        again = out / f"{spec['name']}_resaved"
        mc.save_state(*run.state(), again)
        info["resaved_step"] = mc.read_common(again)["gptforge"]["optimizer_step"]
    _finish(run)
    return info


def _expect_failure(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test looks at the type and message
        return f"{type(e).__name__}: {e}"[:500]
    return None


def case_fixes(spec, out: Path, common):
    """Each distributed-optimizer fix off, then on, against one DP=1 distopt checkpoint."""
    layout = common + ["--parallel.use_distributed_optimizer=true"]
    k, steps = spec["save_at"], spec["steps"]
    result = {}
    # The reference and a fully_reshardable checkpoint at step k.
    run = build(layout)
    ref = [run.step() for _ in range(steps)]
    _finish(run)
    run = build(layout)
    for _ in range(k):
        run.step()
    ckpt = out / "fixes_ckpt"
    mc.save_state(*run.state(), ckpt)
    _finish(run)

    def resume(disabled=(), sharded_ckpt=ckpt, megatron_load=True):
        # Fixes a-d are about megatron's own load path: use it (ours reads in place).
        with megatron_fixes.disabled(*disabled):
            run = build(layout)
            mc.load_state(*run.state(), sharded_ckpt, own_distopt=not megatron_load)
            optimizers = mc.inner_optimizers(run.engine.optimizer)
            steps_after_load = {id(s["step"]) for opt in optimizers
                                for s in opt.optimizer.state.values()}
            n_states = sum(len(opt.optimizer.state) for opt in optimizers)
            run.skip_to(k)
            losses = [run.step() for _ in range(steps - k)]
            step_values = sorted({int(s["step"]) for opt in
                                  mc.inner_optimizers(run.engine.optimizer)
                                  for s in opt.optimizer.state.values()})
            _finish(run)
        return {"losses": losses, "distinct_step_tensors": len(steps_after_load),
                "param_states": n_states, "step_values": step_values}

    result["reference"] = ref[k:]
    result["all_fixes"] = resume()
    for name in ("a", "b"):
        result[f"without_{name}"] = _expect_failure(lambda: resume((name,)))
        destroy_model_parallel()
    result["without_d"] = resume(("d",))
    # Our in-place load relies on (a) and (d) too.
    result["in_place_all_fixes"] = resume(megatron_load=False)
    result["in_place_without_d"] = resume(("d",), megatron_load=False)

    # (c) shows on the dp_reshardable load path (fully_reshardable's loader has no_grad).
    dp_ckpt = out / "fixes_dp_reshardable"
    run = build(layout)
    for _ in range(k):
        run.step()
    mc.save_state(*run.state(), dp_ckpt, sharding="dp_reshardable")
    _finish(run)
    result["without_c"] = _expect_failure(lambda: resume(("c",), dp_ckpt))
    destroy_model_parallel()
    result["dp_reshardable_all_fixes"] = resume((), dp_ckpt)
    result["dp_reshardable_without_b"] = resume(("b",), dp_ckpt)
    return result


class _Payload:
    """Unpickling this runs ``os.system`` (creates the marker file): it must never happen."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def case_bad_input(spec, out: Path, common):
    """Each corruption in a copy of a good checkpoint; the error each load raises."""
    good = out / "bad_good"
    run = build(common)
    rank = dist.get_rank()
    run.step()
    t = time.perf_counter()
    mc.save_state(*run.state(), good)
    save_s = time.perf_counter() - t
    _finish(run)
    marker = out / "payload_ran"
    results = {"save_s": save_s, "marker": str(marker)}

    def corrupt(name, edit):
        target = out / f"bad_{name}"
        if rank == 0:
            shutil.copytree(good, target)
            edit(target)
        dist.barrier()
        return target

    def biggest_shard(d):
        return max(d.glob("__*.distcp"), key=lambda p: p.stat().st_size)

    def flip(d):
        path = biggest_shard(d)
        md = mc.read_metadata(d)
        info = max((i for i in md.storage_data.values() if i.relative_path == path.name),
                   key=lambda i: i.length)
        data = bytearray(path.read_bytes())
        data[info.offset + info.length // 2] ^= 0x40  # inside a tensor's data record
        path.write_bytes(bytes(data))

    def truncate(d):
        path = biggest_shard(d)
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)

    def evil_metadata(d):
        (d / ".metadata").write_bytes(pickle.dumps(_Payload(str(marker))))

    def evil_common(d):
        torch.save({"x": _Payload(str(marker))}, d / "common.pt")

    def evil_object_item(d):
        """A ShardedObject's byte item (a valid, CRC-correct torch.save zip) → the payload."""
        md = mc.read_metadata(d)
        info = next(s for i, s in md.storage_data.items() if "/shard_" in i.fqn)
        path = d / info.relative_path
        data = path.read_bytes()
        buf = io.BytesIO()
        torch.save([_Payload(str(marker))], buf)
        evil = buf.getvalue()
        path.write_bytes(data[:info.offset] + evil + data[info.offset + info.length:])
        for other in md.storage_data.values():
            if other.relative_path == info.relative_path and other.offset > info.offset:
                other.offset += len(evil) - info.length
        info.length = len(evil)
        (d / ".metadata").write_bytes(pickle.dumps(md))
        results["object_item_file"] = path.name  # (the metadata's order: either rank's file)

    edits = {
        "missing_shard": lambda d: biggest_shard(d).unlink(),
        "truncated_shard": truncate,
        "flipped_shard": flip,
        "truncated_common": lambda d: (d / "common.pt").write_bytes(
            (d / "common.pt").read_bytes()[:100]),
        "flipped_metadata": lambda d: (d / ".metadata").write_bytes(
            (d / ".metadata").read_bytes()[:-50] + bytes(50)),
        "payload_metadata": evil_metadata,
        "payload_common": evil_common,
        "payload_object_item": evil_object_item,
    }
    results["biggest_shard"] = biggest_shard(good).name
    for name, edit in edits.items():
        target = corrupt(name, edit)
        run = build(common)
        results[name] = _error_of(lambda: mc.load_state(*run.state(), target))
        results[name]["optimizer_state_left"] = _optimizer_state_size(run)
        _finish(run)
    # Another model shape: fewer layers, and a narrower model.
    for name, extra in (("fewer_layers", ["--model.num_layers=2"]),
                        ("narrower", ["--model.hidden_size=32"]),
                        ("untied_output", ["--model.tie_embeddings=false"])):
        run = build(common + extra)
        results[name] = _error_of(lambda: mc.load_state(*run.state(), good))
        results[name]["optimizer_state_left"] = _optimizer_state_size(run)
        _finish(run)
    results["marker_exists"] = marker.exists()
    return results


def _optimizer_state_size(run: Run) -> int:
    """Params with Adam state: a fresh engine whose load failed must still have none."""
    return sum(len(o.optimizer.state) for o in mc.inner_optimizers(run.engine.optimizer))


def _error_of(fn):
    try:
        fn()
    except mc.CheckpointError as e:
        return {"type": "CheckpointError", "message": str(e)}
    except Exception as e:  # noqa: BLE001
        return {"type": type(e).__name__, "message": traceback.format_exc()[-1500:]}
    return {"type": None, "message": ""}


def _spawn_managers_started(save) -> int:
    """How many multiprocessing spawn Managers ``save()`` starts (a spy on the spawn context)."""
    from multiprocessing import context as mp_context

    started = []
    real = mp_context.SpawnContext.Manager

    def spy(self, *args, **kwargs):
        started.append(1)
        return real(self, *args, **kwargs)

    mp_context.SpawnContext.Manager = spy
    try:
        save()
    finally:
        del mp_context.SpawnContext.Manager  # BaseContext's again
    return len(started)


def case_spawn(spec, out: Path, common):
    """The first save of a process (megatron starts a spawn Manager there, 4-5 s; the fix, a
    results file) and the results queue that replaces it: a forked writer's large result, read
    after the join."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    run = build(common)
    run.step()
    with megatron_fixes.disabled("spawn"):
        upstream = _spawn_managers_started(lambda: mc.save_state(*run.state(),
                                                                 out / "spawn_upstream"))
    ours = _spawn_managers_started(lambda: mc.save_state(*run.state(), out / "spawn_ckpt"))
    _finish(run)
    queue = filesystem_async._get_write_results_queue()
    payload = list(range(200_000))  # ~1 MB pickled: far more than a pipe buffer
    child = multiprocessing.get_context("fork").Process(target=queue.put, args=(payload,))
    child.start()
    child.join(timeout=60)
    return {"spawn_managers": ours, "spawn_managers_without_fix": upstream,
            "queue_type": type(queue).__name__, "child_exitcode": child.exitcode,
            "round_trip": queue.get_nowait() == payload}


CASES = {"reference": case_reference, "resume": case_resume, "fixes": case_fixes,
         "bad_input": case_bad_input, "spawn": case_spawn}


def main() -> None:
    spec_path = Path(sys.argv[1])
    spec = json.loads(spec_path.read_text())
    out = Path(spec["dir"])
    results = {}
    try:
        for case in spec["cases"]:
            t = time.perf_counter()
            results[case["name"]] = CASES[case["kind"]](case, out, spec.get("common", []))
            results[case["name"]]["case_s"] = time.perf_counter() - t
            if dist.get_rank() == 0:
                print(f"[ckpt_worker] {case['name']}: {time.perf_counter() - t:.1f}s", flush=True)
    finally:
        if dist.is_initialized() and dist.get_rank() == 0:
            (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
        destroy_parallel()


if __name__ == "__main__":
    collect_nothing_at_exit()  # as a rank ends (common/shutdown.py)
    torch.set_num_threads(1)
    main()
