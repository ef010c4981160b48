"""Serving speed: ``gptforge serve`` answering ``/v1/completions`` at concurrency 1 and 8, next
to ``gptforge generate``'s decoding (``generate_batch``) of the same prompts and token counts in
batches of 1 and 8.

The model is a ~25M-parameter Llama shape (6 layers, 512 wide, 8 heads, a sentencepiece
tokenizer trained here on the stdlib corpus) with random weights, saved as a Hugging Face folder
that both sides load. Requests are greedy, ``--new-tokens`` each (a random model seldom says
EOS; the server counts the tokens it really made). The server is one process unless
``--nproc-per-node`` and ``--tp`` say otherwise.

    python bench/bench_serve.py [--requests 16] [--new-tokens 64] [--nproc-per-node 1 --tp 1]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SEQ = 512


def build_folder(out: Path, tmp: Path) -> list[str]:
    """The model folder and a few real-text prompts of different lengths."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from gptforge.data import tokenizer
    from gptforge.data.hf_tokenizer import save_hf_tokenizer
    from gptforge.data.synthetic import write_text_corpus

    corpus = write_text_corpus(tmp / "corpus")
    sp = tokenizer.train([str(corpus)], str(tmp / "sp"), 2000, txt_unit="file").path
    info = save_hf_tokenizer(sp, out, model_max_length=SEQ)
    config = LlamaConfig(vocab_size=info.vocab_size, hidden_size=512, intermediate_size=1408,
                         num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8,
                         max_position_embeddings=SEQ, bos_token_id=info.bos_id,
                         eos_token_id=info.eos_id, pad_token_id=info.pad_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(out))
    text = sorted(corpus.glob("*.txt"))[0].read_text()
    return [text[i * 97:i * 97 + 40 + 25 * (i % 4)] for i in range(8)]


def generate_rates(folder: Path, prompts: list[str], args) -> dict[int, float]:
    """New tokens per second of ``generate_batch`` (what ``gptforge generate`` runs) over the
    same ``--requests`` prompts, in batches of 1 and of 8, after a warm-up."""
    from gptforge.data import tokenizer
    from gptforge.launcher.modelio.inference import load_hf, one_process
    from gptforge.model.generate import generate_batch

    tok = tokenizer.load(folder)
    ids = [tok.encode(prompts[i % len(prompts)]) for i in range(args.requests)]
    rates = {}
    with one_process():
        loaded = load_hf(folder)
        runner = loaded.runner
        kwargs = dict(vocab_size=loaded.cfg.model.vocab_size, context=SEQ)
        with runner.decode_layout():
            generate_batch(runner, ids[:1], max_new_tokens=4, **kwargs)  # warm-up
            for batch in (1, 8):
                start = time.perf_counter()
                for first in range(0, len(ids), batch):
                    generate_batch(runner, ids[first:first + batch],
                                   max_new_tokens=args.new_tokens, **kwargs)
                rates[batch] = len(ids) * args.new_tokens / (time.perf_counter() - start)
    return rates


def start_server(folder: Path, port: int, args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "gptforge.launcher.cli.main", "serve", "--checkpoint",
           str(folder), "--port", str(port), "--max-batch-size", "8"]
    if args.nproc_per_node > 1:
        cmd += ["--nproc-per-node", str(args.nproc_per_node),
                f"--parallel.tensor_model_parallel_size={args.tp}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server ended: {proc.communicate()[1][-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
            return proc
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit("the server did not come up in 300 s") from None
            time.sleep(0.5)


def ask(port: int, prompt: str, new_tokens: int) -> int:
    body = json.dumps({"model": "bench", "prompt": prompt, "max_tokens": new_tokens,
                       "temperature": 0}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as answer:
        return json.loads(answer.read())["usage"]["completion_tokens"]


def health(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as answer:
        return json.loads(answer.read())


def serve_rates(port: int, prompts: list[str], concurrency: int, args) -> tuple:
    """(requests/s, new tokens/s, batches so far) for ``--requests`` requests, ``concurrency``
    at a time."""
    tokens = [0] * args.requests
    order = iter(range(args.requests))
    lock = threading.Lock()

    def client():
        while True:
            with lock:
                i = next(order, None)
            if i is None:
                return
            tokens[i] = ask(port, prompts[i % len(prompts)], args.new_tokens)

    ask(port, prompts[0], 4)  # warm-up
    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    return args.requests / wall, sum(tokens) / wall, health(port)["batches"]


def main() -> None:
    from gptforge.parallel.context import free_port

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--nproc-per-node", type=int, default=1)
    parser.add_argument("--tp", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "llama"
        prompts = build_folder(folder, Path(tmp))
        rates = generate_rates(folder, prompts, args)
        port = free_port()
        proc = start_server(folder, port, args)
        try:
            rows = {c: serve_rates(port, prompts, c, args) for c in (1, 8)}
            batches = {1: rows[1][2] - 1, 8: rows[8][2] - rows[1][2] - 1}  # (less the warm-ups)
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
    print(f"Llama shape ~25M parameters, greedy, fp32, {args.new_tokens} new tokens a request, "
          f"{args.requests} requests, server at {args.nproc_per_node} rank(s) TP={args.tp}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'concurrency':>11} | {'requests/s':>10} | {'serve tok/s':>11} | "
          f"{'generate tok/s (batch)':>22} | serve/generate | requests a batch")
    for concurrency, (rps, tps, _) in rows.items():
        print(f"{concurrency:>11} | {rps:>10.2f} | {tps:>11.1f} | {rates[concurrency]:>22.1f} | "
              f"{tps / rates[concurrency]:>13.2f}x | {args.requests / batches[concurrency]:.1f}",
              flush=True)


if __name__ == "__main__":
    main()
