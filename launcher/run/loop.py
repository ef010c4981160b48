"""The one training loop, shared by pre-training and fine-tuning, and its ``train`` section.

It sees an Engine (train_step/eval_step), batch iterators, a metrics sink and a stop check —
nothing of megatron, DeepSpeed or process groups.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from gptforge.common.errors import ConfigError
from gptforge.launcher.run.throughput import memory_bytes
from gptforge.parallel.engine import NONFINITE, Engine, StepResult, TrainingDiverged


@dataclass
class TrainConfig:
    train_iters: int = 20
    """Optimizer steps to train for (the run's last step)."""
    micro_batch_size: int = 2
    """Sequences per micro-batch on one data-parallel rank."""
    global_batch_size: int = 8
    """Sequences per optimizer step over all ranks (micro-batches accumulate up to it)."""
    seed: int = 1234
    """Seed of the weights, dropout and data order (the same for every layout)."""
    eval_interval: int = 10
    """Validate every this many steps (and after the last); 0: never."""
    eval_iters: int = 2
    """Global batches per validation."""
    log_interval: int = 1
    """Log a metrics record every this many steps (and the last, and every skipped one)."""
    max_skipped_steps: int = 3
    """Stop the run (non-zero exit) after this many steps in a row skipped for a non-finite
    loss or gradient norm (fp16 overflows that lower the loss scale do not count)."""


def validate_train(cfg: TrainConfig) -> None:
    """The train section on its own: counts >= 1, intervals >= 0."""
    for key in ("train_iters", "micro_batch_size", "global_batch_size", "log_interval",
                "max_skipped_steps"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"train.{key}", f"must be >= 1, got {getattr(cfg, key)}")
    for key in ("eval_interval", "eval_iters"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"train.{key}", f"must be >= 0, got {getattr(cfg, key)}")


class SkipGuard:
    """Counts the steps skipped in a row for a non-finite loss or grad norm (an applied step
    ends the row; an fp16 overflow that lowered the loss scale neither counts nor ends it)."""

    def __init__(self, limit: int):
        self.limit, self.first = limit, None
        self.count = 0

    def see(self, step: int, out: StepResult) -> None:
        if not out.skipped:
            self.count, self.first = 0, None
        elif out.skip_reason == NONFINITE:
            self.count += 1
            self.first = self.first or step
            if self.count >= self.limit:
                raise TrainingDiverged(
                    f"train.max_skipped_steps: {self.count} steps in a row ({self.first}-{step})"
                    f" were skipped for a non-finite loss or gradient norm (step {step}: loss "
                    f"{out.loss}, grad norm {out.grad_norm}, loss scale {out.loss_scale:g}); no "
                    f"update was applied from them: lower optim.lr, or "
                    f"resume from the newest checkpoint with other settings")


@dataclass
class Throughput:
    tokens_per_step: int  # global: global_batch_size * seq_length
    flops_per_token: float
    world_size: int
    peak_tflops_per_device: float

    def record(self, step_seconds: float) -> dict:
        tokens_per_s = self.tokens_per_step / step_seconds
        tflops = self.flops_per_token * tokens_per_s / self.world_size / 1e12
        mfu = tflops / self.peak_tflops_per_device if self.peak_tflops_per_device else None
        return {"tokens_per_s": tokens_per_s, "tflops_per_device": tflops, "mfu": mfu,
                "step_time_s": step_seconds}


@dataclass
class LoopResult:
    records: list[dict] = field(default_factory=list)  # what was logged (logging rank)
    last_step: int = 0  # the last step completed
    stopped_early: bool = False  # should_stop ended the loop before train_iters


def _take(it: Iterator[dict], n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


def evaluate(engine: Engine, valid_iter: Iterator[dict], num_microbatches: int,
             eval_iters: int) -> float | None:
    """The token-weighted loss over ``eval_iters`` global batches (None off the last stage)."""
    sums = [engine.eval_step(_take(valid_iter, num_microbatches)) for _ in range(eval_iters)]
    if not sums or sums[0] is None:
        return None
    return sum(s for s, _ in sums) / max(sum(t for _, t in sums), 1.0)


def train(engine: Engine, train_iter: Iterator[dict], cfg: TrainConfig, *, num_microbatches: int,
          throughput: Throughput, sink, make_valid_iter: Callable[[], Iterator[dict]] | None = None,
          start_step: int = 0, should_stop: Callable[[int], bool] | None = None) -> LoopResult:
    """Run steps start_step+1 .. cfg.train_iters.

    ``should_stop(step)`` is called after every step (all ranks call it at the same point, so it
    may run a collective); when it returns True the loop ends after that step.
    """
    result = LoopResult(last_step=start_step)
    guard = SkipGuard(cfg.max_skipped_steps)

    def emit(record: dict) -> None:
        result.records.append(record)
        sink.log(record)

    for step in range(start_step + 1, cfg.train_iters + 1):
        start = time.perf_counter()
        micro_batches = _take(train_iter, num_microbatches)
        out = engine.train_step(micro_batches)
        elapsed = time.perf_counter() - start
        last = step == cfg.train_iters
        if step % cfg.log_interval == 0 or last or out.skipped:
            emit({"step": step, "loss": out.loss, "lr": out.lr, "grad_norm": out.grad_norm,
                  "loss_scale": out.loss_scale, "skipped": out.skipped,
                  **({"skip_reason": out.skip_reason} if out.skipped else {}),
                  **throughput.record(elapsed), "mem_bytes": memory_bytes()})
        guard.see(step, out)
        if make_valid_iter and cfg.eval_interval and (step % cfg.eval_interval == 0 or last):
            val_loss = evaluate(engine, make_valid_iter(), num_microbatches, cfg.eval_iters)
            if val_loss is not None:
                emit({"step": step, "val_loss": val_loss,
                      "val_ppl": math.exp(min(val_loss, 50.0))})
        result.last_step = step
        if should_stop is not None and should_stop(step) and not last:
            result.stopped_early = True
            break
    return result
