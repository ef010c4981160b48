"""Seeding: python/numpy/torch generators and megatron's model-parallel RNG tracker.

``rng_state()`` returns every generator's state as plain JSON (no pickles), so checkpoints can
restore dropout and sampling exactly and be read safely.
"""

from __future__ import annotations

import base64
import random

import numpy as np
import torch


def set_seed(seed: int, pp_rank: int = 0) -> None:
    """Seed every generator. Dropout streams differ by pipeline stage, as in megatron."""
    stage_seed = seed + 100 * pp_rank
    random.seed(stage_seed)
    np.random.seed(stage_seed % 2**32)
    torch.manual_seed(stage_seed)
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)


def _tensor_to_text(state: torch.Tensor) -> str:
    return base64.b64encode(state.cpu().numpy().tobytes()).decode()


def _text_to_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def rng_state() -> dict:
    """Every generator's state, JSON-serialisable."""
    from megatron.core import tensor_parallel

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "torch": _tensor_to_text(torch.get_rng_state()),
             "tracker": {k: _tensor_to_text(v) for k, v in
                         tensor_parallel.get_cuda_rng_tracker().get_states().items()}}
    if torch.cuda.is_available():
        state["cuda"] = _tensor_to_text(torch.cuda.get_rng_state())
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` returned."""
    from megatron.core import tensor_parallel

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_text_to_tensor(state["torch"]))
    tracker = tensor_parallel.get_cuda_rng_tracker()
    tracker.set_states({k: _text_to_tensor(v) for k, v in state["tracker"].items()})
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_text_to_tensor(state["cuda"]))
