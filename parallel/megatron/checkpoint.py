"""Engine-level, collective checkpoint primitives over megatron-core ``dist_checkpointing``.

``save_state`` / ``load_state`` write and read one checkpoint directory of this rank's model
chunks, optimizer and LR scheduler; the checkpoint module (manifest, ``latest``, retention, RNG,
loader state, signals) is built on top of them. Every function here is collective: call it on
every rank, in the same order.

On disk (one directory, torch_dist backend, the layout Megatron-LM writes)::

    metadata.json        megatron's {"sharded_backend": "torch_dist", ...}         (rank 0)
    common.pt            non-sharded state: scheduler, optimizer param groups,     (rank 0)
                         content metadata, our "gptforge" record (format, step...)
    .metadata            DCP index: every tensor's global shape and where it lives (rank 0)
    __<rank>_<i>.distcp  tensor data written by <rank> (i < 2 writer processes)    (any rank)

Tensor keys do not depend on the layout: ``embedding.word_embeddings.weight``,
``decoder.layers.mlp.linear_fc1.weight`` (layers stacked on a leading axis, so a PP/VPP stage
addresses its slice), ``optimizer.state.{param,exp_avg,exp_avg_sq}.<model key>`` (Adam state in
the model's shape). The optimizer state is megatron's ``fully_reshardable`` content (metadata
``distrib_optim_sharding_type``), so a checkpoint loads into any TP / PP / VPP / DP layout, with
the distributed optimizer on or off, and Megatron-LM's own loader reads it. The distributed
optimizer writes it without megatron's DP all-gather: each rank writes the boxes of each param it
owns, and loads its boxes straight into its state (see "without a DP gather" below).

Async saves (``async_save=True``) hold the training loop only while the state dicts are built and
planned and the writer is forked (on GPUs: plus the copy to host); a background process writes
and fsyncs, and ``SaveHandle.wait()`` (collective) finishes the save at a step boundary.

Loading never unpickles arbitrary objects: ``.metadata`` goes through a restricted unpickler
that only builds torch.distributed.checkpoint's metadata classes, ``common.pt`` and every tensor
item through ``torch.load(weights_only=True)``; every zip record's CRC-32 is checked before it is
deserialised (``torch.load`` itself does not, so a flipped bit would load silently).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import io
import json
import os
import pickle
import time
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException as DCPCheckpointException

from gptforge.common.durable import fsync_path
from gptforge.parallel.megatron import fixes as megatron_fixes
from gptforge.parallel.engine import CheckpointError  # noqa: F401 (one class for every engine)

FORMAT_VERSION = 1
COMMON_FILE = "common.pt"
METADATA_FILE = ".metadata"
CONFIG_FILE = "metadata.json"
# Sharding of the distributed optimizer's state on disk. Only ``fully_reshardable`` reshards
# across TP/PP and DP; ``dp_reshardable`` (DP only) is kept for the fix (c) test.
_SAVE_SHARDING_TYPE = "fully_reshardable"
_OPTIM_PREFIX = "optimizer."
# Save / load the distributed optimizer's state as per-rank boxes (no DP gather, in place; see
# below). False: megatron's own fully_reshardable save / load (tests use them to exercise the
# megatron_fixes of those paths).
_OWN_DISTOPT_SAVE = True
_OWN_DISTOPT_LOAD = True


class WrittenFile(NamedTuple):
    path: str  # relative to the checkpoint directory
    bytes: int


# --------------------------------------------------------------------------------------------
# state dicts
# --------------------------------------------------------------------------------------------

def _unwrap(model_chunks) -> list:
    from megatron.core.utils import unwrap_model

    return unwrap_model(list(model_chunks))


def _model_sharded_state_dict(chunks) -> dict:
    """Megatron-LM's layout: ``model`` for one chunk, ``model0``, ``model1``... for VPP.

    The dict keys only place non-sharded leaves; every tensor is addressed by its ShardedTensor
    key, which is global (layer offsets included), so any VPP split reads any other's files.
    """
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def _inner_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def _is_distributed(opt) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return isinstance(opt, DistributedOptimizer)


def _optimizer_kind(optimizer) -> str:
    kinds = {"distributed" if _is_distributed(o) else "standard"
             for o in _inner_optimizers(optimizer)}
    return kinds.pop() if len(kinds) == 1 else "mixed"


def _optimizer_step(optimizer) -> int:
    """Adam's step (the same for every param): 0 before the first optimizer step."""
    steps = set()
    for opt in _inner_optimizers(optimizer):
        per_param = {int(s["step"]) for s in opt.optimizer.state.values() if "step" in s}
        # Fused Adams keep it in the group. torch's Adam does not, but a load can leave a stale
        # "step" there (the distributed optimizer's saved param groups carry one): not read.
        per_group = {int(g["step"]) for g in opt.optimizer.param_groups
                     if "step" in g and g.get("params")}
        steps |= per_param or per_group
    # A rank whose optimizer owns no params has no step: take the others'. Every rank learns
    # whether any rank's steps disagree, so all raise together. (A device tensor: the default
    # group is NCCL on GPUs.)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    t = torch.tensor([max(steps, default=0), len(steps) > 1], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if t[1].item():
        raise CheckpointError(f"optimizer: Adam steps differ between params (this rank: "
                              f"{sorted(steps)}); megatron checkpoints one shared step")
    return int(t[0].item())


