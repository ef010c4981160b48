"""Resolve a source path (directory with index.json, glob, brace pattern, ``pipe:`` command)
into the shard list the loader reads, with what ``index.json`` says about it; and resolve the
sources of one split of a ``data`` config with the checks the loader and ``check_data`` share.

The checks only read ``index.json`` files, the tokenizer and ``stat()`` of local shards: a shard
that is missing, or whose size differs from the ``bytes`` its index records, is refused here;
reading a damaged shard later raises ``ShardError`` from ``shards.read_shard``.
"""

from __future__ import annotations

import glob
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import braceexpand

from gptforge.data import tokenizer
from gptforge.data.errors import DataError
from gptforge.data.prepare import INDEX_FILE
from gptforge.data.shards import ShardError

PATTERN_CHARS = "*?[{"


class SourceError(DataError):
    """A source that cannot be used; the message starts with the path, shard or index file."""


class NoValidShards(SourceError):
    """A shard directory whose index.json lists no 'valid' shards (prepared without
    ``--valid-fraction``): what validation would read."""


@dataclass(frozen=True)
class ResolvedSource:
    spec: str
    urls: tuple[str, ...]
    expected_docs: tuple[int | None, ...]  # per shard, from index.json when known
    index_path: str | None
    vocab_size: int | None
    eod_id: int | None
    tokenizer_sha256: str | None
    expected_bytes: tuple[int | None, ...]  # per shard, from index.json when known
    expected_tokens: tuple[int | None, ...]  # per shard, from index.json when known
    tokenizer_path: str | None  # the tokenizer file index.json says made the shards
    sft: bool | None = None  # index.json says SFT shards (True) or pretraining (False)
    tokenizer_vocab_sha256: str | None = None  # its identity (shards from before: None)


def _read_index(path: Path) -> dict:
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SourceError(f"{path}: unreadable index: {err}") from None
    if not isinstance(index, dict) or "splits" not in index:
        raise SourceError(f"{path}: not a gptforge shard index (no 'splits')")
    return index


def _source(spec: str, urls: list[str], entries: list[dict | None], index_path: Path | None,
            index: dict) -> ResolvedSource:
    def per_shard(key: str) -> tuple:
        return tuple(e.get(key) if e else None for e in entries)

    tok = index.get("tokenizer") or {}
    return ResolvedSource(spec, tuple(urls), per_shard("docs"),
                          str(index_path) if index_path else None, index.get("vocab_size"),
                          index.get("eod_id"), tok.get("sha256") or None, per_shard("bytes"),
                          per_shard("tokens"), tok.get("path") or None,
                          bool(index.get("sft", False)) if index_path else None,
                          tok.get("vocab_sha256") or None)


def _from_directory(directory: Path, split: str) -> ResolvedSource:
    index_path = directory / INDEX_FILE
    if not index_path.is_file():
        raise SourceError(f"{directory}: directory has no {INDEX_FILE}; give a glob of shards")
    index = _read_index(index_path)
    shards = index["splits"].get(split, {}).get("shards", [])
    if not shards:
        raise (NoValidShards if split == "valid" else SourceError)(
            f"{index_path}: lists no {split!r} shards")
    return _source(str(directory), [str(directory / s["file"]) for s in shards], shards,
                   index_path, index)


def _expand_pattern(spec: str) -> list[str]:
    urls = []
    for part in braceexpand.braceexpand(spec):
        if part.startswith("pipe:"):
            urls.append(part)
        elif any(ch in part for ch in "*?["):
            urls.extend(sorted(glob.glob(part)))
        else:
            urls.append(part)
    return urls


def _index_entries(urls: list[str]) -> tuple[dict[Path, dict], list[dict | None]]:
    """Look for index.json next to local shards: (the indexes found, each shard's entry)."""
    found: dict[Path, dict] = {}
    by_name: dict[Path, dict[str, dict]] = {}
    entries: list[dict | None] = []
    for url in urls:
        directory = Path(url).parent
        if url.startswith("pipe:") or not (directory / INDEX_FILE).is_file():
            entries.append(None)
            continue
        if directory not in found:
            found[directory] = _read_index(directory / INDEX_FILE)
            by_name[directory] = {s["file"]: s for sp in found[directory]["splits"].values()
                                  for s in sp.get("shards", [])}
        entries.append(by_name[directory].get(Path(url).name))
    return found, entries


