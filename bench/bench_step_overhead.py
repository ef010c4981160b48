"""Where a small model's CPU step time goes: gptforge's engine next to a plain-PyTorch GPT.

The issue's anchor: a 0.86M-parameter nanoGPT-shaped model (4 layers, d=128, 4 heads, T=64,
batch 12) steps ~10 ms slower in gptforge than in nanoGPT's own loop. This builds both models
with identical shapes and parameter counts in one process (one thread), times whole steps
(forward, backward, clipping, AdamW) alternately, then prints the profiler's self time per op
for forward+backward of each, side by side, so the difference can be read op by op.

    python bench/bench_step_overhead.py [--steps 30]
"""

from __future__ import annotations

import argparse
import contextlib
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

warnings.filterwarnings("ignore")

VOCAB, SEQ, HIDDEN, LAYERS, HEADS, BATCH = 65, 64, 128, 4, 4, 12
PADDED_VOCAB = 128  # gptforge pads the vocabulary to a multiple of 128: the baseline does too


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(HIDDEN), nn.LayerNorm(HIDDEN)
        self.qkv, self.proj = nn.Linear(HIDDEN, 3 * HIDDEN), nn.Linear(HIDDEN, HIDDEN)
        self.fc1, self.fc2 = nn.Linear(HIDDEN, 4 * HIDDEN), nn.Linear(4 * HIDDEN, HIDDEN)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (z.view(b, t, HEADS, -1).transpose(1, 2)
                   for z in self.qkv(self.ln1(x)).split(HIDDEN, 2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, HIDDEN))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class PlainGPT(nn.Module):
    """nanoGPT's model, SDPA attention, tied embeddings."""

    def __init__(self):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(PADDED_VOCAB, HIDDEN), nn.Embedding(SEQ, HIDDEN)
        self.blocks = nn.ModuleList(_Block() for _ in range(LAYERS))
        self.ln_f = nn.LayerNorm(HIDDEN)

    def forward(self, tokens, labels):
        x = self.wte(tokens) + self.wpe(torch.arange(SEQ))
        for block in self.blocks:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)
        return F.cross_entropy(logits.view(-1, PADDED_VOCAB), labels.view(-1))


def plain_step_fn():
    model = PlainGPT()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ))

    def fwd_bwd():
        model(tokens, tokens).backward()

    def step():
        fwd_bwd()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return sum(p.numel() for p in model.parameters()), step, fwd_bwd


def gptforge_step_fn():
    from gptforge.launcher.config import load_config, validate
    from gptforge.launcher.run.build import build_batches, build_engine
    from gptforge.parallel.context import init_parallel
    from gptforge.parallel.seeding import set_seed

    cfg = load_config([], [f"--model.num_layers={LAYERS}", f"--model.hidden_size={HIDDEN}",
                           f"--model.num_attention_heads={HEADS}", f"--model.seq_length={SEQ}",
                           f"--model.vocab_size={VOCAB}", f"--train.micro_batch_size={BATCH}",
                           f"--train.global_batch_size={BATCH}"])
    layout = validate(cfg, 1)
    ctx = init_parallel(cfg.parallel)
    set_seed(cfg.train.seed, ctx.pp_rank)
    engine = build_engine(cfg, layout, ctx)
    batches = iter(build_batches(cfg, layout, ctx, "train"))
    model = engine.model_chunks[0]

    def fwd_bwd():
        batch = next(batches)
        out = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        out.float().mean().backward()
        model.zero_grad_buffer()

    def step():
        engine.train_step([next(batches)])

    return engine.num_parameters, step, fwd_bwd


def _median_ms(times: list[float]) -> float:
    return 1000 * sorted(times)[len(times) // 2]


def _self_times(fn, repeats: int = 10) -> dict[str, tuple[float, int]]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            fn()
    return {e.key: (e.self_cpu_time_total / repeats / 1000, e.count // repeats)
            for e in prof.key_averages()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--ops", type=int, default=20, help="rows of the per-op table")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = {"gptforge": gptforge_step_fn(), "plain": plain_step_fn()}
    for name, (params, step, _) in runs.items():
        print(f"{name}: {params:,} parameters")
        for _ in range(5):
            step()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.steps):  # alternate, so that load on the machine hits both alike
        for name, (_, step, _) in runs.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    for name, values in times.items():
        print(f"{name:>9} step: median {_median_ms(values):.1f} ms, "
              f"best {min(values) * 1000:.1f} ms")
    with contextlib.redirect_stdout(None):
        tables = {name: _self_times(fwd_bwd) for name, (_, _, fwd_bwd) in runs.items()}
    keys = sorted(set(tables["gptforge"]) | set(tables["plain"]),
                  key=lambda k: -max(tables["gptforge"].get(k, (0, 0))[0],
                                     tables["plain"].get(k, (0, 0))[0]))
    print(f"\nforward+backward, self time per step (ms) and calls:\n"
          f"{'op':<58} {'gptforge':>9} {'n':>4} {'plain':>8} {'n':>4}")
    for key in keys[:args.ops]:
        g, p = tables["gptforge"].get(key, (0.0, 0)), tables["plain"].get(key, (0.0, 0))
        print(f"{key[:58]:<58} {g[0]:>9.2f} {g[1]:>4} {p[0]:>8.2f} {p[1]:>4}")
    print(f"{'total':<58} {sum(v[0] for v in tables['gptforge'].values()):>9.2f} "
          f"{'':>4} {sum(v[0] for v in tables['plain'].values()):>8.2f}")


if __name__ == "__main__":
    main()