# ---- the distributed optimizer's state without a DP gather ------------------------------------
#
# megatron's ``fully_reshardable`` save all-gathers every param's Adam state over the DP group
# and lets each rank write whole tensors: on gloo that gather is ~80% of a save (5 s of 11 s for
# a 110M model) and it runs on the training thread, so an async save cannot hide it. Each DP rank
# already owns a contiguous flat range of every param it updates; a flat range of a row-major
# tensor is a union of at most a few rectangular boxes, and a box is exactly what a ShardedTensor
# with an irregular grid describes. So every rank writes its own boxes of
# ``optimizer.state.{param,exp_avg,exp_avg_sq}.<model key>`` -- the same keys, global shapes and
# values as ``fully_reshardable``, so megatron's own loader (and ours) reads either.


class _Unsupported(Exception):
    """This optimizer/model needs megatron's gathering path."""


def _boxes(shape: tuple, a: int, b: int) -> list[tuple[tuple, tuple]]:
    """Rectangular (offsets, sizes) boxes covering flat range [a, b) of a row-major ``shape``;
    in order, each one a contiguous flat range."""
    if a >= b:
        return []
    if len(shape) <= 1:
        return [((a,), (b - a,))] if shape else [((), ())]
    inner = 1
    for d in shape[1:]:
        inner *= d
    rest = len(shape) - 1
    first, last = a // inner, (b - 1) // inner
    if first == last:
        return [((first, *o), (1, *z)) for o, z in _boxes(shape[1:], a - first * inner,
                                                          b - first * inner)]
    out, start = [], first
    if a % inner:
        out += [((first, *o), (1, *z)) for o, z in _boxes(shape[1:], a % inner, inner)]
        start = first + 1
    full_end = b // inner
    if full_end > start:
        out.append(((start,) + (0,) * rest, (full_end - start, *shape[1:])))
    if b % inner:
        out += [((full_end, *o), (1, *z)) for o, z in _boxes(shape[1:], 0, b % inner)]
    return out


def _param_targets(model_leaf, param) -> list[tuple[Any, int]]:
    """The model's ShardedTensors for ``param`` and where each starts in the param's flat view."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    if isinstance(model_leaf, ShardedTensor):
        if model_leaf.flattened_range is not None:
            raise _Unsupported(model_leaf.key)
        return [(model_leaf, 0)]
    if not isinstance(model_leaf, ShardedTensorFactory):
        raise _Unsupported(type(model_leaf).__name__)
    out = []
    for _, sub in _sharded_leaves(model_leaf.build()):
        data = sub.data
        if (not isinstance(sub, ShardedTensor) or not data.is_contiguous()
                or data.untyped_storage().data_ptr() != param.untyped_storage().data_ptr()):
            raise _Unsupported(model_leaf.key)
        out.append((sub, data.storage_offset() - param.storage_offset()))
    return out


def _distopt_param_state(opt, model_sharded_state_dict) -> dict:
    """This rank's boxes of every param's (main param, exp_avg, exp_avg_sq); no communication."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories
    from megatron.core.optimizer import distrib_optimizer as dopt

    if (dopt.HAVE_APEX_OR_TE or isinstance(opt.optimizer, dopt.HybridDeviceOptimizer)
            or opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8
            or opt.ddp_config.use_megatron_fsdp):
        raise _Unsupported("optimizer")
    model_tensors, _ = extract_sharded_tensors_and_factories(model_sharded_state_dict)
    by_param = {leaf.data: leaf for _, leaf in _sharded_leaves(model_tensors)}
    instance = opt.distributed_optimizer_instance_id
    state, index = {}, 0
    for gbuf_range_maps in opt.gbuf_ranges:
        for gbuf_range_map_for_all_buckets in gbuf_range_maps.values():
            for gbuf_range_map in gbuf_range_map_for_all_buckets:
                for model_param, range_map in gbuf_range_map["param_map"].items():
                    if model_param not in by_param:
                        raise _Unsupported("param missing from the model's sharded state dict")
                    tensors = opt._get_main_param_and_optimizer_states(model_param)
                    lo, hi = range_map["param"].start, range_map["param"].end
                    pieces = []
                    for target, start in _param_targets(by_param[model_param], model_param):
                        n = target.data.numel()
                        a, b = max(lo, start), min(hi, start + n)
                        rid = target.replica_id
                        rid = (*rid[:2], instance) if isinstance(rid, tuple) and len(rid) == 3 \
                            else instance
                        p = target.prepend_axis_num
                        flat_pos = a
                        for offsets, sizes in _boxes(tuple(target.local_shape), a - start,
                                                     b - start):
                            numel = 1
                            for z in sizes:
                                numel *= z
                            offset = (*target.global_offset[:p],
                                      *(g + o for g, o in zip(target.global_offset[p:], offsets)))
                            # Prepended (layer) axes as explicit 1-sized dims: megatron's
                            # irregular-grid path does not handle prepend_axis_num.
                            shape = (1,) * p + tuple(sizes)
                            for name in ("param", "exp_avg", "exp_avg_sq"):
                                flat = tensors[name].detach()
                                data = flat[flat_pos - lo:flat_pos - lo + numel].view(shape)
                                pieces.append(ShardedTensor(
                                    f"optimizer.state.{name}.{target.key}", data, data.dtype,
                                    shape, tuple(target.global_shape), offset, None,
                                    replica_id=rid, prepend_axis_num=0,
                                    allow_shape_mismatch=target.allow_shape_mismatch))
                            flat_pos += numel
                    state[index] = pieces
                    index += 1
    return state


