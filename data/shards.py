"""WebDataset tar shards of token ids: a deterministic writer and a checked reader.

A sample is one tar member ``<key>.u16`` or ``<key>.u32``: the document's token ids as raw
little-endian bytes. Supervised fine-tuning (SFT) shards (``data prepare --format sft``, index.json
``"sft": true``) hold ``<key>.m32`` members instead: little-endian u32 ids, the prompt's tokens
first with bit 31 (``PROMPT_FLAG``) set, then the response's tokens without it. The flag says
"no loss on predicting this token"; the loader strips it (``packing.make_batch``). A reader
asked for one kind refuses a member of the other, so pretraining never reads prompts as
training targets and fine-tuning never runs without its mask.

The writer fixes every tar header field (mtime 0, uid/gid 0, no names) so equal input gives
byte-identical shards, and writes to a temporary name, fsyncs and renames, so a crash never
leaves a half-written shard under its final name.
"""

from __future__ import annotations

import logging
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from gptforge.common.durable import Durability, publish, temp_path
from gptforge.data.errors import DataError

log = logging.getLogger(__name__)

EXT_DTYPES = {"u16": np.dtype("<u2"), "u32": np.dtype("<u4")}
SFT_EXT = "m32"
SFT_DTYPE = np.dtype("<u4")
PROMPT_FLAG = 1 << 31  # set on a prompt token of an SFT document


class ShardError(DataError):
    """A shard that cannot be read or holds something other than token data; names the shard."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return EXT_DTYPES["u16"] if vocab_size < 65536 else EXT_DTYPES["u32"]


def ext_for_dtype(dtype: np.dtype) -> str:
    return {v.str: k for k, v in EXT_DTYPES.items()}[np.dtype(dtype).str]


def sft_document(prompt: list[int] | np.ndarray, response: list[int] | np.ndarray) -> np.ndarray:
    """An SFT document: the prompt ids flagged with ``PROMPT_FLAG``, then the response ids."""
    prompt = np.asarray(prompt, dtype=SFT_DTYPE) | SFT_DTYPE.type(PROMPT_FLAG)
    return np.concatenate([prompt, np.asarray(response, dtype=SFT_DTYPE)])


BLOCK_BYTES = 512
RECORD_BYTES = 20 * BLOCK_BYTES


def ustar_header(name: str, size: int) -> bytes:
    """The USTAR header ``tarfile`` writes for a regular file with mode 0644, uid/gid 0,
    mtime 0 and no owner names (built directly: ``tarfile.addfile`` costs ~200 us a member)."""
    raw = name.encode("utf-8")
    if len(raw) > 100:
        raise ValueError(f"tar member name too long: {name!r}")
    head = (raw.ljust(100, b"\0") + b"0000644\0" + b"0000000\0" + b"0000000\0"
            + b"%011o\0" % size + b"00000000000\0")
    tail = (b"0" + b"\0" * 100 + b"ustar\x0000" + b"\0" * 64 + b"\0" * 16
            + b"\0" * 155).ljust(BLOCK_BYTES - 156, b"\0")
    checksum = sum(head) + sum(tail) + 8 * 32
    return head + b"%06o\0 " % checksum + tail


class ShardWriter:
    """Writes one shard to ``<final>.tmp`` and renames it to ``final`` on ``close``."""

    def __init__(self, final_path: Path):
        self.final_path = Path(final_path)
        self.tmp_path = temp_path(self.final_path)
        self._file = open(self.tmp_path, "wb")
        self._offset = 0
        self.num_docs = 0
        self.num_tokens = 0

    def add(self, key: str, tokens_bytes: bytes, ext: str, num_tokens: int) -> None:
        pad = -len(tokens_bytes) % BLOCK_BYTES
        self._file.write(ustar_header(f"{key}.{ext}", len(tokens_bytes)))
        self._file.write(tokens_bytes + b"\0" * pad)
        self._offset += BLOCK_BYTES + len(tokens_bytes) + pad
        self.num_docs += 1
        self.num_tokens += num_tokens

    def size_bytes(self) -> int:
        return self._offset

    def close(self) -> int:
        """Finish, fsync and rename to the final name; return the shard size in bytes."""
        end = self._offset + 2 * BLOCK_BYTES
        self._file.write(b"\0" * (2 * BLOCK_BYTES + -end % RECORD_BYTES))
        self._file.flush()
        os.fsync(self._file.fileno())
        size = self._file.tell()
        self._file.close()
        publish(self.tmp_path, self.final_path, Durability.DIRECTORY)  # fsynced just above
        return size


def _member_dtype(url: str, fname: str, sft: bool) -> np.dtype:
    """The dtype of a member's tokens; refuses a member that is not the kind asked for."""
    _, _, ext = fname.rpartition(".")
    if ext == SFT_EXT and not sft:
        raise ShardError(f"{url}: member {fname!r} is SFT data (prompt/response with a loss "
                         f"mask); set data.format=sft to train on it")
    if ext in EXT_DTYPES and sft:
        raise ShardError(f"{url}: member {fname!r} is pretraining data with no loss mask, but "
                         f"data.format=sft; make SFT shards with data prepare --format sft")
    dtype = SFT_DTYPE if ext == SFT_EXT else EXT_DTYPES.get(ext)
    if dtype is None:
        raise ShardError(f"{url}: member {fname!r} is not token data (expected .u16, .u32 "
                         f"or .m32)")
    return dtype


