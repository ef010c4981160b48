"""Loading: ``load_state`` reads a checkpoint of any layout into this one, every check made
(and agreed on by every rank) before the first tensor is read."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException as DCPCheckpointException

from gptforge.parallel.engine import CheckpointError
from gptforge.parallel.megatron import fixes as megatron_fixes
from gptforge.parallel.megatron.checkpoint.distopt import distopt_in_place_request
from gptforge.parallel.megatron.checkpoint.safe_read import (read_common, read_metadata,
                                                              safe_strategies)
from gptforge.parallel.megatron.checkpoint.state import (
    COMMON_FILE, CONFIG_FILE, FORMAT_VERSION, FULLY_RESHARDABLE, METADATA_FILE, OPTIM_PREFIX,
    gc_paused, inner_optimizers, is_distributed, model_sharded_state_dict, optimizer_kind,
    sharded_leaves, sharded_metadata, unwrap)


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
        for path, leaf in sharded_leaves(request[name]):
            value = loaded[name]
            for p in path:
                value = value[p]
            out[_leaf_identity(leaf)] = value
    return out


def _validate_request(request, metadata, directory: Path) -> list[str]:
    """Local check of every requested key and global shape against the index."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    index = metadata.state_dict_metadata
    where = directory / METADATA_FILE
    keys = []
    for path, sh in sharded_leaves(request):
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
    if is_distributed(opt):
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


def load_state(model_chunks, optimizer, scheduler, directory, *, load_optim: bool = True,
               own_distopt: bool = True) -> dict:
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
    ``own_distopt``: read the distributed optimizer's boxes in place (``distopt.py``); False
    takes megatron's own request (its fixes are tested on it).
    """
    megatron_fixes.apply()
    # Optimizers without state are given some to load into; a failed load takes it back.
    fresh = [o for o in inner_optimizers(optimizer) if len(o.optimizer.state) == 0] \
        if load_optim else []
    try:
        return _load_state(model_chunks, optimizer, scheduler, Path(directory), load_optim,
                           own_distopt)
    except BaseException:
        for opt in fresh:
            opt.optimizer.state.clear()
        raise


def _load_state(model_chunks, optimizer, scheduler, directory: Path, load_optim: bool,
                own_distopt: bool) -> dict:
    from megatron.core import dist_checkpointing

    chunks = unwrap(model_chunks)

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
        request = model_sharded_state_dict(chunks)
        if load_optim:
            sharding = record.get("optimizer_sharding", FULLY_RESHARDABLE)
            if sharding != FULLY_RESHARDABLE and record.get("optimizer_kind") != \
                    optimizer_kind(optimizer):
                raise CheckpointError(f"{directory}: optimizer state saved {sharding!r} by a "
                                      f"{record.get('optimizer_kind')} optimizer cannot be "
                                      f"loaded into a {optimizer_kind(optimizer)} one")
            ckpt_keys = set(metadata.state_dict_metadata)
            with gc_paused():
                in_place = distopt_in_place_request(optimizer, request, sharding, ckpt_keys,
                                                    own=own_distopt)
            if in_place is not None:
                request["optimizer"] = in_place
            else:
                request["optimizer"] = optimizer.sharded_state_dict(
                    request, is_loading=True, metadata=sharded_metadata(sharding))
                _translate_optimizer_keys(request["optimizer"], ckpt_keys)
        keys = _validate_request(request, metadata, directory)
    except CheckpointError as e:
        error = str(e)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (error, sorted(k for k in keys
                                                     if not k.startswith(OPTIM_PREFIX)),
                                      str(directory)))
    if len({g[2] for g in gathered}) > 1:
        raise CheckpointError(f"{directory}: ranks name different checkpoint directories: "
                              f"{sorted({g[2] for g in gathered})[:4]}")
    _raise_first([g[0] for g in gathered])
    requested = {k.split("/")[0] for g in gathered for k in g[1]}
    unexpected = sorted(k for k in metadata.state_dict_metadata
                        if not k.startswith(OPTIM_PREFIX) and k.split("/")[0] not in requested)
    if unexpected:
        raise CheckpointError(f"{directory / METADATA_FILE}: unexpected key {unexpected[0]!r} "
                              f"(+{len(unexpected) - 1} more): checkpoint of another model")

    # 2. The collective read (aliases are not requested: the model's load provides them).
    sharded_strategy, common_strategy = safe_strategies(metadata, common)
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
        inner = inner_optimizers(optimizer)
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
