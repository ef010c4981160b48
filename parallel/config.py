"""The sections the engines own: ``parallel`` (layout), ``precision`` and ``optim``.

Defaults live here; each field's docstring is what ``gptforge train --help`` prints.
Cross-field checks that need the world size are in ``gptforge.parallel.layout``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from gptforge.common.errors import ConfigError


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    """Tensor parallel size (TP): each layer's matrices are split over this many ranks."""
    pipeline_model_parallel_size: int = 1
    """Pipeline parallel size (PP): the layers are split into this many stages."""
    virtual_pipeline_model_parallel_size: int | None = None
    """Model chunks per pipeline stage (interleaved 1F1B); None: one chunk."""
    sequence_parallel: bool = False
    """Split norms and dropout along the sequence over the TP ranks (needs TP > 1)."""
    use_distributed_optimizer: bool = False
    """Shard the optimizer state over the data-parallel ranks (megatron engine)."""
    overlap_grad_reduce: bool = True
    """Reduce gradients over the DP ranks during the backward, bucket by bucket (megatron DDP;
    DeepSpeed ZeRO's overlap_comm)."""
    overlap_param_gather: bool = True
    """All-gather the updated parameters during the next forward, not in the step (megatron
    engine with use_distributed_optimizer and overlap_grad_reduce; else ignored)."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation: none, selective (attention core) or full (every layer)."""
    engine: Literal["megatron", "deepspeed"] = "megatron"
    """Training engine: megatron-core (DDP / distributed optimizer) or DeepSpeed ZeRO."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """torch.distributed backend; auto: nccl with GPUs, gloo on CPU."""
    distributed_timeout_minutes: float = 10
    """How long a collective waits for a missing rank before the run fails (fractions allowed:
    0.5 is 30 s)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage (deepspeed engine): 0 none, 1 optimizer, 2 +gradients, 3 +parameters."""
    offload_optimizer: Literal["none", "cpu"] = "none"
    """DeepSpeed: keep the optimizer state and step in host memory (ZeRO stage >= 1)."""
    offload_param: Literal["none", "cpu"] = "none"
    """DeepSpeed: keep the parameters in host memory between uses (ZeRO stage 3)."""
    allow_untested_versions: bool = False
    """Run on a megatron-core or DeepSpeed version other than the tested one (refused otherwise,
    when the engine is built); the upstream patches are checked target by target either way."""


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class PrecisionConfig:
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Parameter/compute dtype; bf16 and fp16 keep fp32 master weights in the optimizer."""
    initial_loss_scale: float = 2.0**16
    """fp16: the dynamic loss scale to start from."""
    loss_scale_window: int = 1000
    """fp16: steps without overflow before the loss scale is raised."""
    min_loss_scale: float = 1.0
    """fp16: the loss scale never drops below this."""
    loss_scale_hysteresis: int = 2
    """fp16: overflows tolerated before the loss scale is lowered."""

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def validate_precision(cfg: PrecisionConfig) -> None:
    """fp16's loss-scaling settings are positive (the other dtypes do not read them)."""
    if cfg.dtype == "fp16":
        for key in ("initial_loss_scale", "min_loss_scale", "loss_scale_window",
                    "loss_scale_hysteresis"):
            if not getattr(cfg, key) > 0:
                raise ConfigError(f"precision.{key}", f"must be > 0, got {getattr(cfg, key)}")


@dataclass
class OptimConfig:
    lr: float = 3e-4
    """Peak learning rate (reached after the warmup)."""
    min_lr: float = 3e-5
    """Learning rate at the end of the decay."""
    lr_warmup_iters: int = 2
    """Steps of linear warmup from 0 to lr."""
    lr_decay_iters: int | None = None
    """Steps over which lr decays to min_lr; None: train.train_iters."""
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    """Shape of the decay."""
    weight_decay: float = 0.1
    """AdamW weight decay (not applied to biases and norms)."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.95
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this; 0: no clipping."""
