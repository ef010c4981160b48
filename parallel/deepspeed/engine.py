"""DeepSpeed engine: ZeRO 0/1/2/3 (optionally offloaded to host memory) over the same megatron
GPTModel, optimizer settings, LR schedule and loss as the megatron engine.

The model is this rank's megatron-core GPTModel (tensor parallelism from megatron; DeepSpeed gets
megatron's groups through ``MegatronMpu``), wrapped in megatron's Float16Module for bf16/fp16 as
the megatron engine does, and in ``LossModel`` so that DeepSpeed's forward returns the loss of
``model/loss.py``. The optimizer is torch's AdamW with megatron's param groups (no weight decay on
biases and 1-D params); the learning rate follows ``parallel/optim.py: learning_rate`` through
``MegatronLR``. DeepSpeed does loss scaling (fp16), gradient accumulation over the trainer's
micro-batches, ZeRO partitioning, clipping and the update.

Nothing here compiles C++: the torch optimizer is passed in (no FusedAdam / CPUAdam build) and
DeepSpeed's shared-memory all-reduce op is not built (``parallel/deepspeed/compat.py``).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist

from gptforge.model.loss import masked_token_loss_sum, token_weighted_mean
from gptforge.common.durable import Durability, fsync_path, write_atomic
from gptforge.parallel.config import OptimConfig, ParallelConfig, PrecisionConfig
from gptforge.common.errors import ConfigError
from gptforge.parallel.context import ParallelContext
from gptforge.parallel.deepspeed.compat import import_deepspeed
from gptforge.parallel.deepspeed.config import CONFIG_FILE, deepspeed_config
from gptforge.parallel.deepspeed.convert import (TAG, fp32_state_dict, gpt_param_name,
                                                 read_record, write_record)
from gptforge.parallel.engine import (NONFINITE, OVERFLOW, CheckpointError, StepResult,
                                     TrainingDiverged)
from gptforge.parallel.optim import adamw_settings, fuse_adamw, learning_rate

FORMAT_VERSION = 1  # of our record beside DeepSpeed's files (deepspeed_convert.RECORD_FILE)


class MegatronMpu:
    """megatron's parallel_state as DeepSpeed's ``mpu``: model parallel = tensor parallel (the
    deepspeed engine runs without pipeline stages); data parallel = megatron's DP group."""

    def __init__(self):
        from megatron.core import parallel_state as ps

        self._ps = ps

    def get_model_parallel_group(self):
        return self._ps.get_tensor_model_parallel_group()

    def get_model_parallel_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return self._ps.get_tensor_model_parallel_world_size()

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_src_rank()

    def get_data_parallel_group(self):
        return self._ps.get_data_parallel_group()

    def get_data_parallel_rank(self) -> int:
        return self._ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return self._ps.get_data_parallel_world_size()

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1


class LossModel(torch.nn.Module):
    """The GPT chunk (or its Float16Module) with the loss of ``model/loss.py`` on top: returns
    the micro-batch's (loss sum, token count)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens, position_ids, attention_mask, labels, loss_mask):
        per_token = self.model(tokens, position_ids, attention_mask, labels=labels)
        return masked_token_loss_sum(per_token, loss_mask)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load through the wrapped model's own ``load_state_dict``. megatron's Float16Module
        (bf16/fp16) saves its chunk's keys without its own ``module.`` level and loads them the
        same way, but torch's recursive load would look for ``model.module.*``: a bf16 run could
        not resume. Keys are ``model.<chunk key>`` in every precision."""
        inner = {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")}
        extra = sorted(k for k in state_dict if not k.startswith("model."))
        if strict and extra:
            raise RuntimeError(f"unexpected keys in the saved module state: {extra[:5]}")
        result = self.model.load_state_dict(inner, strict=strict)
        return result if result is not None else torch.nn.modules.module._IncompatibleKeys([], [])


def megatron_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """megatron's default groups: no weight decay on biases and 1-D params (norms)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.dim() == 1 or name.endswith(".bias") else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class MegatronLR:
    """The LR schedule of ``parallel/optim.py`` as the scheduler DeepSpeed steps after every
    applied update (not after an fp16 overflow), like megatron's OptimizerParamScheduler."""

    def __init__(self, optimizer, optim: OptimConfig, train_iters: int):
        self.optimizer, self.optim, self.train_iters = optimizer, optim, train_iters
        self.num_steps = 0
        self._apply()

    def _apply(self) -> None:
        lr = learning_rate(self.num_steps, self.optim, self.train_iters)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self, increment: int = 1) -> None:
        self.num_steps += increment
        self._apply()

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:
        return self.get_lr()

    def state_dict(self) -> dict:
        return {"num_steps": self.num_steps}

    def load_state_dict(self, state: dict) -> None:
        self.num_steps = int(state["num_steps"])
        self._apply()