def _optimizer_save_state(optimizer, model_sharded_state_dict, meta: dict):
    """The optimizer's sharded state dict for saving: the distributed optimizer's own boxes
    where supported (fully_reshardable content, no gather), else megatron's."""
    inner = _inner_optimizers(optimizer)
    if not _OWN_DISTOPT_SAVE or meta["distrib_optim_sharding_type"] != "fully_reshardable" or \
            not all(_is_distributed(o) for o in inner):
        return optimizer.sharded_state_dict(model_sharded_state_dict, is_loading=False,
                                            metadata=meta)
    if hasattr(optimizer, "_synchronize_steps") and len(inner) > 1:
        optimizer._synchronize_steps()
    try:
        parts = [{**opt.state_dict(),
                  "param_state": _distopt_param_state(opt, model_sharded_state_dict),
                  "param_state_sharding_type": "fully_reshardable"} for opt in inner]
    except _Unsupported:
        return optimizer.sharded_state_dict(model_sharded_state_dict, is_loading=False,
                                            metadata=meta)
    return parts[0] if len(parts) == 1 else dict(enumerate(parts))


def _compact_cpu_views(state) -> None:
    """Give every CPU view in a save state dict a storage of its own size, sharing memory.

    megatron's writer clones each CPU tensor whose storage is larger than itself (torch.save
    would otherwise write the whole storage): every param (a view of DDP's buffer) and every
    optimizer box -- a full copy of the state on the training thread. A tensor over a *slice* of
    the storage has the same bytes, is not cloned and saves only itself. Sync: written before
    save_state returns. Async on CPU: the forked writer reads its copy-on-write snapshot.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    for _, leaf in _sharded_leaves(state):
        data = getattr(leaf, "data", None)
        if not isinstance(leaf, ShardedTensor) or not isinstance(data, torch.Tensor) \
                or data.device.type != "cpu" or not data.is_contiguous():
            continue
        nbytes = data.numel() * data.element_size()
        storage = data.untyped_storage()
        if storage.nbytes() == nbytes:
            continue
        start = data.storage_offset() * data.element_size()
        piece = storage[start:start + nbytes]
        if piece.data_ptr() != data.data_ptr():  # slicing copied: leave it to megatron
            continue
        leaf.data = torch.empty(0, dtype=data.dtype).set_(piece, 0, data.shape)


def _distopt_in_place_request(optimizer, model_request, sharding: str, ckpt_keys: set[str]):
    """The distributed optimizer's load request as this rank's boxes, viewing the live state.

    DCP then reads exactly the bytes this DP rank owns straight into its Adam state (megatron's
    fully_reshardable request instead allocates the whole DP-gathered state on every rank and
    reads all of it). None where that cannot be done: another optimizer kind saved the
    checkpoint (keys to translate), another sharding type, an unsupported optimizer.
    """
    inner = _inner_optimizers(optimizer)
    if not _OWN_DISTOPT_LOAD or sharding != "fully_reshardable" or \
            not all(_is_distributed(o) for o in inner):
        return None
    for opt in inner:
        if len(opt.optimizer.state) == 0:  # allocate the state to load into (as megatron does)
            opt.load_state_dict(opt.state_dict())
    try:
        parts = [{"param_state": _distopt_param_state(opt, model_request)} for opt in inner]
    except _Unsupported:
        return None
    if any(leaf.key not in ckpt_keys for part in parts for _, leaf in _sharded_leaves(part)):
        return None
    return parts[0] if len(parts) == 1 else dict(enumerate(parts))


def _sharded_metadata(sharding_type: str) -> dict:
    return {"distrib_optim_sharding_type": sharding_type, "chained_optim_avoid_prefix": True}


# --------------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------------

def _dp_group():
    from megatron.core import parallel_state as ps

    try:
        return ps.get_data_parallel_group(with_context_parallel=True)
    except (AssertionError, RuntimeError):
        return None


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
            self._release()
            raise CheckpointError(f"{self.directory}: save failed: {e}") from e
        return done

    def _release(self) -> None:
        global _IN_FLIGHT
        self._queue = None
        if _IN_FLIGHT is self:
            _IN_FLIGHT = None

    def _finish(self) -> None:
        self._release()
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


_IN_FLIGHT: SaveHandle | None = None


@contextlib.contextmanager
def _gc_paused():
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def save_state(model_chunks, optimizer, scheduler, directory, *,
               async_save: bool = False) -> SaveHandle:
    """Collective: write model chunks, optimizer and scheduler state into ``directory``.

    ``directory`` must be new or empty (rank 0 creates it). Sync: returns when every rank's
    files are durable. Async: returns once the state is staged (tensors copied off the device;
    on CPU the forked writer's copy-on-write snapshot) and a background process writes; call
    ``handle.wait()`` (collective) at a later step boundary. One save is in flight at a time:
    a new save first waits for the previous one.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelSaveStrategyWrapper)
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    megatron_fixes.apply()
    global _IN_FLIGHT
    if _IN_FLIGHT is not None:
        _IN_FLIGHT.wait()
    started = time.perf_counter()
    handle = SaveHandle(Path(directory), async_save, started)
    directory = handle.directory
    clock = _Clock(handle.timings)
    _rank0_prepare_dir(directory)
    clock("prepare_dir")

    chunks = _unwrap(model_chunks)
    meta = _sharded_metadata(_SAVE_SHARDING_TYPE)
    with _gc_paused():  # thousands of small objects: a full collection here costs ~0.2 s
        state = _model_sharded_state_dict(chunks)
        state["optimizer"] = _optimizer_save_state(optimizer, state, meta)
        _compact_cpu_views(state)
    state["opt_param_scheduler"] = scheduler.state_dict()
    state["gptforge"] = {"format": FORMAT_VERSION, "optimizer_kind": _optimizer_kind(optimizer),
                         "optimizer_step": _optimizer_step(optimizer),
                         "optimizer_sharding": _SAVE_SHARDING_TYPE}
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
            _IN_FLIGHT = handle
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


