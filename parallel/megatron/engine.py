"""Megatron engine: DDP or distributed optimizer, mixed precision, pipeline schedules.

apply_* functions each add one concern to the model chunks; ``MegatronEngine`` runs a step with
megatron's forward/backward schedule (no pipelining, 1F1B or interleaved, chosen by megatron from
the parallel state), then megatron's optimizer (grad clipping, loss scaling) and LR scheduler.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from gptforge.common.patching import TESTED, Patches
from gptforge.model.loss import masked_token_loss_sum, token_weighted_mean
from gptforge.parallel.megatron import cpu_compat
from gptforge.parallel.config import OptimConfig, ParallelConfig, PrecisionConfig
from gptforge.parallel.context import ParallelContext
from gptforge.parallel.engine import NONFINITE, OVERFLOW, StepResult
from gptforge.parallel.optim import fuse_adamw, lr_decay_iters


_OPTIMIZER = "megatron.core.optimizer.optimizer"
# The upstream step() bodies ``MegatronEngine._step_optimizer`` follows stage by stage: a change
# upstream stops the engine build in one line instead of silently diverging (common/patching.py).
STEP_BODIES = Patches("engine step", "megatron-core", TESTED["megatron-core"])
for _cls, _sha in (("MixedPrecisionOptimizer", "10ed0cb46699b1cc"),
                   ("FP32Optimizer", "c376b9dec1eab575"), ("ChainedOptimizer", "efe98d8282885005")):
    STEP_BODIES.add(f"{_cls}.step", f"{_OPTIMIZER}:{_cls}.step", copied_sha256=_sha)
for _method in ("prepare_grads", "get_grad_norm", "step_with_ready_grads"):
    STEP_BODIES.add(_method, f"{_OPTIMIZER}:MegatronOptimizer.{_method}")
STEP_BODIES.add("finalize_model_grads", "megatron.core.distributed.finalize_model_grads:"
                "finalize_model_grads", copied_sha256="8e8e2bb919cc02fc")


def apply_mixed_precision(chunks, tcfg, precision: PrecisionConfig):
    """bf16/fp16: megatron's Float16Module (norm params stay fp32, outputs come back fp32)."""
    if precision.dtype == "fp32":
        return chunks
    from megatron.core.transformer.module import Float16Module

    return [Float16Module(tcfg, chunk) for chunk in chunks]


