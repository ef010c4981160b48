"""``<run.dir>/metrics.jsonl``: one JSON record per line, read here and nowhere else.

The trainer appends (``launcher/run/metrics.py``); the run-dir check, ``gptforge report``,
``gptforge launch status`` and the tests read through ``read_records``. A record with
``"event"`` is a marker (restart, loaded, stopped); one with ``"step"`` and no event is a step's
metrics (``loss``...) or a validation (``val_loss``). A line cut off by a crash is skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


def metrics_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / METRICS_FILE


def read_records(run_dir: str | Path) -> list[dict]:
    """Every whole record of ``run_dir``'s metrics.jsonl, in order ([] when there is none)."""
    path = metrics_path(run_dir)
    if not path.is_file():
        return []
    records = []
    with path.open() as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:  # cut off by a crash, or a full disk
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def is_event(record: dict) -> bool:
    return "event" in record


def step_records(records: list[dict]) -> list[dict]:
    """The records of steps (training and validation), markers left out."""
    return [r for r in records if "step" in r and not is_event(r)]
