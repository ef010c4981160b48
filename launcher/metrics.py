"""The one metrics path: console line + <run.dir>/metrics.jsonl + MLflow, on the logging rank only.

Rank filtering happens here, once: ``build_sink`` returns a sink that drops everything on every
rank but the logging one.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class LoggingConfig:
    mlflow: bool = False
    """Also record params and metrics in MLflow (logging rank only)."""
    mlflow_tracking_uri: str = ""
    """MLflow tracking URI; empty: MLflow's default."""
    experiment_name: str = "gptforge"
    """MLflow experiment."""


class NullSink:
    def log(self, record: dict) -> None:
        pass

    def log_params(self, params: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _fmt(key: str, value) -> str:
    if key.endswith("bytes"):
        return f"mem {value / 2**20:.0f}MiB"
    if isinstance(value, float):
        if key in ("lr",):
            return f"{key} {value:.3e}"
        return f"{key} {value:.4g}"
    return f"{key} {value}"


class MetricsSink:
    """Writes each record to metrics.jsonl, prints one line, and forwards to MLflow if enabled."""

    CONSOLE_KEYS = ("loss", "val_loss", "val_ppl", "lr", "grad_norm", "loss_scale",
                    "tokens_per_s", "tflops_per_device", "mfu", "mem_bytes")

    def __init__(self, run_dir: str | Path, logging_cfg: LoggingConfig, stream=sys.stdout):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", buffering=1)
        self._stream = stream
        self._mlflow = None
        if logging_cfg.mlflow:
            import mlflow  # imported lazily: only the logging rank pays for it

            if logging_cfg.mlflow_tracking_uri:
                mlflow.set_tracking_uri(logging_cfg.mlflow_tracking_uri)
            mlflow.set_experiment(logging_cfg.experiment_name)
            self._mlflow = mlflow
            self._run = mlflow.start_run()

    def log(self, record: dict) -> None:
        record = {"time": time.time(), **record}
        self._file.write(json.dumps(record) + "\n")
        if "event" in record:
            return  # a marker in metrics.jsonl (restart, stop), not a metric
        parts = [f"step {record['step']:>6}"] + [_fmt(k, record[k]) for k in self.CONSOLE_KEYS
                                                 if record.get(k) is not None]
        if record.get("skipped"):
            parts.append("SKIPPED (overflow)")
        print(" | ".join(parts), file=self._stream, flush=True)
        if self._mlflow is not None:
            numbers = {k: float(v) for k, v in record.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)
                       and k not in ("step", "time") and math.isfinite(float(v))}
            self._mlflow.log_metrics(numbers, step=int(record["step"]))

    def log_params(self, params: dict) -> None:
        if self._mlflow is not None:
            self._mlflow.log_params(params)

    def close(self) -> None:
        self._file.close()
        if self._mlflow is not None:
            self._mlflow.end_run()


def build_sink(run_dir: str, logging_cfg: LoggingConfig, is_logging_rank: bool):
    return MetricsSink(run_dir, logging_cfg) if is_logging_rank else NullSink()
