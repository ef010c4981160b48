"""What saving and loading share: file names, the state dicts of chunks and optimizers, the
optimizer's kind and Adam step, walking a sharded state dict."""

from __future__ import annotations

import contextlib
import gc
from typing import NamedTuple

import torch
import torch.distributed as dist

from gptforge.parallel.engine import CheckpointError

FORMAT_VERSION = 1
COMMON_FILE = "common.pt"
METADATA_FILE = ".metadata"
CONFIG_FILE = "metadata.json"
OPTIM_PREFIX = "optimizer."
# How the distributed optimizer's state is sharded on disk. Only ``fully_reshardable`` reshards
# across TP/PP and DP (``dp_reshardable``, DP only, can be written for the fix (c) test).
FULLY_RESHARDABLE = "fully_reshardable"


class WrittenFile(NamedTuple):
    path: str  # relative to the checkpoint directory
    bytes: int


def unwrap(model_chunks) -> list:
    from megatron.core.utils import unwrap_model

    return unwrap_model(list(model_chunks))


def model_sharded_state_dict(chunks) -> dict:
    """Megatron-LM's layout: ``model`` for one chunk, ``model0``, ``model1``... for VPP.

    The dict keys only place non-sharded leaves; every tensor is addressed by its ShardedTensor
    key, which is global (layer offsets included), so any VPP split reads any other's files.
    """
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def inner_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def is_distributed(opt) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return isinstance(opt, DistributedOptimizer)


def optimizer_kind(optimizer) -> str:
    kinds = {"distributed" if is_distributed(o) else "standard"
             for o in inner_optimizers(optimizer)}
    return kinds.pop() if len(kinds) == 1 else "mixed"


def optimizer_step(optimizer) -> int:
    """Adam's step (the same for every param): 0 before the first optimizer step."""
    steps = set()
    for opt in inner_optimizers(optimizer):
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


def sharded_metadata(sharding_type: str) -> dict:
    return {"distrib_optim_sharding_type": sharding_type, "chained_optim_avoid_prefix": True}


@contextlib.contextmanager
def gc_paused():
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def sharded_leaves(tree, path=()):
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from sharded_leaves(v, path + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from sharded_leaves(v, path + (i,))
    elif isinstance(tree, ShardedBase):
        yield path, tree
