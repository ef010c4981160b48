"""The loader's resumable position: per-epoch plans, stream states, and re-sharding them.

Vocabulary. A *stream* is one (data-parallel rank, DataLoader worker) pair; there are
``num_streams = dp_size * max(1, num_workers)`` of them, numbered ``dp_rank * W + worker``.
For each source and epoch, the shard order is a permutation seeded by (seed, source, epoch).
Each shard is cut into ``num_slices = ceil(num_streams / num_shards)`` interleaved slices (one
slice when there are enough shards), giving *units* ``(shard, slice)`` that are dealt
round-robin to the streams. A unit's documents are the slice ``[slice::num_slices]`` of a
permutation of the shard's documents seeded by (seed, source, epoch, shard); its *chunk* is
those documents joined with an EOD token after each one.

An *item* ``[epoch, shard, slice, num_slices, offset]`` is a unit plus the number of its chunk's
tokens already consumed. A stream's state per source is ``{"next_epoch": e, "queue": [items]}``:
the queue holds what is left of the epochs it has started, head first; when it runs dry the
stream appends its units of ``next_epoch``. The state is exact: re-reading the head item's
shard and skipping ``offset`` tokens puts the stream where it was.
"""

from __future__ import annotations

import numpy as np

from gptforge.data.errors import DataError

STATE_VERSION = 1


class StateError(DataError):
    """A loader state that cannot be restored into this configuration."""


def num_slices(num_shards: int, num_streams: int) -> int:
    return max(1, -(-num_streams // num_shards))


def epoch_items(seed: int, source: int, epoch: int, num_shards: int, stream: int,
                num_streams: int) -> list[list[int]]:
    """The items ``stream`` reads from ``source`` in ``epoch``, in reading order."""
    order = np.random.default_rng([seed, source, epoch]).permutation(num_shards)
    slices = num_slices(num_shards, num_streams)
    units = [(int(shard), j) for shard in order for j in range(slices)]
    return [[epoch, shard, j, slices, 0] for shard, j in units[stream::num_streams]]


def doc_order(seed: int, source: int, item: list[int], num_docs: int) -> np.ndarray:
    """Indices (file order) of the documents of ``item``'s unit, in reading order."""
    epoch, shard, j, slices, _ = item
    perm = np.random.default_rng([seed, source, epoch, shard, 1]).permutation(num_docs)
    return perm[j::slices]


def initial_stream_state(num_sources: int) -> dict:
    return {"sources": [{"next_epoch": 0, "queue": []} for _ in range(num_sources)],
            "blend_counts": [0] * num_sources}


def _remaining_items(src: dict, seed: int, source: int, num_shards: int, stream: int,
                     num_streams: int, until_epoch: int) -> list[list[int]]:
    """What one old stream has left of every epoch before ``until_epoch``."""
    items = [list(item) for item in src["queue"]]
    for epoch in range(src["next_epoch"], until_epoch):
        items += epoch_items(seed, source, epoch, num_shards, stream, num_streams)
    return items


def reshard(streams: list[dict], new_num_streams: int, seed: int,
            num_shards: list[int]) -> list[dict]:
    """Spread the old streams' unfinished work over ``new_num_streams`` new streams.

    Every epoch any old stream has started is completed exactly once across the new streams
    (partially read items keep their offsets); after that, the new streams follow the plan for
    ``new_num_streams``. Blend counters restart at zero.
    """
    old_num = len(streams)
    new = [initial_stream_state(len(num_shards)) for _ in range(new_num_streams)]
    for source, shards in enumerate(num_shards):
        until = max(st["sources"][source]["next_epoch"] for st in streams)
        left = []
        for stream, st in enumerate(streams):
            items = _remaining_items(st["sources"][source], seed, source, shards, stream,
                                     old_num, until)
            left += [(item[0], stream, pos, item) for pos, item in enumerate(items)]
        left.sort(key=lambda entry: entry[:3])
        for k, (_, _, _, item) in enumerate(left):
            new[k % new_num_streams]["sources"][source]["queue"].append(item)
        for st in new:
            st["sources"][source]["next_epoch"] = until
    return new


def merge_states(states: list[dict]) -> dict:
    """Combine every data-parallel rank's ``state_dict()`` (list indexed by dp_rank) into one
    global state: all streams in global order plus the settings they were made with."""
    if not states:
        raise StateError("merge_states: no states given")
    if states[0].get("version") == STATE_VERSION and "all_streams" in states[0]:
        return states[0]  # already global
    first = states[0]
    for rank, st in enumerate(states):
        if st.get("version") != STATE_VERSION:
            raise StateError(f"loader state of dp_rank {rank}: unknown version {st.get('version')}")
        if st["dp_rank"] != rank or st["dp_size"] != len(states):
            raise StateError(f"loader state at position {rank} is dp_rank {st['dp_rank']} of "
                             f"{st['dp_size']}; pass every rank's state, indexed by dp_rank")
        for key in ("num_workers", "seed", "num_shards"):
            if st[key] != first[key]:
                raise StateError(f"loader states disagree on {key}")
    return {"version": STATE_VERSION, "dp_size": len(states), "num_workers": first["num_workers"],
            "seed": first["seed"], "num_shards": first["num_shards"],
            "batches": [st["batches"] for st in states],
            "all_streams": [stream for st in states for stream in st["streams"]]}
