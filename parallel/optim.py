"""Optimizer and learning-rate settings from the ``optim`` section, as pure functions.

Every engine builds its AdamW and its schedule from these, so a step's learning rate is the
same whichever engine runs it.
"""

from __future__ import annotations

import math

from gptforge.parallel.config import OptimConfig
from gptforge.common.errors import ConfigError


def validate_optim(optim: OptimConfig, train_iters: int) -> None:
    """Checks that need no model or layout; each error names its key."""
    if not optim.lr > 0:
        raise ConfigError("optim.lr", f"must be > 0, got {optim.lr}")
    if optim.min_lr < 0:
        raise ConfigError("optim.min_lr", f"must be >= 0, got {optim.min_lr}")
    if optim.min_lr > optim.lr:
        raise ConfigError("optim.min_lr", f"{optim.min_lr} is larger than optim.lr={optim.lr}")
    if optim.lr_warmup_iters < 0:
        raise ConfigError("optim.lr_warmup_iters", f"must be >= 0, got {optim.lr_warmup_iters}")
    decay = lr_decay_iters(optim, train_iters)
    if decay < 1:
        raise ConfigError("optim.lr_decay_iters", f"must be >= 1, got {decay}")
    if optim.lr_warmup_iters >= decay:
        source = "optim.lr_decay_iters" if optim.lr_decay_iters else "train.train_iters"
        raise ConfigError("optim.lr_warmup_iters", f"{optim.lr_warmup_iters} warmup steps must be "
                          f"fewer than the {decay} decay steps ({source}); lower the warmup or "
                          f"raise {source}")
    for key in ("weight_decay", "adam_eps", "clip_grad"):
        if getattr(optim, key) < 0:
            raise ConfigError(f"optim.{key}", f"must be >= 0, got {getattr(optim, key)}")
    for key in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(optim, key) < 1.0:
            raise ConfigError(f"optim.{key}", f"must be in [0, 1), got {getattr(optim, key)}")


def lr_decay_iters(optim: OptimConfig, train_iters: int) -> int:
    return optim.lr_decay_iters or train_iters


def adamw_settings(optim: OptimConfig) -> dict:
    """AdamW hyper-parameters, named as torch.optim.AdamW takes them."""
    return dict(lr=optim.lr, betas=(optim.adam_beta1, optim.adam_beta2), eps=optim.adam_eps,
                weight_decay=optim.weight_decay)


def learning_rate(step: int, optim: OptimConfig, train_iters: int) -> float:
    """The LR after ``step`` optimizer steps: megatron OptimizerParamScheduler's formula
    (linear warmup from 0, then cosine/linear/constant decay to min_lr)."""
    warmup, decay = optim.lr_warmup_iters, lr_decay_iters(optim, train_iters)
    if warmup > 0 and step <= warmup:
        return optim.lr * step / warmup
    if optim.lr_decay_style == "constant":
        return optim.lr
    if step > decay:
        return optim.min_lr
    ratio = (step - warmup) / (decay - warmup)
    if optim.lr_decay_style == "linear":
        coeff = 1.0 - ratio
    else:
        coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
    return optim.min_lr + coeff * (optim.lr - optim.min_lr)


def fuse_adamw(optimizer) -> bool:
    """Switch a torch Adam/AdamW to its fused kernel (one call for every param, CPU and CUDA);
    False for any other optimizer (TE/apex FusedAdam, DeepSpeed's own). ``load_state_dict``
    restores the saved param groups, so an engine calls this again after each load: otherwise
    a checkpoint saved unfused (before this existed) would turn it off for good. Fused keeps
    Adam's ``step`` as fp32 on the param's device; a loaded one is moved there."""
    import torch

    if not isinstance(optimizer, torch.optim.Adam):  # torch's AdamW subclasses Adam
        return False
    optimizer.defaults.update(fused=True, foreach=None)
    for group in optimizer.param_groups:
        group.update(fused=True, foreach=None)
        for param in group["params"]:
            state = optimizer.state.get(param)
            if state and torch.is_tensor(state.get("step")):
                state["step"] = state["step"].to(device=param.device, dtype=torch.float32)
    return True

