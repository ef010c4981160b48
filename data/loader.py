"""The training/validation data loader: packed micro-batches for one data-parallel rank.

``build_loader(cfg.data, split=..., seq_length=..., micro_batch_size=..., dp_rank=...,
dp_size=..., seed=..., vocab_size=...)`` returns an infinite iterator of dicts with ``tokens``,
``labels`` (int64 [b, s]), ``loss_mask`` (float32), ``position_ids`` (int64) and, with
``reset_attention_mask``, ``attention_mask`` (bool [b, 1, s, s], True = masked out). With
``data.format=sft`` the shards are SFT shards and ``loss_mask`` is 0 where the label is a
prompt token (see ``packing``).

Sources. ``cfg.sources`` (``cfg.valid_sources`` for split "valid"; when that is empty, the
"valid" split of every source directory's index.json) are directories with index.json, globs,
brace patterns or ``pipe:`` commands. Each source is read through webdataset; sources are
blended per window by weight with megatron's deterministic rule (take the source furthest
below its share), so token shares match the weights exactly up to one window.

Splitting and shuffling. There are ``dp_size * max(1, num_workers)`` *streams*, one per
(data-parallel rank, DataLoader worker); TP/PP peers pass the same dp_rank and get the same
batches. Every epoch, each source's shards are permuted (seed, source, epoch) and dealt to the
streams; when shards are fewer than streams, each shard is cut into interleaved slices of
documents. Within a shard, documents are read in a seeded permutation (the whole shard is held
in memory, so shuffling is exact and no shuffle buffer state is needed). Epochs repeat
forever, reshuffled. See ``gptforge.data.state``.

Resume design. A stream's position per source is a queue of *items* ``[epoch, shard, slice,
num_slices, token_offset]`` plus the next epoch to plan; because orders are pure functions of
the seed, re-reading the head shard and skipping ``token_offset`` tokens restores the stream
exactly. ``loader.state_dict()`` holds this rank's streams (JSON, small) and the number of
batches consumed; with workers, each batch carries its stream's state, so the saved state
counts only batches the trainer actually took (not prefetched ones), and the worker order is
rotated on restore so the batch sequence continues exactly.

* Same dp_size and num_workers: ``loader.load_state_dict(own_state)`` (or the full list)
  continues exactly where the uninterrupted run would be.
* Different dp_size (or num_workers): gather every old rank's ``state_dict()`` into a list
  indexed by dp_rank and call ``loader.load_state_dict(states)`` on every new rank
  (``merge_states(states)`` gives the same thing as one dict). The unfinished work of every
  started epoch (partial items keep their offsets) is dealt over the new streams, so across
  the union of ranks no document is repeated or skipped; later epochs follow the new layout.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import numpy as np
import torch

from gptforge.data.packing import SourceStream, make_batch, windows_from
from gptforge.data.shardspec import ResolvedSource, SourceError, config_tokenizer, resolve_split
from gptforge.data.state import (
    STATE_VERSION,
    StateError,
    initial_stream_state,
    merge_states,
    reshard,
)

log = logging.getLogger(__name__)

__all__ = ["build_loader", "Loader", "merge_states", "SourceError", "StateError"]


@dataclass(frozen=True)
class LoaderSpec:
    """Everything a stream needs, picklable for DataLoader workers."""

    sources: tuple[ResolvedSource, ...]
    weights: tuple[float, ...]
    eod_ids: tuple[int, ...]
    seq_length: int
    micro_batch_size: int
    seed: int
    vocab_size: int
    skip_corrupt: bool
    reset_position_ids: bool
    reset_attention_mask: bool
    sft: bool = False  # SFT shards: prompt tokens carry no loss (see packing)


class StreamBatcher:
    """Micro-batches of one stream: blends the sources window by window."""

    def __init__(self, spec: LoaderSpec, stream: int, num_streams: int, state: dict):
        self.spec = spec
        self.sources = [
            SourceStream(src, k, seed=spec.seed, stream=stream, num_streams=num_streams,
                         eod_id=spec.eod_ids[k], vocab_size=spec.vocab_size,
                         skip_corrupt=spec.skip_corrupt, state=state["sources"][k],
                         sft=spec.sft)
            for k, src in enumerate(spec.sources)]
        self.blend_counts = list(state["blend_counts"])
        self.weights = np.asarray(spec.weights) / sum(spec.weights)

    def state(self) -> dict:
        return {"sources": [s.state() for s in self.sources],
                "blend_counts": list(self.blend_counts)}

    def _pick_sources(self, count: int) -> list[int]:
        picks = []
        for _ in range(count):
            total = sum(self.blend_counts) + 1
            k = int(np.argmax(self.weights * total - np.asarray(self.blend_counts)))
            self.blend_counts[k] += 1
            picks.append(k)
        return picks

    def next_batch(self) -> dict[str, torch.Tensor]:
        spec = self.spec
        return make_batch(self.next_windows(), spec.eod_ids[0], spec.reset_position_ids,
                          spec.reset_attention_mask, spec.sft)

    def next_windows(self) -> np.ndarray:
        """The next micro-batch as int64 windows ``[micro_batch_size, seq_length + 1]``."""
        spec = self.spec
        picks = self._pick_sources(spec.micro_batch_size) if len(self.sources) > 1 else \
            [0] * spec.micro_batch_size
        rows, start = [], 0
        while start < len(picks):  # consecutive windows from one source in one read
            end = start
            while end < len(picks) and picks[end] == picks[start]:
                end += 1
            tokens = self.sources[picks[start]].read((end - start) * spec.seq_length)
            rows.append(windows_from(tokens, end - start, spec.seq_length))
            start = end
        return rows[0] if len(rows) == 1 else np.concatenate(rows)


STATE_KEY = "_gptforge_stream_state"


class WorkerDataset(torch.utils.data.IterableDataset):
    """DataLoader worker ``w`` serves stream ``first + (w + rotation) % W``: it yields the
    windows of each micro-batch (one tensor crosses processes; the main process builds the
    batch) tagged with that stream's state after it."""

    def __init__(self, spec: LoaderSpec, first_stream: int, num_streams: int,
                 states: list[dict], rotation: int):
        self.spec, self.first_stream, self.num_streams = spec, first_stream, num_streams
        self.states, self.rotation = states, rotation

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        num_workers = len(self.states)
        local = (info.id + self.rotation) % num_workers
        batcher = StreamBatcher(self.spec, self.first_stream + local, self.num_streams,
                                self.states[local])
        while True:
            yield {"windows": batcher.next_windows(),
                   STATE_KEY: json.dumps([local, batcher.state()])}


