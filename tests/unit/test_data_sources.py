"""Loader sources: path kinds, blending by weight, and every kind of bad input."""

from __future__ import annotations

import json
import logging
import tarfile

import numpy as np
import pytest


from gptforge.data.loader import build_loader
from gptforge.data.shardspec import SourceError
from gptforge.data.shards import ShardError
from gptforge.data.synthetic import unique_docs, write_token_dataset
from gptforge.data.tokenizer import TokenizerError
from gptforge.data.config import DataConfig, DataSourceConfig

VOCAB = 60000




def cfg_for(*paths, weights=None, **kw):
    weights = weights or [1.0] * len(paths)
    return DataConfig(source="webdataset", sources=[
        DataSourceConfig(path=str(p), weight=w) for p, w in zip(paths, weights)], **kw)


def first_batches(cfg, n=1, vocab_size=VOCAB, split="train", mbs=2):
    it = build_loader(cfg, split=split, seq_length=16, micro_batch_size=mbs, dp_rank=0,
                      dp_size=1, seed=3, vocab_size=vocab_size)
    return [next(it) for _ in range(n)]


@pytest.fixture
def data_dir(tmp_path):
    write_token_dataset(tmp_path / "d", {"train": unique_docs(3, 6, 9, first_token=10),
                                         "valid": unique_docs(1, 4, 9, first_token=50000)},
                        vocab_size=VOCAB, eod_id=0)
    return tmp_path / "d"


def tokens_of(batches) -> set[int]:
    return set(np.concatenate([b["tokens"].numpy().ravel() for b in batches]).tolist()) - {0, 2}


def test_directory_glob_brace_and_pipe_sources_read_the_same_tokens(data_dir, tiny_tokenizer):
    want = tokens_of(first_batches(cfg_for(data_dir), 20))
    assert len(want) == 3 * 6 * 9
    for spec in [f"{data_dir}/train-*.tar", f"{data_dir}/train-{{000000..000002}}.tar"]:
        assert tokens_of(first_batches(cfg_for(spec), 20)) == want, spec
    pipe = f"pipe:cat {data_dir}/train-{{000000..000002}}.tar"  # no index: EOD from tokenizer
    batches = first_batches(cfg_for(pipe, tokenizer_model=str(tiny_tokenizer)), 20)
    assert tokens_of(batches) == want
    assert 2 in np.concatenate([b["tokens"].numpy().ravel() for b in batches])


def test_failing_pipe_command_is_named(tiny_tokenizer):
    cfg = cfg_for("pipe:cat /nonexistent.tar", tokenizer_model=str(tiny_tokenizer))
    with pytest.raises(ShardError, match="pipe:cat /nonexistent.tar"):
        first_batches(cfg)


def test_valid_split_comes_from_the_directory_index(data_dir):
    got = tokens_of(first_batches(cfg_for(data_dir), 3, split="valid"))
    assert got and min(got) >= 50000


def test_blend_weights_give_token_shares(tmp_path):
    write_token_dataset(tmp_path / "a", {"train": unique_docs(2, 50, 30, first_token=1)},
                        vocab_size=VOCAB, eod_id=0)
    write_token_dataset(tmp_path / "b", {"train": unique_docs(2, 50, 30, first_token=30000)},
                        vocab_size=VOCAB, eod_id=0)
    batches = first_batches(cfg_for(tmp_path / "a", tmp_path / "b", weights=[0.7, 0.3]), 500,
                            mbs=8)
    tokens = np.concatenate([b["tokens"].numpy().ravel() for b in batches])
    tokens = tokens[tokens != 0]
    share_a = float(np.mean(tokens < 30000))
    assert abs(share_a - 0.7) < 0.02, share_a


def test_missing_shard_is_named(data_dir):
    (data_dir / "train-000001.tar").unlink()
    with pytest.raises(SourceError, match="train-000001.tar"):
        first_batches(cfg_for(data_dir))
    with pytest.raises(SourceError, match="train-000001.tar: shard not found"):
        first_batches(cfg_for(f"{data_dir}/train-{{000000..000009}}.tar"))


