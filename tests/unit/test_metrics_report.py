"""The metrics sink's MLflow-free behaviour and `gptforge report`'s PNG."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from gptforge.launcher.run.metrics import LoggingConfig, MetricsSink, NullSink, build_sink
from gptforge.launcher.tracking.report import read_series, write_report


def test_sink_without_mlflow_writes_jsonl_and_one_line_per_step(tmp_path, capsys):
    sink = build_sink(str(tmp_path), LoggingConfig(), True)
    assert isinstance(sink, MetricsSink) and isinstance(build_sink(str(tmp_path),
                                                                    LoggingConfig(), False),
                                                         NullSink)
    sink = MetricsSink(tmp_path, LoggingConfig())
    sink.log_params({"a.b": 1})
    sink.log({"step": 1, "loss": 2.5, "skipped": True})
    sink.log({"event": "restart", "step": 1})
    sink.close("FINISHED")
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("loss") for r in lines] == [2.5, None]
    out = capsys.readouterr().out
    assert out.count("step      1") == 1 and "SKIPPED" in out
    assert not (tmp_path / "mlflow").exists()


def test_report_plots_the_newest_value_of_each_step(tmp_path):
    records = [{"step": s, "loss": 5.0 - s, "lr": 1e-3, "tokens_per_s": 100.0 * s}
               for s in range(1, 6)]
    records += [{"event": "restart", "step": 3}, {"step": 4, "loss": 9.0, "lr": 1e-3},
                {"step": 5, "val_loss": 1.5, "val_ppl": 4.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    series = read_series(tmp_path)
    assert series["loss"] == [(1, 4.0), (2, 3.0), (3, 2.0), (4, 9.0), (5, 0.0)]
    assert series["val_loss"] == [(5, 1.5)]
    png = write_report(tmp_path)
    assert png == tmp_path / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_report_of_a_dir_without_metrics_is_one_line(tmp_path):
    gptforge = str(Path(sys.executable).parent / "gptforge")
    proc = subprocess.run([gptforge, "report", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr == f"gptforge: error: run dir {tmp_path}: no metrics.jsonl (not a run " \
                          f"dir, or nothing logged yet)\n"
