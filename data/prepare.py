"""``gptforge data prepare``: text → tokenized WebDataset shards plus ``index.json``.

Documents are read in a stable order (see ``text_inputs``), tokenized in worker processes in
ordered chunks, assigned to ``train``/``valid`` by a stable hash of their text and appended to
``<out>/<split>-%06d.tar`` until a shard reaches ``shard_size_mb``. Shard boundaries depend only
on the document order, so the worker count never changes the output. After each finished shard
``<out>/.prepare-state.json`` records it with the input position it ends at; a rerun after a
crash keeps those shards and restarts from the earliest unfinished position (documents already
in a finished shard of their split are skipped). ``index.json`` is written last.

With ``format="sft"`` (``--format sft``) the inputs are ``.jsonl`` lines with ``prompt`` and
``response`` strings; prompt and response are tokenized separately and written as SFT documents
(``.m32`` members: the prompt's ids flagged, see ``shards``), and index.json says ``"sft": true``.

Bad settings, inputs and tokenizers raise a ``DataError`` naming the culprit before anything is
written: every input is read once up front (``text_inputs.check_input``; for plain text this
costs far less than tokenizing it). A ``DataError`` after writing has begun removes what this
run added: the whole ``--out`` directory if the run created it, else the files it added, with
the earlier ``.prepare-state.json`` put back, so an interrupted run stays resumable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gptforge.common.durable import Durability, write_atomic
from gptforge.data import tokenizer
from gptforge.data.errors import DataError
from gptforge.data.outputs import check_out_dir, missing_root
from gptforge.data.shards import (
    SFT_DTYPE,
    SFT_EXT,
    ShardWriter,
    dtype_for_vocab,
    ext_for_dtype,
    sft_document,
)
from gptforge.data.text_inputs import (
    TXT_UNITS,
    check_input,
    expand_inputs,
    is_jsonl,
    iter_records,
    record_pair,
    record_text,
)

log = logging.getLogger(__name__)

SPLITS = ("train", "valid")
FORMATS = ("pretrain", "sft")
STATE_FILE = ".prepare-state.json"
INDEX_FILE = "index.json"
FORMAT = "gptforge-tokens-v1"
OUTPUT_NAME = re.compile(r"(train|valid)-\d{6}\.tar(\.tmp)?|(index|\.prepare-state)\.json(\.tmp)?")


class PrepareError(DataError):
    """A problem preparing shards; the message starts with the file or directory."""


@dataclass
class PrepareSettings:
    inputs: list[str]
    tokenizer: str
    out: str
    text_key: str = "text"
    txt_unit: str = "paragraph"
    valid_fraction: float = 0.0
    shard_size_mb: float = 256.0
    workers: int = 1
    docs_per_chunk: int = 256
    command: list[str] = field(default_factory=list)
    format: str = "pretrain"  # or "sft": prompt/response jsonl, documents with a loss mask


def check_settings(settings: PrepareSettings) -> None:
    """Refuse bad numbers and an unusable ``--out`` before any input is read."""
    if not 0 <= settings.valid_fraction < 1:
        raise PrepareError(f"--valid-fraction: must be in [0, 1), got {settings.valid_fraction}")
    if not (settings.shard_size_mb > 0 and math.isfinite(settings.shard_size_mb)):
        raise PrepareError(f"--shard-size-mb: must be a positive number, got "
                           f"{settings.shard_size_mb}")
    if not settings.workers >= 1:
        raise PrepareError(f"--workers: must be at least 1, got {settings.workers}")
    if not settings.docs_per_chunk >= 1:
        raise PrepareError(f"docs_per_chunk: must be at least 1, got {settings.docs_per_chunk}")
    if settings.format not in FORMATS:
        raise PrepareError(f"--format: must be one of {FORMATS}, got {settings.format!r}")
    if settings.txt_unit not in TXT_UNITS:
        raise PrepareError(f"--txt-unit: must be one of {TXT_UNITS}, got {settings.txt_unit!r}")
    check_out_dir(Path(settings.out), "--out", PrepareError)


def valid_hash_fraction(text_bytes: bytes) -> float:
    """A stable number in [0, 1) from a document's text: the train/valid split key."""
    return int.from_bytes(hashlib.blake2b(text_bytes, digest_size=8).digest(), "little") / 2**64


