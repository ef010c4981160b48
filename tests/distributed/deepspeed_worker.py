"""One rank of a deepspeed test launch: several cases in one process group, in turn.

argv[1]: a JSON file {"cases": [{"name", "kind", ...}]}; rank 0 writes <its dir>/results.json
{name: result}. Kinds:

- cpu_compat: a small torch model under ZeRO-2 before and after ``cpu_compat.apply()`` (which
  megatron needs on CPU and which changes torch globally); the losses of both runs. Must come
  first (cpu_compat cannot be undone).
- memory: the peak model-state bytes of this rank during its second step for one ZeRO stage
  (and offload): every distinct storage the engine holds (``engine_state_bytes``), counted after
  each backward and just before the update; with the formula of ``parallel/plan/zero_memory.py``.
- eval_converted: a one-process-per-rank megatron engine loads a converted (weights-only)
  checkpoint through the Checkpointer and evaluates; also the errors for load_optim=true and for
  a deepspeed checkpoint given to the megatron engine.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from gptforge.common.shutdown import collect_nothing_at_exit
from gptforge.launcher.config import load_config, validate
from gptforge.launcher.run.build import build_batches, build_engine
from gptforge.parallel.context import (destroy_model_parallel, destroy_parallel, init_parallel,
                                       world_size_from_env)
from gptforge.parallel.engine import CheckpointError
from gptforge.parallel.seeding import set_seed

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


# ---------------------------------------------------------------- cpu_compat


def _plain_zero2_losses(steps: int = 4) -> list[float]:
    from gptforge.parallel.deepspeed.compat import import_deepspeed

    deepspeed = import_deepspeed()
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(32, 32) for _ in range(3)])
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
              "train_batch_size": 4 * 2 * dist.get_world_size(), "gradient_clipping": 1.0,
              "zero_optimization": {"stage": 2, "reduce_bucket_size": 4096,
                                    "allgather_bucket_size": 4096},
              "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
              "steps_per_print": 10**9}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config,
                                      dist_init_required=False)
    gen = torch.Generator().manual_seed(1 + dist.get_rank())
    losses = []
    for _ in range(steps * 2):
        x = torch.randn(4, 32, generator=gen)
        loss = (engine(x) - x).pow(2).mean()
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    return losses


def case_cpu_compat(case: dict) -> dict:
    from gptforge.parallel.megatron import cpu_compat
    from gptforge.parallel.context import init_distributed

    init_distributed("gloo")
    before = _plain_zero2_losses()
    applied = cpu_compat.apply()
    after = _plain_zero2_losses()
    from deepspeed.accelerator import get_accelerator

    return {"before": before, "after": after, "applied": applied,
            "accelerator": get_accelerator().device_name(),
            "cuda_available": torch.cuda.is_available()}


# ---------------------------------------------------------------- memory


def _storage(t: torch.Tensor) -> tuple[int, int] | None:
    if t.device.type == "meta" or not t.numel():
        return None
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def _walk_tensors(obj, found: dict, depth: int = 0) -> None:
    """Storages of the tensors a DeepSpeed object holds (its attributes, lists, dicts)."""
    if isinstance(obj, torch.Tensor):
        if (s := _storage(obj)) is not None:
            found[s[0]] = s[1]
        return
    if depth > 6:
        return
    if isinstance(obj, dict):
        for value in obj.values():
            _walk_tensors(value, found, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _walk_tensors(value, found, depth + 1)
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("deepspeed"):
        for value in vars(obj).values():
            _walk_tensors(value, found, depth + 1)


def engine_state_bytes(engine) -> dict[str, int]:
    """Bytes of the model state this rank's deepspeed engine holds, by kind: the module's
    parameters (ZeRO-3: their partitions), gradients, the optimizer's parameters (fp32 master
    partitions), its moments, and DeepSpeed's other buffers (gradient partitions, buckets)."""
    kinds: dict[str, dict] = {k: {} for k in ("params", "grads", "master", "moments", "buffers")}

    def add(kind, t):
        if t is not None and (s := _storage(t)) is not None:
            kinds[kind][s[0]] = s[1]

    for param in engine.engine.module.parameters():
        add("params", param)
        add("params", getattr(param, "ds_tensor", None))
        add("grads", param.grad)
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for group in inner.param_groups:
        for param in group["params"]:
            add("master", param)
            add("grads", param.grad)
    for state in inner.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.numel() > 1:
                add("moments", value)
    _walk_tensors(engine.optimizer, kinds["buffers"])
    _walk_tensors(engine.engine, kinds["buffers"])
    out, seen = {}, set()
    for kind, storages in kinds.items():
        out[kind] = sum(n for ptr, n in storages.items() if ptr not in seen)
        seen |= set(storages)
    out["total"] = sum(out.values())
    return out