def apply_data_parallel(chunks, tcfg, parallel: ParallelConfig):
    """megatron DistributedDataParallel: contiguous fp32 grad buffers.

    ``parallel.overlap_grad_reduce``: each bucket's all-reduce (reduce-scatter with the
    distributed optimizer) is issued asynchronously by the backward hook of its last gradient
    and waited for in ``finalize_model_grads``; off: one synchronous reduction after the
    backward. ``parallel.overlap_param_gather`` (distributed optimizer, with the former, as
    Megatron-LM requires): the step updates this rank's shard only, and the all-gather of the
    updated parameters runs from forward pre-hooks in the next forward (a save completes it
    first: ``checkpoint/save.py: complete_params``). Aligned all-gathers (``param_sync_func``)
    only with virtual pipeline stages, as in Megatron-LM: only the interleaved schedule issues
    them.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    distopt, overlap_grad = parallel.use_distributed_optimizer, parallel.overlap_grad_reduce
    overlap_param = parallel.overlap_param_gather and distopt and overlap_grad
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=overlap_grad,
        overlap_param_gather=overlap_param, align_param_gather=overlap_param and len(chunks) > 1,
        use_distributed_optimizer=distopt, check_for_nan_in_grad=False,
    )
    return [DistributedDataParallel(config=tcfg, ddp_config=ddp_config, module=chunk,
                                    disable_bucketing=i > 0)
            for i, chunk in enumerate(chunks)]


def build_optimizer(chunks, optim: OptimConfig, precision: PrecisionConfig,
                    use_distributed_optimizer: bool):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    ddp_config = chunks[0].ddp_config
    config = OptimizerConfig(
        optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad, bf16=precision.dtype == "bf16",
        fp16=precision.dtype == "fp16", params_dtype=precision.torch_dtype,
        initial_loss_scale=precision.initial_loss_scale,
        min_loss_scale=precision.min_loss_scale, loss_scale_window=precision.loss_scale_window,
        hysteresis=precision.loss_scale_hysteresis,
        use_distributed_optimizer=use_distributed_optimizer,
        # the DDP's (megatron reads it only for mxfp8 params; the DDP's copy rules the step)
        overlap_param_gather=ddp_config.overlap_param_gather,
    )
    with cpu_compat.optimizer_context():
        optimizer = get_megatron_optimizer(config, chunks)
    apply_fused_adam(optimizer)
    return optimizer


def apply_fused_adam(optimizer) -> None:
    """torch's fused AdamW wherever megatron picked torch's AdamW (no TE/apex FusedAdam).

    megatron leaves torch's default: a Python loop over params on CPU, ``foreach`` on CUDA.
    The fused kernel does the whole update in one call on both (0.82M params, CPU: 1.64 ms ->
    0.42 ms per step). Applied again after each checkpoint load (``fuse_adamw``).
    """
    for opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        fuse_adamw(getattr(opt, "optimizer", None))


def build_scheduler(optimizer, optim: OptimConfig, train_iters: int):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=optim.lr, min_lr=optim.min_lr,
        lr_warmup_steps=optim.lr_warmup_iters,
        lr_decay_steps=lr_decay_iters(optim, train_iters),
        lr_decay_style=optim.lr_decay_style, start_wd=optim.weight_decay,
        end_wd=optim.weight_decay, wd_incr_steps=train_iters, wd_incr_style="constant",
        # the config in force defines the schedule; a checkpoint gives only the step count
        # (the rule of both engines: README "Resuming")
        override_opt_param_scheduler=True, use_checkpoint_opt_param_scheduler=False,
    )


def _loss_func(loss_mask: torch.Tensor, tokens_per_micro_batch: int,
               output_tensor: torch.Tensor):
    """The micro-batch's loss sum over ``tokens_per_micro_batch`` and its token count:
    megatron's per-token-loss form (the schedule adds the counts up; ``_finalize_grads``
    divides the gradients by the step's global count, times the same size). Backpropagating the
    sum / size keeps gradients as large as a mean's: fp16 loss scales behave as before."""
    total, tokens = masked_token_loss_sum(output_tensor, loss_mask)
    return (total / tokens_per_micro_batch, tokens.to(torch.int),
            {"lm_loss": torch.stack([total.detach().clone(), tokens])})


def _finalize_grads(model, num_tokens=None, pg_collection=None, force_all_reduce=False, *,
                    tokens_per_micro_batch: int):
    """megatron's ``finalize_model_grads`` (all-reduces), then the token weighting it would do
    with ``num_tokens`` (its last lines, pinned by ``STEP_BODIES``): the global token count from
    the last pipeline stage, summed over DP, divides the gradients; times the micro-batch size
    that ``_loss_func`` divided the sums by."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads

    finalize_model_grads(model, None, pg_collection=pg_collection,
                         force_all_reduce=force_all_reduce)
    if num_tokens is None:
        return
    dist.broadcast(num_tokens, src=ps.get_pipeline_model_parallel_last_rank(),
                   group=ps.get_pipeline_model_parallel_group())
    dist.all_reduce(num_tokens, group=ps.get_data_parallel_group(with_context_parallel=True))
    if num_tokens > 0:
        for chunk in model:
            chunk.scale_gradients(tokens_per_micro_batch / float(num_tokens))


@dataclass
class Distiller:
    """Knowledge distillation in the training steps (``model/distill_loss.py``): the teacher's
    vocabulary-parallel logits for a micro-batch (no gradient), and the loss's mix."""

    teacher: Callable  # (tokens, position_ids) -> [b, s, V/t] logits
    alpha: float  # weight of the soft (KL) term; 1 - alpha of the cross entropy
    temperature: float


