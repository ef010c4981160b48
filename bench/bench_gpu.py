"""One-GPU training throughput: gptforge next to a plain PyTorch GPT of the same shape.

A benchmark, not a test. For each shape, in one process, one after the other:

  gptforge   ``gptforge.launcher.run.entry.run(cfg)`` as ``gptforge train`` runs it (megatron-core
             GPTModel, megatron DDP buffers, megatron optimizer with fused AdamW, bf16 with fp32
             master weights); its own records give the step times.
  plain      a nanoGPT-style model: SDPA causal attention, ``torch.compile``, bf16 autocast over
             fp32 weights, fused AdamW, clip_grad_norm_ 1.0, tied embeddings, padded vocabulary.

Shapes (issue 11): GPT-2 124M at T=1024 and GPT-3 1.3B (``configs/models/gpt3-1.3b.yaml``)
at T=2048. Both rows of a shape train on the same mock tokens, micro-batch and sequence length.

Numbers: tokens/s = global batch x seq_length / median step time; model FLOPs per token from
``gptforge/model/flops.py`` (PaLM appendix B: 6 (N_matmul + V h) + 12 L s h, recompute not
counted, causal mask not discounted), the same formula for both rows; MFU against the device's
dense peak (H100/H200: 989 TFLOP/s bf16; ``--peak-tflops`` overrides); peak memory is
``torch.cuda.max_memory_allocated`` of the row (reset between rows).

    python bench/bench_gpu.py                         # both shapes, bf16, on the GPU
    python bench/bench_gpu.py --shapes gpt2-124m --micro-batch-size 32
    python bench/bench_gpu.py --gptforge-args "--parallel.recompute_granularity=selective"
    python bench/bench_gpu.py --device cpu --tiny     # a 2-layer smoke run (used by a test)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import statistics
import tempfile
import time
import warnings

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")

import torch  # noqa: E402
# bench_train.py's model (this script's folder is on sys.path when it runs): pre-LN, GELU MLP,
# learned positions, tied embeddings, biases, SDPA causal attention, nanoGPT's init
from bench_train import PlainGPT  # noqa: E402

SHAPES = {  # name: model fields, default micro-batch size
    "gpt2-124m": (dict(num_layers=12, hidden_size=768, num_attention_heads=12, seq_length=1024,
                       vocab_size=50257), 16),
    "gpt3-1.3b": (dict(num_layers=24, hidden_size=2048, num_attention_heads=16, seq_length=2048,
                       vocab_size=50257), 4),
    "tiny": (dict(num_layers=2, hidden_size=64, num_attention_heads=2, seq_length=64,
                  vocab_size=512), 2),
}
LR, CLIP, SEED = 3e-4, 1.0, 1234


# --------------------------------------------------------------------------- plain PyTorch GPT
def mock_batches(model_fields: dict, micro_batch_size: int):
    from gptforge.data.mock import MockBatches  # the very batches gptforge trains on

    return MockBatches(split="train", seq_length=model_fields["seq_length"],
                       micro_batch_size=micro_batch_size, global_batch_size=micro_batch_size,
                       dp_rank=0, dp_size=1, seed=SEED, vocab_size=model_fields["vocab_size"])


def run_plain(model_fields: dict, padded_vocab: int, micro_batch_size: int, args) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(SEED)
    model = PlainGPT(padded_vocab, model_fields["hidden_size"],
                     model_fields["num_attention_heads"], model_fields["num_layers"],
                     model_fields["seq_length"]).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.95), fused=True)
    forward = torch.compile(model) if args.compile else model
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16"
                else contextlib.nullcontext())
    batches = mock_batches(model_fields, micro_batch_size)
    times, losses = [], []
    for _ in range(args.warmup + args.steps):
        start = time.perf_counter()
        batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = forward(batch["tokens"], batch["position_ids"], batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        losses.append(loss.item())  # a sync, as the trainer's float(loss)
        times.append(time.perf_counter() - start)
    return dict(times=times[args.warmup:], losses=losses,
                params=sum(p.numel() for p in model.parameters()))


# --------------------------------------------------------------------------- gptforge
def run_gptforge(model_fields: dict, micro_batch_size: int, args) -> dict:
    from gptforge.launcher.config import load_config
    from gptforge.launcher.run.entry import run
    from gptforge.parallel.context import destroy_parallel

    with tempfile.TemporaryDirectory(prefix="gptforge-bench-gpu-") as run_dir:
        overrides = [f"--model.{k}={v}" for k, v in model_fields.items()]
        overrides += [f"--train.micro_batch_size={micro_batch_size}",
                      f"--train.global_batch_size={micro_batch_size}",
                      f"--precision.dtype={args.dtype}", f"--optim.lr={LR}",
                      f"--optim.clip_grad={CLIP}", "--data.source=mock",
                      f"--train.train_iters={args.warmup + args.steps}",
                      "--train.eval_interval=0", "--train.log_interval=1",
                      f"--train.seed={SEED}", f"--run.dir={run_dir}",
                      "--checkpoint.enabled=false",  # a 1.3B final save is not the benchmark
                      *shlex.split(args.gptforge_args)]
        cfg = load_config([], overrides)
        try:
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), \
                    contextlib.redirect_stderr(quiet):
                records = run(cfg).records
        finally:
            destroy_parallel()
    steps = [r for r in records if "step_time_s" in r]
    return dict(times=[r["step_time_s"] for r in steps][args.warmup:],
                losses=[r["loss"] for r in steps])


def padded_vocab_size(model_fields: dict) -> int:
    from gptforge.launcher.config import load_config, validate

    cfg = load_config([], [f"--model.{k}={v}" for k, v in model_fields.items()])
    return validate(cfg, 1).padded_vocab_size


def peak_memory_gib(device: str) -> float | None:
    if device != "cuda":
        return None
    return torch.cuda.max_memory_allocated() / 2**30


def measure(shape: str, args) -> list[dict]:
    from gptforge.launcher.run.throughput import peak_tflops_per_device
    from gptforge.model.config import ModelConfig
    from gptforge.model.flops import flops_per_token

    fields, default_mbs = SHAPES[shape]
    mbs = args.micro_batch_size or default_mbs
    padded = padded_vocab_size(fields)
    flops = flops_per_token(ModelConfig(**fields), padded)
    peak = args.peak_tflops or peak_tflops_per_device(args.dtype)
    tokens_per_step = mbs * fields["seq_length"]
    rows = []
    for name, fn in (("gptforge", lambda: run_gptforge(fields, mbs, args)),
                     ("plain (SDPA" + (" + compile)" if args.compile else ")"),
                      lambda: run_plain(fields, padded, mbs, args))):
        if args.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        result = fn()
        step = statistics.median(result["times"])
        tokens_per_s = tokens_per_step / step
        tflops = flops * tokens_per_s / 1e12
        rows.append(dict(shape=shape, row=name, mbs=mbs, step_ms=step * 1e3,
                         tokens_per_s=tokens_per_s, tflops=tflops,
                         mfu=tflops / peak if peak else float("nan"),
                         mem_gib=peak_memory_gib(args.device),
                         loss=(result["losses"][0], result["losses"][-1])))
        print(f"  {shape} {name}: loss {rows[-1]['loss'][0]:.3f} -> {rows[-1]['loss'][1]:.3f}, "
              f"{tokens_per_s:,.0f} tokens/s", flush=True)
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"\n{'shape':<10} {'row':<24} {'mbs':>4} {'step ms':>9} {'tokens/s':>11} "
          f"{'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9} {'vs plain':>9}")
    for row in rows:
        plain = next(r for r in rows if r["shape"] == row["shape"] and r["row"] != "gptforge")
        mem = "-" if row["mem_gib"] is None else f"{row['mem_gib']:.1f}"
        print(f"{row['shape']:<10} {row['row']:<24} {row['mbs']:>4} {row['step_ms']:>9.1f} "
              f"{row['tokens_per_s']:>11,.0f} {row['tflops']:>8.4g} {row['mfu']:>6.3f} "
              f"{mem:>9} {row['tokens_per_s'] / plain['tokens_per_s']:>8.2f}x")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="gpt2-124m,gpt3-1.3b",
                    help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--micro-batch-size", type=int, default=0, help="0: the shape's default")
    ap.add_argument("--steps", type=int, default=20, help="measured steps per row")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps per row (compile)")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="plain row without torch.compile")
    ap.add_argument("--peak-tflops", type=float, default=0.0,
                    help="dense peak per device; 0: the device's (H100: 989 bf16)")
    ap.add_argument("--gptforge-args", default="", help="extra overrides for the gptforge row")
    ap.add_argument("--tiny", action="store_true",
                    help="the 2-layer shape, fp32, no compile, 3 steps (a smoke run)")
    args = ap.parse_args()
    if args.tiny:
        args.shapes, args.dtype, args.compile, args.steps, args.warmup = "tiny", "fp32", False, 3, 1
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device here: use --device cpu --tiny for a smoke run")
    shapes = args.shapes.split(",")
    for shape in shapes:
        if shape not in SHAPES:
            ap.error(f"--shapes: unknown shape {shape!r} (known: {', '.join(SHAPES)})")
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"device {device}, torch {torch.__version__}, {args.dtype}, {args.warmup} warmup + "
          f"{args.steps} measured steps per row", flush=True)
    rows = [row for shape in shapes for row in measure(shape, args)]
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
