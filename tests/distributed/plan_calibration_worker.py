"""One rank of the planner's calibration launch: peak memory of several layouts in turn.

argv[1]: a JSON file {"layouts": {name: [overrides]}, "common": [overrides], "steps": N,
"warmups": [[overrides], ...]}. The warm-up layouts run first, unmeasured: they do the imports
and one-time allocations (megatron's modules, optimizer code, the bf16 kernels' caches) that
would otherwise land inside the first measurement of their kind. Then, for each layout, every
rank reads its resident memory before the model is built (``baseline``), resets the kernel's
high-water mark after building the engine, runs N training steps through the engine and reads
the high-water mark (``peak``); test_plan_calibration.py says why this way. Rank 0 writes
<dir>/<name>.json with every rank's record.
"""

from __future__ import annotations

import gc
import json
import re
import sys
from pathlib import Path

import torch

from gptforge.common.shutdown import collect_nothing_at_exit
from gptforge.launcher.config import load_config, validate
from gptforge.launcher.run.build import build_batches, build_engine
from gptforge.parallel.context import (all_gather_objects, destroy_model_parallel,
                                       destroy_parallel, env_rank_info, init_parallel)
from gptforge.parallel.seeding import set_seed

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def status_kib(field: str) -> int:
    """A VmRSS / VmHWM line of /proc/self/status, in KiB."""
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(match.group(1))


def reset_peak() -> None:
    """Set VmHWM back to the current resident size (Linux: clear_refs value 5)."""
    Path("/proc/self/clear_refs").write_text("5")


def measure(cfg, world_size: int, steps: int) -> dict:
    layout = validate(cfg, world_size)
    ctx = init_parallel(cfg.parallel)
    set_seed(cfg.train.seed, ctx.pp_rank)
    gc.collect()
    baseline = status_kib("VmRSS")
    engine = build_engine(cfg, layout, ctx)
    batches = iter(build_batches(cfg, layout, ctx, "train"))
    gc.collect()
    reset_peak()
    built = status_kib("VmRSS")
    for _ in range(steps):
        engine.train_step([next(batches) for _ in range(layout.num_microbatches)])
    record = {"rank": ctx.rank, "tp_rank": ctx.tp_rank, "pp_rank": ctx.pp_rank,
              "dp_rank": ctx.dp_rank, "num_parameters": engine.num_parameters,
              "baseline_bytes": baseline * 1024, "built_bytes": built * 1024,
              "peak_bytes": status_kib("VmHWM") * 1024}
    records = all_gather_objects(ctx, record)
    del engine, batches
    gc.collect()
    destroy_model_parallel()
    return {"records": records}


def main() -> None:
    spec_path = Path(sys.argv[1])
    spec = json.loads(spec_path.read_text())
    rank, world_size, _ = env_rank_info()
    try:
        for overrides in spec["warmups"]:
            warmup = load_config([TINY], [*overrides, f"--run.dir={spec_path.parent / 'warmup'}"])
            measure(warmup, world_size, 1)
        for name, overrides in spec["layouts"].items():
            cfg = load_config([TINY], [*spec["common"], *overrides,
                                       f"--run.dir={spec_path.parent / name}"])
            result = measure(cfg, world_size, spec["steps"])
            if rank == 0:
                (spec_path.parent / f"{name}.json").write_text(json.dumps(result))
    finally:
        destroy_parallel()


if __name__ == "__main__":
    collect_nothing_at_exit()  # as a rank ends (common/shutdown.py)
    torch.set_num_threads(1)
    main()
