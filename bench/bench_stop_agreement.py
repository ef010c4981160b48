"""What the per-step stop agreement costs: the all-reduce every rank makes after each step so that
all of them stop after the same step for the same signal (``launcher/run/entry.py: _stop_check``,
``parallel/context.py: max_over_ranks`` on the gloo control group), against the step it follows.

Run: .venv/bin/python bench/bench_stop_agreement.py [--steps 30] (starts 2 ranks with torchrun).
Prints the median step time of the tiny model, the median agreement time, their ratio, and the
interval K the run picks from such a measurement (``launcher/run/stopping.py``) with the cost
per step that leaves.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rank_main(steps: int) -> None:
    import torch

    from gptforge.launcher.config import load_config, validate
    from gptforge.launcher.run.build import build_batches, build_engine
    from gptforge.launcher.run.stopping import BUDGET
    from gptforge.parallel.context import destroy_parallel, init_parallel, max_over_ranks

    torch.set_num_threads(1)
    cfg = load_config([ROOT / "configs" / "tiny.yaml"], ["--train.micro_batch_size=4"])
    layout = validate(cfg, int(os.environ["WORLD_SIZE"]))
    ctx = init_parallel(cfg.parallel)
    engine = build_engine(cfg, layout, ctx)
    batches = build_batches(cfg, layout, ctx, "train")
    step_s, agree_s = [], []
    for _ in range(steps):
        micro = [next(batches) for _ in range(layout.num_microbatches)]
        start = time.perf_counter()
        engine.train_step(micro)
        step_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        max_over_ranks(ctx, 0)
        agree_s.append(time.perf_counter() - start)
    if ctx.rank == 0:
        step, agree = statistics.median(step_s[3:]), statistics.median(agree_s[3:])
        every = max(1, math.ceil(agree / step / BUDGET))
        print(f"ranks {ctx.world_size}  step {step * 1e3:.2f} ms  agreement {agree * 1e3:.3f} ms"
              f"  ratio {agree / step:.2%}  ->  agreed every {every} steps: "
              f"{agree / step / every:.2%} of a step")
    destroy_parallel()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank:
        rank_main(args.steps)
        return 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
           __file__, "--rank", "--steps", str(args.steps)]
    return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1",
                                    "PYTHONWARNINGS": "ignore"}).returncode


if __name__ == "__main__":
    sys.exit(main())
