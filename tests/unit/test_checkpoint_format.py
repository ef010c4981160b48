"""The checkpoint format in process: `latest`, retention, and the layout-free data position."""

from __future__ import annotations

import collections
import json

import numpy as np

from gptforge.common.durable import Durability, write_atomic
from gptforge.data.loader import build_loader
from gptforge.data.mock import MockBatches
from gptforge.data.synthetic import unique_docs, write_token_dataset
from gptforge.data.config import DataConfig, DataSourceConfig
from gptforge.launcher.run.checkpoint import format as ck
from gptforge.launcher.run.checkpoint.checkpointer import global_loader_state
from tests.unit.test_data_loader import epoch0_tokens_left


def _fake_checkpoint(save, step):
    d = save / ck.step_name(step)
    d.mkdir(parents=True)
    (d / ck.MANIFEST).write_text(json.dumps({"format": ck.FORMAT, "step": step, "files": {}}))
    return d


def test_latest_is_trusted_only_when_its_manifest_hash_matches(tmp_path):
    for step in (2, 4, 6):
        _fake_checkpoint(tmp_path, step)
    (tmp_path / "step-0000008.partial").mkdir()
    write_atomic(tmp_path / ck.LATEST,
                 f"step-0000004 {ck._sha256(tmp_path / 'step-0000004' / ck.MANIFEST)}\n",
                 Durability.DIRECTORY)
    assert ck.read_latest(tmp_path).name == "step-0000004"
    (tmp_path / "step-0000004" / ck.MANIFEST).write_text("{}")  # changed behind its back
    assert ck.read_latest(tmp_path).name == "step-0000006"  # newest complete instead
    assert ck.resolve(tmp_path / "step-0000002").name == "step-0000002"


def test_retention_keeps_the_newest_and_protected_ones(tmp_path):
    dirs = [_fake_checkpoint(tmp_path, s) for s in (1, 2, 3, 4, 5)]
    removed = ck.apply_retention(tmp_path, 2, protect={dirs[0].resolve()})
    assert [p.name for p in removed] == ["step-0000002", "step-0000003"]
    assert [p.name for p in ck.complete_checkpoints(tmp_path)] == [
        "step-0000001", "step-0000004", "step-0000005"]


def test_mock_position_is_global_and_restores_at_another_dp_size():
    kwargs = dict(split="train", seq_length=8, micro_batch_size=2, global_batch_size=8, seed=3,
                  vocab_size=100)
    whole = MockBatches(dp_rank=0, dp_size=1, **kwargs)
    reference = [next(whole)["tokens"] for _ in range(4 * 4)]  # 4 steps of 4 micro-batches
    old = [MockBatches(dp_rank=r, dp_size=2, **kwargs) for r in range(2)]
    for it in old:
        for _ in range(2 * 2):  # 2 steps of 2 micro-batches
            next(it)
    state = json.loads(json.dumps(global_loader_state([it.state_dict() for it in old])))
    new = MockBatches(dp_rank=0, dp_size=1, **kwargs)
    new.load_state_dict(state)
    for want in reference[8:]:  # steps 3 and 4 of the one-rank run
        assert (next(new)["tokens"] == want).all()


def _epoch_tokens(shards) -> collections.Counter:
    tokens = np.concatenate([np.concatenate(docs) for docs in shards]).tolist()
    return collections.Counter(tokens) + collections.Counter({0: sum(map(len, shards))})