def _decode_member(url: str, fname: str, data: bytes, sft: bool) -> np.ndarray:
    dtype = _member_dtype(url, fname, sft)
    if len(data) % dtype.itemsize:
        raise ShardError(f"{url}: member {fname!r} has {len(data)} bytes, not a whole number "
                         f"of {dtype.itemsize}-byte tokens")
    return np.frombuffer(data, dtype=dtype)


def read_shard(url: str, *, skip_corrupt: bool = False, sft: bool = False) -> list[np.ndarray]:
    """Every document of a shard (path or ``pipe:`` command), in file order; with ``sft`` its
    ``.m32`` SFT documents (flags kept), else its ``.u16``/``.u32`` documents.

    A missing, truncated or corrupt shard, or a member that is not token data, raises
    ``ShardError`` naming ``url``; with ``skip_corrupt`` bad members are skipped and a broken
    tar ends the shard early, each logged as a warning.
    """
    import webdataset as wds  # here, not at the top: ``data prepare`` does not need torch
    from webdataset.tariterators import tar_file_iterator

    docs: list[np.ndarray] = []
    try:
        stream = wds.gopen(url, "rb")
    except OSError as err:
        return _fail(url, f"cannot open shard: {err}", skip_corrupt, docs)
    try:
        for sample in tar_file_iterator(stream):
            try:
                docs.append(_decode_member(url, sample["fname"], sample["data"], sft))
            except ShardError as err:
                if not skip_corrupt:
                    raise
                log.warning("skipping corrupt sample: %s", err)
    except (tarfile.TarError, OSError, EOFError) as err:
        _close_quietly(stream)
        return _fail(url, f"truncated or corrupt tar: {err}", skip_corrupt, docs)
    except BaseException:
        _close_quietly(stream)
        raise
    try:
        stream.close()  # a pipe: command reports its exit status here
    except OSError as err:
        return _fail(url, f"shard command failed: {err}", skip_corrupt, docs)
    return docs


def _close_quietly(stream) -> None:
    try:
        stream.close()
    except OSError:
        pass


def _fail(url: str, message: str, skip_corrupt: bool, docs: list[np.ndarray]) -> list[np.ndarray]:
    if not skip_corrupt:
        raise ShardError(f"{url}: {message}")
    log.warning("skipping rest of corrupt shard %s (%d documents kept): %s", url, len(docs),
                message)
    return docs


def iter_shard_members(path: Path) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of a local shard, for tests and tools."""
    with tarfile.open(path) as tar:
        for member in tar:
            yield member.name, tar.extractfile(member).read()
