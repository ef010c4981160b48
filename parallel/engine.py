"""The one interface the trainer drives, and the registry that picks an engine by name.

``parallel.engine`` names an entry of ``ENGINES``; the launcher validates the name before any
rank starts and calls ``engine_class(name)`` on each rank.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Protocol

import torch

from gptforge.common.errors import ConfigError, UserError


class CheckpointError(UserError):
    """A checkpoint that cannot be saved here or loaded into this model; names the file/key."""


class TrainingDiverged(UserError):
    """Training produced non-finite values it could not skip past; the message names the step."""


OVERFLOW = "overflow"  # fp16: the loss scale was too high; it is lowered (not counted)
NONFINITE = "non-finite"  # a non-finite loss or grad norm no loss scale explains (counted)


@dataclass
class StepResult:
    loss: float | None  # token-weighted mean over the global batch; None off the last stage
    grad_norm: float | None
    skipped: bool  # the update was not applied (the weights are those of the step before)
    loss_scale: float
    lr: float
    skip_reason: str = ""  # OVERFLOW or NONFINITE when skipped


class Engine(Protocol):
    model_chunks: list[torch.nn.Module]

    def train_step(self, micro_batches: list[dict]) -> StepResult: ...

    def eval_step(self, micro_batches: list[dict]) -> tuple[float, float] | None:
        """(loss sum, loss-carrying tokens) of a global batch; None off the last stage."""

    @property
    def num_parameters(self) -> int: ...

    def save(self, directory, *, async_save: bool = False):
        """Collective: write model, optimizer and scheduler state; returns a handle with
        ``wait()``, ``poll()`` (collective) and ``files`` (what this rank wrote)."""

    def load(self, directory, *, load_optim: bool = True) -> dict:
        """Collective: load any layout's save into this one (weights only without optim)."""


# name -> "module:Class"; imported only when chosen.
ENGINES = {"megatron": "gptforge.parallel.megatron.engine:MegatronEngine",
           "deepspeed": "gptforge.parallel.deepspeed.engine:DeepSpeedEngine"}


# What an engine's constructor takes beyond the common arguments, by name; the launcher offers
# micro_batch_size, num_microbatches (per step and DP rank) and run_dir.
ENGINE_OPTIONS = {"megatron": ("micro_batch_size",),
                  "deepspeed": ("micro_batch_size", "num_microbatches", "run_dir")}


def engine_options(name: str, **offered) -> dict:
    """The subset of ``offered`` that engine ``name`` takes."""
    return {key: offered[key] for key in ENGINE_OPTIONS.get(name, ())}


def engine_class(name: str) -> type:
    module, cls = ENGINES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def validate_engine(parallel, precision) -> None:
    """``parallel.engine`` names an engine of this version, which takes these settings."""
    from gptforge.parallel.deepspeed.config import check_engine

    if parallel.engine not in ENGINES:
        raise ConfigError("parallel.engine", f"{parallel.engine!r} is not available in this "
                          f"version (available: {', '.join(sorted(ENGINES))})")
    check_engine(parallel, precision)