class Loader:
    """Infinite iterator of this data-parallel rank's micro-batches; resumable."""

    def __init__(self, spec: LoaderSpec, *, dp_rank: int, dp_size: int, num_workers: int):
        self.spec, self.dp_rank, self.dp_size = spec, dp_rank, dp_size
        self.num_workers = num_workers
        self.workers_per_rank = max(1, num_workers)
        self.num_streams = dp_size * self.workers_per_rank
        self.stream_states = [initial_stream_state(len(spec.sources))
                              for _ in range(self.workers_per_rank)]
        self.batches = 0  # consumed by the trainer since the start of training
        self._iter = None

    # ---------------------------------------------------------------- iteration

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._iter is None:
            self._iter = self._start()
        batch = next(self._iter)
        self.batches += 1
        return batch

    def _start(self):
        """The batch generator; it refers only to ``self.stream_states`` (a list it updates in
        place), never to ``self``, so dropping the loader stops DataLoader workers at once."""
        first = self.dp_rank * self.workers_per_rank
        if self.num_workers == 0:
            batcher = StreamBatcher(self.spec, first, self.num_streams, self._plain_states()[0])
            return _in_process(batcher, self.stream_states)
        rotation = self.batches % self.num_workers
        dataset = WorkerDataset(self.spec, first, self.num_streams, self._plain_states(),
                                rotation)
        loader = torch.utils.data.DataLoader(dataset, batch_size=None,
                                             num_workers=self.num_workers, prefetch_factor=4)
        return _from_workers(iter(loader), self.stream_states, self.spec)

    def close(self) -> None:
        """Stop DataLoader workers (they also stop when the loader is dropped)."""
        self._iter = None

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict:
        """This rank's position (JSON-serialisable); see the module docstring."""
        return {"version": STATE_VERSION, "dp_rank": self.dp_rank, "dp_size": self.dp_size,
                "num_workers": self.num_workers, "seed": self.spec.seed,
                "num_shards": [len(s.urls) for s in self.spec.sources],
                "batches": self.batches,
                "streams": json.loads(json.dumps(self._plain_states()))}

    def _plain_states(self) -> list[dict]:
        return [s.state() if isinstance(s, StreamBatcher) else s for s in self.stream_states]

    def load_state_dict(self, state: dict | list[dict]) -> None:
        """Restore from this rank's own state, or from every old rank's states (a list indexed
        by dp_rank, or ``merge_states`` of it) when the data-parallel layout changed."""
        if isinstance(state, dict) and "streams" in state:
            self._load_own(state)
        else:
            self._load_global(merge_states(state) if isinstance(state, list) else state)

    def _load_own(self, state: dict) -> None:
        layout = (state["dp_rank"], state["dp_size"], state["num_workers"])
        if layout != (self.dp_rank, self.dp_size, self.num_workers):
            if state["dp_size"] != 1:
                raise StateError(
                    f"loader state is for dp_rank {layout[0]} of {layout[1]} with {layout[2]} "
                    f"workers; this is dp_rank {self.dp_rank} of {self.dp_size} with "
                    f"{self.num_workers}: pass every old rank's state as a list")
            self._load_global(merge_states([state]))
            return
        self._check_compatible(state)
        self.close()
        self.stream_states = json.loads(json.dumps(state["streams"]))
        self.batches = state["batches"]

    def _load_global(self, merged: dict) -> None:
        self._check_compatible(merged)
        self.close()
        first = self.dp_rank * self.workers_per_rank
        streams = merged["all_streams"]
        same_layout = (merged["dp_size"], merged["num_workers"]) == (self.dp_size, self.num_workers)
        if len(streams) != self.num_streams:
            streams = reshard(streams, self.num_streams, merged["seed"], merged["num_shards"])
        self.stream_states = json.loads(json.dumps(streams[first:first + self.workers_per_rank]))
        self.batches = merged["batches"][self.dp_rank] if same_layout else 0

    def _check_compatible(self, merged: dict) -> None:
        num_shards = [len(s.urls) for s in self.spec.sources]
        if merged["seed"] != self.spec.seed or merged["num_shards"] != num_shards:
            raise StateError(
                f"loader state was made with seed {merged['seed']} and shard counts "
                f"{merged['num_shards']}; this loader has seed {self.spec.seed} and {num_shards}")



