"""CPU training throughput: gptforge's trainer vs a plain eager PyTorch GPT loop, side by side.

A benchmark, not a test. One process, one rank, CPU, fp32. Rows:

  plain      a hand-written eager GPT (same shapes, pre-LN, GELU 4h MLP, learned positions, tied
             embeddings, biases, SDPA causal attention) with torch.optim.AdamW + clip_grad_norm_.
  gptforge   ``gptforge.launcher.run.entry.run(cfg)`` exactly as the launcher runs it (megatron-core
             GPTModel, megatron DDP grad buffers, megatron optimizer + clipping, LR scheduler),
             once with the default attention backend (auto -> SDPA on CPU) and once with
             megatron's unfused "local" attention.

Step time is the median over the measured steps (after warmup) of the wall time of one step:
fetching the batch, zero_grad, forward, backward, clipping and the optimizer step (gptforge's own
``step_time_s`` records; the plain loop is timed the same way around the same work). The plain
loop runs before AND after the gptforge rows; its row is the median over the pooled measured steps
of both runs (so slow drift of the machine — thermal, other load — affects both sides alike); the
two per-run medians are printed too.

Then the two-rank rows: megatron DP=2 (DDP), deepspeed ZeRO-1 and deepspeed ZeRO-3, the same
model and global batch (micro-batch 4 per rank, one micro-batch per step), one launch of 2 ranks
(``torch.distributed.run``, one thread per rank) holding the three engines, which take turns step
by step (see ``two_rank_worker``); a row is the median over its measured steps on rank 0.
Target: ZeRO-1 >= 0.95x megatron DP.

Then the cost of cpu_compat's optimizer_context() (a TorchFunctionMode, entered around optimizer
construction only since a step clips without it) is measured in isolation: clip_grad_norm_ over the
plain model's parameters, with and without the mode active.

    .venv/bin/python bench/bench_train.py [--steps 10] [--warmup 3] [--threads 2] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import tempfile
import time
import warnings

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SHAPE = dict(num_layers=6, hidden_size=256, num_attention_heads=4, seq_length=256,
             vocab_size=8192, micro_batch_size=8, global_batch_size=8)
LR, WD, BETAS, EPS, CLIP = 3e-4, 0.1, (0.9, 0.95), 1e-8, 1.0
SEED = 1234


# --------------------------------------------------------------------------- plain PyTorch GPT
class Block(nn.Module):
    def __init__(self, h: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(h, eps=1e-5)
        self.qkv = nn.Linear(h, 3 * h)
        self.proj = nn.Linear(h, h)
        self.ln2 = nn.LayerNorm(h, eps=1e-5)
        self.fc1 = nn.Linear(h, 4 * h)
        self.fc2 = nn.Linear(4 * h, h)

    def forward(self, x):
        b, s, h = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, h // self.heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, n, s, d]
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, h))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class PlainGPT(nn.Module):
    def __init__(self, vocab: int, h: int, heads: int, layers: int, seq: int):
        super().__init__()
        self.wte = nn.Embedding(vocab, h)
        self.wpe = nn.Embedding(seq, h)
        self.blocks = nn.ModuleList(Block(h, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(h, eps=1e-5)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                scaled = name.endswith(("proj.weight", "fc2.weight"))
                std = 0.02 / math.sqrt(2 * layers) if scaled else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, tokens, position_ids, labels):
        x = self.wte(tokens) + self.wpe(position_ids)
        for blk in self.blocks:
            x = blk(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)  # tied output layer
        return F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), labels.reshape(-1))


def plain_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    # megatron's default param groups: no weight decay on biases and norm weights (1-D params).
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": WD},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=LR, betas=BETAS, eps=EPS)


def mock_batches():
    from gptforge.data.mock import MockBatches  # the very batches gptforge trains on

    return MockBatches(split="train", seq_length=SHAPE["seq_length"],
                       micro_batch_size=SHAPE["micro_batch_size"],
                       global_batch_size=SHAPE["global_batch_size"], dp_rank=0, dp_size=1,
                       seed=SEED, vocab_size=SHAPE["vocab_size"])


def run_plain(warmup: int, steps: int) -> tuple[list[float], int, nn.Module]:
    torch.manual_seed(SEED)
    model = PlainGPT(SHAPE["vocab_size"], SHAPE["hidden_size"], SHAPE["num_attention_heads"],
                     SHAPE["num_layers"], SHAPE["seq_length"])
    model.train()
    opt = plain_optimizer(model)
    batches = mock_batches()
    times, losses = [], []
    for _ in range(warmup + steps):
        start = time.perf_counter()
        batch = next(batches)
        opt.zero_grad(set_to_none=True)
        loss = model(batch["tokens"], batch["position_ids"], batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        losses.append(loss.detach().item())
        times.append(time.perf_counter() - start)
    print(f"  plain: loss {losses[0]:.3f} -> {losses[-1]:.3f}", flush=True)
    return times[warmup:], sum(p.numel() for p in model.parameters()), model


# --------------------------------------------------------------------------- gptforge
def gptforge_overrides(backend: str, iters: int, run_dir: str) -> list[str]:
    o = [f"--model.{k}={SHAPE[k]}" for k in ("num_layers", "hidden_size", "num_attention_heads",
                                             "seq_length", "vocab_size")]
    o += [f"--train.micro_batch_size={SHAPE['micro_batch_size']}",
          f"--train.global_batch_size={SHAPE['global_batch_size']}",
          "--precision.dtype=fp32", f"--optim.lr={LR}", f"--optim.clip_grad={CLIP}",
          "--data.source=mock", f"--train.train_iters={iters}", "--train.eval_interval=0",
          "--train.log_interval=1", f"--train.seed={SEED}", f"--run.dir={run_dir}"]
    if backend != "auto":
        o.append(f"--model.attention_backend={backend}")
    return o


def run_gptforge(backend: str, warmup: int, steps: int, profile: bool = False):
    """gptforge.launcher.run.entry.run(cfg) unchanged; build_engine is wrapped only to note the
    engine (parameter count) and time its forward/backward and optimizer step per step."""
    import gptforge.launcher.run.entry as gtrain
    from gptforge.launcher.config import load_config

    seen: dict = {"fb": [], "opt": []}
    original_build = gtrain.build_engine

    def timed(fn, key):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                seen[key].append(time.perf_counter() - t0)
        return wrapper

    def build_engine(*a, **k):
        engine = original_build(*a, **k)
        seen["engine"] = engine
        engine._forward_backward = timed(engine._forward_backward, "fb")
        engine.optimizer.step = timed(engine.optimizer.step, "opt")
        return engine

    gtrain.build_engine = build_engine
    try:
        with tempfile.TemporaryDirectory(prefix="gptforge-bench-") as run_dir:
            cfg = load_config([], gptforge_overrides(backend, warmup + steps, run_dir))
            if profile:
                import cProfile
                import pstats

                prof = cProfile.Profile()
                prof.enable()
            with contextlib.redirect_stdout(open(os.devnull, "w")):
                records = gtrain.run(cfg).records
            if profile:
                prof.disable()
                print(f"\n--- cProfile of gptforge ({backend}) run(), {warmup + steps} steps incl. "
                      "build; top 25 by tottime ---")
                pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    finally:
        gtrain.build_engine = original_build
    recs = [r for r in records if "step_time_s" in r]
    print(f"  gptforge[{backend}]: loss {recs[0]['loss']:.3f} -> {recs[-1]['loss']:.3f}",
          flush=True)
    times = [r["step_time_s"] for r in recs][warmup:]
    engine = seen["engine"]
    return dict(times=times, params=engine.num_parameters,
                fb=statistics.median(seen["fb"][warmup:]),
                opt=statistics.median(seen["opt"][warmup:]))


# --------------------------------------------------------------------------- two ranks
TWO_RANK_ROWS = {  # row name: overrides on top of the single-process shape
    "megatron DP=2": ["--parallel.engine=megatron"],
    "deepspeed ZeRO-1": ["--parallel.engine=deepspeed", "--parallel.zero_stage=1"],
    "deepspeed ZeRO-3": ["--parallel.engine=deepspeed", "--parallel.zero_stage=3"],
}
TWO_RANK_MICRO_BATCH = SHAPE["global_batch_size"] // 2


def two_rank_worker(spec_path: str) -> None:
    """One rank of the two-rank launch. Every row's engine is built (``build_engine``, the
    trainer's own) in one process group; then the rows take turns, one step each, the order
    rotating every round, so that drift of the machine's load reaches every row alike. A row's
    time is its steps' wall time (batch fetch + ``train_step``); rank 0 writes them."""
    import json

    from gptforge.launcher.config import load_config, validate
    from gptforge.launcher.run.build import build_batches, build_engine
    from gptforge.parallel.context import destroy_parallel, init_parallel, world_size_from_env
    from gptforge.parallel.seeding import set_seed

    spec = json.loads(open(spec_path).read())
    torch.set_num_threads(1)
    rows, ctx = {}, None
    try:
        for i, (name, overrides) in enumerate(spec["rows"].items()):
            run_dir = os.path.join(spec["dir"], f"row{i}")  # the same on every rank
            cfg = load_config([], gptforge_overrides("auto", spec["iters"], run_dir)
                              + [f"--train.micro_batch_size={TWO_RANK_MICRO_BATCH}", *overrides])
            layout = validate(cfg, world_size_from_env())
            ctx = ctx or init_parallel(cfg.parallel)
            set_seed(cfg.train.seed, ctx.pp_rank)
            rows[name] = dict(engine=build_engine(cfg, layout, ctx), times=[], losses=[],
                              batches=iter(build_batches(cfg, layout, ctx, "train")),
                              n=layout.num_microbatches)
        names = list(rows)
        for step in range(spec["iters"]):
            for name in names[step % len(names):] + names[:step % len(names)]:
                row = rows[name]
                start = time.perf_counter()
                result = row["engine"].train_step([next(row["batches"])
                                                   for _ in range(row["n"])])
                row["times"].append(time.perf_counter() - start)
                row["losses"].append(result.loss)
        if ctx.rank == 0:
            with open(spec["out"], "w") as f:
                json.dump({k: {"times": r["times"], "losses": r["losses"]}
                           for k, r in rows.items()}, f)
    finally:
        destroy_parallel()


