"""Resolve a source path (directory with index.json, glob, brace pattern, ``pipe:`` command)
into the shard list the loader reads, with what ``index.json`` says about it."""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path

import braceexpand

from gptforge.data.prepare import INDEX_FILE


class SourceError(ValueError):
    """A source that cannot be used; the message starts with the path, shard or index file."""


@dataclass(frozen=True)
class ResolvedSource:
    spec: str
    urls: tuple[str, ...]
    expected_docs: tuple[int | None, ...]  # per shard, from index.json when known
    index_path: str | None
    vocab_size: int | None
    eod_id: int | None
    tokenizer_sha256: str | None


def _read_index(path: Path) -> dict:
    try:
        index = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SourceError(f"{path}: unreadable index: {err}") from err
    if not isinstance(index, dict) or "splits" not in index:
        raise SourceError(f"{path}: not a gptforge shard index (no 'splits')")
    return index


def _from_directory(directory: Path, split: str) -> ResolvedSource:
    index_path = directory / INDEX_FILE
    if not index_path.is_file():
        raise SourceError(f"{directory}: directory has no {INDEX_FILE}; give a glob of shards")
    index = _read_index(index_path)
    shards = index["splits"].get(split, {}).get("shards", [])
    if not shards:
        raise SourceError(f"{index_path}: lists no {split!r} shards")
    return ResolvedSource(str(directory), tuple(str(directory / s["file"]) for s in shards),
                          tuple(s["docs"] for s in shards), str(index_path),
                          index.get("vocab_size"), index.get("eod_id"),
                          index.get("tokenizer", {}).get("sha256"))


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


def _indexed_counts(urls: list[str]) -> tuple[dict, list]:
    """Look for index.json next to local shards: (the index, per-shard expected docs)."""
    found: dict[Path, dict] = {}
    expected: list[int | None] = []
    for url in urls:
        directory = Path(url).parent
        if url.startswith("pipe:") or not (directory / INDEX_FILE).is_file():
            expected.append(None)
            continue
        if directory not in found:
            found[directory] = _read_index(directory / INDEX_FILE)
        docs = {s["file"]: s["docs"] for sp in found[directory]["splits"].values()
                for s in sp.get("shards", [])}
        expected.append(docs.get(Path(url).name))
    return found, expected


def _check_exist(urls, spec: str, check_exists: bool) -> None:
    for url in urls:
        if check_exists and not url.startswith("pipe:") and not Path(url).is_file():
            raise SourceError(f"{url}: shard not found (from {spec})")


def resolve(spec: str, split: str, *, check_exists: bool = True) -> ResolvedSource:
    """The shards of one source; errors name the spec, shard or index file."""
    if not spec:
        raise SourceError("data source path is empty")
    if not spec.startswith("pipe:") and Path(spec).is_dir():
        resolved = _from_directory(Path(spec), split)
        _check_exist(resolved.urls, spec, check_exists)
        return resolved
    urls = _expand_pattern(spec)
    if not urls:
        raise SourceError(f"{spec}: matches no shards")
    _check_exist(urls, spec, check_exists)
    indexes, expected = _indexed_counts(urls)
    first = next(iter(indexes.items()), (None, {}))
    index = first[1]
    index_path = str(first[0] / INDEX_FILE) if first[0] else None
    return ResolvedSource(spec, tuple(urls), tuple(expected), index_path, index.get("vocab_size"),
                          index.get("eod_id"), index.get("tokenizer", {}).get("sha256"))
