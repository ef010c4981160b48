"""The distributed optimizer's state as this rank's boxes: saved without megatron's DP gather and
loaded in place, in the same keys, shapes and values as megatron's ``fully_reshardable``.

megatron's ``fully_reshardable`` save all-gathers every param's Adam state over the DP group
and lets each rank write whole tensors: on gloo that gather is ~80% of a save (5 s of 11 s for
a 110M model) and it runs on the training thread, so an async save cannot hide it. Each DP rank
already owns a contiguous flat range of every param it updates; a flat range of a row-major
tensor is a union of at most a few rectangular boxes, and a box is exactly what a ShardedTensor
with an irregular grid describes. So every rank writes its own boxes of
``optimizer.state.{param,exp_avg,exp_avg_sq}.<model key>`` -- the same keys, global shapes and
values as ``fully_reshardable``, so megatron's own loader (and ours) reads either.

"""

from __future__ import annotations

from typing import Any

import torch

from gptforge.parallel.megatron.checkpoint.state import (FULLY_RESHARDABLE, inner_optimizers,
                                                          is_distributed, sharded_leaves)


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
    for _, sub in sharded_leaves(model_leaf.build()):
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
    by_param = {leaf.data: leaf for _, leaf in sharded_leaves(model_tensors)}
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


def optimizer_save_state(optimizer, model_sharded_state_dict, meta: dict, *, own: bool = True):
    """The optimizer's sharded state dict for saving: the distributed optimizer's own boxes
    where supported (fully_reshardable content, no gather; ``own``), else megatron's."""
    inner = inner_optimizers(optimizer)
    if not own or meta["distrib_optim_sharding_type"] != FULLY_RESHARDABLE or \
            not all(is_distributed(o) for o in inner):
        return optimizer.sharded_state_dict(model_sharded_state_dict, is_loading=False,
                                            metadata=meta)
    if hasattr(optimizer, "_synchronize_steps") and len(inner) > 1:
        optimizer._synchronize_steps()
    try:
        parts = [{**opt.state_dict(),
                  "param_state": _distopt_param_state(opt, model_sharded_state_dict),
                  "param_state_sharding_type": FULLY_RESHARDABLE} for opt in inner]
    except _Unsupported:
        return optimizer.sharded_state_dict(model_sharded_state_dict, is_loading=False,
                                            metadata=meta)
    return parts[0] if len(parts) == 1 else dict(enumerate(parts))


def compact_cpu_views(state) -> None:
    """Give every CPU view in a save state dict a storage of its own size, sharing memory.

    megatron's writer clones each CPU tensor whose storage is larger than itself (torch.save
    would otherwise write the whole storage): every param (a view of DDP's buffer) and every
    optimizer box -- a full copy of the state on the training thread. A tensor over a *slice* of
    the storage has the same bytes, is not cloned and saves only itself. Sync: written before
    save_state returns. Async on CPU: the forked writer reads its copy-on-write snapshot.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    for _, leaf in sharded_leaves(state):
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


def distopt_in_place_request(optimizer, model_request, sharding: str, ckpt_keys: set[str], *,
                             own: bool = True):
    """The distributed optimizer's load request as this rank's boxes, viewing the live state.

    DCP then reads exactly the bytes this DP rank owns straight into its Adam state (megatron's
    fully_reshardable request instead allocates the whole DP-gathered state on every rank and
    reads all of it). None where that cannot be done (or not ``own``: megatron's request):
    another optimizer kind saved the checkpoint (keys to translate), another sharding type, an
    unsupported optimizer.
    """
    inner = inner_optimizers(optimizer)
    if not own or sharding != FULLY_RESHARDABLE or \
            not all(is_distributed(o) for o in inner):
        return None
    for opt in inner:
        if len(opt.optimizer.state) == 0:  # allocate the state to load into (as megatron does)
            opt.load_state_dict(opt.state_dict())
    try:
        parts = [{"param_state": _distopt_param_state(opt, model_request)} for opt in inner]
    except _Unsupported:
        return None
    if any(leaf.key not in ckpt_keys for part in parts for _, leaf in sharded_leaves(part)):
        return None
    return parts[0] if len(parts) == 1 else dict(enumerate(parts))
