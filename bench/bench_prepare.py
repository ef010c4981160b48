"""``data prepare`` MB/s (whole command: start-up, tokenizing, writing shards) of raw text per
worker against plain sentencepiece encode of the same documents (one thread). Prints a table;
not a timed test.

    .venv/bin/python bench/bench_prepare.py [--vocab-size 8000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from gptforge.data import tokenizer
from gptforge.data.prepare import PrepareSettings, prepare
from gptforge.data.synthetic import write_text_corpus
from gptforge.data.text_inputs import expand_inputs, iter_documents

REPEATS = 3  # best of: the machine may be shared
CORPUS = ("json/*.py", "email/*.py", "logging/*.py", "asyncio/*.py", "unittest/*.py",
          "http/*.py", "xml/*/*.py", "*.py")


def bench_plain_encode(corpus: Path, model: Path) -> tuple[float, int]:
    proc = tokenizer.load(model)
    docs = list(iter_documents(expand_inputs([str(corpus)]), txt_unit="paragraph"))
    num_bytes = sum(len(d.encode("utf-8")) for d in docs)
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        for doc in docs:
            proc.encode(doc, out_type=int)
        best = min(best, time.perf_counter() - start)
    return num_bytes / best, num_bytes


def bench_prepare(corpus: Path, model: Path, out: Path, workers: int, num_bytes: int) -> float:
    best = float("inf")
    for k in range(REPEATS):
        start = time.perf_counter()
        prepare(PrepareSettings(inputs=[str(corpus)], tokenizer=str(model), out=f"{out}{k}",
                                valid_fraction=0.01, shard_size_mb=64, workers=workers),
                progress=False)
        best = min(best, time.perf_counter() - start)
    return num_bytes / best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vocab-size", type=int, default=8000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = write_text_corpus(Path(tmp) / "corpus", CORPUS)
        info = tokenizer.train([str(corpus)], f"{tmp}/tok", args.vocab_size,
                               input_sentence_size=200_000)
        plain, num_bytes = bench_plain_encode(corpus, Path(info.path))
        one = bench_prepare(corpus, Path(info.path), Path(tmp) / "w1", 1, num_bytes)
        two = bench_prepare(corpus, Path(info.path), Path(tmp) / "w2", 2, num_bytes)
    mb = 1 << 20
    print(f"\n{num_bytes / mb:.1f} MB of text (Python stdlib), BPE vocab {args.vocab_size}")
    print(f"{'path':<42} {'MB/s':>8} {'per worker / plain':>20}")
    print(f"{'plain sentencepiece encode (1 thread)':<42} {plain / mb:>8.2f} {1.0:>20.2f}")
    print(f"{'data prepare, --workers 1':<42} {one / mb:>8.2f} {one / plain:>20.2f}")
    print(f"{'data prepare, --workers 2':<42} {two / mb:>8.2f} {two / 2 / plain:>20.2f}")


if __name__ == "__main__":
    main()