# ------------------------------------------------------------------ worker side

_WORKER: dict = {}


def _init_worker(model_path: str, text_key: str, valid_fraction: float, dtype_str: str,
                 sft: bool = False) -> None:
    try:  # an initializer that raises makes a Pool restart workers forever: raise it per task
        proc = tokenizer.load(model_path)
    except DataError as err:
        proc = err
    _WORKER.update(proc=proc, text_key=text_key, valid_fraction=valid_fraction,
                   dtype=np.dtype(dtype_str), sft=sft)


def check_file(path_key_sft: tuple[str, str, bool]) -> None:
    """``check_input`` for a worker: ``(path, text_key, sft)``."""
    check_input(Path(path_key_sft[0]), path_key_sft[1], path_key_sft[2])


def encode_chunk(chunk: tuple[str, bool, list[tuple[int, int, str]]]) -> list[tuple]:
    """Tokenize ``(file, jsonl, [(ordinal, line, raw)])``; return
    ``[(ordinal, split index, token bytes, token count)]`` and the chunk's text byte count."""
    path, jsonl, records = chunk
    if isinstance(_WORKER["proc"], DataError):
        raise _WORKER["proc"]
    if _WORKER["sft"]:
        return _encode_sft_chunk(path, records)
    texts, ordinals = [], []
    text_bytes = 0
    for ordinal, line_no, raw in records:
        text = record_text(raw, jsonl, _WORKER["text_key"], f"{path}:{line_no}")
        if text:
            texts.append(text)
            ordinals.append(ordinal)
    ids = tokenizer.encode_batch(_WORKER["proc"], texts) if texts else []
    out = []
    for ordinal, text, doc_ids in zip(ordinals, texts, ids):
        raw_bytes = text.encode("utf-8")
        text_bytes += len(raw_bytes)
        split = int(valid_hash_fraction(raw_bytes) < _WORKER["valid_fraction"])
        out.append((ordinal, split, np.asarray(doc_ids, dtype=_WORKER["dtype"]).tobytes(),
                    len(doc_ids)))
    return out, text_bytes


def _encode_sft_chunk(path: str, records: list[tuple[int, int, str]]) -> list[tuple]:
    """``encode_chunk`` for prompt/response records: SFT documents (prompt flagged)."""
    pairs, ordinals = [], []
    for ordinal, line_no, raw in records:
        pair = record_pair(raw, f"{path}:{line_no}")
        if pair[0] or pair[1]:
            pairs.append(pair)
            ordinals.append(ordinal)
    proc = _WORKER["proc"]
    prompts = tokenizer.encode_batch(proc, [p for p, _ in pairs]) if pairs else []
    responses = tokenizer.encode_batch(proc, [r for _, r in pairs]) if pairs else []
    out, text_bytes = [], 0
    for ordinal, (prompt, response), p_ids, r_ids in zip(ordinals, pairs, prompts, responses):
        raw_bytes = json.dumps([prompt, response]).encode("utf-8")
        text_bytes += len(prompt.encode("utf-8")) + len(response.encode("utf-8"))
        split = int(valid_hash_fraction(raw_bytes) < _WORKER["valid_fraction"])
        out.append((ordinal, split, sft_document(p_ids, r_ids).tobytes(),
                    len(p_ids) + len(r_ids)))
    return out, text_bytes


# ------------------------------------------------------------------ reading side