def test_webdataset_position_through_the_manifest_repeats_and_skips_nothing(tmp_path):
    """DP=2 → DP=1 and DP=1 → DP=2 through global_loader_state and JSON, as a checkpoint does."""
    shards = unique_docs(4, 8, 11)
    write_token_dataset(tmp_path / "d", {"train": shards}, vocab_size=60000, eod_id=0)
    cfg = DataConfig(source="webdataset", sources=[DataSourceConfig(path=str(tmp_path / "d"))])

    def loader(rank, size):
        return build_loader(cfg, split="train", seq_length=16, micro_batch_size=1,
                            dp_rank=rank, dp_size=size, seed=7, vocab_size=60000)

    for old_size, new_size in ((2, 1), (1, 2)):
        seen = collections.Counter()
        old = [loader(r, old_size) for r in range(old_size)]
        for it in old:
            for _ in range(2):
                seen.update(next(it)["tokens"].reshape(-1).tolist())
        state = json.loads(json.dumps(global_loader_state([it.state_dict() for it in old])))
        for r in range(new_size):
            it = loader(r, new_size)
            it.load_state_dict(state)
            (mine,) = epoch0_tokens_left(it.state_dict())
            tokens = []
            while len(tokens) < mine:
                tokens += next(it)["tokens"].reshape(-1).tolist()
            seen.update(tokens[:mine])
        assert seen == _epoch_tokens(shards), (old_size, new_size)


def _engine_checkpoint(save, cfg, engine: str, **extra):
    """A step directory whose manifest says ``engine`` saved it (no tensors: none are read)."""
    from gptforge.launcher.config import to_dict

    d = save / ck.step_name(3)
    d.mkdir(parents=True)
    manifest = {"format": ck.FORMAT, "step": 3, "files": {}, "config": to_dict(cfg),
                "layout": {"engine": engine}, **extra}
    (d / ck.MANIFEST).write_text(json.dumps(manifest))
    return d


def test_a_checkpoint_of_the_other_engine_is_refused_before_any_model(tmp_path):
    """find_start (the front door's preflight and each rank, before the model) names both
    engines, the checkpoint and the ways out: for the run's own checkpoints a new run dir or
    overwrite; from deepspeed to megatron also `gptforge convert zero-to-fp32`."""
    import pytest

    from gptforge.launcher.config import load_config
    from gptforge.launcher.run.entry import find_start
    from gptforge.parallel.engine import CheckpointError
    from tests.conftest import TINY

    def cfg(*overrides):
        return load_config([TINY], [f"--run.dir={tmp_path / 'run'}", *overrides])

    own = _engine_checkpoint(tmp_path / "run" / "checkpoints", cfg(), "megatron")
    with pytest.raises(CheckpointError) as info:
        find_start(cfg("--parallel.engine=deepspeed"))
    line = str(info.value)
    for part in (own, "saved by the megatron engine", "parallel.engine=deepspeed",
                 "--parallel.engine=megatron", "--run.dir", "--run.overwrite=true"):
        assert str(part) in line, (part, line)
    assert "\n" not in line and "zero-to-fp32" not in line
    assert find_start(cfg()).checkpoint == own  # the same engine resumes
    assert find_start(cfg("--parallel.engine=deepspeed", "--run.overwrite=true")).checkpoint \
        is None  # overwrite: the old checkpoints are not the start

    ds = _engine_checkpoint(tmp_path / "ds", cfg(), "deepspeed")
    with pytest.raises(CheckpointError) as info:
        find_start(cfg(f"--checkpoint.load={ds}", "--checkpoint.enabled=false"))
    line = str(info.value)
    for part in (ds, "saved by the deepspeed engine", "parallel.engine=megatron",
                 f"gptforge convert zero-to-fp32 --checkpoint {ds}", "--checkpoint.load_optim"):
        assert str(part) in line, (part, line)
    assert "--run.overwrite" not in line

    weights = _engine_checkpoint(tmp_path / "conv", cfg(), "megatron", weights_only=True)
    with pytest.raises(CheckpointError, match="checkpoint.load_optim=false"):
        find_start(cfg(f"--checkpoint.load={weights}", "--checkpoint.enabled=false"))
    assert find_start(cfg(f"--checkpoint.load={weights}", "--checkpoint.enabled=false",
                          "--checkpoint.load_optim=false")).checkpoint == weights