def _distill_output(model, batch: dict, distiller: Distiller):
    """The per-token distillation loss of one micro-batch (one pipeline stage: the checks)."""
    from megatron.core import parallel_state as ps

    from gptforge.model.distill_loss import distill_token_loss
    from gptforge.parallel.weights import unwrapped

    logits = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"))
    # the cross entropy megatron computes when given labels, on the same logits ([s, b, V/t])
    logits_sbv = logits.transpose(0, 1).contiguous()  # the layout megatron's loss takes
    cross_entropy = unwrapped(model).compute_language_model_loss(batch["labels"], logits_sbv)
    teacher = distiller.teacher(batch["tokens"], batch["position_ids"])
    return distill_token_loss(logits, teacher, cross_entropy, alpha=distiller.alpha,
                              temperature=distiller.temperature,
                              group=ps.get_tensor_model_parallel_group())


def _forward_step(data_iterator, model, *, tokens_per_micro_batch: int,
                  distiller: Distiller | None = None):
    batch = next(data_iterator)
    if distiller is not None:
        output = _distill_output(model, batch, distiller)
    else:
        output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"),
                       labels=batch["labels"])
    return output, partial(_loss_func, batch["loss_mask"], tokens_per_micro_batch)


class MegatronEngine:
    """Holds this rank's model chunks, optimizer and LR scheduler; runs one global batch a step."""

    def __init__(self, chunks, tcfg, ctx: ParallelContext, *, parallel: ParallelConfig,
                 precision: PrecisionConfig, optim: OptimConfig, train_iters: int,
                 seq_length: int, micro_batch_size: int):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from gptforge.parallel.megatron import fixes as megatron_fixes

        megatron_fixes.apply()  # before the optimizer exists: its load paths are patched
        STEP_BODIES.check()  # the optimizer step _step_optimizer re-composes
        self.ctx, self.seq_length = ctx, seq_length
        # Chunks are built on CPU (use_cpu_initialization): move them before wrapping.
        chunks = [chunk.to(ctx.device) for chunk in chunks]
        tcfg.calculate_per_token_loss = True  # a step's gradient: the token-weighted mean's
        distopt = parallel.use_distributed_optimizer
        self.model_chunks = apply_data_parallel(apply_mixed_precision(chunks, tcfg, precision),
                                                tcfg, parallel)
        self.optimizer = build_optimizer(self.model_chunks, optim, precision, distopt)
        self.scheduler = build_scheduler(self.optimizer, optim, train_iters)
        tcfg.grad_scale_func = self.optimizer.scale_loss
        self.tokens_per_micro_batch = micro_batch_size * seq_length
        tcfg.finalize_model_grads_func = partial(
            _finalize_grads, tokens_per_micro_batch=self.tokens_per_micro_batch)
        # The schedule's hooks for DDP, wired as Megatron-LM's training.py does: no_sync around
        # all but the last micro-batch; with overlap_grad_reduce, grad_sync_func starts a chunk's
        # reduction (align_grad_reduce: the stages of a pipeline start theirs together); with
        # aligned param gathers, param_sync_func starts a chunk's all-gather.
        ddp = self.model_chunks[0].ddp_config
        one = len(self.model_chunks) == 1
        tcfg.no_sync_func = [c.no_sync for c in self.model_chunks]
        tcfg.grad_sync_func = [c.start_grad_sync for c in self.model_chunks] \
            if ddp.overlap_grad_reduce else None
        tcfg.param_sync_func = [c.start_param_sync for c in self.model_chunks] \
            if ddp.overlap_param_gather and ddp.align_param_gather else None
        if one:
            for name in ("no_sync_func", "grad_sync_func", "param_sync_func"):
                if getattr(tcfg, name) is not None:
                    setattr(tcfg, name, getattr(tcfg, name)[0])
        self._forward_backward = get_forward_backward_func()
        self._param_count = sum(p.numel() for c in chunks for p in c.parameters())
        self._last_save = None  # the SaveHandle of the newest save (async: maybe in flight)
        self.distiller: Distiller | None = None  # set by the trainer for a distill section

    def save(self, directory, *, async_save: bool = False):
        """One save in flight at a time: a new one first finishes this engine's previous one."""
        from gptforge.parallel.megatron.checkpoint import save_state

        self._last_save = save_state(self.model_chunks, self.optimizer, self.scheduler,
                                     directory, async_save=async_save, previous=self._last_save)
        return self._last_save

    def load(self, directory, *, load_optim: bool = True) -> dict:
        from gptforge.parallel.megatron.checkpoint import load_state

        record = load_state(self.model_chunks, self.optimizer, self.scheduler, directory,
                            load_optim=load_optim)
        apply_fused_adam(self.optimizer)  # load_state_dict restores the saved param groups
        return record

    @property
    def num_parameters(self) -> int:
        """Parameters held by this rank (see the trainer for the global count)."""
        return self._param_count

    def _run(self, micro_batches: list[dict], forward_only: bool) -> tuple[float, float] | None:
        """The global batch's (loss sum, loss-carrying tokens); None off the last stage."""
        if self.ctx.device.type != "cpu":
            micro_batches = [{k: v.to(self.ctx.device, non_blocking=True) for k, v in mb.items()}
                             for mb in micro_batches]
        iters = [iter(micro_batches) for _ in self.model_chunks]
        losses = self._forward_backward(
            forward_step_func=partial(_forward_step,
                                      tokens_per_micro_batch=self.tokens_per_micro_batch,
                                      distiller=None if forward_only else self.distiller),
            data_iterator=iters if len(iters) > 1 else iters[0],
            model=self.model_chunks if len(self.model_chunks) > 1 else self.model_chunks[0],
            num_microbatches=len(micro_batches), seq_length=self.seq_length,
            micro_batch_size=micro_batches[0]["tokens"].shape[0], forward_only=forward_only,
        )
        if not self.ctx.is_last_stage:
            return None
        total, tokens = torch.stack([d["lm_loss"] for d in losses]).sum(0)
        if self.ctx.dp_size > 1:
            from megatron.core import parallel_state as ps

            both = torch.stack([total, tokens])
            dist.all_reduce(both, group=ps.get_data_parallel_group())
            total, tokens = both
        return float(total), float(tokens)

    def _step_optimizer(self) -> tuple[bool, float | None, str]:
        """megatron's optimizer step, guarded: (applied, grad norm, skip reason).

        megatron's own ``step()`` applies a bf16/fp32 update whatever the gradient holds. Here
        the same stages run (``prepare_grads``, the grad norm, clipping by it,
        ``step_with_ready_grads``; ``STEP_BODIES`` pins the upstream bodies this follows), and a
        non-finite grad norm -- the same on every rank -- skips the update as an fp16 overflow
        does. An fp16 overflow at the minimum loss scale is non-finite too: no scale explains it.
        """
        from megatron.core.optimizer import optimizer as moptimizer

        opt = self.optimizer
        inners = getattr(opt, "chained_optimizers", None) or [opt]
        if opt.prepare_grads():  # fp16: the scaler found inf/nan and lowered the scale
            scaler = next((o.grad_scaler for o in inners if getattr(o, "grad_scaler", None)),
                          None)
            at_min = scaler is None or float(scaler.scale) <= float(scaler.min_scale)
            return False, None, NONFINITE if at_min else OVERFLOW
        grad_norm = float(opt.get_grad_norm())
        if not math.isfinite(grad_norm):
            return False, grad_norm, NONFINITE
        for inner in inners:
            params = inner.get_parameters()
            if params and inner.config.clip_grad > 0.0:
                moptimizer.clip_grad_by_total_norm_fp32(
                    params, max_norm=inner.config.clip_grad, total_norm=grad_norm,
                    use_decoupled_grad=inner.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
        return bool(opt.step_with_ready_grads()), grad_norm, ""

    def train_step(self, micro_batches: list[dict]) -> StepResult:
        for chunk in self.model_chunks:
            if not chunk.training:  # eval_step sets the whole tree; train() walks every module
                chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        sums = self._run(micro_batches, forward_only=False)
        loss = None if sums is None else token_weighted_mean(*sums)
        updated, grad_norm, reason = self._step_optimizer()
        if updated:
            self.scheduler.step(increment=1)
        return StepResult(loss=loss, grad_norm=grad_norm, skipped=not updated,
                          loss_scale=float(self.optimizer.get_loss_scale()),
                          lr=self.optimizer.param_groups[0]["lr"], skip_reason=reason)

    @torch.no_grad()
    def eval_step(self, micro_batches: list[dict]) -> tuple[float, float] | None:
        for chunk in self.model_chunks:
            chunk.eval()
        return self._run(micro_batches, forward_only=True)
