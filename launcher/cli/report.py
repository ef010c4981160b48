"""``gptforge report RUN_DIR``: the PNG of a run's metrics (``launcher/tracking/report.py``)."""

from __future__ import annotations

from pathlib import Path

from gptforge.common.metrics_file import metrics_path
from gptforge.launcher.tracking.report import write_report


def register(verbs) -> None:
    p = verbs.add_parser("report", help="a PNG of loss, lr and throughput against step",
                         description="Plot <run.dir>/metrics.jsonl: train/validation loss, "
                                     "learning rate, throughput against step.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", metavar="PNG", help="default: <RUN_DIR>/report.png")
    p.set_defaults(func=_report)


def _report(args) -> int:
    from gptforge.launcher.rundir import RunDirError

    run_dir = Path(args.run_dir)
    if not metrics_path(run_dir).is_file():
        raise RunDirError(f"run dir {run_dir}: no metrics.jsonl (not a run dir, or nothing "
                          f"logged yet)")
    path = write_report(run_dir, args.out)
    if path is None:
        raise RunDirError(f"run dir {run_dir}: metrics.jsonl holds no training step yet")
    print(f"[gptforge] wrote {path}")
    return 0
