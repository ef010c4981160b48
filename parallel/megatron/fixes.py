"""Our fixes for megatron-core 0.16.1, installed by ``apply()`` on CPU and GPU alike.

Each fix is the smallest monkeypatch we could find and carries a docstring that says what
upstream does wrong (a note for an upstream report). Line numbers are for the installed 0.16.1
sources (``megatron/core/...``).

=====  ==========================================================================================
name   what it fixes
=====  ==========================================================================================
spawn  ``filesystem_async._get_write_results_queue``: a *spawn* Manager on a process's first
       save (1.5-5 s measured; it re-imports ``__main__``)
writer ``FileSystemWriterAsync.write_preloaded_data_multiproc``: waits forever for a writer
       process that died (OOM-killed, or psutil missing) -- the save, so the run, hangs
a      ``DistributedOptimizer.state_dict``: asserts one Adam ``step`` in an empty state
b      ``DistributedOptimizer._set_main_param_and_optimizer_states``: copies ``step`` too
c      the same function runs without ``torch.no_grad`` on several load paths
d      ``DistributedOptimizer.load_state_dict``: one shared ``step`` tensor for every param
e      ``DistributedOptimizer.sharded_param_state_fully_reshardable``: slices the gathered
       state at padded buffer offsets, but the gathered state has the padding removed
warn   megatron's grad buffers call ``torch.distributed.reduce_scatter_tensor`` and
       ``all_gather_into_tensor``, deprecated since torch 2.13: a FutureWarning on every rank's
       console that its user cannot act on; filtered by its exact message, nothing else
=====  ==========================================================================================

Fixes a, b and d concern the torch-Adam path of the distributed optimizer (no Apex/TE: CPU, and
our GPU machines too); where Apex or Transformer Engine provides the optimizer they step aside.
c and e apply to every distributed optimizer. The checkpoint package's own distributed-optimizer
save and load (per-rank boxes, read in place) do not go through the code of b, c and e, but
megatron's own paths do (its fallback for unsupported optimizers, Megatron-LM-style tools);
a and d matter to both. ``disabled(*names)`` switches fixes off for a block, so that tests can
show each one matters.

Every target is listed in ``PATCHES`` (``common/patching.py``), with what the fixes only read:
a fix is installed only once its target is found and, where it re-writes an upstream body, that
body still hashes to what the fix was written against. Otherwise the engine build stops with
one line naming the target and the installed megatron-core version.
"""

from __future__ import annotations

import contextlib
import gc
import os
import pickle
import shutil
import tempfile
import warnings
import weakref
from queue import Empty

import torch

from gptforge.common.durable import Durability, write_atomic
from gptforge.common.patching import TESTED, Patches

FIXES = ("spawn", "writer", "a", "b", "c", "d", "e")
_FILESYSTEM_ASYNC = "megatron.core.dist_checkpointing.strategies.filesystem_async"
_DISTRIB_OPTIMIZER = "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer"

_disabled: set[str] = set()


@contextlib.contextmanager
def disabled(*names: str):
    """Run a block with the named fixes switched off (upstream behaviour); for tests."""
    unknown = set(names) - set(FIXES)
    if unknown:
        raise ValueError(f"unknown megatron fix(es) {sorted(unknown)}; known: {FIXES}")
    before = set(_disabled)
    _disabled.update(names)
    try:
        yield
    finally:
        _disabled.clear()
        _disabled.update(before)


def _on(name: str) -> bool:
    return name not in _disabled


# --------------------------------------------------------------------------------------------
# spawn: the per-process spawn Manager behind every torch_dist save
# --------------------------------------------------------------------------------------------

