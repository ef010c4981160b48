"""Loader throughput (one process, packed micro_batch_size x seq_length batches out) against
nanoGPT's reader of the same tokens (random windows from a numpy.memmap, per-sample Python)
and plain webdataset iteration. Prints a table; not a timed test.

    .venv/bin/python bench/bench_loader.py [--tokens 40e6] [--seq-length 1024] [--mbs 8]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gptforge.data.loader import build_loader
from gptforge.data.synthetic import write_token_dataset
from gptforge.data.config import DataConfig, DataSourceConfig

VOCAB, EOD = 32000, 2


def make_docs(total_tokens: int, num_shards: int, seed: int = 0) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    shards = []
    for _ in range(num_shards):
        docs, have = [], 0
        while have < total_tokens // num_shards:
            length = int(rng.integers(50, 2000))
            docs.append(rng.integers(3, VOCAB, length, dtype=np.uint16))
            have += length
        shards.append(docs)
    return shards


def bench_loader(path: Path, seq: int, mbs: int, tokens: int, num_workers: int) -> float:
    cfg = DataConfig(source="webdataset", sources=[DataSourceConfig(path=str(path))],
                     num_workers=num_workers)
    it = build_loader(cfg, split="train", seq_length=seq, micro_batch_size=mbs, dp_rank=0,
                      dp_size=1, seed=0, vocab_size=VOCAB)
    next(it)
    steps = tokens // (seq * mbs)
    start = time.perf_counter()
    for _ in range(steps):
        batch = next(it)
    assert batch["tokens"].shape == (mbs, seq)
    elapsed = time.perf_counter() - start
    it.close()
    return steps * seq * mbs / elapsed


def bench_nanogpt(bin_path: Path, seq: int, mbs: int, tokens: int) -> float:
    """nanoGPT's train.py get_batch (CPU branch), verbatim apart from names."""
    steps = tokens // (seq * mbs)
    start = time.perf_counter()
    for _ in range(steps):
        data = np.memmap(bin_path, dtype=np.uint16, mode="r")
        ix = torch.randint(len(data) - seq, (mbs,))
        x = torch.stack([torch.from_numpy((data[i:i + seq]).astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy((data[i + 1:i + 1 + seq]).astype(np.int64)) for i in ix])
    assert x.shape == y.shape == (mbs, seq)
    return steps * seq * mbs / (time.perf_counter() - start)


def bench_plain_webdataset(shard: Path) -> float:
    import webdataset as wds
    count, start = 0, time.perf_counter()
    for sample in wds.WebDataset(str(shard), shardshuffle=False):
        count += len(np.frombuffer(sample["u16"], dtype=np.uint16))
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=float, default=40e6)
    parser.add_argument("--seq-length", type=int, default=1024)
    parser.add_argument("--mbs", type=int, default=8)
    parser.add_argument("--shards", type=int, default=2)
    args = parser.parse_args()
    total = int(args.tokens)
    with tempfile.TemporaryDirectory() as tmp:
        shards = make_docs(total, args.shards)
        write_token_dataset(Path(tmp) / "d", {"train": shards}, vocab_size=VOCAB, eod_id=EOD)
        flat = np.concatenate([x for docs in shards for d in docs
                               for x in (d, np.array([EOD], np.uint16))])
        flat.tofile(Path(tmp) / "train.bin")
        n = min(total, len(flat)) * 3 // 4
        rows = [("gptforge loader, num_workers=0", bench_loader(Path(tmp) / "d", args.seq_length,
                                                                args.mbs, n, 0)),
                ("gptforge loader, num_workers=2", bench_loader(Path(tmp) / "d", args.seq_length,
                                                                args.mbs, n, 2)),
                ("nanoGPT memmap get_batch", bench_nanogpt(Path(tmp) / "train.bin",
                                                           args.seq_length, args.mbs, n // 4)),
                ("plain webdataset, raw bytes (1 shard)",
                 bench_plain_webdataset(Path(tmp) / "d" / "train-000000.tar"))]
    print(f"\n{len(flat) / 1e6:.1f}M tokens in {args.shards} shards, seq_length "
          f"{args.seq_length}, micro_batch_size {args.mbs}, torch threads "
          f"{torch.get_num_threads()}")
    print(f"{'reader':<40} {'Mtokens/s':>10}")
    for name, rate in rows:
        print(f"{name:<40} {rate / 1e6:>10.2f}")


if __name__ == "__main__":
    main()
