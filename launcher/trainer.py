"""The one training loop, shared by pre-training and fine-tuning.

It sees an Engine (train_step/eval_step), batch iterators, and a metrics sink — nothing of
megatron, DeepSpeed or process groups.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from gptforge.launcher.config import TrainConfig
from gptforge.launcher.throughput import memory_bytes
from gptforge.parallel.engine import Engine


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


def _take(it: Iterator[dict], n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


def evaluate(engine: Engine, valid_iter: Iterator[dict], num_microbatches: int,
             eval_iters: int) -> float | None:
    losses = [engine.eval_step(_take(valid_iter, num_microbatches)) for _ in range(eval_iters)]
    return None if losses[0] is None else sum(losses) / len(losses)


def train(engine: Engine, train_iter: Iterator[dict], cfg: TrainConfig, *, num_microbatches: int,
          throughput: Throughput, sink, make_valid_iter: Callable[[], Iterator[dict]] | None = None,
          start_step: int = 0, on_step_end: Callable[[int], None] | None = None) -> list[dict]:
    """Run steps start_step+1 .. cfg.train_iters; return the records logged (logging rank)."""
    records = []

    def emit(record: dict) -> None:
        records.append(record)
        sink.log(record)

    for step in range(start_step + 1, cfg.train_iters + 1):
        start = time.perf_counter()
        micro_batches = _take(train_iter, num_microbatches)
        result = engine.train_step(micro_batches)
        elapsed = time.perf_counter() - start
        if step % cfg.log_interval == 0 or step == cfg.train_iters:
            emit({"step": step, "loss": result.loss, "lr": result.lr,
                  "grad_norm": result.grad_norm, "loss_scale": result.loss_scale,
                  "skipped": result.skipped, **throughput.record(elapsed),
                  "mem_bytes": memory_bytes()})
        last = step == cfg.train_iters
        if make_valid_iter and cfg.eval_interval and (step % cfg.eval_interval == 0 or last):
            val_loss = evaluate(engine, make_valid_iter(), num_microbatches, cfg.eval_iters)
            if val_loss is not None:
                emit({"step": step, "val_loss": val_loss,
                      "val_ppl": math.exp(min(val_loss, 50.0))})
        if on_step_end:
            on_step_end(step)
    return records