class FileResultsQueue:
    """``put`` / ``get_nowait`` for one save's write results, through a private temp file.

    Replaces ``filesystem_async._get_write_results_queue`` (filesystem_async.py:50-55).
    Upstream: ``mp.get_context("spawn").Manager().Queue()`` -- the first save of every process
    starts a spawn server process that re-imports ``__main__`` (1.5 s on an idle 2-core box,
    4-5 s measured on a loaded one, against 0.09 s with this fix for the tiny model; an entry
    script without a ``__main__`` guard re-runs itself and the save fails or hangs). The queue
    is only ever used for one message per save, written either in this process (sync save) or
    in a forked child (async save), and read here with ``get_nowait`` after the writer is done.

    Why not a plain fork-context ``mp.Queue``: a put in this process reaches the pipe through a
    feeder thread, so the immediate ``get_nowait`` can race it and report an empty queue; and a
    forked writer whose result exceeds the pipe buffer (~64 KiB: a few hundred WriteResults)
    cannot exit before the parent reads, while the parent joins it before reading (async
    finalize) -- a deadlock. A file written atomically (tmp + rename) has neither problem and
    needs no helper process. One queue per save (megatron asks for it once per save), so no
    stale message can be read by a later save.
    """

    def __init__(self):
        self._dir = tempfile.mkdtemp(prefix="gptforge-ckpt-results-")
        self._path = os.path.join(self._dir, "results.pkl")
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._dir, True)

    def put(self, obj) -> None:
        write_atomic(self._path, pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL),
                     Durability.ATOMIC)

    def get_nowait(self):
        try:
            with open(self._path, "rb") as f:
                # Our own message, written by this process or its forked writer a moment ago in
                # a 0700 temp dir: the same trust as a multiprocessing queue (which pickles too).
                obj = pickle.load(f)
        except FileNotFoundError:
            raise Empty from None
        os.unlink(self._path)
        return obj

    def get(self, block: bool = True, timeout: float | None = None):
        return self.get_nowait()


def _write_results_queue():
    if not _on("spawn"):
        return PATCHES.original("spawn")()
    return FileResultsQueue()


# --------------------------------------------------------------------------------------------
# writer: a checkpoint writer process that dies
# --------------------------------------------------------------------------------------------

WRITER_POLL_S = 1.0


def _write_preloaded_data_multiproc(transform_list, use_msc, rank, write_buckets,
                                    global_results_queue) -> None:
    """Fix (writer): one forked writer per bucket, as upstream, but a writer that dies fails
    the save instead of hanging it.

    Upstream (filesystem_async.py:235-340) ``count_queue.join()``s until every writer calls
    ``task_done``. A writer that dies first never does: an OOM kill, or megatron's own
    ``_process_memory()`` (:366, outside its try) raising where psutil is missing. The rank then
    waits forever inside the save, holding its allocation. Here the parent reads the results
    queue with a timeout and checks the writers' exit codes in between; a writer that exited
    without a result is reported (with its exit code; its traceback, if any, went to stderr)
    as the save's result, which megatron raises on the rank.
    """
    import multiprocessing as mp
    from functools import partial

    from megatron.core.dist_checkpointing.strategies.filesystem_async import \
        FileSystemWriterAsync

    if not _on("writer"):
        return PATCHES.original("writer").__func__(transform_list, use_msc, rank, write_buckets,
                                                   global_results_queue)
    ctx = mp.get_context("fork")
    results, count = ctx.Queue(), ctx.JoinableQueue()  # the writer's API needs both
    procs = []
    for i, bucket in enumerate(write_buckets):
        count.put(i)
        kwargs = dict(local_proc_idx=i, write_bucket=bucket, results_queue=results,
                      count_queue=count, use_fsync=True, **({"use_msc": True} if use_msc else {}))
        procs.append(ctx.Process(target=partial(FileSystemWriterAsync.write_preloaded_data,
                                                transform_list), kwargs=kwargs))
    for proc in procs:
        proc.start()
    written: dict = {}
    outcome = None
    suspect = None  # a writer found exited without a result at the last timeout
    while len(written) < len(procs) and outcome is None:
        try:
            index, result = results.get(timeout=WRITER_POLL_S)
        except Empty:
            dead = [i for i, p in enumerate(procs) if p.exitcode is not None and i not in written]
            if dead and dead[0] == suspect:  # still no result a poll later: it is lost
                code = procs[suspect].exitcode
                outcome = RuntimeError(
                    f"rank {rank}: checkpoint writer process {suspect} of {len(procs)} died "
                    f"(exit code {code}{', killed: out of memory?' if code < 0 else ''}) "
                    f"before writing its file; see its traceback above, if any")
            suspect = dead[0] if dead else None
            continue
        if isinstance(result, Exception):
            outcome = result
        else:
            written[index] = result
    for proc in procs:
        if outcome is not None and proc.is_alive():
            proc.kill()
        proc.join()
    global_results_queue.put(written if outcome is None else outcome)


# --------------------------------------------------------------------------------------------
# a-d: the distributed optimizer's torch-Adam path
# --------------------------------------------------------------------------------------------

def _torch_adam_path(opt) -> bool:
    """True where DistributedOptimizer keeps torch.optim.Adam's per-param ``step`` tensors."""
    from megatron.core.optimizer import distrib_optimizer as dopt

    return (not dopt.HAVE_APEX_OR_TE
            and not isinstance(opt.optimizer, dopt.HybridDeviceOptimizer)
            and not opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)


