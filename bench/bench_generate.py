"""Generation speed: ``gptforge generate``'s decoding (megatron-core KV cache) against
transformers' ``generate`` on the same weights, prompts and settings (greedy, CPU, fp32).

The model is a ~25M-parameter GPT-2 shape (6 layers, 512 wide, 8 heads, 8192 tokens) with
random weights, saved as a Hugging Face folder and loaded by both sides. Both generate exactly
``--new-tokens`` tokens (no EOS stop) after ``--prompt-tokens`` prompt tokens; the table shows
new tokens per second (best of ``--repeats`` after a warm-up) and whether the tokens agree.

    python bench/bench_generate.py [--batch-sizes 1 8] [--new-tokens 128] [--threads N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def build_folder(out: Path) -> int:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=8192, n_positions=1024, n_embd=512, n_layer=6, n_head=8,
                        activation_function="gelu_new")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(str(out))
    return sum(p.numel() for p in model.parameters())


def best_time(fn, repeats: int) -> tuple[float, list]:
    fn()  # warm-up
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def bench(folder: Path, batch: int, args) -> dict:
    from transformers import AutoModelForCausalLM

    from gptforge.launcher.modelio.inference import load_hf, one_process
    from gptforge.model.generate import generate_batch

    gen = torch.Generator().manual_seed(batch)
    prompts = torch.randint(0, 8192, (batch, args.prompt_tokens), generator=gen)
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()

    def theirs():
        with torch.no_grad():
            out = hf.generate(prompts, attention_mask=torch.ones_like(prompts),
                              max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                              do_sample=False, eos_token_id=None, pad_token_id=0)
        return out[:, args.prompt_tokens:].tolist()

    t_hf, hf_ids = best_time(theirs, args.repeats)
    with one_process():
        loaded = load_hf(folder)

        def ours():
            return generate_batch(loaded.model, prompts.tolist(), max_new_tokens=args.new_tokens,
                                  vocab_size=8192, context=1024)

        t_ours, our_ids = best_time(ours, args.repeats)
    tokens = batch * args.new_tokens
    return {"batch": batch, "ours": tokens / t_ours, "hf": tokens / t_hf,
            "same": our_ids == hf_ids}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        params = build_folder(Path(tmp) / "gpt2")
        print(f"GPT-2 shape, {params / 1e6:.1f}M parameters, {args.prompt_tokens} prompt + "
              f"{args.new_tokens} new tokens, greedy, fp32, {torch.get_num_threads()} threads")
        print(f"{'batch':>5} | {'gptforge tok/s':>14} | {'transformers tok/s':>18} | "
              f"{'ratio':>6} | same tokens")
        for batch in args.batch_sizes:
            row = bench(Path(tmp) / "gpt2", batch, args)
            print(f"{row['batch']:>5} | {row['ours']:>14.1f} | {row['hf']:>18.1f} | "
                  f"{row['ours'] / row['hf']:>5.2f}x | {'yes' if row['same'] else 'NO'}",
                  flush=True)


if __name__ == "__main__":
    main()
