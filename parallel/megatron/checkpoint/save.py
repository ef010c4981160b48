"""Saving: ``save_state`` writes one checkpoint directory, sync or async (``SaveHandle``)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException as DCPCheckpointException

from gptforge.common.durable import fsync_path
from gptforge.parallel.engine import CheckpointError
from gptforge.parallel.megatron import fixes as megatron_fixes
from gptforge.parallel.megatron.checkpoint.distopt import compact_cpu_views, optimizer_save_state
from gptforge.parallel.megatron.checkpoint.state import (
    COMMON_FILE, CONFIG_FILE, FORMAT_VERSION, FULLY_RESHARDABLE, METADATA_FILE, WrittenFile,
    gc_paused, model_sharded_state_dict, optimizer_kind, optimizer_step, sharded_metadata, unwrap)


def _dp_group():
    from megatron.core import parallel_state as ps

    try:
        return ps.get_data_parallel_group(with_context_parallel=True)
    except (AssertionError, RuntimeError):
        return None


def complete_params(model_chunks) -> None:
    """Every DP rank's parameters whole before a save reads them (collective over DP).

    With ``parallel.overlap_param_gather`` the distributed optimizer's step updates only this
    rank's shard, and megatron DDP's forward pre-hooks (``use_forward_hook``) all-gather the rest
    in the next forward. A save reads the weights outside any forward, so it finishes that
    all-gather first, as Megatron-LM does before its saves (``disable_forward_pre_hook``).
    """
    for chunk in model_chunks:
        if getattr(chunk, "use_forward_hook", False):
            chunk.start_param_sync(force_sync=True)


def _same_directory(directory: Path) -> None:
    """Every rank must name the same directory (else each would write a different half)."""
    names = [None] * dist.get_world_size()
    dist.all_gather_object(names, str(directory))
    if len(set(names)) > 1:
        raise CheckpointError(f"{directory}: ranks name different checkpoint directories: "
                              f"{sorted(set(names))[:4]}")


def _rank0_prepare_dir(directory: Path) -> None:
    """Rank 0 creates the directory and refuses a non-empty one; every rank learns the verdict."""
    _same_directory(directory)
    error = None
    if dist.get_rank() == 0:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            leftovers = sorted(os.listdir(directory))
            if leftovers:
                error = (f"{directory}: checkpoint directory is not empty ({leftovers[:5]}); "
                         "save into a fresh directory")
        except OSError as e:
            error = f"{directory}: cannot create checkpoint directory: {e}"
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0]:
        raise CheckpointError(box[0])



class SaveHandle:
    """One save in progress (async) or done (sync).

    ``wait()`` is collective: call it on every rank at a step boundary. It returns once every
    rank's files are written and fsynced (directory entries too) and DCP's ``.metadata`` (the
    index, written last) exists. ``files`` then lists what this rank wrote, with sizes.
    ``blocked_s`` is how long ``save_state`` held the training loop; ``total_s`` the time from
    the call to the end of ``wait()``; ``timings`` this rank's seconds per phase (prepare_dir,
    state_dict, plan, stage or write, finalize, fsync).
    """

    def __init__(self, directory: Path, async_save: bool, started: float):
        self.directory = directory
        self.async_save = async_save
        self._started = started
        self._queue = None  # megatron AsyncCallsQueue while writes are in flight
        self._files: list[WrittenFile] | None = None
        self.blocked_s: float | None = None
        self.total_s: float | None = None
        self.timings: dict[str, float] = {}  # seconds per phase, this rank

    @property
    def done(self) -> bool:
        return self._files is not None

    @property
    def files(self) -> list[WrittenFile]:
        if self._files is None:
            raise RuntimeError(f"{self.directory}: call wait() before reading files")
        return list(self._files)

    def poll(self) -> bool:
        """Collective, non-blocking: finish the save if every rank's writer is done."""
        if not self.done and self._finalize(blocking=False):
            self._finish()
        return self.done

    def wait(self) -> "SaveHandle":
        """Collective: block until every rank's files are durable; idempotent."""
        if not self.done:
            start = time.perf_counter()
            self._finalize(blocking=True)
            self.timings["finalize"] = time.perf_counter() - start
            self._finish()
            self.timings["fsync"] = time.perf_counter() - start - self.timings["finalize"]
        return self

    def _finalize(self, blocking: bool) -> bool:
        """megatron's collective finalize: .metadata (rank 0) once every writer is done."""
        if self._queue is None:
            return True
        try:
            done = bool(self._queue.maybe_finalize_async_calls(blocking=blocking))
        except (Exception, DCPCheckpointException) as e:  # raised on every rank
            self._queue = None
            raise CheckpointError(f"{self.directory}: save failed: {e}") from e
        return done

    def _finish(self) -> None:
        self._queue = None
        rank = dist.get_rank()
        names = [n for n in os.listdir(self.directory)
                 if n.startswith(f"__{rank}_") and n.endswith(".distcp")]
        if rank == 0:
            names += [n for n in (METADATA_FILE, COMMON_FILE, CONFIG_FILE)
                      if (self.directory / n).exists()]
        files = []
        for name in sorted(names):
            path = self.directory / name
            fsync_path(path)  # shard files and .metadata are fsynced already: cheap
            files.append(WrittenFile(name, path.stat().st_size))
        fsync_path(self.directory)
        dist.barrier()
        self._files = files
        self.total_s = time.perf_counter() - self._started


