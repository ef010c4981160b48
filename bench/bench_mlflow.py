"""What MLflow costs a training step, per logged record, with the server alive, absent or hung.

    python bench/bench_mlflow.py [--records 500]

For each case a MetricsSink (the logging rank's) logs ``--records`` step records the way the
trainer does (one record per step) and we time each ``log`` call, then ``close``:

- off:        logging.mlflow=false (metrics.jsonl and the console line only)
- embedded:   the default sqlite store next to the run (MLflow creates its tables meanwhile)
- refused:    a tracking URI whose port refuses connections (server down)
- blackhole:  a server that accepts connections and never answers (hung server)

The sender is a separate process, so these numbers are what the step pays: appending one JSON
line to the outbox. ``close`` waits at most logging.mlflow_close_timeout_s (here 20 s) while the
sender makes progress; a dead server gets one more attempt (bounded by
MLFLOW_HTTP_REQUEST_TIMEOUT = 5 s for the hung one).
"""

from __future__ import annotations

import argparse
import logging
import socket
import statistics
import tempfile
import time
from pathlib import Path

from gptforge.launcher.run.metrics import LoggingConfig, MetricsSink


def record(step: int) -> dict:
    return {"step": step, "loss": 5.0 - step * 1e-3, "lr": 1e-3, "grad_norm": 1.0,
            "loss_scale": 1.0, "skipped": False, "tokens_per_s": 1e5, "tflops_per_device": 1.0,
            "mfu": 0.3, "step_time_s": 0.1, "mem_bytes": 2**30}


def bench(name: str, uri: str | None, records: int, root: Path) -> tuple:
    # what is timed is the sink's own cost (jsonl + outbox), not the console line
    logging.getLogger("gptforge.launcher.run.metrics").setLevel(logging.WARNING)
    cfg = LoggingConfig(mlflow=uri is not None, mlflow_tracking_uri=uri or "",
                        mlflow_close_timeout_s=20.0)
    run_dir = root / name / "run"
    sink = MetricsSink(run_dir, cfg, fresh=True)
    sink.log_params({f"p.{i}": i for i in range(80)})
    times = []
    for step in range(1, records + 1):
        t = time.perf_counter()
        sink.log(record(step))
        times.append(time.perf_counter() - t)
        time.sleep(0.002)  # a (very) short step
    t = time.perf_counter()
    sink.close("FINISHED", report=False)
    close_s = time.perf_counter() - t
    from gptforge.launcher.tracking.outbox import read_state

    unsent = read_state(run_dir).get("unsent", 0) if uri is not None else "-"
    us = [x * 1e6 for x in times]
    return (name, statistics.mean(us), statistics.median(us), sorted(us)[int(0.99 * len(us))],
            max(us), close_s, unsent)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=500)
    args = ap.parse_args()
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(128)  # accepts (kernel backlog), never answers
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cases = [("off", None), ("embedded", f"sqlite:///{root / 'embedded' / 'mlflow.db'}"),
                 ("refused", f"http://127.0.0.1:{refused.getsockname()[1]}"),
                 ("blackhole", f"http://127.0.0.1:{hole.getsockname()[1]}")]
        print(f"{args.records} records per case; time of one sink.log call (the step's cost)")
        print(f"{'case':<10} {'mean us':>9} {'median us':>10} {'p99 us':>8} {'max us':>8} "
              f"{'close s':>8} {'unsent':>7}")
        for name, uri in cases:
            row = bench(name, uri, args.records, root)
            print(f"{row[0]:<10} {row[1]:>9.1f} {row[2]:>10.1f} {row[3]:>8.1f} {row[4]:>8.1f} "
                  f"{row[5]:>8.2f} {row[6]!s:>7}")


if __name__ == "__main__":
    main()