def run_two_ranks(warmup: int, steps: int) -> dict:
    import json
    import subprocess
    import sys

    from gptforge.parallel.context import free_port

    with tempfile.TemporaryDirectory(prefix="gptforge-bench2-") as tmp:
        spec = os.path.join(tmp, "spec.json")
        out = os.path.join(tmp, "out.json")
        with open(spec, "w") as f:
            json.dump({"rows": TWO_RANK_ROWS, "iters": warmup + steps, "out": out, "dir": tmp}, f)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
               f"--master-port={free_port()}", __file__, "--two-rank-worker", spec]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"two-rank launch failed:\n{proc.stderr[-3000:]}")
        with open(out) as f:
            result = json.load(f)
    for name, r in result.items():
        print(f"  {name}: loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}", flush=True)
        r["times"] = r["times"][warmup:]
    return result


# --------------------------------------------------------------------------- cpu_compat cost
def compat_overhead(model: nn.Module, reps: int) -> tuple[float, float]:
    """ms per clip_grad_norm_ without / with cpu_compat's TorchFunctionMode."""
    from gptforge.parallel.megatron import cpu_compat

    cpu_compat.apply()
    torch.manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3

    def one():
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)

    def timeit(ctx_factory):
        out = []
        for _ in range(reps):
            t0 = time.perf_counter()
            with ctx_factory():
                one()
            out.append(time.perf_counter() - t0)
        return out

    for _ in range(3):  # warm both paths
        one()
        with cpu_compat._CudaTypeNames():
            one()
    off, on = [], []
    for _ in range(3):  # interleave blocks of each
        off += timeit(contextlib.nullcontext)
        on += timeit(cpu_compat._CudaTypeNames)
    return statistics.median(off) * 1e3, statistics.median(on) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="measured steps per row")
    ap.add_argument("--warmup", type=int, default=3, help="untimed warmup steps per row")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", action="store_true",
                    help="also cProfile one extra short gptforge (sdpa) run and print the top")
    ap.add_argument("--two-rank-worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.two_rank_worker:
        two_rank_worker(args.two_rank_worker)
        return 0
    torch.set_num_threads(args.threads)
    from gptforge.parallel.context import destroy_parallel

    tokens_per_step = SHAPE["global_batch_size"] * SHAPE["seq_length"]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{args.warmup} warmup + {args.steps} measured steps, "
          f"{tokens_per_step} tokens/step, shape {SHAPE}", flush=True)
    t_start = time.perf_counter()
    try:
        plain1, plain_params, plain_model = run_plain(args.warmup, args.steps)
        g_sdpa = run_gptforge("auto", args.warmup, args.steps)
        g_local = run_gptforge("local", args.warmup, args.steps)
        plain2, _, _ = run_plain(args.warmup, args.steps)
        two = run_two_ranks(args.warmup, args.steps)
        if args.profile:
            run_gptforge("auto", 1, 3, profile=True)
    finally:
        destroy_parallel()
    off_ms, on_ms = compat_overhead(plain_model, reps=max(args.steps, 10))

    plain_step = statistics.median(plain1 + plain2)
    rows = [("plain PyTorch loop", plain_step, plain_params),
            ("gptforge (sdpa, default)", statistics.median(g_sdpa["times"]), g_sdpa["params"]),
            ("gptforge (megatron local attn)", statistics.median(g_local["times"]),
             g_local["params"])]
    print()
    print(f"{'row':32s} {'tokens/s':>10s} {'step ms':>9s} {'vs plain':>9s} {'params':>11s}")
    for name, step, params in rows:
        print(f"{name:32s} {tokens_per_step / step:10.0f} {step * 1e3:9.1f} "
              f"{plain_step / step:8.2f}x {params:11,d}")
    print(f"  plain per-run medians: run 1 {statistics.median(plain1) * 1e3:.1f} ms, "
          f"run 2 {statistics.median(plain2) * 1e3:.1f} ms (row = median of both runs' steps)")
    for name, g in (("sdpa", g_sdpa), ("local", g_local)):
        step = statistics.median(g["times"])
        print(f"  gptforge[{name}] breakdown (medians): forward+backward {g['fb'] * 1e3:.1f} ms, "
              f"optimizer.step (clip + fused AdamW) {g['opt'] * 1e3:.1f} ms "
              f"= {100 * g['opt'] / step:.1f}% of step")
    print(f"  parameters match: {plain_params == g_sdpa['params'] == g_local['params']}")
    print()
    print(f"two ranks (1 thread each), same model and global batch ({tokens_per_step} tokens/step, "
          f"micro-batch {TWO_RANK_MICRO_BATCH} per rank):")
    print(f"{'row':32s} {'tokens/s':>10s} {'step ms':>9s} {'vs DP':>9s}")
    dp_step = statistics.median(two["megatron DP=2"]["times"])
    for name in TWO_RANK_ROWS:
        step = statistics.median(two[name]["times"])
        print(f"{name:32s} {tokens_per_step / step:10.0f} {step * 1e3:9.1f} "
              f"{dp_step / step:8.2f}x")
    print()
    print(f"cpu_compat optimizer_context() cost, clip_grad_norm_ over "
          f"{plain_params:,d} params ({len(list(plain_model.parameters()))} tensors):")
    print(f"  without mode {off_ms:.2f} ms, with _CudaTypeNames {on_ms:.2f} ms -> overhead "
          f"{on_ms - off_ms:+.2f} ms/step = {100 * (on_ms - off_ms) / (plain_step * 1e3):+.2f}% "
          f"of the plain loop's step")
    print(f"\ntotal bench wall time {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