def shard_problem(src: ResolvedSource, k: int) -> DataError | None:
    """Why shard ``k`` of ``src`` cannot be read as its index says (None if it looks fine)."""
    url = src.urls[k]
    if url.startswith("pipe:"):
        return None
    try:
        info = os.stat(url)
    except OSError:
        return SourceError(f"{url}: shard not found (from {src.spec})")
    if not stat.S_ISREG(info.st_mode):
        return SourceError(f"{url}: not a regular file (from {src.spec})")
    expected = src.expected_bytes[k]
    if expected is not None and info.st_size != expected:
        return ShardError(f"{url}: {info.st_size} bytes on disk, but {src.index_path} records "
                          f"{expected} (truncated or replaced shard)")
    return None


def shard_problems(src: ResolvedSource) -> list[DataError]:
    problems = (shard_problem(src, k) for k in range(len(src.urls)))
    return [problem for problem in problems if problem is not None]


def _check_shards(src: ResolvedSource, check_exists: bool) -> ResolvedSource:
    for k in range(len(src.urls) if check_exists else 0):
        if (problem := shard_problem(src, k)) is not None:
            raise problem
    return src


def resolve(spec: str, split: str, *, check_exists: bool = True) -> ResolvedSource:
    """The shards of one source; errors name the spec, shard or index file. With
    ``check_exists`` every local shard must exist with the size its index records."""
    if not spec:
        raise SourceError("data source path is empty")
    if not spec.startswith("pipe:") and Path(spec).is_dir():
        return _check_shards(_from_directory(Path(spec), split), check_exists)
    if not spec.startswith("pipe:") and not any(c in spec for c in PATTERN_CHARS) \
            and not Path(spec).exists():
        raise SourceError(f"{spec}: no such shard directory or file")
    urls = _expand_pattern(spec)
    if not urls:
        raise SourceError(f"{spec}: matches no shards")
    indexes, entries = _index_entries(urls)
    index_dir, index = next(iter(indexes.items()), (None, {}))
    index_path = index_dir / INDEX_FILE if index_dir else None
    return _check_shards(_source(spec, urls, entries, index_path, index), check_exists)


# ------------------------------------------------------------------ one split of a data config


@dataclass(frozen=True)
class SplitSources:
    """The checked sources of one split, in config order."""

    keys: tuple[str, ...]  # where each came from, e.g. "data.sources[0]"
    sources: tuple[ResolvedSource, ...]
    weights: tuple[float, ...]
    eod_ids: tuple[int, ...]


def config_tokenizer(cfg, vocab_size: int) -> tokenizer.TokenizerInfo | None:
    """``data.tokenizer_model`` (None when unset), checked to fit ``model.vocab_size``."""
    if not cfg.tokenizer_model:
        return None
    try:
        tok = tokenizer.info(cfg.tokenizer_model)
    except tokenizer.TokenizerError as err:
        raise tokenizer.TokenizerError(f"data.tokenizer_model: {err}") from None
    if tok.vocab_size > vocab_size:
        raise tokenizer.TokenizerError(
            f"data.tokenizer_model: {tok.path} has a vocabulary of {tok.vocab_size}, larger "
            f"than model.vocab_size {vocab_size}")
    return tok


def _source_configs(cfg, split: str) -> list[tuple[str, object, str]]:
    """``(config key, source config, index split to read)`` of each source of ``split``."""
    if split == "train":
        if not cfg.sources:
            raise SourceError("data.sources: no training sources configured")
        return [(f"data.sources[{k}]", sc, "train") for k, sc in enumerate(cfg.sources)]
    if split != "valid":
        raise ValueError(f"split must be 'train' or 'valid', got {split!r}")
    if cfg.valid_sources:
        return [(f"data.valid_sources[{k}]", sc, "train") for k, sc in enumerate(cfg.valid_sources)]
    return [(f"data.sources[{k}]", sc, "valid") for k, sc in enumerate(cfg.sources)]


