"""The restart's record of lost work and of a new world size (launcher/run/resize.py)."""

from __future__ import annotations

import json

from gptforge.launcher.run.resize import describe, lost_work, resize_record
from gptforge.parallel.layout import Layout


def _metrics(run_dir, rows, tail: str = ""):
    lines = [json.dumps(row) for row in rows]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n" + tail)


def test_lost_work_is_the_steps_after_the_checkpoint_and_their_time(tmp_path):
    _metrics(tmp_path, [
        {"time": 100.0, "step": 9, "loss": 3.0},
        {"time": 101.0, "step": 10, "loss": 2.9},
        {"time": 101.5, "step": 10, "val_loss": 2.8},  # a validation is not a training step
        {"time": 101.6, "event": "stopped", "step": 10},
        {"time": 104.0, "step": 11, "loss": 2.8},
        {"time": 107.0, "step": 12, "loss": 2.7},
    ], tail='{"time": 108.0, "step": 13, "lo')  # a line cut off by the crash
    lost = lost_work(tmp_path, 10, now=130.0)
    assert (lost.steps, lost.seconds, lost.down_seconds) == (2, 6.0, 23.0)
    assert lost_work(tmp_path, 12, now=130.0).steps == 0  # saved at the last step: none lost
    assert lost_work(tmp_path / "none", 5).fields() == {"lost_steps": 0, "lost_seconds": 0.0,
                                                         "down_seconds": 0.0}


def _layout(world_size, dp, microbatches) -> Layout:
    return Layout(world_size=world_size, tensor_model_parallel_size=world_size // dp,
                  pipeline_model_parallel_size=1, virtual_pipeline_model_parallel_size=None,
                  data_parallel_size=dp, micro_batch_size=2, global_batch_size=8,
                  num_microbatches=microbatches, padded_vocab_size=256)


def test_a_resize_is_recorded_only_at_another_world_size():
    manifest = {"layout": {"world_size": 2, "data_parallel_size": 2},
                "config": {"train": {"global_batch_size": 8, "micro_batch_size": 2}}}
    assert resize_record(manifest, _layout(2, 2, 2), 20) is None
    record = resize_record(manifest, _layout(1, 1, 4), 20)
    assert record == {"event": "resized", "step": 20, "from_world_size": 2, "to_world_size": 1,
                      "from_data_parallel_size": 2, "to_data_parallel_size": 1,
                      "from_num_microbatches": 2, "to_num_microbatches": 4}
    line = describe({**record, "lost_steps": 3, "lost_seconds": 1.25, "down_seconds": 9.0})
    assert line.startswith("resized at step 20: world size 2 -> 1 (data-parallel 2 -> 1, "
                           "micro-batches per step 2 -> 4")
    assert "lost 3 steps (1.2 s), 9.0 s down" in line


def test_a_lost_peer_and_a_timeout_are_one_line_user_errors():
    """What a surviving rank says when a node dies (gloo: connection reset) or hangs."""
    from gptforge.common.errors import UserError
    from gptforge.parallel.context import CollectiveTimeout, PeerLost, collective_timeout

    reset = RuntimeError("[../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:22918: "
                         "Connection reset by peer. This is typically caused by a remote worker")
    lost = collective_timeout(reset, 10)
    assert isinstance(lost, PeerLost) and isinstance(lost, UserError)
    assert "lost its connection to another rank" in str(lost) and "\n" not in str(lost)
    assert "Read error [127.0.0.1]:22918: Connection reset by peer)" in str(lost)
    waited = collective_timeout(RuntimeError("[gloo] Timed out waiting 15000ms for recv"), 0.25)
    assert isinstance(waited, CollectiveTimeout)
    assert "parallel.distributed_timeout_minutes=0.25 " in str(waited)
    assert collective_timeout(RuntimeError("CUDA out of memory"), 10) is None
    assert collective_timeout(ValueError("Connection reset by peer"), 10) is None