def wait_for_pending_save() -> None:
    """Collective: finish the save in flight, if any (call before exit)."""
    if _IN_FLIGHT is not None:
        _IN_FLIGHT.wait()


# --------------------------------------------------------------------------------------------
# safe reading
# --------------------------------------------------------------------------------------------

def _allowed_globals() -> dict[tuple[str, str], Any]:
    from torch.distributed.checkpoint import filesystem, metadata, planner

    allowed = {}
    for module, names in (
        (metadata, ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                    "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                    "_MEM_FORMAT_ENCODING")),
        (planner, ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")),
        (filesystem, ("_StorageInfo", "_StoragePrefix")),
    ):
        for name in names:
            if hasattr(module, name):
                allowed[(module.__name__, name)] = getattr(module, name)
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    for name in dir(torch):
        value = getattr(torch, name, None)
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            allowed[("torch", name)] = value
    import collections
    import pathlib

    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    allowed[("pathlib", "PosixPath")] = pathlib.PosixPath
    allowed[("pathlib", "PurePosixPath")] = pathlib.PurePosixPath
    try:  # placeholders megatron defines to read older checkpoints' metadata
        from megatron.core.dist_checkpointing.strategies import torch as mtorch

        for name in ("MCoreMetadata", "MCoreSavePlan"):
            if hasattr(mtorch, name):
                allowed[(mtorch.__name__, name)] = getattr(mtorch, name)
    except ImportError:
        pass
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only DCP metadata classes and a few torch/builtin values; refuses anything else."""

    _allowed: dict | None = None

    def find_class(self, module, name):
        if _MetadataUnpickler._allowed is None:
            _MetadataUnpickler._allowed = _allowed_globals()
        try:
            return _MetadataUnpickler._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused to load global {module}.{name}") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused persistent id")


def read_metadata(directory) -> Any:
    """DCP's ``.metadata`` through the restricted unpickler; CheckpointError names the file."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = Path(directory) / METADATA_FILE
    try:
        with open(path, "rb") as f:
            md = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (not a complete checkpoint)") from None
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable or unsafe: {e}") from e
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict) \
            or not isinstance(md.storage_data, dict):
        raise CheckpointError(f"{path}: not a torch.distributed.checkpoint index")
    return md


def _check_zip(raw: bytes, where: str) -> None:
    """Verify every record's CRC-32 of a torch.save zip (torch.load does not).

    torch.save stores records uncompressed: the CRC is computed straight over the bytes in
    place (zipfile's own testzip reads each record through Python-level buffers, ~3x slower).
    """
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as zf:
            infos = zf.infolist()
            if any(i.compress_type != zipfile.ZIP_STORED for i in infos):
                bad = zf.testzip()
            else:
                view, bad = memoryview(raw), None
                for info in infos:
                    header = info.header_offset
                    if raw[header:header + 4] != b"PK\x03\x04":
                        raise zipfile.BadZipFile(f"bad local header for {info.filename}")
                    name_len = int.from_bytes(raw[header + 26:header + 28], "little")
                    extra_len = int.from_bytes(raw[header + 28:header + 30], "little")
                    start = header + 30 + name_len + extra_len
                    end = start + info.compress_size
                    if end > len(raw) or zlib.crc32(view[start:end]) != info.CRC:
                        bad = info.filename
                        break
    except Exception as e:
        raise CheckpointError(f"{where}: corrupted ({e})") from e
    if bad is not None:
        raise CheckpointError(f"{where}: corrupted (CRC mismatch in record {bad})")


def _reason(e: Exception) -> str:
    """The line of torch's weights-only refusal that names the global; else the first line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or "global" in line.split(" ", 3)[:3]:
            return line
    return lines[0][:300] if lines else type(e).__name__


def _safe_torch_load(raw: bytes, where: str):
    _check_zip(raw, where)
    try:
        return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{where}: refused or unreadable ({_reason(e)})") from e


def read_common(directory) -> dict:
    """``common.pt`` with ``weights_only=True`` after a CRC check; CheckpointError names it."""
    path = Path(directory) / COMMON_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (not a complete checkpoint)") from None
    common = _safe_torch_load(raw, str(path))
    if not isinstance(common, dict):
        raise CheckpointError(f"{path}: not a state dict")
    return common


def _make_safe_reader(metadata):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.planner import LoadItemType
    from torch.futures import Future

    class SafeFileSystemReader(FileSystemReader):
        """FileSystemReader that never unpickles: restricted ``.metadata``, CRC-checked,
        weights-only items (DCP's own reader uses a bare ``pickle.load`` for the index and
        ``torch.load(weights_only=False)`` for byte items)."""

        def read_metadata(self, *args, **kwargs):
            from torch.distributed.checkpoint.metadata import StorageMeta

            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

        def read_data(self, plan, planner):
            from torch.distributed._shard._utils import narrow_tensor_by_index

            per_file: dict[str, list] = {}
            for item in plan.items:
                per_file.setdefault(self.storage_data[item.storage_index].relative_path,
                                    []).append(item)
            for relative_path, items in per_file.items():
                path = Path(self.path) / relative_path
                try:
                    f = open(path, "rb")
                except OSError as e:
                    raise CheckpointError(f"{path}: missing shard file ({e.strerror})") from e
                with f:
                    for item in sorted(items, key=lambda r: self.storage_data[
                            r.storage_index].offset):
                        info = self.storage_data[item.storage_index]
                        where = f"{path} (item {item.storage_index.fqn})"
                        if info.transform_descriptors:
                            raise CheckpointError(f"{where}: unsupported storage transform "
                                                  f"{info.transform_descriptors}")
                        f.seek(info.offset)
                        raw = f.read(info.length)
                        if len(raw) != info.length:
                            raise CheckpointError(f"{where}: truncated ({len(raw)} of "
                                                  f"{info.length} bytes)")
                        value = _safe_torch_load(raw, where)
                        if item.type == LoadItemType.BYTE_IO:
                            _assign_bytes_item(planner, item, value)
                            continue
                        if not isinstance(value, torch.Tensor):
                            raise CheckpointError(f"{where}: not a tensor")
                        value = narrow_tensor_by_index(value, item.storage_offsets, item.lengths)
                        target = planner.resolve_tensor(item).detach()
                        if target.size() != value.size():
                            raise CheckpointError(f"{where}: size {tuple(value.size())}, "
                                                  f"expected {tuple(target.size())}")
                        target.copy_(value)
                        planner.commit_tensor(item, target)
            fut: Future = Future()
            fut.set_result(None)
            return fut

    return SafeFileSystemReader


def _assign_bytes_item(planner, item, value) -> None:
    """DefaultLoadPlanner.load_bytes without its ``torch.load(weights_only=False)``."""
    from torch.distributed.checkpoint._nested_dict import set_element

    fqn = item.dest_index.fqn
    if getattr(planner, "flatten_state_dict", False):
        set_element(planner.original_state_dict, planner.mappings[fqn], value)
    else:
        planner.state_dict[fqn] = value


@contextlib.contextmanager
def _swap(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _safe_strategies(metadata, common):
    from megatron.core.dist_checkpointing.strategies import torch as mtorch
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

    reader_cls = _make_safe_reader(metadata)

    def get_reader(checkpoint_dir, cache_metadata=False):
        return reader_cls(checkpoint_dir)

    class SafeLoadStrategy(mtorch.TorchDistLoadShardedStrategy):
        """megatron's torch_dist loading through ``SafeFileSystemReader``."""

        def load(self, sharded_state_dict, checkpoint_dir):
            with _swap(mtorch, "_get_filesystem_reader", get_reader):
                return super().load(sharded_state_dict, checkpoint_dir)

        def load_tensors_metadata(self, checkpoint_dir, metadata_=None):
            return super().load_tensors_metadata(checkpoint_dir, metadata_ or metadata)

        def load_sharded_metadata(self, checkpoint_dir):
            with _swap(mtorch, "_get_filesystem_reader", get_reader):
                return super().load_sharded_metadata(checkpoint_dir)

    class SafeCommonStrategy(TorchCommonLoadStrategy):
        """The ``common.pt`` read (weights-only, CRC-checked) before the load."""

        def load_common(self, checkpoint_dir):
            return dict(common)

        def load_sharded_objects(self, sharded_objects_state_dict, checkpoint_dir):
            raise CheckpointError(f"{checkpoint_dir}: per-object .pt files are not supported")

    return SafeLoadStrategy(), SafeCommonStrategy()


# --------------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------------

def _read_config(directory: Path) -> dict:
    path = directory / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (not a megatron distributed checkpoint)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from e
    if not isinstance(config, dict) or config.get("sharded_backend") != "torch_dist":
        raise CheckpointError(f"{path}: expected sharded_backend torch_dist, got {config!r}")
    return config


def _check_files(directory: Path, metadata) -> None:
    """Every file the index points at exists and is long enough (missing/truncated shards)."""
    need: dict[str, int] = {}
    for info in metadata.storage_data.values():
        end = int(info.offset) + int(info.length)
        need[info.relative_path] = max(need.get(info.relative_path, 0), end)
    for name, end in sorted(need.items()):
        path = directory / name
        if Path(name).name != name:
            raise CheckpointError(f"{directory / METADATA_FILE}: bad file name {name!r}")
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"{path}: missing shard file") from None
        if size < end:
            raise CheckpointError(f"{path}: truncated ({size} bytes, index needs {end})")


