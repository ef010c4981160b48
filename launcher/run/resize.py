"""What a restart records about the work it lost and the size it came back at.

An elastic launch (torchrun ``--nnodes MIN:MAX``, ``gptforge launch slurm --nodes MIN-MAX``)
restarts every rank from ``latest`` when a node is lost or joins; the world size may differ.
The checkpoint's layout is reshaped on load (``parallel/``: weights and optimizer state; ``data/``:
the position, resharded over the new data-parallel ranks) and ``train.global_batch_size`` stays,
so the number of micro-batches changes instead: the same training. Here, on the logging rank:

- ``lost_work``: the steps done after the checkpoint that are done again (the last step record
  in metrics.jsonl before the restart), the seconds they took, and the seconds since that record
  (the failure, its detection, the rendezvous and the start-up);
- ``resize_record``: the ``resized`` event (from/to world size, data-parallel size and
  micro-batches per step) when the world size changed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from gptforge.common.metrics_file import read_records, step_records
from gptforge.parallel.layout import Layout


@dataclass(frozen=True)
class LostWork:
    steps: int  # done after the checkpoint, done again now
    seconds: float  # what those steps took
    down_seconds: float  # from the last record before the restart to now

    def fields(self) -> dict:
        return {"lost_steps": self.steps, "lost_seconds": round(self.seconds, 3),
                "down_seconds": round(self.down_seconds, 3)}


def lost_work(run_dir: str | Path, checkpoint_step: int, *, now: float | None = None) -> LostWork:
    """The training steps recorded after ``checkpoint_step`` (the restart's start) in
    ``run_dir``'s metrics.jsonl: the last record is where the previous attempt ended."""
    trained = [r for r in step_records(read_records(run_dir)) if "loss" in r and "time" in r]
    now = time.time() if now is None else now
    if not trained:
        return LostWork(0, 0.0, 0.0)
    last = trained[-1]
    steps = max(0, int(last["step"]) - checkpoint_step)
    at_checkpoint = [r for r in trained if r["step"] == checkpoint_step]
    seconds = last["time"] - at_checkpoint[-1]["time"] if steps and at_checkpoint else 0.0
    return LostWork(steps, max(0.0, seconds), max(0.0, now - last["time"]))


def saved_shape(manifest: dict) -> tuple[int, int, int]:
    """(world size, data-parallel size, micro-batches per step) of the run that saved."""
    lay, train = manifest["layout"], manifest["config"]["train"]
    dp = lay["data_parallel_size"]
    return lay["world_size"], dp, train["global_batch_size"] // (train["micro_batch_size"] * dp)


def resize_record(manifest: dict, layout: Layout, step: int) -> dict | None:
    """The ``resized`` event for a restart at another world size than the checkpoint's."""
    world, dp, microbatches = saved_shape(manifest)
    if world == layout.world_size:
        return None
    return {"event": "resized", "step": step, "from_world_size": world,
            "to_world_size": layout.world_size, "from_data_parallel_size": dp,
            "to_data_parallel_size": layout.data_parallel_size,
            "from_num_microbatches": microbatches, "to_num_microbatches": layout.num_microbatches}


def describe(record: dict) -> str:
    """One line for the console and the MLflow tag."""
    return (f"resized at step {record['step']}: world size {record['from_world_size']} -> "
            f"{record['to_world_size']} (data-parallel {record['from_data_parallel_size']} -> "
            f"{record['to_data_parallel_size']}, micro-batches per step "
            f"{record['from_num_microbatches']} -> {record['to_num_microbatches']}; the global "
            f"batch is the same); lost {record.get('lost_steps', 0)} steps "
            f"({record.get('lost_seconds', 0.0):.1f} s), {record.get('down_seconds', 0.0):.1f} s "
            f"down")