def iter_chunks(files: list[Path], txt_unit: str, docs_per_chunk: int,
                skip_before: int) -> Iterator[tuple[str, bool, list[tuple[int, int, str]]]]:
    """Ordered chunks of raw records with their global ordinal; records before
    ``skip_before`` (already in finished shards) are counted but not sent."""
    ordinal = 0
    for path in files:
        jsonl = is_jsonl(path)
        records: list[tuple[int, int, str]] = []
        for line_no, raw in iter_records(path, txt_unit):
            if ordinal >= skip_before:
                records.append((ordinal, line_no, raw))
                if len(records) >= docs_per_chunk:
                    yield str(path), jsonl, records
                    records = []
            ordinal += 1
        if records:
            yield str(path), jsonl, records


Mapper = Callable[[Callable, Iterator], Iterator]


@contextmanager
def _worker_map(settings: PrepareSettings, dtype: np.dtype) -> Iterator[Mapper]:
    """An ordered ``imap(fn, items)`` over the worker processes (this process for one)."""
    args = (settings.tokenizer, settings.text_key, settings.valid_fraction, dtype.str,
            settings.format == "sft")
    if settings.workers <= 1:
        _init_worker(*args)
        yield map
        return
    ctx = mp.get_context(_start_method(settings.tokenizer))
    with ctx.Pool(settings.workers, initializer=_init_worker, initargs=args) as pool:
        yield lambda fn, items: _without_remote_traceback(pool.imap(fn, items, chunksize=1))


def _start_method(tokenizer_path: str) -> str:
    """fork for sentencepiece (workers inherit the loaded modules). A Hugging Face tokenizer's
    Rust thread pool and locks do not survive a fork of a process that has used them (workers
    hang in encode), so its workers start from a clean forkserver process."""
    from gptforge.data.hf_tokenizer import is_hf_path

    if os.name != "posix":
        return "spawn"
    return "forkserver" if is_hf_path(Path(tokenizer_path)) else "fork"


def _without_remote_traceback(results: Iterator) -> Iterator:
    """Re-raise a worker's DataError as itself, without the worker's traceback attached."""
    try:
        yield from results
    except DataError as err:
        raise err from None


def _check_inputs(imap: Mapper, files: list[Path], text_key: str, sft: bool) -> None:
    for _ in imap(check_file, [(str(path), text_key, sft) for path in files]):
        pass


# ------------------------------------------------------------------ resume state


def _fingerprint(settings: PrepareSettings, files: list[Path],
                 tok: tokenizer.TokenizerInfo) -> dict:
    """Everything that determines the output bytes (not the worker count or the command)."""
    sft = {"sft": True} if settings.format == "sft" else {}
    return {"format": FORMAT, **sft, "files": [[str(p), p.stat().st_size] for p in files],
            "tokenizer_sha256": tok.sha256, "text_key": settings.text_key,
            "txt_unit": settings.txt_unit, "valid_fraction": settings.valid_fraction,
            "shard_size_mb": settings.shard_size_mb}


def _write_json_atomic(path: Path, obj: dict) -> None:
    write_atomic(path, json.dumps(obj, indent=1) + "\n", Durability.FILE)


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PrepareError(f"{path}: unreadable ({err}); delete it or use a new --out "
                           f"directory") from None
    return obj if isinstance(obj, dict) else {}


def _completed_index(out: Path, fingerprint: dict) -> dict | None:
    """The index of a finished run with the same inputs and settings (None if unfinished)."""
    index_path = out / INDEX_FILE
    if not index_path.is_file():
        return None
    index = _read_json(index_path)
    if index.get("fingerprint") != fingerprint:
        raise PrepareError(f"{index_path}: written from different inputs or settings; "
                           f"use a new --out directory")
    log.debug("%s: already complete", index_path)
    return index