def check_source(src: ResolvedSource, vocab_size: int,
                 tok: tokenizer.TokenizerInfo | None) -> None:
    """The shards fit ``model.vocab_size`` and were made with ``data.tokenizer_model``."""
    where = src.index_path or src.spec
    if src.vocab_size is not None and src.vocab_size > vocab_size:
        raise SourceError(f"{where}: shards were made with a vocabulary of {src.vocab_size}, "
                          f"larger than model.vocab_size {vocab_size}")
    made_with = f"tokenizer {src.tokenizer_path} " if src.tokenizer_path else "a tokenizer "
    if tok and src.tokenizer_vocab_sha256 and tok.vocab_sha256:  # the same vocabulary?
        if tok.vocab_sha256 != src.tokenizer_vocab_sha256:
            raise SourceError(f"{where}: shards were made with {made_with}of another "
                              f"vocabulary (sha256 {src.tokenizer_vocab_sha256[:12]}…) than "
                              f"data.tokenizer_model {tok.path} "
                              f"(sha256 {tok.vocab_sha256[:12]}…)")
    elif tok and src.tokenizer_sha256 and tok.sha256 != src.tokenizer_sha256:  # older shards
        raise SourceError(f"{where}: shards were made with {made_with}of sha256 "
                          f"{src.tokenizer_sha256[:12]}…, but data.tokenizer_model "
                          f"{tok.path} has sha256 {tok.sha256[:12]}…")


def check_format(src: ResolvedSource, data_format: str) -> None:
    """The shards are of ``data.format`` as far as index.json tells (members are checked when
    read: ``shards.read_shard``)."""
    if src.sft is None or src.sft == (data_format == "sft"):
        return
    if data_format == "sft":
        raise SourceError(f"{src.index_path}: pretraining shards (no loss mask), but "
                          f"data.format=sft would train on prompts; make SFT shards with "
                          f"data prepare --format sft")
    raise SourceError(f"{src.index_path}: SFT shards (prompt/response), but data.format="
                      f"{data_format}; set data.format=sft to train on them")


def eod_id(src: ResolvedSource, tok: tokenizer.TokenizerInfo | None) -> int:
    if src.eod_id is not None:
        return src.eod_id
    if tok is not None and tok.eos_id >= 0:
        return tok.eos_id
    raise SourceError(f"{src.spec}: no index.json next to these shards tells the end-of-document "
                      f"id; set data.tokenizer_model")


def _resolve_one(key: str, sc, index_split: str, cfg, vocab_size: int,
                 tok: tokenizer.TokenizerInfo | None) -> tuple[ResolvedSource, int]:
    """One source and its end-of-document id; an error starts with ``key``."""
    if not sc.weight > 0:
        raise SourceError(f"{key}.weight: must be > 0, got {sc.weight}")
    try:
        src = resolve(sc.path, index_split, check_exists=not cfg.skip_corrupt)
        check_source(src, vocab_size, tok)
        check_format(src, cfg.format)
        return src, eod_id(src, tok)
    except DataError as err:
        raise type(err)(f"{key}: {err}") from None


def resolve_split(cfg, split: str, *, vocab_size: int,
                  tok: tokenizer.TokenizerInfo | None) -> SplitSources:
    """Resolve and check the sources of ``split`` (``tok`` from ``config_tokenizer``); every
    error names the config key and the file at fault."""
    configs = _source_configs(cfg, split)
    resolved = [_resolve_one(key, sc, index_split, cfg, vocab_size, tok)
                for key, sc, index_split in configs]
    keys = tuple(key for key, _, _ in configs)
    eods = tuple(eod for _, eod in resolved)
    if len(set(eods)) > 1:
        raise SourceError(f"{', '.join(keys)}: sources disagree on the end-of-document id "
                          f"{list(eods)} (made with different tokenizers?)")
    return SplitSources(keys, tuple(src for src, _ in resolved),
                        tuple(float(sc.weight) for _, sc, _ in configs), eods)
