"""The MLflow spool of a run dir: what the logging rank has said and what the server has taken.

Files in ``<run.dir>/mlflow/``:

    state.json     run uid (minted once per run dir), MLflow run id, tracking URI, experiment,
                   records not yet sent
    outbox.jsonl   every operation (params, tags, metrics, artifacts, status), numbered
    sent           the number of the last operation the server acknowledged
    sender.lock    held by the one process sending (the sender, ``sync``, ``end_unfinished``)

Default tracking URI: ``sqlite:///<parent of run.dir>/mlflow.db``, artifacts in
``<parent of run.dir>/mlartifacts`` (next to the runs, never the current directory). Nothing
here imports mlflow."""

from __future__ import annotations

import json
from pathlib import Path

from gptforge.common.durable import Durability, write_atomic
from gptforge.common.locks import try_lock

STATE_DIR = "mlflow"
SENDER_LOCK = "sender.lock"


def tracking_uri(logging_cfg, run_dir: str | Path) -> str:
    if logging_cfg.mlflow_tracking_uri:
        return logging_cfg.mlflow_tracking_uri
    return f"sqlite:///{Path(run_dir).resolve().parent / 'mlflow.db'}"


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps artifacts: beside a sqlite file; a server decides itself."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return None

def state_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / STATE_DIR


def read_state(run_dir: str | Path) -> dict:
    try:
        return json.loads((state_dir(run_dir) / "state.json").read_text())
    except (OSError, ValueError):
        return {}


def write_state(run_dir: str | Path, state: dict) -> None:
    state_dir(run_dir).mkdir(parents=True, exist_ok=True)
    write_atomic(state_dir(run_dir) / "state.json", json.dumps(state, indent=1) + "\n",
                 Durability.ATOMIC)


def forget_run(run_dir: str | Path) -> None:
    """A new run in this dir (not a resume): a new MLflow run; the old outbox is dropped."""
    d = state_dir(run_dir)
    for name in ("state.json", "outbox.jsonl", "sent"):
        (d / name).unlink(missing_ok=True)


def read_sent(run_dir: Path) -> int:
    try:
        return int((state_dir(run_dir) / "sent").read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def read_outbox(run_dir: str | Path) -> list[dict]:
    path = state_dir(run_dir) / "outbox.jsonl"
    ops = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                ops.append(json.loads(line))
            except ValueError:  # a line cut off by a crash: it was never acknowledged
                continue
    return ops


def sender_lock(run_dir: Path, wait_s: float):
    """The run dir's one-sender lock (common/locks.py): None if another process holds it after
    ``wait_s`` seconds."""
    return try_lock(state_dir(run_dir) / SENDER_LOCK, wait_s)

def short_error(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else type(err).__name__
    return (line[:160] + "...") if len(line) > 160 else line
