"""The loader: contract, DP/worker split, packing, resume (same and changed DP size), blending."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

from gptforge.data.loader import build_loader
from gptforge.data.synthetic import unique_docs, write_token_dataset
from gptforge.data.config import DataConfig, DataSourceConfig

VOCAB = 60000
EOD = 0


def make_cfg(*paths, weights=None, **kw) -> DataConfig:
    weights = weights or [1.0] * len(paths)
    return DataConfig(source="webdataset", sources=[DataSourceConfig(path=str(p), weight=w)
                                                    for p, w in zip(paths, weights)], **kw)


def loader(cfg, *, dp_rank=0, dp_size=1, seq=16, mbs=2, seed=7, split="train"):
    return build_loader(cfg, split=split, seq_length=seq, micro_batch_size=mbs, dp_rank=dp_rank,
                        dp_size=dp_size, seed=seed, vocab_size=VOCAB)


def take(it, n):
    return [next(it) for _ in range(n)]


def inputs(batches) -> np.ndarray:
    """The stream's tokens: input rows back to back (windows overlap by one token)."""
    return np.concatenate([b["tokens"].numpy().reshape(-1) for b in batches])


@pytest.fixture
def even_data(tmp_path):
    """4 shards x 8 docs x 11 tokens: a shard is 96 tokens with EODs = 3 batches of 2 x 16."""
    shards = unique_docs(4, 8, 11)
    write_token_dataset(tmp_path / "even", {"train": shards}, vocab_size=VOCAB, eod_id=EOD)
    return tmp_path / "even", shards


def epoch_multiset(shards) -> collections.Counter:
    tokens = np.concatenate([np.concatenate(docs) for docs in shards])
    return collections.Counter(tokens.tolist()) + collections.Counter(
        {EOD: sum(len(docs) for docs in shards)})


def test_batch_contract(even_data):
    batch = next(loader(make_cfg(even_data[0])))
    assert set(batch) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert batch["tokens"].dtype == torch.int64 and batch["tokens"].shape == (2, 16)
    assert batch["labels"].dtype == torch.int64 and batch["loss_mask"].dtype == torch.float32
    assert torch.equal(batch["tokens"][:, 1:], batch["labels"][:, :-1])
    assert torch.equal(batch["position_ids"][1], torch.arange(16))


@pytest.mark.parametrize("dp_size,num_workers", [(2, 2), (4, 0), (1, 0)])
def test_ranks_and_workers_cover_the_epoch_once(even_data, dp_size, num_workers):
    path, shards = even_data
    streams_per_rank = max(1, num_workers)
    per_stream_batches = 3 * 4 // (dp_size * streams_per_rank)
    seen = collections.Counter()
    for rank in range(dp_size):
        it = loader(make_cfg(path, num_workers=num_workers), dp_rank=rank, dp_size=dp_size)
        seen.update(inputs(take(it, per_stream_batches * streams_per_rank)).tolist())
    assert seen == epoch_multiset(shards)


def test_fewer_shards_than_streams_are_sliced(tmp_path):
    shards = unique_docs(1, 16, 11)  # 1 shard, 4 streams: 4 docs (48 tokens) per stream
    write_token_dataset(tmp_path / "one", {"train": shards}, vocab_size=VOCAB, eod_id=EOD)
    seen = collections.Counter()
    for rank in range(4):
        it = loader(make_cfg(tmp_path / "one"), dp_rank=rank, dp_size=4, mbs=1)
        seen.update(inputs(take(it, 3)).tolist())
    assert seen == epoch_multiset(shards)


def test_documents_are_packed_whole_with_eod_and_reshuffled_per_epoch(even_data):
    path, shards = even_data
    stream = inputs(take(loader(make_cfg(path)), 24))  # two epochs
    docs = {tuple(d.tolist()) for s in shards for d in s}
    pieces = np.split(stream, np.flatnonzero(stream == EOD) + 1)
    assert all(tuple(p[:-1].tolist()) in docs for p in pieces if len(p))
    first, second = stream[:384], stream[384:]
    assert collections.Counter(first.tolist()) == collections.Counter(second.tolist())
    assert not np.array_equal(first, second)


def test_reset_position_ids_and_attention_mask(even_data):
    cfg = make_cfg(even_data[0], reset_position_ids=True, reset_attention_mask=True)
    batch = next(loader(cfg, mbs=1, seq=16))
    tokens, pos = batch["tokens"][0], batch["position_ids"][0]
    eod_at = int(torch.nonzero(tokens == EOD)[0])  # docs are 11 tokens: EOD at 11
    assert eod_at == 11
    assert pos.tolist() == list(range(12)) + list(range(4))
    mask = batch["attention_mask"]
    assert mask.shape == (1, 1, 16, 16) and mask.dtype == torch.bool
    assert not mask[0, 0, 13, 12] and mask[0, 0, 13, 11] and mask[0, 0, 3, 4]
    assert not mask[0, 0, 11, 0]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_same_dp_size_is_exact(even_data, num_workers):
    cfg = make_cfg(even_data[0], num_workers=num_workers)
    for rank in range(2):
        reference = take(loader(cfg, dp_rank=rank, dp_size=2), 11)
        first = loader(cfg, dp_rank=rank, dp_size=2)
        take(first, 5)
        state = first.state_dict()
        resumed = loader(cfg, dp_rank=rank, dp_size=2)
        resumed.load_state_dict(state)
        for want, got in zip(reference[5:], take(resumed, 6)):
            assert torch.equal(want["tokens"], got["tokens"])
            assert torch.equal(want["labels"], got["labels"])


def epoch0_tokens_left(state, docs_per_shard=8, doc_length=11) -> list[int]:
    """Per stream of a restored loader: tokens of epoch 0 it still has to read."""
    left = []
    for stream in state["streams"]:
        src = stream["sources"][0]
        assert src["next_epoch"] == 1
        left.append(sum(len(range(j, docs_per_shard, m)) * (doc_length + 1) - off
                        for epoch, _, j, m, off in src["queue"] if epoch == 0))
    return left


@pytest.mark.parametrize("old_dp,old_workers,new_dp,steps",
                         [(2, 0, 1, 1), (1, 0, 2, 2), (2, 0, 3, 1), (3, 0, 2, 1), (1, 2, 2, 3)])
def test_resume_with_new_dp_size_repeats_and_skips_nothing(even_data, old_dp, old_workers,
                                                           new_dp, steps):
    path, shards = even_data
    seen = collections.Counter()
    old_states = []
    for rank in range(old_dp):
        it = loader(make_cfg(path, num_workers=old_workers), dp_rank=rank, dp_size=old_dp, mbs=1)
        seen.update(inputs(take(it, steps)).tolist())
        old_states.append(it.state_dict())
    for rank in range(new_dp):
        it = loader(make_cfg(path), dp_rank=rank, dp_size=new_dp, mbs=1)
        it.load_state_dict(old_states)
        (left,) = epoch0_tokens_left(it.state_dict())
        stream = inputs(take(it, left // 16 + 1))
        seen.update(stream[:left].tolist())
    assert seen == epoch_multiset(shards)