class WrittenFile(NamedTuple):
    path: str  # relative to the state directory
    bytes: int


class DoneSave:
    """The handle of a DeepSpeed save: always synchronous, so ``wait``/``poll`` have nothing to
    wait for; ``files`` lists what this rank claims (see ``_file_owner``)."""

    def __init__(self, files: list[WrittenFile]):
        self._files = files

    @property
    def files(self) -> list[WrittenFile]:
        return list(self._files)

    def wait(self) -> "DoneSave":
        return self

    def poll(self) -> bool:
        return True


_OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_(?:optim|model)_states\.pt$")
_MODEL_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")


def _file_owner(name: str) -> tuple[int, int] | None:
    """(dp rank, tp rank) whose process writes the DeepSpeed file ``name``; None: rank 0."""
    if m := _OPTIM_FILE.match(name):
        return int(m.group(1)), int(m.group(2))
    if m := _MODEL_FILE.match(name):
        return 0, int(m.group(1))
    return None



class DeepSpeedEngine:
    """This rank's GPT inside ``deepspeed.initialize``; one global batch per ``train_step``."""

    def __init__(self, chunks, tcfg, ctx: ParallelContext, *, parallel: ParallelConfig,
                 precision: PrecisionConfig, optim: OptimConfig, train_iters: int,
                 seq_length: int, micro_batch_size: int, num_microbatches: int,
                 run_dir: str | Path | None = None):
        from gptforge.parallel.megatron.engine import apply_mixed_precision

        if precision.dtype == "fp16" and ctx.device.type == "cpu":
            raise ConfigError("precision.dtype", "fp16 with the deepspeed engine needs a GPU "
                              "(DeepSpeed's CPU accelerator has no fp16); use bf16")
        if len(chunks) != 1:
            raise ValueError("the deepspeed engine takes one model chunk (no pipeline stages)")
        deepspeed = import_deepspeed()
        self.ctx, self.seq_length, self.parallel = ctx, seq_length, parallel
        self.num_microbatches = num_microbatches
        chunk = chunks[0].to(ctx.device)
        self._param_count = sum(p.numel() for p in chunk.parameters())
        # the whole model's: TP-split params counted once per TP rank, replicated ones once
        self._model_param_count = sum(
            p.numel() * (ctx.tp_size if getattr(p, "tensor_model_parallel", False) else 1)
            for p in chunk.parameters())
        self.model_chunks = [chunk]
        module = LossModel(apply_mixed_precision([chunk], tcfg, precision)[0])
        self.config = deepspeed_config(parallel, precision, optim,
                                       micro_batch_size=micro_batch_size,
                                       num_microbatches=num_microbatches,
                                       data_parallel_size=ctx.dp_size,
                                       num_parameters=self._param_count)
        if run_dir and ctx.rank == 0:  # what DeepSpeed runs with, for the record
            _write_json(Path(run_dir) / CONFIG_FILE, self.config)
        optimizer = torch.optim.AdamW(megatron_param_groups(module, optim.weight_decay),
                                      fused=True,  # one kernel for all params, CPU and CUDA
                                      **{k: v for k, v in adamw_settings(optim).items()
                                         if k != "weight_decay"})
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, config=self.config, mpu=MegatronMpu(),
            lr_scheduler=lambda opt: MegatronLR(opt, optim, train_iters),
            dist_init_required=False)
        self.fp16 = precision.dtype == "fp16"
        self.min_loss_scale = precision.min_loss_scale
        self._clip_norm: float | None = None
        self._dropped_update = False
        if parallel.zero_stage == 0 and precision.dtype == "fp32":
            # DeepSpeed's own fp32 path clips without keeping the norm: keep it.
            self.engine.clip_fp32_gradients = self._clip_fp32_gradients

    def _clip_fp32_gradients(self) -> None:
        """DeepSpeed's fp32 clipping, keeping the norm; a non-finite norm drops the gradients
        (torch's AdamW then leaves every param and its state as they are: the update is
        skipped, as ZeRO 1/2 skip it)."""
        from deepspeed.runtime.utils import clip_grad_norm_

        params = list(self.engine.module.parameters())
        norm = float(clip_grad_norm_(parameters=params, max_norm=self.engine.gradient_clipping(),
                                     mpu=self.engine.mpu))
        self._clip_norm = norm
        if not math.isfinite(norm):
            for param in params:
                param.grad = None
            self._dropped_update = True

    # ------------------------------------------------------------------ steps

    @property
    def num_parameters(self) -> int:
        """Parameters held by this rank before ZeRO partitioning (its TP shard)."""
        return self._param_count

    def _forward(self, mb: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if self.ctx.device.type != "cpu":
            mb = {k: v.to(self.ctx.device, non_blocking=True) for k, v in mb.items()}
        return self.engine(mb["tokens"], mb["position_ids"], mb.get("attention_mask"),
                           mb["labels"], mb["loss_mask"])

    def _sum_over_dp(self, values: torch.Tensor) -> torch.Tensor:
        values = values.to(self.ctx.device, torch.float64)
        if self.ctx.dp_size > 1:
            dist.all_reduce(values, group=MegatronMpu().get_data_parallel_group())
        return values

    def _global_tokens(self, micro_batches: list[dict]) -> torch.Tensor:
        """The step's loss-carrying tokens over every micro-batch and DP rank."""
        local = sum(mb["loss_mask"].sum(dtype=torch.float64) for mb in micro_batches)
        return self._sum_over_dp(torch.as_tensor(local).reshape(1))[0]

    def train_step(self, micro_batches: list[dict]) -> StepResult:
        if len(micro_batches) != self.num_microbatches:
            raise ValueError(f"{len(micro_batches)} micro-batches, the DeepSpeed config says "
                             f"{self.num_microbatches}")
        self.engine.train()
        tokens = self._global_tokens(micro_batches)
        # DeepSpeed divides each micro-batch's loss by their number and averages gradients over
        # DP: a sum scaled by (micro-batches x DP) / tokens gives the token-weighted gradient.
        scale = float(self.num_microbatches * self.ctx.dp_size / tokens.clamp(min=1))
        totals = []
        for mb in micro_batches:
            total, _ = self._forward(mb)
            self.engine.backward(total * scale)
            self.engine.step()  # an update only at the last micro-batch (accumulation boundary)
            totals.append(total.detach())
        norm = self.engine.get_global_grad_norm()
        norm = self._clip_norm if norm is None else float(norm)
        scale = self.engine._get_optimizer_loss_scale() if self.fp16 else 1.0
        scale = float(scale if scale is not None else 1.0)
        skipped, reason = self._skip_of(norm, scale)
        return StepResult(loss=token_weighted_mean(self._sum_over_dp(torch.stack(totals).sum()),
                                                   tokens),
                          grad_norm=norm, skipped=skipped, loss_scale=scale,
                          lr=float(self.optimizer.param_groups[0]["lr"]), skip_reason=reason)

    def _skip_of(self, norm: float | None, loss_scale: float) -> tuple[bool, str]:
        """Whether DeepSpeed skipped this step's update, and why (NONFINITE: counted)."""
        finite = norm is None or math.isfinite(norm)
        if self._dropped_update:  # _clip_fp32_gradients dropped it; DeepSpeed stepped the LR
            self._dropped_update = False
            self.scheduler.step(increment=-1)
            return True, NONFINITE
        if self.engine.was_step_applied():
            if not finite:
                raise TrainingDiverged(
                    f"parallel.engine=deepspeed (ZeRO stage {self.parallel.zero_stage}) applied "
                    f"an update with a non-finite gradient norm ({norm}); the weights are lost "
                    f"from this step on: resume from the newest checkpoint with a lower optim.lr")
            return False, ""
        if self.fp16 and loss_scale > self.min_loss_scale:
            return True, OVERFLOW
        return True, NONFINITE

    @torch.no_grad()
    def eval_step(self, micro_batches: list[dict]) -> tuple[float, float]:
        self.engine.eval()
        sums = torch.stack([torch.stack(self._forward(mb)).detach() for mb in micro_batches])
        total, tokens = self._sum_over_dp(sums.sum(0))
        return float(total), float(tokens)

    # ------------------------------------------------------------------ checkpoints

    def _record(self) -> dict:
        return {"format": FORMAT_VERSION, "engine": "deepspeed",
                "zero_stage": self.parallel.zero_stage, "dp_size": self.ctx.dp_size,
                "tp_size": self.ctx.tp_size, "optimizer_step": self.scheduler.num_steps,
                "num_parameters": self._model_param_count}

    def save(self, directory, *, async_save: bool = False) -> DoneSave:
        """Collective: DeepSpeed's save_checkpoint into ``directory``/deepspeed (always
        synchronous: DeepSpeed writes on the training thread)."""
        directory = Path(directory)
        if self.ctx.rank == 0:
            directory.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        try:
            self.engine.save_checkpoint(str(directory), tag=TAG, save_latest=False)
        except Exception as e:  # noqa: BLE001 (reported with the directory, on this rank)
            raise CheckpointError(f"{directory}: deepspeed save failed: {e}") from e
        if self.ctx.rank == 0:
            write_record(directory, self._record())
        dist.barrier()
        return DoneSave(self._claim_files(directory))

    def _claim_files(self, directory: Path) -> list[WrittenFile]:
        mine = []
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            owner = _file_owner(path.name)
            me = (self.ctx.dp_rank, self.ctx.tp_rank)
            if owner == me or (owner is None and self.ctx.rank == 0):
                fsync_path(path)
                mine.append(WrittenFile(str(path.relative_to(directory)), path.stat().st_size))
        if self.ctx.rank == 0:
            for sub in {directory, directory / TAG}:
                if sub.is_dir():
                    fsync_path(sub)
        dist.barrier()
        return mine

    def load(self, directory, *, load_optim: bool = True) -> dict:
        """Collective: DeepSpeed's load_checkpoint of a save of this engine. With ``load_optim``
        the layout (ZeRO stage, DP and TP size) must match the save; without it the weights are
        rebuilt in fp32 from any ZeRO stage and DP size (same TP) and loaded."""
        directory = Path(directory)
        record = self._check_saved(directory, load_optim)
        if load_optim:
            path, _ = self.engine.load_checkpoint(str(directory), tag=TAG,
                                                  load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
            if path is None:
                raise CheckpointError(f"{directory}: deepspeed found no checkpoint to load")
            fuse_adamw(self._torch_optimizer())  # the load restored the saved param groups
            return record
        self.load_weights(fp32_state_dict(directory, tp_rank=self.ctx.tp_rank))
        return record

    def _torch_optimizer(self):
        """The torch AdamW under DeepSpeed's wrappers (ZeRO, bf16/fp16 optimizers)."""
        opt = self.optimizer
        while opt is not None and not isinstance(opt, torch.optim.Optimizer):
            opt = getattr(opt, "optimizer", None)
        return opt

    def _check_saved(self, directory: Path, load_optim: bool) -> dict:
        record = read_record(directory)
        if record["tp_size"] != self.ctx.tp_size:
            raise CheckpointError(f"{directory}: saved with tensor_model_parallel_size="
                                  f"{record['tp_size']}, this run has {self.ctx.tp_size}")
        if load_optim:
            saved = (record["zero_stage"], record["dp_size"])
            here = (self.parallel.zero_stage, self.ctx.dp_size)
            if saved != here:
                raise CheckpointError(
                    f"{directory}: saved by ZeRO stage {saved[0]} on {saved[1]} data-parallel "
                    f"ranks, this run is stage {here[0]} on {here[1]}: DeepSpeed restores its "
                    f"optimizer state only into the same layout; load the weights alone "
                    f"(--checkpoint.load_optim=false)")
        return record

    def load_weights(self, state: dict) -> None:
        """Collective: set the model's weights from a GPTModel state dict (fp32, this rank's TP
        shard); the optimizer's master weights follow, its moments stay as they are."""
        deepspeed = import_deepspeed()
        params = dict(self.engine.module.named_parameters())
        missing = sorted(set(gpt_param_name(n) for n in params) - set(state))
        if missing:
            raise CheckpointError(f"weights: {missing[0]!r} (+{len(missing) - 1} more) missing "
                                  f"from the checkpoint")
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0,
                                               enabled=self.parallel.zero_stage == 3):
            with torch.no_grad():
                for name, param in params.items():
                    value = state[gpt_param_name(name)]
                    if tuple(value.shape) != tuple(param.shape):
                        raise CheckpointError(f"weights: {gpt_param_name(name)} has shape "
                                              f"{tuple(value.shape)} in the checkpoint, "
                                              f"{tuple(param.shape)} here")
                    param.copy_(value.to(param.dtype))
        if hasattr(self.optimizer, "refresh_fp32_params"):
            self.optimizer.refresh_fp32_params()


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(data, indent=1) + "\n", Durability.ATOMIC)

