"""Token datasets written straight from arrays (no tokenizer): for tests and benchmarks.

The shards and index.json have the same format ``data prepare`` writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from gptforge.data.prepare import FORMAT, INDEX_FILE
from gptforge.data.shards import SFT_DTYPE, SFT_EXT, ShardWriter, dtype_for_vocab, ext_for_dtype


def write_token_dataset(out: str | Path, splits: dict[str, list[list[np.ndarray]]], *,
                        vocab_size: int, eod_id: int, tokenizer_sha256: str = "",
                        sft: bool = False) -> dict:
    """``splits[name][k]`` is the list of documents of shard k; returns the index written.
    With ``sft`` the documents are SFT documents (``shards.sft_document``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = SFT_DTYPE if sft else dtype_for_vocab(vocab_size)
    ext = SFT_EXT if sft else ext_for_dtype(dtype)
    index_splits = {}
    for split, shards in splits.items():
        entries = []
        for k, docs in enumerate(shards):
            writer = ShardWriter(out / f"{split}-{k:06d}.tar")
            for d, doc in enumerate(docs):
                writer.add(f"{d:010d}", np.asarray(doc, dtype=dtype).tobytes(), ext, len(doc))
            entries.append({"file": writer.final_path.name, "docs": writer.num_docs,
                            "tokens": writer.num_tokens, "bytes": writer.close()})
        index_splits[split] = {"docs": sum(e["docs"] for e in entries),
                               "tokens": sum(e["tokens"] for e in entries), "shards": entries}
    index = {"format": FORMAT, "sft": sft, "vocab_size": vocab_size, "dtype": dtype.name,
             "eod_id": eod_id,
             "tokenizer": {"sha256": tokenizer_sha256}, "command": ["synthetic"],
             "splits": index_splits}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")
    return index


def unique_docs(num_shards: int, docs_per_shard: int, doc_length: int,
                first_token: int = 1) -> list[list[np.ndarray]]:
    """Shards of equal-length documents whose token ids are all distinct (and != 0)."""
    shards, token = [], first_token
    for _ in range(num_shards):
        docs = []
        for _ in range(docs_per_shard):
            docs.append(np.arange(token, token + doc_length))
            token += doc_length
        shards.append(docs)
    return shards


STDLIB_SAMPLE = ("json/*.py", "email/*.py", "textwrap.py", "string.py", "this.py")
# ``gptforge data sample-corpus --size``: the stdlib sources each size copies (medium: the
# demo's corpus, scripts/demo.sh)
SAMPLE_SIZES = {
    "small": STDLIB_SAMPLE,
    "medium": ("json/*.py", "email/*.py", "logging/*.py", "asyncio/*.py", "http/*.py",
               "unittest/*.py", "textwrap.py", "argparse.py"),
}


def text_corpus_files(out: str | Path, patterns: tuple[str, ...] = STDLIB_SAMPLE) -> list[Path]:
    """Write the corpus of ``write_text_corpus``; returns the files written (only those: other
    files in ``out`` are left alone). A DataError when no stdlib source matches."""
    import glob
    import sysconfig

    from gptforge.data.errors import DataError

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a directory")
    stdlib = sysconfig.get_paths()["stdlib"]
    sources = [src for pattern in patterns for src in sorted(glob.glob(f"{stdlib}/{pattern}"))]
    if not sources:
        raise DataError(f"{stdlib}: no Python sources match {', '.join(patterns)} (a Python "
                        f"installed without its .py files?)")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for src in sources:
        name = Path(src).relative_to(stdlib).as_posix().replace("/", "_")
        (out / f"{name}.txt").write_text(Path(src).read_text(encoding="utf-8"))
        written.append(out / f"{name}.txt")
    return written


def write_text_corpus(out: str | Path, patterns: tuple[str, ...] = STDLIB_SAMPLE) -> Path:
    """A small on-machine text corpus: Python stdlib sources copied as ``.txt`` files."""
    text_corpus_files(out, patterns)
    return Path(out)