def _state_dict(self):
    """Fix (a): ``state_dict()`` of a distributed optimizer that has not stepped yet.

    Upstream (distrib_optimizer.py:639-642), torch-Adam path: ``steps = {s["step"] for s in
    inner_state["state"].values()}; assert len(steps) == 1``. Before the first optimizer step the
    Adam state is empty, so the assertion fails -- and ``sharded_state_dict(is_loading=True)``
    calls ``state_dict()`` first, so a checkpoint cannot be loaded into a freshly built
    optimizer (the normal resume case). Fix: while the state is empty, give every param a
    placeholder ``step`` of 0 for the duration of the call (the value upstream would need),
    then leave the state empty again, exactly as it was.
    """
    original = PATCHES.original("a")
    if not _on("a") or not _torch_adam_path(self) or len(self.optimizer.state) > 0:
        return original(self)
    zero = torch.zeros((), dtype=torch.float32)
    for group in self.optimizer.param_groups:
        for param in group["params"]:
            self.optimizer.state[param] = {"step": zero}
    try:
        return original(self)
    finally:
        self.optimizer.state.clear()


def _set_main_param_and_optimizer_states_b(self, model_param, tensors):
    """Fix (b): loading a param's optimizer state must not touch Adam's ``step``.

    Upstream (distrib_optimizer.py:936-940, non-precision-aware branch) copies every key of the
    live state, ``{"param": main_param, **optim_state}``, from ``tensors`` -- including
    ``step``, which the loaders never meant to provide: ``step`` is restored from
    ``param_groups`` by ``load_state_dict`` (distrib_optimizer.py:817-825). With
    ``fully_reshardable`` the loaded tensors have no ``step`` (KeyError); with
    ``dp_reshardable`` they carry a LocalNonpersistentObject holding the *pre-load* step, which
    silently overwrites the loaded one (Adam's bias correction restarts, training diverges from
    the uninterrupted run). Fix: copy param, exp_avg, exp_avg_sq; leave ``step`` alone.
    """
    original = PATCHES.original("b")
    if (not _on("b") or not _torch_adam_path(self)
            or self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8):
        return original(self, model_param, tensors)
    group_index, group_order = self.model_param_group_index_map[model_param]
    main_param = self.optimizer.param_groups[group_index]["params"][group_order]
    dst_tensors = {"param": main_param,
                   **{k: v for k, v in self.optimizer.state[main_param].items() if k != "step"}}
    for key, dst in dst_tensors.items():
        dst.copy_(tensors[key])


def _set_main_param_and_optimizer_states_c(self, model_param, tensors):
    """Fix (c): the optimizer-state load paths write into leaf views without ``no_grad``.

    Upstream: ``_set_main_param_and_optimizer_states`` does ``dst.copy_(src)`` where, for fp32
    models, the main param is a *view* of the model parameter (a leaf that requires grad).
    ``load_parameter_state_from_fully_reshardable`` and ``..._fs_model_space`` are decorated
    with ``@torch.no_grad()``, but ``load_parameter_state_from_dp_reshardable``
    (distrib_optimizer.py:1772) and ``..._dp_zero`` (:1965) are not, so loading those formats
    raises "a view of a leaf Variable that requires grad is being used in an in-place
    operation". Fix: run the setter itself under ``torch.no_grad()`` (covers every caller).
    """
    inner = _set_main_param_and_optimizer_states_b
    if not _on("c"):
        return inner(self, model_param, tensors)
    with torch.no_grad():
        return inner(self, model_param, tensors)


def _load_state_dict(self, state_dict):
    """Fix (d): after a load every param must own its Adam ``step`` tensor.

    Upstream (distrib_optimizer.py:817-825), torch-Adam path: ``step = torch.tensor(...)``
    once, then ``s["step"] = step`` for *every* param's state; torch's
    ``Optimizer.load_state_dict`` keeps a non-capturable ``step`` as is (no copy), so all params
    share one tensor. ``torch.optim.Adam`` increments ``state["step"]`` in place per param, so
    after a load the shared step advances by the number of params on this rank every iteration:
    bias correction goes wrong and training silently diverges from an uninterrupted run (loss
    off by ~1e-2 after a few steps on the tiny model). Fix: after the upstream load, give each
    param a private copy of its step.
    """
    PATCHES.original("d")(self, state_dict)
    if not _on("d") or not _torch_adam_path(self):
        return
    for state in self.optimizer.state.values():
        step = state.get("step")
        if isinstance(step, torch.Tensor):
            state["step"] = step.detach().clone()


