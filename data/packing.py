"""Packing: one source's documents, as one stream sees them, cut into training windows.

The stream's tokens are its chunks back to back (documents with an EOD after each), across
shards and epochs, so nothing is padded. ``read(n)`` returns the next ``n + 1`` tokens and
advances by ``n``: consecutive windows of ``seq_length + 1`` tokens overlap by one token, so
every token is an input once and a label once (megatron's GPT dataset does the same).

SFT streams (``sft=True``) carry each prompt token's ``PROMPT_FLAG`` (bit 31, see ``shards``)
through packing; the EOD after a document has none. ``make_batch`` turns the flag into the loss
mask: position ``i`` has no loss when its label (window position ``i + 1``) is a prompt token,
so the response's tokens and the EOD after it are learned, the prompt's are not. The flag is
stripped from tokens and labels. Windows and resume offsets count tokens exactly as for
pretraining.
"""

from __future__ import annotations

import logging
from collections import deque

import numpy as np
import torch

from gptforge.data.shards import PROMPT_FLAG, ShardError, read_shard
from gptforge.data.shardspec import ResolvedSource, SourceError
from gptforge.data.state import doc_order, epoch_items

log = logging.getLogger(__name__)

EMPTY_EPOCHS_LIMIT = 2


class SourceStream:
    """The token stream of one source for one (dp_rank, worker) stream; state is exact."""

    def __init__(self, source: ResolvedSource, source_index: int, *, seed: int, stream: int,
                 num_streams: int, eod_id: int, vocab_size: int, skip_corrupt: bool,
                 state: dict, sft: bool = False):
        self.source, self.source_index = source, source_index
        self.seed, self.stream, self.num_streams = seed, stream, num_streams
        self.eod_id, self.vocab_size, self.skip_corrupt = eod_id, vocab_size, skip_corrupt
        self.sft = sft
        self.next_epoch = state["next_epoch"]
        self.items: deque[list[int]] = deque(list(item) for item in state["queue"])
        self.chunks: deque[np.ndarray] = deque()  # loaded chunks of the first items
        self._tokens_since_refill = 1
        self._empty_epochs = 0

    def state(self) -> dict:
        return {"next_epoch": self.next_epoch, "queue": [list(item) for item in self.items]}

    def _refill(self) -> None:
        self._empty_epochs = 0 if self._tokens_since_refill else self._empty_epochs + 1
        if self._empty_epochs >= EMPTY_EPOCHS_LIMIT:
            raise SourceError(f"{self.source.spec}: no documents for data stream {self.stream} "
                              f"of {self.num_streams} in {EMPTY_EPOCHS_LIMIT} epochs")
        self._tokens_since_refill = 0
        self.items.extend(epoch_items(self.seed, self.source_index, self.next_epoch,
                                      len(self.source.urls), self.stream, self.num_streams))
        self.next_epoch += 1

    def _load_next_chunk(self) -> None:
        while len(self.items) <= len(self.chunks):
            self._refill()
        item = self.items[len(self.chunks)]
        chunk = self._chunk(item)
        self._tokens_since_refill += len(chunk)
        self.chunks.append(chunk)

    def _chunk(self, item: list[int]) -> np.ndarray:
        url = self.source.urls[item[1]]
        docs = read_shard(url, skip_corrupt=self.skip_corrupt, sft=self.sft)
        expected = self.source.expected_docs[item[1]]
        if expected is not None and len(docs) != expected:
            message = (f"{url}: holds {len(docs)} documents, {self.source.index_path} says "
                       f"{expected} (truncated shard?)")
            if not self.skip_corrupt:
                raise ShardError(message)
            log.warning("reading what is there: %s", message)
        order = doc_order(self.seed, self.source_index, item, len(docs))
        return join_documents([docs[i] for i in order], self.eod_id, url, self.vocab_size,
                              sft=self.sft)

    def read(self, num_tokens: int) -> np.ndarray:
        """The next ``num_tokens + 1`` tokens; advance by ``num_tokens``."""
        need = num_tokens + 1
        if not self.chunks:
            self._load_next_chunk()
        head_offset = self.items[0][4]
        if len(self.chunks[0]) - head_offset >= need:
            out = self.chunks[0][head_offset:head_offset + need]
            self._advance(num_tokens)
            return out
        parts, have, k = [self.chunks[0][head_offset:]], len(self.chunks[0]) - head_offset, 1
        while have < need:
            if k == len(self.chunks):
                self._load_next_chunk()
            parts.append(self.chunks[k][: need - have])
            have += len(parts[-1])
            k += 1
        out = np.concatenate(parts)
        self._advance(num_tokens)
        return out

    def _advance(self, num_tokens: int) -> None:
        while num_tokens:
            left = len(self.chunks[0]) - self.items[0][4]
            if num_tokens < left:
                self.items[0][4] += num_tokens
                return
            num_tokens -= left
            self.items.popleft()
            self.chunks.popleft()
            if not self.chunks and num_tokens:
                self._load_next_chunk()
        if self.chunks and self.items[0][4] == len(self.chunks[0]):
            self.items.popleft()
            self.chunks.popleft()