def test_missing_shard_is_skipped_with_skip_corrupt(data_dir, caplog):
    (data_dir / "train-000001.tar").unlink()
    with caplog.at_level(logging.WARNING):
        batches = first_batches(cfg_for(data_dir, skip_corrupt=True), 20)
    assert len(tokens_of(batches)) == 2 * 6 * 9
    assert "train-000001.tar" in caplog.text


def truncate(path, keep_fraction=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])


@pytest.mark.parametrize("damage", ["truncate", "garbage", "cut_at_member"])
def test_truncated_or_corrupt_tar_is_named(data_dir, damage):
    shard = data_dir / "train-000000.tar"
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        shard.write_bytes(data[: len(data) // 2 + 100])
    elif damage == "garbage":
        data[2048:2560] = b"\xff" * 512
        shard.write_bytes(data)
    else:  # a whole number of members, no end-of-archive blocks: only index.json can tell
        shard.write_bytes(data[:1024 * 3])
    with pytest.raises(ShardError, match="train-000000.tar"):
        first_batches(cfg_for(data_dir), 30)


def test_corrupt_tar_is_skipped_with_skip_corrupt(data_dir, caplog):
    truncate(data_dir / "train-000000.tar")
    with caplog.at_level(logging.WARNING):
        batches = first_batches(cfg_for(data_dir, skip_corrupt=True), 30)
    assert batches and "train-000000.tar" in caplog.text


def test_member_that_is_not_token_data_is_named(tmp_path, data_dir):
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        for name, payload in [("0001.u16", b"\x01\x00\x02\x00"), ("0002.txt", b"hello"),
                              ("0003.u16", b"\x01\x00\x02")]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, __import__("io").BytesIO(payload))
    cfg = cfg_for(str(bad), tokenizer_model="")
    with pytest.raises(SourceError, match="bad.tar"):  # no index: end-of-document id unknown
        first_batches(cfg)
    (tmp_path / "index.json").write_text(json.dumps({"splits": {}, "eod_id": 0, "vocab_size": 10}))
    with pytest.raises(ShardError, match=r"bad.tar.*0002.txt.*not token data"):
        first_batches(cfg_for(str(bad)))


def test_vocab_larger_than_the_model_is_named(data_dir):
    with pytest.raises(SourceError, match="index.json.*60000.*1000"):
        first_batches(cfg_for(data_dir), vocab_size=1000)


def test_token_ids_beyond_the_vocab_are_named_without_an_index(data_dir):
    (data_dir / "index.json").rename(data_dir / "moved.json")
    index = json.loads((data_dir / "moved.json").read_text())
    index.pop("vocab_size")
    (data_dir / "index.json").write_text(json.dumps(index))
    with pytest.raises(ShardError, match="train-00000.\\.tar.*token id"):
        first_batches(cfg_for(data_dir), vocab_size=100)


def test_tokenizer_hash_mismatch_is_named(data_dir, tmp_path, tiny_tokenizer):
    index = json.loads((data_dir / "index.json").read_text())
    index["tokenizer"]["sha256"] = "0" * 64
    (data_dir / "index.json").write_text(json.dumps(index))
    with pytest.raises(SourceError, match=f"{data_dir}/index.json.*{tiny_tokenizer.name}"):
        first_batches(cfg_for(data_dir, tokenizer_model=str(tiny_tokenizer)))
    with pytest.raises(TokenizerError, match="nope.model"):
        first_batches(cfg_for(data_dir, tokenizer_model=str(tmp_path / "nope.model")))


def test_empty_inputs_are_errors_not_hangs(tmp_path):
    write_token_dataset(tmp_path / "e", {"train": [[], []]}, vocab_size=VOCAB, eod_id=0)
    with pytest.raises(SourceError, match="no documents"):
        first_batches(cfg_for(tmp_path / "e"))
    with pytest.raises(SourceError, match="matches no shards"):
        first_batches(cfg_for(f"{tmp_path}/nothing-*.tar"))
    with pytest.raises(SourceError, match="data.sources"):
        first_batches(DataConfig(source="webdataset"))
    with pytest.raises(SourceError, match="no 'valid' shards"):
        first_batches(cfg_for(tmp_path / "e"), split="valid")
