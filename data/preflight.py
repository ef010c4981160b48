"""``check_data``: a cheap look at a ``data`` config before training starts.

It runs the loader's own resolution and checks (``shardspec.resolve_split``): it reads the
tokenizer and ``index.json`` files and ``stat()``s local shards, but no shard contents, so a
missing or truncated shard, a foreign tokenizer or too small a ``model.vocab_size`` is reported
before any process group or model is built; so is a ``data.format`` that differs from the
shards' (index.json). ``pipe:`` sources are resolved but not run.
"""

from __future__ import annotations

from gptforge.data.shardspec import (
    ResolvedSource,
    config_tokenizer,
    resolve_split,
    shard_problems,
)
from gptforge.data.tokenizer import TokenizerInfo


def check_data(cfg, *, splits: tuple[str, ...] = ("train", "valid"), seq_length: int,
               vocab_size: int) -> list[str]:
    """Check ``cfg`` (a ``DataConfig``) for ``splits`` against ``model.vocab_size``
    (``vocab_size``, unpadded); raise a DataError naming the culprit, or return notes."""
    tok = config_tokenizer(cfg, vocab_size)
    notes = [_tokenizer_note(tok)] if tok else []
    if cfg.source == "mock":
        return notes
    for split in splits:
        resolved = resolve_split(cfg, split, vocab_size=vocab_size, tok=tok)
        for key, src in zip(resolved.keys, resolved.sources):
            notes.append(_source_note(key, split, src, seq_length))
            if cfg.skip_corrupt:  # the loader skips these with a warning
                notes += [f"{key}: will skip: {problem}" for problem in shard_problems(src)]
    return notes


def _tokenizer_note(tok: TokenizerInfo) -> str:
    return f"data.tokenizer_model: {tok.path} (vocabulary {tok.vocab_size})"


def _source_note(key: str, split: str, src: ResolvedSource, seq_length: int) -> str:
    shards = f"{key}: {len(src.urls)} {split} shard{'s' * (len(src.urls) != 1)}"
    if any(t is None for t in src.expected_tokens):
        return f"{shards} (token count unknown: not listed in an index.json)"
    tokens = sum(src.expected_tokens)
    note = f"{shards}, {human_count(tokens)} tokens"
    if tokens < seq_length + 1:
        note += f", fewer than one sequence of {seq_length}: they repeat within a batch"
    return note


def human_count(count: int) -> str:
    """1234 -> '1.2K', 5_600_000 -> '5.6M'."""
    for scale, suffix in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K")):
        if count >= scale:
            return f"{count / scale:.1f}{suffix}"
    return str(count)