def save_state(model_chunks, optimizer, scheduler, directory, *, async_save: bool = False,
               previous: SaveHandle | None = None, sharding: str = FULLY_RESHARDABLE,
               own_distopt: bool = True) -> SaveHandle:
    """Collective: write model chunks, optimizer and scheduler state into ``directory``.

    ``directory`` must be new or empty (rank 0 creates it). Sync: returns when every rank's
    files are durable. Async: returns once the state is staged (tensors copied off the device;
    on CPU the forked writer's copy-on-write snapshot) and a background process writes; call
    ``handle.wait()`` (collective) at a later step boundary. One save is in flight at a time:
    the caller passes its ``previous`` handle, which is finished first.

    ``sharding``: how the distributed optimizer's state is laid out on disk (megatron's
    names). ``own_distopt``: write the distributed optimizer's boxes without a DP gather
    (``distopt.py``); False takes megatron's own gathering save (its fixes are tested on it).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelSaveStrategyWrapper)
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    megatron_fixes.apply()
    if previous is not None:
        previous.wait()
    started = time.perf_counter()
    handle = SaveHandle(Path(directory), async_save, started)
    directory = handle.directory
    clock = _Clock(handle.timings)
    _rank0_prepare_dir(directory)
    clock("prepare_dir")

    complete_params(model_chunks)
    chunks = unwrap(model_chunks)
    meta = sharded_metadata(sharding)
    with gc_paused():  # thousands of small objects: a full collection here costs ~0.2 s
        state = model_sharded_state_dict(chunks)
        state["optimizer"] = optimizer_save_state(optimizer, state, meta, own=own_distopt)
        compact_cpu_views(state)
    state["opt_param_scheduler"] = scheduler.state_dict()
    state["gptforge"] = {"format": FORMAT_VERSION, "optimizer_kind": optimizer_kind(optimizer),
                         "optimizer_step": optimizer_step(optimizer),
                         "optimizer_sharding": sharding}
    clock("state_dict")

    strategy = TorchDistSaveShardedStrategy("torch_dist", 1)
    group = _dp_group()
    if group is not None and dist.get_world_size(group) > 1:
        strategy = FullyParallelSaveStrategyWrapper(strategy, group)
    try:
        request = dist_checkpointing.save(state, str(directory), strategy,
                                          async_sharded_save=True, content_metadata=meta)
        clock("plan")  # common.pt, validation, fully-parallel distribution, DCP plan
        if async_save:
            handle._queue = AsyncCallsQueue(persistent=False)  # persistent: CUDA-only worker
            handle._queue.schedule_async_request(request)
            clock("stage")  # device-to-host copies (GPU) and the writer's fork
        else:
            request.execute_sync()
            clock("write")
    except (Exception, DCPCheckpointException) as e:  # DCP's is a BaseException
        raise CheckpointError(f"{directory}: save failed: {e}") from e
    if not async_save:
        handle._finish()
        clock("fsync")
    handle.blocked_s = time.perf_counter() - started
    return handle


class _Clock:
    """Adds the seconds since the last call to ``timings[phase]``."""

    def __init__(self, timings: dict):
        self.timings, self.last = timings, time.perf_counter()

    def __call__(self, phase: str) -> None:
        now = time.perf_counter()
        self.timings[phase] = self.timings.get(phase, 0.0) + now - self.last
        self.last = now