def _load_state(out: Path, fingerprint: dict) -> dict:
    """Finished shards from an earlier, interrupted run with the same settings (else empty)."""
    empty = {"fingerprint": fingerprint, "splits": {s: [] for s in SPLITS}}
    path = out / STATE_FILE
    if not path.is_file():
        if any(out.glob("*-*.tar")):
            raise PrepareError(f"{out}: holds shards but no {STATE_FILE} or matching "
                               f"{INDEX_FILE}; use an empty --out directory")
        return empty
    state = _read_json(path)
    if state.get("fingerprint") != fingerprint:
        raise PrepareError(f"{path}: an unfinished run with different inputs or settings; "
                           f"use a new --out directory or delete it")
    for split in SPLITS:  # keep the prefix of shards that are intact on disk
        kept = []
        for shard in state["splits"][split]:
            file = out / shard["file"]
            if not file.is_file() or file.stat().st_size != shard["bytes"]:
                break
            kept.append(shard)
        state["splits"][split] = kept
    return state


def _resume_ordinals(state: dict) -> dict[str, int]:
    """Per split, the input ordinal from which its documents are not yet in a finished shard."""
    return {s: (state["splits"][s][-1]["end_ordinal"] if state["splits"][s] else 0)
            for s in SPLITS}


# ------------------------------------------------------------------ writing side


class _SplitWriter:
    """Rolls one split's documents over ``<split>-%06d.tar`` shards of a target size."""

    def __init__(self, out: Path, split: str, done: list[dict], target_bytes: int, ext: str):
        self.out, self.split, self.done = out, split, done
        self.target_bytes, self.ext = target_bytes, ext
        self.next_key = sum(s["docs"] for s in done)
        self.writer: ShardWriter | None = None

    def add(self, ordinal: int, token_bytes: bytes, num_tokens: int) -> bool:
        """Append a document; return True when this closed a shard."""
        if self.writer is None:
            name = f"{self.split}-{len(self.done):06d}.tar"
            self.writer = ShardWriter(self.out / name)
        self.writer.add(f"{self.next_key:010d}", token_bytes, self.ext, num_tokens)
        self.next_key += 1
        if self.writer.size_bytes() >= self.target_bytes:
            self.close(ordinal + 1)
            return True
        return False

    def close(self, end_ordinal: int) -> None:
        if self.writer is None:
            return
        size = self.writer.close()
        self.done.append({"file": self.writer.final_path.name, "docs": self.writer.num_docs,
                          "tokens": self.writer.num_tokens, "bytes": size,
                          "end_ordinal": end_ordinal})
        self.writer = None


def _progress(total_bytes: int, enabled: bool) -> tqdm:
    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1 << 20,
                desc="prepare", disable=not enabled, smoothing=0.1)


def no_document_hook(docs_written: int) -> None:
    """The default ``after_document`` of ``prepare``: nothing."""


def prepare(settings: PrepareSettings, *, progress: bool = True,
            after_document: Callable[[int], None] = no_document_hook) -> dict:
    """Write the shards and ``index.json`` (resuming an interrupted run); return the index.
    ``after_document(n)`` is called after the n-th document this call wrote (the crash tests
    kill the process there)."""
    check_settings(settings)
    files = expand_inputs(settings.inputs)
    tok = tokenizer.info(settings.tokenizer)
    if tok.eos_id < 0:
        raise PrepareError(f"{settings.tokenizer}: the tokenizer has no end-of-sequence token "
                           f"to end documents with")
    dtype = SFT_DTYPE if settings.format == "sft" else dtype_for_vocab(tok.vocab_size)
    out = Path(settings.out)
    fingerprint = _fingerprint(settings, files, tok)
    index = _completed_index(out, fingerprint)
    if index is not None:
        return index
    state = _load_state(out, fingerprint)
    with _worker_map(settings, dtype) as imap:
        _check_inputs(imap, files, settings.text_key, settings.format == "sft")
        with _undone_on_data_error(out):
            _make_dir(out)
            _write_shards(out, settings, files, state, dtype, imap, progress, after_document)
            return _finish(out, settings, state, tok, dtype, fingerprint)


