"""The loop, the metrics sink and the throughput formulas, in process, with a fake Engine."""

from __future__ import annotations

import json
import math

import pytest

from gptforge.launcher.run.metrics import LoggingConfig, MetricsSink
from gptforge.launcher.run.throughput import flops_per_token, matmul_params_per_layer
from gptforge.launcher.run.loop import Throughput, TrainConfig, evaluate, train
from gptforge.model.config import ModelConfig
from gptforge.parallel.engine import StepResult


class FakeEngine:
    """Loss = 10 / step; counts the micro-batches it is given."""

    model_chunks: list = []
    num_parameters = 0

    def __init__(self):
        self.steps, self.batches_seen, self.eval_calls = 0, [], 0

    def train_step(self, micro_batches):
        self.steps += 1
        self.batches_seen.append([mb["i"] for mb in micro_batches])
        return StepResult(loss=10.0 / self.steps, grad_norm=1.0, skipped=False,
                          loss_scale=1.0, lr=1e-3)

    def eval_step(self, micro_batches):
        self.eval_calls += 1
        k = float(self.eval_calls)
        return k * k, k  # (loss sum, tokens): batch k has k tokens of loss k


class ListSink:
    def __init__(self):
        self.records = []

    def log(self, record):
        self.records.append(record)


def counter():
    i = 0
    while True:
        yield {"i": i}
        i += 1


THROUGHPUT = Throughput(tokens_per_step=1000, flops_per_token=1e6, world_size=2,
                        peak_tflops_per_device=1.0)


def run_loop(cfg, **kwargs):
    engine, sink = FakeEngine(), ListSink()
    result = train(engine, counter(), cfg, num_microbatches=3, throughput=THROUGHPUT, sink=sink,
                   **kwargs)
    return engine, sink, result


def test_loop_feeds_micro_batches_in_order_and_logs_every_interval():
    cfg = TrainConfig(train_iters=5, log_interval=2, eval_interval=0)
    engine, sink, result = run_loop(cfg)
    assert engine.batches_seen == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11], [12, 13, 14]]
    assert [r["step"] for r in sink.records] == [2, 4, 5]  # every 2nd step and the last
    assert sink.records[0]["loss"] == pytest.approx(5.0)
    for key in ("lr", "grad_norm", "loss_scale", "skipped", "tokens_per_s", "tflops_per_device",
                "mfu", "mem_bytes", "step_time_s"):
        assert key in sink.records[0], key
    assert result.last_step == 5 and not result.stopped_early


def test_validation_runs_every_interval_and_after_the_last_step():
    cfg = TrainConfig(train_iters=5, log_interval=1, eval_interval=2, eval_iters=3)
    engine, sink, _ = run_loop(cfg, make_valid_iter=counter)
    val = [r for r in sink.records if "val_loss" in r]
    assert [r["step"] for r in val] == [2, 4, 5]
    assert engine.eval_calls == 3 * 3
    assert val[0]["val_ppl"] == pytest.approx(math.exp((1 + 4 + 9) / (1 + 2 + 3)))


def test_resume_starts_after_start_step():
    cfg = TrainConfig(train_iters=5, eval_interval=0)
    engine, sink, result = run_loop(cfg, start_step=3)
    assert [r["step"] for r in sink.records] == [4, 5] and engine.steps == 2
    assert result.last_step == 5


def test_should_stop_ends_the_loop_after_that_step():
    cfg = TrainConfig(train_iters=10, eval_interval=0)
    asked = []

    def should_stop(step):
        asked.append(step)
        return step == 3

    engine, sink, result = run_loop(cfg, should_stop=should_stop)
    assert asked == [1, 2, 3] and engine.steps == 3
    assert result.stopped_early and result.last_step == 3


def test_a_stop_on_the_last_step_is_a_normal_end():
    cfg = TrainConfig(train_iters=2, eval_interval=0)
    _, _, result = run_loop(cfg, should_stop=lambda step: True)
    assert result.last_step == 1 and result.stopped_early  # stops after step 1 of 2
    _, _, result = run_loop(TrainConfig(train_iters=1, eval_interval=0),
                            should_stop=lambda step: True)
    assert result.last_step == 1 and not result.stopped_early


def test_evaluate_weighs_by_token_and_reports_none_off_the_last_stage():
    class OffStage(FakeEngine):
        def eval_step(self, micro_batches):
            return None

    # (1 + 4 + 9 + 16) / (1 + 2 + 3 + 4), not the mean of the batches' means, 2.5
    assert evaluate(FakeEngine(), counter(), 2, 4) == 3.0
    assert evaluate(OffStage(), counter(), 2, 4) is None


def test_throughput_record():
    rec = THROUGHPUT.record(step_seconds=0.5)
    assert rec["tokens_per_s"] == pytest.approx(2000.0)
    # 1e6 FLOPs/token * 2000 tokens/s / 2 devices = 1e9 FLOP/s per device = 1e-3 TFLOP/s
    assert rec["tflops_per_device"] == pytest.approx(1e-3)
    assert rec["mfu"] == pytest.approx(1e-3)
    assert Throughput(1, 1.0, 1, 0.0).record(1.0)["mfu"] is None


def test_flops_per_token_counts_matmuls_logits_and_attention():
    m = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32)
    h, ffn = 64, 256
    per_layer = h * 3 * h + h * h + 2 * h * ffn
    assert matmul_params_per_layer(m) == per_layer
    want = 6 * (2 * per_layer + 512 * h) + 12 * 2 * 32 * h
    assert flops_per_token(m, padded_vocab_size=512) == want
    gqa = ModelConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                      activation="swiglu", ffn_hidden_size=128)
    assert matmul_params_per_layer(gqa) == 64 * (64 + 2 * 2 * 16) + 64 * 64 + 3 * 64 * 128


def test_metrics_sink_writes_jsonl_and_one_console_line_per_record(tmp_path, capsys):
    sink = MetricsSink(tmp_path, LoggingConfig())
    sink.log({"step": 1, "loss": 2.5, "lr": 1e-3, "mem_bytes": 2**20, "skipped": False})
    sink.log({"event": "restart", "step": 1})
    sink.log({"step": 2, "loss": 2.0, "skipped": True})
    sink.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("event") for r in lines] == [None, "restart", None]
    assert all("time" in r for r in lines)
    console = capsys.readouterr().out.splitlines()
    assert len(console) == 2  # events are not metrics lines
    assert console[0].startswith("step      1 | loss 2.5 | lr 1.000e-03 | mem 1MiB")
    assert "SKIPPED (overflow)" in console[1]
