"""The ``parallel`` config section (defaults; validated in launcher/config.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    recompute: Literal["none", "selective", "full"] = "none"
    engine: Literal["megatron", "deepspeed"] = "megatron"
    backend: Literal["auto", "nccl", "gloo"] = "auto"