def _make_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PrepareError(f"{out}: cannot create the --out directory: {err.strerror}") from None


@contextmanager
def _undone_on_data_error(out: Path) -> Iterator[None]:
    """On a DataError in the block, remove what it added under ``out``: all of ``out`` when
    this run creates it, else the output files it added, putting back the earlier state file."""
    created = missing_root(out)
    before = set() if created else {p.name for p in out.iterdir()}
    state_path = out / STATE_FILE
    earlier_state = None if created or not state_path.is_file() else state_path.read_bytes()
    try:
        yield
    except DataError:
        if created:
            shutil.rmtree(created, ignore_errors=True)
        else:
            _remove_added(out, before, earlier_state)
        raise


def _remove_added(out: Path, before: set[str], earlier_state: bytes | None) -> None:
    for path in out.iterdir():
        if path.name not in before and OUTPUT_NAME.fullmatch(path.name):
            path.unlink(missing_ok=True)
    if earlier_state is not None:
        write_atomic(out / STATE_FILE, earlier_state, Durability.FILE)


def _write_shards(out: Path, settings: PrepareSettings, files: list[Path], state: dict,
                  dtype: np.dtype, imap: Mapper, progress: bool,
                  after_document: Callable[[int], None]) -> None:
    """Tokenize the documents not yet in a finished shard and append them to their split."""
    resume = _resume_ordinals(state)
    target = int(settings.shard_size_mb * (1 << 20))
    ext = SFT_EXT if settings.format == "sft" else ext_for_dtype(dtype)
    writers = [_SplitWriter(out, s, state["splits"][s], target, ext) for s in SPLITS]
    chunks = iter_chunks(files, settings.txt_unit, settings.docs_per_chunk, min(resume.values()))
    docs_written, last_ordinal, start = 0, -1, time.perf_counter()
    with _progress(sum(p.stat().st_size for p in files), progress) as bar:
        for encoded, text_bytes in imap(encode_chunk, chunks):
            for ordinal, split, token_bytes, num_tokens in encoded:
                last_ordinal = ordinal
                if ordinal < resume[SPLITS[split]]:
                    continue
                if writers[split].add(ordinal, token_bytes, num_tokens):
                    _write_json_atomic(out / STATE_FILE, state)
                docs_written += 1
                after_document(docs_written)
            bar.update(text_bytes)
            bar.set_postfix(docs_per_s=f"{docs_written / (time.perf_counter() - start):.0f}")
    for writer in writers:
        writer.close(last_ordinal + 1)


def _finish(out: Path, settings: PrepareSettings, state: dict, tok: tokenizer.TokenizerInfo,
            dtype: np.dtype, fingerprint: dict) -> dict:
    splits = {}
    for split in SPLITS:
        shards = [{k: s[k] for k in ("file", "docs", "tokens", "bytes")}
                  for s in state["splits"][split]]
        splits[split] = {"docs": sum(s["docs"] for s in shards),
                         "tokens": sum(s["tokens"] for s in shards), "shards": shards}
    if splits["train"]["docs"] + splits["valid"]["docs"] == 0:
        raise PrepareError(f"{', '.join(settings.inputs)}: the inputs hold no documents")
    if settings.valid_fraction > 0 and splits["valid"]["docs"] == 0:
        log.warning("%s: no document fell into the valid split (valid_fraction=%s)", out,
                    settings.valid_fraction)
    index = {"format": FORMAT, "sft": settings.format == "sft",
             "vocab_size": tok.vocab_size, "dtype": dtype.name,
             "eod_id": tok.eos_id, "tokenizer": asdict(tok),
             "command": settings.command, "fingerprint": fingerprint, "splits": splits}
    _write_json_atomic(out / INDEX_FILE, index)
    (out / STATE_FILE).unlink(missing_ok=True)
    for stale in out.glob("*.tmp"):  # half-written shards of an interrupted run
        stale.unlink()
    return index
