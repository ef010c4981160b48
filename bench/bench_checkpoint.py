"""Checkpoint save/load speed of gptforge.parallel.megatron.checkpoint on CPU (gloo).

A benchmark, not a test. A ~110M-parameter GPT (12 layers, h=768, 12 heads, vocab 32000,
seq 512, fp32) with Adam state after one training step, on 2 ranks (default DP=2 with the
distributed optimizer; ``--layout tp2`` for TP=2). Rows, each repeated ``--repeats`` times:

  sync save    save_state(async_save=False): the training loop is blocked for all of it
  async save   save_state(async_save=True): "blocked" is the time save_state holds the loop
               (state dicts, the optimizer's DP gather, planning, staging, fork); the writer
               then runs while the ranks do nothing here, and wait() finishes it
  load         load_state into the same engine (model + optimizer + scheduler)
  disk         plain write + fsync of the same number of bytes per rank, concurrently: what
               the disk gives at this moment, for scale (a shared virtual disk swings a lot)

Bytes are the sum of every rank's files (WrittenFile sizes). GB/s = bytes / seconds (1e9).
Run: torchrun --nproc-per-node=2 bench/bench_checkpoint.py [--dir /tmp/x] [--repeats 3]
(or ``.venv/bin/python bench/bench_checkpoint.py`` which starts torchrun itself).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

SHAPE = ["--model.num_layers=12", "--model.hidden_size=768", "--model.num_attention_heads=12",
         "--model.seq_length=512", "--model.vocab_size=32000", "--train.micro_batch_size=1",
         "--train.global_batch_size=2", "--train.train_iters=100", "--train.eval_interval=0"]
LAYOUTS = {"dp2-distopt": ["--parallel.use_distributed_optimizer=true"],
           "dp2": [], "tp2": ["--parallel.tensor_model_parallel_size=2"]}


def build(overrides: list[str]):
    """Config overrides → process groups → engine and batches (adapt here when train.py moves)."""
    from gptforge.launcher.config import load_config, validate
    from gptforge.launcher.run.build import build_batches, build_engine
    from gptforge.parallel.megatron import fixes as megatron_fixes
    from gptforge.parallel.context import init_parallel, world_size_from_env
    from gptforge.parallel.seeding import set_seed

    megatron_fixes.apply()
    cfg = load_config([], overrides)
    derived = validate(cfg, world_size_from_env())
    ctx = init_parallel(cfg.parallel)
    set_seed(cfg.train.seed, ctx.pp_rank)
    engine = build_engine(cfg, derived, ctx)
    batches = build_batches(cfg, derived, ctx, "train")
    return engine, batches, derived.num_microbatches


def _sum_all(value: float) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


def _max_all(value: float) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _disk_baseline(directory: Path, nbytes: int) -> float:
    """Seconds for every rank to write ``nbytes`` and fsync, concurrently (slowest rank)."""
    import torch.distributed as dist

    chunk = os.urandom(1 << 20)
    path = directory / f"disk_{dist.get_rank()}.bin"
    dist.barrier()
    start = time.perf_counter()
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            f.write(chunk[:min(left, len(chunk))])
            left -= len(chunk)
        f.flush()
        os.fsync(f.fileno())
    seconds = _max_all(time.perf_counter() - start)
    path.unlink()
    return seconds


def main() -> None:
    import torch
    import torch.distributed as dist

    from gptforge.parallel.megatron import checkpoint as mc
    from gptforge.parallel.context import destroy_parallel

    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="dp2-distopt")
    parser.add_argument("--json", default=None, help="also write the results here (rank 0)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    engine, batches, nmb = build(SHAPE + LAYOUTS[args.layout])
    rank = dist.get_rank()
    params = _sum_all(sum(p.numel() for c in engine.model_chunks for p in c.parameters()))
    if args.layout.startswith("dp"):
        params /= dist.get_world_size()  # replicated: count once
    engine.train_step([next(batches) for _ in range(nmb)])  # Adam state exists
    state = (engine.model_chunks, engine.optimizer, engine.scheduler)

    box = [args.dir or (tempfile.mkdtemp(prefix="gptforge-bench-ckpt-") if rank == 0 else None)]
    dist.broadcast_object_list(box, src=0)  # one directory for every rank
    root = Path(box[0])
    rows: dict[str, list] = {"sync": [], "async": [], "load": [], "disk": []}
    total_bytes = 0
    for i in range(args.repeats):
        for mode in ("sync", "async"):
            target = root / f"{mode}_{i}"
            dist.barrier()
            start = time.perf_counter()
            handle = mc.save_state(*state, target, async_save=mode == "async")
            blocked = time.perf_counter() - start
            handle.wait()
            total = time.perf_counter() - start
            nbytes = _sum_all(sum(f.bytes for f in handle.files))
            total_bytes = nbytes
            rows[mode].append({"blocked_s": _max_all(blocked), "total_s": _max_all(total),
                               "bytes": nbytes, "rank0_phases": handle.timings})
        dist.barrier()
        start = time.perf_counter()
        mc.load_state(*state, root / f"sync_{i}")
        rows["load"].append({"total_s": _max_all(time.perf_counter() - start),
                             "bytes": total_bytes})
        mine = sum(f.bytes for f in handle.files)
        rows["disk"].append({"total_s": _disk_baseline(root, mine), "bytes": total_bytes})
        if rank == 0:
            for mode in ("sync", "async"):
                shutil.rmtree(root / f"{mode}_{i}", ignore_errors=True)
        dist.barrier()

    if rank == 0:
        def med(mode, key):
            return statistics.median(r[key] for r in rows[mode])

        gb = total_bytes / 1e9
        print(f"\nmodel: {params / 1e6:.1f}M params, layout {args.layout}, "
              f"{dist.get_world_size()} ranks (gloo, CPU), checkpoint {gb:.2f} GB "
              f"(weights + Adam state), {args.repeats} repeats, medians; dir {root}")
        print(f"{'':12s}{'seconds':>10s}{'GB/s':>8s}   per repeat")
        for label, mode, key in (("sync save", "sync", "total_s"),
                                 ("async block", "async", "blocked_s"),
                                 ("async total", "async", "total_s"),
                                 ("load", "load", "total_s"), ("disk fsync", "disk", "total_s")):
            s = med(mode, key)
            each = " ".join(f"{r[key]:.2f}" for r in rows[mode])
            print(f"{label:12s}{s:10.2f}{gb / s:8.2f}   {each}")
        ratio = med("async", "blocked_s") / med("sync", "total_s")
        print(f"async blocks the loop for {100 * ratio:.1f}% of a sync save's time")
        for mode in ("sync", "async"):
            for i, r in enumerate(rows[mode]):
                phases = " ".join(f"{k} {v:.2f}" for k, v in r["rank0_phases"].items())
                print(f"  {mode} #{i} rank 0 phases (s): {phases}")
        if args.json:
            Path(args.json).write_text(json.dumps({"params": params, "layout": args.layout,
                                                   "rows": rows, "bytes": total_bytes,
                                                   "async_block_ratio": ratio}, indent=1))
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    destroy_parallel()


if __name__ == "__main__":
    if "RANK" not in os.environ:  # started directly: re-run under torchrun with 2 ranks
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
               f"--master-port={port}", __file__, *sys.argv[1:]]
        sys.exit(subprocess.call(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}))
    main()
