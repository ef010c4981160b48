"""The one interface the trainer drives; megatron_engine and (later) deepspeed_engine implement it."""

from __future__ import annotations

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
