"""The one interface the trainer drives, and the registry that picks an engine by name.

``parallel.engine`` names an entry of ``ENGINES``; the launcher validates the name before any
rank starts and calls ``engine_class(name)`` on each rank.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class StepResult:
    loss: float | None  # mean over the global batch; None on ranks that do not hold it
    grad_norm: float | None
    skipped: bool  # fp16 overflow: the update was not applied
    loss_scale: float
    lr: float


class Engine(Protocol):
    model_chunks: list[torch.nn.Module]

    def train_step(self, micro_batches: list[dict]) -> StepResult: ...

    def eval_step(self, micro_batches: list[dict]) -> float | None: ...

    @property
    def num_parameters(self) -> int: ...


# name -> "module:Class"; imported only when chosen.
ENGINES = {"megatron": "gptforge.parallel.megatron_engine:MegatronEngine"}


def engine_class(name: str) -> type:
    module, cls = ENGINES[name].split(":")
    return getattr(importlib.import_module(module), cls)