def case_memory(case: dict) -> dict:
    """Peak model-state bytes of this rank during its second step (Adam's moments exist):
    after every backward, just before the update and as the optimizer steps, the largest."""
    from gptforge.parallel.plan.zero_memory import model_state_bytes

    cfg = load_config([TINY], case["overrides"])
    layout = validate(cfg, world_size_from_env())
    ctx = init_parallel(cfg.parallel)
    set_seed(cfg.train.seed, ctx.pp_rank)
    batches = iter(build_batches(cfg, layout, ctx, "train"))
    engine = build_engine(cfg, layout, ctx)
    samples: list[dict] = []
    backward, update = engine.engine.backward, engine.engine._take_model_step

    def counted_backward(*args, **kwargs):
        out = backward(*args, **kwargs)
        samples.append(engine_state_bytes(engine))
        return out

    def counted_update(*args, **kwargs):
        samples.append(engine_state_bytes(engine))
        return update(*args, **kwargs)

    engine.engine.backward, engine.engine._take_model_step = counted_backward, counted_update
    # inside the step, when DeepSpeed has built the fp32 gradient partition the update reads
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    inner_step = inner.step

    def counted_inner_step(*args, **kwargs):
        samples.append(engine_state_bytes(engine))
        return inner_step(*args, **kwargs)

    inner.step = counted_inner_step
    for step in range(2):
        samples.clear()
        engine.train_step([next(batches) for _ in range(layout.num_microbatches)])
    peak = max(samples, key=lambda s: s["total"])
    p = cfg.parallel
    formula = model_state_bytes(engine.num_parameters, dp_size=ctx.dp_size,
                                zero_stage=p.zero_stage,
                                mixed_precision=cfg.precision.dtype != "fp32",
                                offload_optimizer=p.offload_optimizer != "none",
                                offload_param=p.offload_param != "none")
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, peak)
    num_parameters = engine.num_parameters
    destroy_model_parallel()
    gc.collect()
    return {"peak": peaks, "formula": formula, "num_parameters": num_parameters}


# ---------------------------------------------------------------- converted checkpoint


class _NoStop:
    def saving(self):
        import contextlib

        return contextlib.nullcontext()


def case_eval_converted(case: dict) -> dict:
    from gptforge.launcher.run.checkpoint.checkpointer import Checkpointer
    from gptforge.launcher.run.entry import run_record
    from gptforge.launcher.run.loop import evaluate

    cfg = load_config([TINY], case["overrides"])
    layout = validate(cfg, world_size_from_env())
    ctx = init_parallel(cfg.parallel)
    set_seed(cfg.train.seed, ctx.pp_rank)
    engine = build_engine(cfg, layout, ctx)
    batches = build_batches(cfg, layout, ctx, "train")
    ckpt = Checkpointer(cfg.checkpoint, run_record(cfg), run_dir=cfg.run.dir, ctx=ctx,
                        engine=engine, batches=batches, layout=layout, stop=_NoStop())
    errors = {}
    for name, path, load_optim in (("load_optim", case["converted"], True),
                                   ("deepspeed_into_megatron", case["deepspeed"], False)):
        try:
            ckpt.load(Path(path), load_optim=load_optim)
            errors[name] = None
        except CheckpointError as err:
            errors[name] = str(err)
    start = ckpt.load(Path(case["converted"]), load_optim=False)
    valid = iter(build_batches(cfg, layout, ctx, "valid"))
    val_loss = evaluate(engine, valid, layout.num_microbatches, cfg.train.eval_iters)
    destroy_model_parallel()
    return {"val_loss": val_loss, "start_step": start, "errors": errors}


CASES = {"cpu_compat": case_cpu_compat, "memory": case_memory,
         "eval_converted": case_eval_converted}


def main() -> None:
    spec_path = Path(sys.argv[1])
    spec = json.loads(spec_path.read_text())
    results = {}
    try:
        for case in spec["cases"]:
            results[case["name"]] = CASES[case["kind"]](case)
            dist.barrier()
        if dist.get_rank() == 0:
            (spec_path.parent / "results.json").write_text(json.dumps(results, indent=1))
    finally:
        destroy_parallel()


if __name__ == "__main__":
    collect_nothing_at_exit()  # as a rank ends (common/shutdown.py)
    torch.set_num_threads(1)
    main()
