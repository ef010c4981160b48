"""Layout-independent initialisation: a weight's values depend on the seed, never on TP/PP/DP.

Each randomly initialised tensor is identified by its layout-free checkpoint identity (megatron's
sharded_state_dict: a key plus this shard's offset in the global tensor). Every global row is
drawn from its own generator, seeded by (seed, key, layer, row), so a rank generates only the
rows it holds and all layouts agree. Constant-initialised tensors (norm weights, biases) are
already layout-free and are left as built.
"""

from __future__ import annotations

import hashlib
import math

import torch

# megatron's scaled_init_method_normal: output projections get std / sqrt(2 * num_layers).
_SCALED_INIT_SUFFIXES = ("linear_proj.weight", "linear_fc2.weight")


def _row_seed(seed: int, key: str, prefix: tuple[int, ...], row: int) -> int:
    text = f"{seed}/{key}/{prefix}/{row}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def _fill_shard(sh, seed: int, std: float) -> None:
    """Fill ShardedTensor ``sh``'s local data with its rows of the seeded global tensor."""
    n_pre = sh.prepend_axis_num
    prefix = tuple(sh.global_offset[:n_pre])
    row_offset = sh.global_offset[n_pre]
    rest_global = sh.global_shape[n_pre + 1:]
    rest_slices = tuple(slice(o, o + n) for o, n in
                        zip(sh.global_offset[n_pre + 1:], sh.local_shape[1:]))
    local = sh.data
    gen = torch.Generator()
    rows = torch.empty(local.shape, dtype=torch.float32)
    for i in range(local.shape[0]):
        gen.manual_seed(_row_seed(seed, sh.key, prefix, row_offset + i))
        rows[i] = torch.randn(rest_global, generator=gen)[rest_slices] * std
    local.copy_(rows.to(local.dtype))


def _shards(sharded_state_dict):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    for item in sharded_state_dict.values():
        if isinstance(item, ShardedTensorFactory):
            for built in item.build():
                yield built
        elif isinstance(item, ShardedTensor):
            yield item


@torch.no_grad()
def init_layout_independent(module: torch.nn.Module, *, seed: int, std: float,
                            num_layers: int) -> None:
    scaled_std = std / math.sqrt(2.0 * num_layers)
    for sh in _shards(module.sharded_state_dict()):
        if sh.data is None or sh.data.dim() < 2:
            continue  # 1-D: norms and biases keep their constant init
        if sh.flattened_range is not None:
            raise NotImplementedError(f"flattened shard {sh.key}")
        key_std = scaled_std if sh.key.endswith(_SCALED_INIT_SUFFIXES) else std
        _fill_shard(sh, seed, key_std)