def _in_process(batcher: StreamBatcher, stream_states: list):
    stream_states[0] = batcher  # its live position is the consumed one: nothing prefetched
    while True:
        yield batcher.next_batch()


def _from_workers(iterator, stream_states: list[dict], spec: LoaderSpec):
    for item in iterator:
        local, state = json.loads(item[STATE_KEY])
        stream_states[local] = state
        yield make_batch(item["windows"].numpy(), spec.eod_ids[0], spec.reset_position_ids,
                         spec.reset_attention_mask, spec.sft)


def build_spec(cfg, *, split: str, seq_length: int, micro_batch_size: int, seed: int,
               vocab_size: int) -> LoaderSpec:
    """Resolve and check the sources of ``split``; every error names the file at fault."""
    resolved = resolve_split(cfg, split, vocab_size=vocab_size,
                             tok=config_tokenizer(cfg, vocab_size))
    return LoaderSpec(resolved.sources, resolved.weights, resolved.eod_ids, seq_length,
                      micro_batch_size, seed, vocab_size, cfg.skip_corrupt,
                      cfg.reset_position_ids, cfg.reset_attention_mask, cfg.format == "sft")


def build_loader(cfg, *, split: str, seq_length: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int, seed: int, vocab_size: int) -> Loader:
    """The loader of ``split`` for data-parallel rank ``dp_rank`` of ``dp_size``."""
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} is not in [0, {dp_size})")
    spec = build_spec(cfg, split=split, seq_length=seq_length, micro_batch_size=micro_batch_size,
                      seed=seed, vocab_size=vocab_size)
    return Loader(spec, dp_rank=dp_rank, dp_size=dp_size, num_workers=cfg.num_workers)
