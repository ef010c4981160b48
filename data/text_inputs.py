"""Text inputs for the tokenizer and the shard writer.

Inputs are ``.txt``, ``.jsonl`` and ``.jsonl.gz`` files (``.txt.gz`` too), directories (searched
recursively) and globs. They expand to a sorted, de-duplicated file list, so the document order
is stable. A ``.jsonl`` line is one document (its ``text_key`` field); a ``.txt`` file is split
into documents by ``txt_unit``: ``file`` (the whole file), ``paragraph`` (blank-line separated)
or ``line``.

``check_input`` reads a file once and stops at its first problem (binary data, invalid UTF-8,
a bad gzip stream, a jsonl line that is not a JSON object with a string text field), naming
``path:line``; ``data prepare`` and ``tokenizer train`` run it on every input before they write
anything. For SFT data (``data prepare --format sft``) the inputs are ``.jsonl`` files whose
lines are objects with string ``prompt`` and ``response`` fields (``record_pair``).
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

from gptforge.data.errors import DataError

TEXT_SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz")
TXT_UNITS = ("file", "paragraph", "line")
SNIFF_BYTES = 8192  # a NUL byte this early marks a binary file (as git and grep decide)
SCAN_BLOCK_BYTES = 16 << 20
GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)
SFT_KEYS = ("prompt", "response")


class InputError(DataError):
    """A problem with a text input; the message starts with the file or pattern."""


def _has_text_suffix(path: Path) -> bool:
    return path.name.endswith(TEXT_SUFFIXES)


def _expand_dir(path: Path) -> list[Path]:
    found = sorted(p for p in path.rglob("*") if p.is_file())
    files = [p for p in found if _has_text_suffix(p)]
    if not files:
        other = f" (it holds {len(found)} other file(s), e.g. {found[0].name})" if found else ""
        raise InputError(f"{path}: directory holds no {'/'.join(TEXT_SUFFIXES)} files{other}")
    return files


def _expand_one(spec: str) -> list[Path]:
    path = Path(spec)
    if path.is_dir():
        return _expand_dir(path)
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


def open_bytes(path: Path) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _piece_problem(piece: bytes, lines_before: int) -> str | None:
    """``:line: what`` for the first NUL byte or invalid UTF-8 of whole lines ``piece``."""
    nul_at = piece.find(b"\0")
    try:
        piece.decode("utf-8")
        bad_at, reason = -1, ""
    except UnicodeDecodeError as err:
        bad_at, reason = err.start, err.reason
    if nul_at < 0 and bad_at < 0:
        return None
    if nul_at >= 0 and (bad_at < 0 or nul_at < bad_at):
        at, what = nul_at, "NUL byte: binary data, not text"
    else:
        at, what = bad_at, (f"not valid UTF-8 (byte 0x{piece[bad_at]:02x}: {reason}); "
                            f"convert the file to UTF-8")
    line_no = lines_before + piece.count(b"\n", 0, at) + 1
    return f":{line_no}: {what}"


def _bytes_problem(handle: io.BufferedIOBase) -> str | None:
    """What follows the file name in the message about the first problem of a byte stream
    (read in blocks cut at line ends)."""
    head = handle.read(SNIFF_BYTES)
    if b"\0" in head:
        return ": binary file (NUL bytes near the start), not text"
    carry, lines_before = head, 0
    while True:
        block = handle.read(SCAN_BLOCK_BYTES)
        data = carry + block
        cut = len(data) if not block else data.rfind(b"\n") + 1
        problem = _piece_problem(data[:cut], lines_before)
        if problem or not block:
            return problem
        lines_before += data.count(b"\n", 0, cut)
        carry = data[cut:]


def check_bytes(path: Path) -> None:
    """Raise InputError naming ``path`` (and the line) if it is binary, not UTF-8 or a bad gzip."""
    try:
        with open_bytes(path) as handle:
            problem = _bytes_problem(handle)
    except GZIP_ERRORS as err:
        raise InputError(f"{path}: not a readable gzip file ({err})") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read: {err.strerror or err}") from None
    if problem:
        raise InputError(f"{path}{problem}")


def check_input(path: Path, text_key: str = "text", sft: bool = False) -> None:
    """Read ``path`` once and raise InputError at its first problem; see the module docstring."""
    if sft and not is_jsonl(path):
        raise InputError(f"{path}: --format sft reads .jsonl files with {SFT_KEYS[0]!r} and "
                         f"{SFT_KEYS[1]!r} string fields")
    if not is_jsonl(path):
        check_bytes(path)
        return
    for line_no, raw in iter_records(path, "line"):  # locates bad bytes with check_bytes
        if sft:
            record_pair(raw, f"{path}:{line_no}")
        else:
            record_text(raw, True, text_key, f"{path}:{line_no}")


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
    except (UnicodeDecodeError, *GZIP_ERRORS, OSError) as err:
        check_bytes(path)  # names the line of a decoding problem
        raise InputError(f"{path}: cannot read text: {err}") from None


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


def _json_type(value) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
             float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def record_text(raw: str, jsonl: bool, text_key: str, where: str) -> str:
    """The document text of one raw record; ``where`` (file:line) names a bad record."""
    if not jsonl:
        return raw
    obj = _json_object(raw, where, f"a {text_key!r} field")
    return _string_field(obj, text_key, where, " (--text-key)")


def record_pair(raw: str, where: str) -> tuple[str, str]:
    """The ``(prompt, response)`` of one SFT jsonl line; ``where`` (file:line) names a bad one."""
    obj = _json_object(raw, where, f"{SFT_KEYS[0]!r} and {SFT_KEYS[1]!r} fields")
    return _string_field(obj, SFT_KEYS[0], where), _string_field(obj, SFT_KEYS[1], where)


def _json_object(raw: str, where: str, wanted: str) -> dict:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as err:
        raise InputError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{where}: a JSON {_json_type(obj)}, not an object with {wanted}")
    return obj


def _string_field(obj: dict, key: str, where: str, hint: str = "") -> str:
    if key not in obj:
        raise InputError(f"{where}: JSON record has no {key!r} field{hint}")
    value = obj[key]
    if not isinstance(value, str):
        raise InputError(f"{where}: field {key!r} is a JSON {_json_type(value)}, not a string")
    return value


def iter_documents(files: list[Path], text_key: str = "text",
                   txt_unit: str = "paragraph") -> Iterator[str]:
    """Every non-empty document of ``files`` in order."""
    for path in files:
        jsonl = is_jsonl(path)
        for line_no, raw in iter_records(path, txt_unit):
            text = record_text(raw, jsonl, text_key, f"{path}:{line_no}")
            if text:
                yield text
