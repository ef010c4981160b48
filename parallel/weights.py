"""A GPTModel's weights by name, whatever wraps it (megatron DDP, Float16Module): the one way
converters and inference read a model's tensors and copy tensors into it."""

from __future__ import annotations

import torch

from gptforge.parallel.engine import CheckpointError


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside megatron's DDP / Float16Module wrappers."""
    from megatron.core.utils import unwrap_model

    return unwrap_model(model)


def gpt_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters and buffers by GPTModel name (no ``_extra_state`` entries)."""
    return {k: v for k, v in unwrapped(model).state_dict().items()
            if not k.endswith("_extra_state")}


def load_gpt_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy ``weights`` (GPTModel names) into ``model``; every parameter must be there with its
    shape, and nothing else may be (a buffer of the model may be)."""
    inner = unwrapped(model)
    params = dict(inner.named_parameters())
    buffers = dict(inner.named_buffers())
    missing = sorted(set(params) - set(weights))
    unexpected = sorted(k for k in set(weights) - set(params) if k not in buffers)
    for names, what in ((missing, "missing from"), (unexpected, "not in this model, found in")):
        if names:
            raise CheckpointError(f"weights: {names[0]!r} (+{len(names) - 1} more) {what} the "
                                  f"checkpoint")
    with torch.no_grad():
        for name, param in params.items():
            value = weights[name]
            if tuple(value.shape) != tuple(param.shape):
                raise CheckpointError(f"weights: {name} has shape {tuple(value.shape)} in the "
                                      f"checkpoint, {tuple(param.shape)} here")
            param.copy_(value.to(param.dtype))