def _sharded_leaves(tree, path=()):
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _sharded_leaves(v, path + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _sharded_leaves(v, path + (i,))
    elif isinstance(tree, ShardedBase):
        yield path, tree


def _storage_key(sh) -> str:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return sh.unique_key if isinstance(sh, ShardedObject) else sh.key


class _Alias:
    """An optimizer leaf whose value is the model's own weight (same key, same shard)."""

    def __init__(self, leaf):
        self.match = _leaf_identity(leaf)


def _leaf_identity(leaf) -> tuple:
    """What identifies a model shard on this rank, whatever the key prefix."""
    if hasattr(leaf, "local_shape"):  # ShardedTensor
        return (leaf.key, tuple(leaf.global_offset), tuple(leaf.local_shape))
    if hasattr(leaf, "global_offset"):  # ShardedObject
        return (leaf.key, tuple(leaf.global_offset))
    return (leaf.key, id(getattr(leaf, "build_fn", None)))  # a ShardedTensorFactory


def _translate_optimizer_keys(request_optim, ckpt_keys: set[str]) -> None:
    """Point master-weight leaves at what another optimizer kind saved, in place.

    distributed optimizer: ``optimizer.state.param.K``; mixed-precision (Float16) optimizer:
    ``optimizer.state.fp32_param.K``; fp32 optimizer: none -- its master *is* model weight
    ``K``, already requested by the model on this rank, so such a leaf becomes an ``_Alias``
    filled from the model's loaded value (a second request of one shard is not allowed).
    exp_avg / exp_avg_sq use the same keys in all three.
    """
    alternatives = {"optimizer.state.param.": "optimizer.state.fp32_param.",
                    "optimizer.state.fp32_param.": "optimizer.state.param."}

    def translate(leaf):
        if not (dataclasses.is_dataclass(leaf) and isinstance(getattr(leaf, "key", None), str)):
            return None
        if leaf.key in ckpt_keys:
            return None
        for prefix, other in alternatives.items():
            if leaf.key.startswith(prefix):
                base = leaf.key[len(prefix):]
                if other + base in ckpt_keys:
                    return dataclasses.replace(leaf, key=other + base)
                if base in ckpt_keys:
                    return _Alias(dataclasses.replace(leaf, key=base))
        return None

    def walk(tree):
        items = tree.items() if isinstance(tree, dict) else \
            enumerate(tree) if isinstance(tree, list) else ()
        for k, v in list(items):
            new = translate(v)
            if new is not None:
                tree[k] = new
            else:
                walk(v)

    walk(request_optim)


def _loaded_model_shards(request, loaded, names) -> dict:
    """(model shard identity) -> loaded value, for ``_Alias`` leaves."""
    out = {}
    for name in names:
        for path, leaf in _sharded_leaves(request[name]):
            value = loaded[name]
            for p in path:
                value = value[p]
            out[_leaf_identity(leaf)] = value
    return out


def _not_main(replica_id):
    if isinstance(replica_id, tuple):
        return (*replica_id[:-1], replica_id[-1] + 1)
    return replica_id + 1


def _validate_request(request, metadata, directory: Path) -> list[str]:
    """Local check of every requested key and global shape against the index."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    index = metadata.state_dict_metadata
    where = directory / METADATA_FILE
    keys = []
    for path, sh in _sharded_leaves(request):
        key = _storage_key(sh)
        keys.append(key)
        if isinstance(sh, ShardedObject):
            if not isinstance(index.get(key), BytesStorageMetadata):
                raise CheckpointError(f"{where}: missing key {key!r} (checkpoint of another "
                                      "model or optimizer?)")
            continue
        if key not in index:
            raise CheckpointError(f"{where}: missing key {key!r} (checkpoint of another model "
                                  "or optimizer?)")
        stored = index[key]
        if isinstance(sh, ShardedTensor):
            if isinstance(stored, BytesStorageMetadata):
                raise CheckpointError(f"{where}: key {key!r} holds an object, expected a tensor")
            if tuple(stored.size) != tuple(sh.global_shape):
                raise CheckpointError(
                    f"{where}: shape mismatch for key {key!r}: checkpoint "
                    f"{tuple(stored.size)}, model {tuple(sh.global_shape)}")
    return keys


def _fill(request, loaded, aliases=None):
    """The request's own structure, with every sharded leaf replaced by its loaded value."""
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedBase

    if isinstance(request, ShardedBase):
        return loaded
    if isinstance(request, _Alias):
        return aliases[request.match]
    if isinstance(request, LocalNonpersistentObject):
        return request.unwrap()
    if isinstance(request, dict):
        return {k: _fill(v, loaded.get(k) if isinstance(loaded, dict) else None, aliases)
                for k, v in request.items()}
    if isinstance(request, list):
        return [_fill(v, loaded[i] if isinstance(loaded, list) and i < len(loaded) else None,
                      aliases) for i, v in enumerate(request)]
    return request


def _without_aliases(tree):
    if isinstance(tree, dict):
        return {k: _without_aliases(v) for k, v in tree.items() if not isinstance(v, _Alias)}
    if isinstance(tree, list):
        return [None if isinstance(v, _Alias) else _without_aliases(v) for v in tree]
    return tree


def _set_step(opt, state_dict: dict, step: int) -> None:
    """Put the checkpoint's Adam step where this optimizer kind's load_state_dict reads it."""
    if _is_distributed(opt):
        for group in state_dict["optimizer"]["param_groups"]:
            group["step"] = float(step)
        return
    inner = state_dict["optimizer"] if "fp32_from_fp16_params" in state_dict else state_dict
    inner["state"] = {k: v for k, v in inner["state"].items() if k != "common_step"}
    for param_state in inner["state"].values():
        param_state.pop("step", None)
    inner["state"]["common_step"] = torch.tensor(float(step))


def _raise_first(errors: list) -> None:
    for error in errors:
        if error:
            raise CheckpointError(error)


def _unwrap_dcp_error(e: Exception, directory: Path) -> CheckpointError:
    """DCP gathers every rank's read failure; surface ours (it names the file)."""
    failures = getattr(e, "failures", None) or {}
    for rank in sorted(failures):
        exc = failures[rank]
        exc = exc[0] if isinstance(exc, tuple) else exc
        if isinstance(exc, CheckpointError):
            return CheckpointError(str(exc))
    return CheckpointError(f"{directory}: load failed: {e}")


def load_state(model_chunks, optimizer, scheduler, directory, *, load_optim: bool = True) -> dict:
    """Collective: load ``directory`` into this rank's model chunks (and optimizer, scheduler).

    Works whatever layout saved it (TP, PP, VPP, DP, distributed optimizer on or off). With
    ``load_optim=False`` only the model weights are read (the optimizer's master weights are
    refreshed from them). Raises CheckpointError (the same on every rank, naming the file or
    key) for another model shape, a missing or truncated shard, a corrupted or unsafe file.
    Returns the checkpoint's "gptforge" record (format, optimizer kind and step).

    Everything that can be checked before reading tensors is (config, index, every shard's
    presence and length, common.pt, keys and shapes): such errors leave the model and optimizer
    untouched. A corrupted record found *while* reading (CRC mismatch) can leave the weights
    partly overwritten: load another checkpoint or rebuild the engine after that error.
    """
    megatron_fixes.apply()
    # Optimizers without state are given some to load into; a failed load takes it back.
    fresh = [o for o in _inner_optimizers(optimizer) if len(o.optimizer.state) == 0] \
        if load_optim else []
    try:
        return _load_state(model_chunks, optimizer, scheduler, Path(directory), load_optim)
    except BaseException:
        for opt in fresh:
            opt.optimizer.state.clear()
        raise


def _load_state(model_chunks, optimizer, scheduler, directory: Path, load_optim: bool) -> dict:
    from megatron.core import dist_checkpointing

    chunks = _unwrap(model_chunks)

    # 1. Local reads and checks; the verdict is shared so that every rank raises together.
    error, metadata, common, keys, in_place = None, None, None, [], None
    try:
        if not directory.is_dir():
            raise CheckpointError(f"{directory}: no such checkpoint directory")
        _read_config(directory)
        metadata = read_metadata(directory)
        _check_files(directory, metadata)
        common = read_common(directory)
        record = common.get("gptforge")
        if not isinstance(record, dict) or record.get("format") != FORMAT_VERSION:
            raise CheckpointError(f"{directory / COMMON_FILE}: not a gptforge checkpoint "
                                  f"(format {FORMAT_VERSION}) record: {record!r}")
        request = _model_sharded_state_dict(chunks)
        if load_optim:
            sharding = record.get("optimizer_sharding", "fully_reshardable")
            if sharding != "fully_reshardable" and record.get("optimizer_kind") != \
                    _optimizer_kind(optimizer):
                raise CheckpointError(f"{directory}: optimizer state saved {sharding!r} by a "
                                      f"{record.get('optimizer_kind')} optimizer cannot be "
                                      f"loaded into a {_optimizer_kind(optimizer)} one")
            ckpt_keys = set(metadata.state_dict_metadata)
            with _gc_paused():
                in_place = _distopt_in_place_request(optimizer, request, sharding, ckpt_keys)
            if in_place is not None:
                request["optimizer"] = in_place
            else:
                request["optimizer"] = optimizer.sharded_state_dict(
                    request, is_loading=True, metadata=_sharded_metadata(sharding))
                _translate_optimizer_keys(request["optimizer"], ckpt_keys)
        keys = _validate_request(request, metadata, directory)
    except CheckpointError as e:
        error = str(e)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (error, sorted(k for k in keys
                                                     if not k.startswith(_OPTIM_PREFIX)),
                                      str(directory)))
    if len({g[2] for g in gathered}) > 1:
        raise CheckpointError(f"{directory}: ranks name different checkpoint directories: "
                              f"{sorted({g[2] for g in gathered})[:4]}")
    _raise_first([g[0] for g in gathered])
    requested = {k.split("/")[0] for g in gathered for k in g[1]}
    unexpected = sorted(k for k in metadata.state_dict_metadata
                        if not k.startswith(_OPTIM_PREFIX) and k.split("/")[0] not in requested)
    if unexpected:
        raise CheckpointError(f"{directory / METADATA_FILE}: unexpected key {unexpected[0]!r} "
                              f"(+{len(unexpected) - 1} more): checkpoint of another model")

    # 2. The collective read (aliases are not requested: the model's load provides them).
    sharded_strategy, common_strategy = _safe_strategies(metadata, common)
    try:
        with warnings.catch_warnings():  # torch's own deprecations inside megatron's reader
            warnings.simplefilter("ignore", FutureWarning)
            loaded = dist_checkpointing.load(_without_aliases(request), str(directory),
                                             sharded_strategy, common_strategy)
    except CheckpointError:
        raise
    except (Exception, DCPCheckpointException) as e:  # DCP's is a BaseException
        raise _unwrap_dcp_error(e, directory) from e

    # 3. Into the live objects.
    names = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for name, chunk in zip(names, chunks):
        chunk.load_state_dict(_fill(request[name], loaded[name]), strict=True)
    if load_optim:
        inner = _inner_optimizers(optimizer)
        disk_optim = common.get("optimizer", {})
        disk_scaler = disk_optim.get("grad_scaler") if isinstance(disk_optim, dict) else None
        step = int(record["optimizer_step"])
        if in_place is not None:  # the state is loaded already: param groups, step, scaler
            for opt in inner:
                part = opt.state_dict()
                _set_step(opt, part, step)
                if "grad_scaler" in part and disk_scaler is not None:
                    part["grad_scaler"] = disk_scaler
                opt.load_state_dict(part)
        else:
            state = _fill(request["optimizer"], loaded["optimizer"],
                          _loaded_model_shards(request, loaded, names))
            parts = [state] if len(inner) == 1 else [state[i] for i in range(len(inner))]
            for opt, part in zip(inner, parts):
                _set_step(opt, part, step)
                if "grad_scaler" in part and disk_scaler is not None:
                    part["grad_scaler"] = disk_scaler
            optimizer.load_state_dict(state)
        scheduler.load_state_dict(common["opt_param_scheduler"])
    else:
        optimizer.reload_model_params()
    return dict(record)
