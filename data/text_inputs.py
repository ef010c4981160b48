"""Text inputs for the tokenizer and the shard writer.

Inputs are ``.txt``, ``.jsonl`` and ``.jsonl.gz`` files (``.txt.gz`` too), directories (searched
recursively) and globs. They expand to a sorted, de-duplicated file list, so the document order
is stable. A ``.jsonl`` line is one document (its ``text_key`` field); a ``.txt`` file is split
into documents by ``txt_unit``: ``file`` (the whole file), ``paragraph`` (blank-line separated)
or ``line``.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz")
TXT_UNITS = ("file", "paragraph", "line")


class InputError(ValueError):
    """A problem with a text input; the message starts with the file or pattern."""


def _has_text_suffix(path: Path) -> bool:
    return path.name.endswith(TEXT_SUFFIXES)


def _expand_one(spec: str) -> list[Path]:
    path = Path(spec)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and _has_text_suffix(p))
    if any(ch in spec for ch in "*?["):
        return sorted(Path(p) for p in glob.glob(spec, recursive=True)
                      if Path(p).is_file() and _has_text_suffix(Path(p)))
    if path.is_file():
        if not _has_text_suffix(path):
            raise InputError(f"{spec}: unsupported input type (expected one of {TEXT_SUFFIXES})")
        return [path]
    raise InputError(f"{spec}: no such file or directory")


def expand_inputs(specs: list[str]) -> list[Path]:
    """Files named by ``specs`` in a stable order; an error names a spec that matches nothing."""
    files: list[Path] = []
    seen: set[Path] = set()
    for spec in specs:
        matched = _expand_one(str(spec))
        if not matched:
            raise InputError(f"{spec}: matches no {'/'.join(TEXT_SUFFIXES)} files")
        for path in matched:
            if path.resolve() not in seen:
                seen.add(path.resolve())
                files.append(path)
    if not files:
        raise InputError("no input files given")
    return files


def open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def is_jsonl(path: Path) -> bool:
    return path.name.endswith((".jsonl", ".jsonl.gz"))


def iter_records(path: Path, txt_unit: str) -> Iterator[tuple[int, str]]:
    """(line number, raw record) pairs: a jsonl line, or a txt document per ``txt_unit``."""
    if txt_unit not in TXT_UNITS:
        raise InputError(f"txt_unit: must be one of {TXT_UNITS}, got {txt_unit!r}")
    try:
        with open_text(path) as handle:
            if is_jsonl(path) or txt_unit == "line":
                for line_no, line in enumerate(handle, 1):
                    if line.strip():
                        yield line_no, line.rstrip("\r\n") if txt_unit == "line" else line
            elif txt_unit == "file":
                text = handle.read()
                if text:
                    yield 1, text
            else:
                yield from _paragraphs(handle)
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError, OSError) as err:
        raise InputError(f"{path}: cannot read text: {err}") from err


def _paragraphs(handle: io.TextIOBase) -> Iterator[tuple[int, str]]:
    lines: list[str] = []
    start = 1
    for line_no, line in enumerate(handle, 1):
        if line.strip():
            if not lines:
                start = line_no
            lines.append(line)
        elif lines:
            yield start, "".join(lines).rstrip("\r\n")
            lines = []
    if lines:
        yield start, "".join(lines).rstrip("\r\n")


def record_text(raw: str, jsonl: bool, text_key: str, where: str) -> str:
    """The document text of one raw record; ``where`` (file:line) names a bad record."""
    if not jsonl:
        return raw
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as err:
        raise InputError(f"{where}: not valid JSON: {err}") from err
    if not isinstance(obj, dict) or text_key not in obj:
        raise InputError(f"{where}: JSON record has no {text_key!r} field")
    text = obj[text_key]
    if not isinstance(text, str):
        raise InputError(f"{where}: field {text_key!r} is not a string")
    return text


def iter_documents(files: list[Path], text_key: str = "text",
                   txt_unit: str = "paragraph") -> Iterator[str]:
    """Every non-empty document of ``files`` in order."""
    for path in files:
        jsonl = is_jsonl(path)
        for line_no, raw in iter_records(path, txt_unit):
            text = record_text(raw, jsonl, text_key, f"{path}:{line_no}")
            if text:
                yield text
