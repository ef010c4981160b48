"""The one metrics path: console line + <run.dir>/metrics.jsonl + MLflow, on the logging rank only.

Which rank keeps the metrics is decided here, once: ``build_sink`` returns a sink that drops
everything on every rank but the logging one (what prints where: ``common/log.py``). MLflow goes
through ``launcher/tracking/``: records are spooled in the run dir and sent by a background
process, so a slow or dead server never holds a step up; one MLflow run per run dir, continued
by a resumed or requeued run.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from gptforge.common.log import ANY_RANK, PLAIN_ANY_RANK, get_logger

log = get_logger(__name__)


@dataclass
class LoggingConfig:
    mlflow: bool = False
    """Also record params, metrics, tags and artifacts in MLflow (logging rank only)."""
    mlflow_tracking_uri: str = ""
    """MLflow tracking URI (http://host:port for a server); empty: an embedded sqlite database
    next to the runs, sqlite:///<parent of run.dir>/mlflow.db."""
    experiment_name: str = "gptforge"
    """MLflow experiment."""
    mlflow_close_timeout_s: float = 60.0
    """At the end, wait at most this long for MLflow to take what is left (a dead server: one
    more attempt); the rest stays spooled in <run.dir>/mlflow/ for `gptforge mlflow sync`."""


class NullSink:
    def log(self, record: dict) -> None:
        pass

    def log_params(self, params: dict) -> None:
        pass

    def log_tags(self, tags: dict) -> None:
        pass

    def close(self, status: str = "FINISHED", artifacts=(), report: bool = True) -> None:
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

    def __init__(self, run_dir: str | Path, logging_cfg: LoggingConfig, *,
                 run_name: str = "", fresh: bool = False, tags: dict | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", buffering=1)
        self._close_timeout = logging_cfg.mlflow_close_timeout_s
        self._mlflow = None
        if logging_cfg.mlflow:
            from gptforge.launcher.tracking.tracker import MlflowTracker

            name = run_name or Path(run_dir).resolve().name
            self._mlflow = MlflowTracker(run_dir, logging_cfg, name, fresh=fresh)
            self._mlflow.put({"op": "status", "status": "RUNNING"})
            if tags:
                self._mlflow.put({"op": "tags", "values": tags})
            uri = self._mlflow.uri
            where = f"in {uri}" if uri.startswith("sqlite:") else f"at {uri}"
            view = f"; view it: mlflow ui --backend-store-uri {uri}" \
                if uri.startswith("sqlite:") else ""
            log.info(f"MLflow: run {name!r} {where} (experiment "
                     f"{logging_cfg.experiment_name!r}){view}", extra=ANY_RANK)

    def log(self, record: dict) -> None:
        record = {"time": time.time(), **record}
        try:
            self._file.write(json.dumps(record) + "\n")
        except OSError as err:  # a full disk, a quota, a vanished mount
            from gptforge.launcher.rundir import RunDirError

            raise RunDirError(f"{self.path}: {err.strerror or err}; the run stopped at step "
                              f"{record.get('step')}: the records before it and the "
                              f"checkpoints written so far are kept") from None
        if "event" in record:  # a marker in metrics.jsonl (restart, stop), not a metric
            self._event_to_mlflow(record)
            return
        parts = [f"step {record['step']:>6}"] + [_fmt(k, record[k]) for k in self.CONSOLE_KEYS
                                                 if record.get(k) is not None]
        if record.get("skipped"):
            parts.append(f"SKIPPED ({record.get('skip_reason') or 'overflow'})")
        log.info(" | ".join(parts), extra=PLAIN_ANY_RANK)
        if self._mlflow is not None:
            numbers = {k: float(v) for k, v in record.items()
                       if isinstance(v, (int, float)) and k not in ("step", "time")
                       and math.isfinite(float(v))}  # bools (skipped) as 0/1
            self._mlflow.log_metrics(int(record["step"]), numbers, when=record["time"])

    def _event_to_mlflow(self, record: dict) -> None:
        """A ``resized`` event: the new size and the lost work as metrics at its step (a chart
        of world_size over the run), and a tag that says it in words."""
        if self._mlflow is None or record["event"] != "resized":
            return
        from gptforge.launcher.run.resize import describe

        numbers = {"world_size": record["to_world_size"],
                   "data_parallel_size": record["to_data_parallel_size"],
                   "num_microbatches": record["to_num_microbatches"],
                   **{k: record[k] for k in ("lost_steps", "lost_seconds", "down_seconds")
                      if k in record}}
        self._mlflow.log_metrics(int(record["step"]), {k: float(v) for k, v in numbers.items()},
                                 when=record["time"])
        self._mlflow.put({"op": "tags", "values": {"world_size": str(record["to_world_size"]),
                                                   "gptforge.last_resize": describe(record)}})

    def log_params(self, params: dict) -> None:
        if self._mlflow is not None:
            self._mlflow.put({"op": "params", "values": params})

    def log_tags(self, tags: dict) -> None:
        if self._mlflow is not None:
            self._mlflow.put({"op": "tags", "values": tags})

    def close(self, status: str = "FINISHED", artifacts=(), report: bool = True) -> None:
        """``status``: FINISHED, FAILED or KILLED (stopped by a signal; a resumed run sets it
        RUNNING again). ``artifacts``: (path, artifact dir) pairs logged before the status."""
        try:
            self._file.close()
        except OSError:  # a line a full disk refused (reported by log) is not flushed again
            pass
        if self._mlflow is not None:
            for path, artifact_path in artifacts:
                self._mlflow.put({"op": "artifact", "path": str(path),
                                  "artifact_path": artifact_path})
            if report:
                self._mlflow.put({"op": "report"})
            self._mlflow.put({"op": "status", "status": status})
            self._mlflow.close(self._close_timeout)
            self._mlflow = None


def build_sink(run_dir: str, logging_cfg: LoggingConfig, is_logging_rank: bool, **mlflow_run):
    """``mlflow_run``: run_name, fresh (a new run in this dir: a new MLflow run), tags."""
    return MetricsSink(run_dir, logging_cfg, **mlflow_run) if is_logging_rank else NullSink()
