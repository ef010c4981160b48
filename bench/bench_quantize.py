"""int8 weight-only inference against fp32 on one trained checkpoint: weights' memory, eval loss
and greedy generation speed at batch 1 and 8 (``gptforge generate|eval|serve --quantize int8``).

One process loads the checkpoint in fp32, measures, quantizes the same model in place
(``model/quantize.py``: torchao's Int8WeightOnlyConfig on the linear layers) and measures again,
so both rows see the same machine in one run. Tokens/s: ``--new-tokens`` greedy tokens after a
short prompt, best of ``--repeats``, through the CLI's own decoding path (KV cache, CPU decode
layout). Defaults: the checkpoint and shards of ``make demo``.

    python bench/bench_quantize.py [--checkpoint runs/demo/run/checkpoints]
        [--data runs/demo/shards] [--new-tokens 64] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

PROMPT = "import os\n"


def _speed(loaded, tok, batch: int, new_tokens: int, repeats: int) -> float:
    from gptforge.launcher.cli.generate import generate_texts

    args = SimpleNamespace(quiet=True, max_new_tokens=new_tokens, batch_size=batch, greedy=True,
                           temperature=None, top_k=None, top_p=None, repetition_penalty=1.0,
                           seed=0, no_kv_cache=False)
    best = float("inf")
    for _ in range(repeats + 1):  # the first is a warm-up
        start = time.perf_counter()
        out = generate_texts(loaded, tok, [PROMPT] * batch, args)
        best = min(best, time.perf_counter() - start)
    assert all(len(r["token_ids"]) == new_tokens for r in out)
    return batch * new_tokens / best


def _row(name, loaded, tok, opts) -> dict:
    from gptforge.launcher.cli.eval import evaluate_model
    from gptforge.launcher.modelio.inference import weights_bytes

    result = evaluate_model(loaded, opts.data, split="valid", eval_iters=opts.eval_iters,
                            micro_batch_size=4)
    row = {"name": name, "weights_bytes": weights_bytes(loaded), "loss": result["loss"]}
    for batch in (1, 8):
        row[f"tokens_per_s_b{batch}"] = _speed(loaded, tok, batch, opts.new_tokens, opts.repeats)
    return row


def main(argv=None) -> int:
    from gptforge.launcher.cli.generate import _tokenizer
    from gptforge.launcher.modelio.inference import load_any, one_process, quantize

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="runs/demo/run/checkpoints")
    p.add_argument("--data", default="runs/demo/shards")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--eval-iters", type=int, default=None, help="default: the whole split")
    p.add_argument("--threads", type=int, default=None)
    opts = p.parse_args(argv)
    if not Path(opts.checkpoint).exists() or not Path(opts.data).exists():
        print(f"{opts.checkpoint} or {opts.data} is missing: run `make demo` first, or pass "
              f"--checkpoint and --data", file=sys.stderr)
        return 2
    if opts.threads:
        torch.set_num_threads(opts.threads)
    with one_process():
        loaded = load_any(opts.checkpoint)
        tok = _tokenizer(loaded, None)
        fp32 = _row("fp32", loaded, tok, opts)
        int8 = _row("int8", quantize(loaded, "int8"), tok, opts)
    print(f"checkpoint {opts.checkpoint}, {torch.get_num_threads()} threads, "
          f"{opts.new_tokens} greedy tokens, best of {opts.repeats}")
    print(f"{'':6} {'weights MiB':>11} {'eval loss':>9} {'tok/s b=1':>10} {'tok/s b=8':>10}")
    for row in (fp32, int8):
        print(f"{row['name']:6} {row['weights_bytes'] / 2**20:>11.2f} {row['loss']:>9.5f} "
              f"{row['tokens_per_s_b1']:>10.1f} {row['tokens_per_s_b8']:>10.1f}")
    print(f"int8/fp32: weights {int8['weights_bytes'] / fp32['weights_bytes']:.3f}x, eval loss "
          f"{int8['loss'] / fp32['loss'] - 1:+.3%}, tokens/s b=1 "
          f"{int8['tokens_per_s_b1'] / fp32['tokens_per_s_b1']:.2f}x, b=8 "
          f"{int8['tokens_per_s_b8'] / fp32['tokens_per_s_b8']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