def _world_offsets(buffer) -> dict:
    """``param_index_map`` with offsets into the gathered, inter-bucket-padding-free state."""
    shifts, unpadded_before = [], 0
    for bucket in buffer.buckets:
        shifts.append(bucket.offset - unpadded_before)
        unpadded_before += bucket.numel_unpadded
    return {param: (start - shifts[bucket_id], end - shifts[bucket_id], bucket_id)
            for param, (start, end, bucket_id) in buffer.param_index_map.items()}


def _sharded_param_state_fully_reshardable(self, model_sharded_state_dict, is_loading=False,
                                           metadata=None):
    """Fix (e): ``fully_reshardable`` saves wrong optimizer state for multi-bucket buffers.

    Upstream (distrib_optimizer.py:1404-1537) slices the gathered per-buffer state
    (``get_parameter_state_dp_zero``) with ``buffer.param_index_map`` offsets. Those offsets
    count the padding at the end of every bucket, but ``get_parameter_state_dp_zero`` builds the
    gathered tensors with that padding removed ("gets rid of the padding between buckets",
    :1108-1116). In a buffer with more than one bucket whose earlier bucket is padded, every
    param of a later bucket is read shifted by the padding: its saved param/exp_avg/exp_avg_sq
    are wrong (the "param range exceeds unpadded buffer ... padded with zeros which can lead to
    data corruption" warning, :1502-1517, is this bug). It happens whenever a buffer has several
    buckets: DDP bucketing, or PP>1 with shared embeddings, which megatron puts in a bucket of
    their own -- a PP=2 x VPP=2 resume diverges at the first step after the load. Fix: during
    the call, give each buffer a ``param_index_map`` shifted to the gathered layout (the
    method's only use of it; the checkpoint's keys and shapes do not change).
    """
    original = PATCHES.original("e")
    if not _on("e"):
        return original(self, model_sharded_state_dict, is_loading, metadata)
    saved = [buffer.param_index_map for buffer in self.buffers]
    try:
        for buffer in self.buffers:
            buffer.param_index_map = _world_offsets(buffer)
        return original(self, model_sharded_state_dict, is_loading, metadata)
    finally:
        for buffer, index_map in zip(self.buffers, saved):
            buffer.param_index_map = index_map


def _write_preloaded_data_multiproc_gc_off(*args, **kwargs) -> None:
    """As upstream: no garbage collection while the writers run (megatron's ``_disable_gc``)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        _write_preloaded_data_multiproc(*args, **kwargs)
    finally:
        if enabled:
            gc.enable()


# Each fix's target; a re-written upstream body carries the hash of the source it was written
# against (megatron-core 0.16.1): ``common/patching.py`` refuses to install over another.
PATCHES = Patches("megatron fix", "megatron-core", TESTED["megatron-core"])
PATCHES.add("spawn", f"{_FILESYSTEM_ASYNC}:_get_write_results_queue", _write_results_queue)
PATCHES.add("writer", f"{_FILESYSTEM_ASYNC}:FileSystemWriterAsync.write_preloaded_data_multiproc",
            staticmethod(_write_preloaded_data_multiproc_gc_off),
            copied_sha256="c6477519938bea8c")
PATCHES.add("writer's worker", f"{_FILESYSTEM_ASYNC}:FileSystemWriterAsync.write_preloaded_data")
PATCHES.add("a", f"{_DISTRIB_OPTIMIZER}.state_dict", _state_dict)
PATCHES.add("b", f"{_DISTRIB_OPTIMIZER}._set_main_param_and_optimizer_states",
            _set_main_param_and_optimizer_states_c, copied_sha256="0f5b599c6cb16c50")
PATCHES.add("d", f"{_DISTRIB_OPTIMIZER}.load_state_dict", _load_state_dict)
PATCHES.add("e", f"{_DISTRIB_OPTIMIZER}.sharded_param_state_fully_reshardable",
            _sharded_param_state_fully_reshardable)
# What _torch_adam_path reads to tell torch's Adam from Apex/TE's and the hybrid optimizer:
_DOPT = _DISTRIB_OPTIMIZER.split(":")[0]
PATCHES.add("a, b, d (Apex/TE check)", f"{_DOPT}:HAVE_APEX_OR_TE")
PATCHES.add("a, b, d (hybrid check)", f"{_DOPT}:HybridDeviceOptimizer")


def apply() -> None:
    """Install every fix (idempotent; each target checked, one line if one is missing). Call
    before building optimizers or saving checkpoints."""
    PATCHES.install()
    for name in ("reduce_scatter_tensor", "all_gather_into_tensor"):
        warnings.filterwarnings("ignore", category=FutureWarning,
                                message=rf"`torch\.distributed\.{name}` is deprecated")