def join_documents(docs: list[np.ndarray], eod_id: int, url: str, vocab_size: int, *,
                   sft: bool = False) -> np.ndarray:
    """Documents back to back with ``eod_id`` after each; checks ids (without an SFT
    document's ``PROMPT_FLAG``) against ``vocab_size``."""
    if not docs:
        return np.empty(0, dtype=np.uint32)
    dtype = np.result_type(*[d.dtype for d in docs[:1]], np.uint16)
    total = sum(len(d) for d in docs) + len(docs)
    out = np.empty(total, dtype=dtype)
    pos = 0
    for doc in docs:
        out[pos:pos + len(doc)] = doc
        pos += len(doc)
        out[pos] = eod_id
        pos += 1
    top = int((out & (PROMPT_FLAG - 1)).max() if sft else out.max())
    if top >= vocab_size:
        raise ShardError(f"{url}: token id {top} >= the model's vocab_size {vocab_size}")
    return out


def windows_from(tokens: np.ndarray, count: int, seq_length: int) -> np.ndarray:
    """``count`` windows of ``seq_length + 1`` tokens, stride ``seq_length``, as int64."""
    step = tokens.strides[0]
    view = np.lib.stride_tricks.as_strided(tokens, shape=(count, seq_length + 1),
                                           strides=(seq_length * step, step), writeable=False)
    return view.astype(np.int64)


def make_batch(windows: np.ndarray, eod_id: int, reset_position_ids: bool,
               reset_attention_mask: bool, sft: bool = False) -> dict[str, torch.Tensor]:
    """The trainer's micro-batch from ``[b, seq_length + 1]`` int64 windows (with ``sft``,
    flagged prompt tokens: no loss where the label is one)."""
    seq_length = windows.shape[1] - 1
    if sft:
        loss_mask = (windows[:, 1:] < PROMPT_FLAG).astype(np.float32)
        windows = windows & (PROMPT_FLAG - 1)
    else:
        loss_mask = np.ones((windows.shape[0], seq_length), dtype=np.float32)
    tokens = np.ascontiguousarray(windows[:, :-1])
    labels = np.ascontiguousarray(windows[:, 1:])
    arange = np.arange(seq_length, dtype=np.int64)
    out = {"tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels),
           "loss_mask": torch.from_numpy(loss_mask)}
    if not (reset_position_ids or reset_attention_mask):
        out["position_ids"] = torch.from_numpy(np.broadcast_to(arange, tokens.shape).copy())
        return out
    starts = np.zeros(tokens.shape, dtype=bool)
    starts[:, 1:] = tokens[:, :-1] == eod_id
    doc_start = np.maximum.accumulate(np.where(starts, arange, 0), axis=1)
    position_ids = (arange - doc_start if reset_position_ids
                    else np.broadcast_to(arange, tokens.shape))
    out["position_ids"] = torch.from_numpy(np.ascontiguousarray(position_ids))
    if reset_attention_mask:
        segment = torch.from_numpy(np.cumsum(starts, axis=1))
        same_doc = segment[:, :, None] == segment[:, None, :]
        causal = torch.ones(seq_length, seq_length, dtype=torch.bool).tril()
        out["attention_mask"] = ~(same_doc & causal).unsqueeze(1)
    return out
