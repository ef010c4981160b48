"""The logging rank's side of MLflow: ``MlflowTracker.put`` appends an operation to the outbox
and returns (microseconds; no network, no mlflow import); a child process (``sender.py``) ships
the outbox to the server. Being a process, its imports and HTTP waits never take the training
process's interpreter lock, and a slow or dead server never holds a step up."""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path

from gptforge.common.log import ANY_RANK, get_logger
from gptforge.launcher.tracking.outbox import (forget_run, read_outbox, read_sent, read_state,
                                               state_dir, tracking_uri, write_state)
from gptforge.launcher.tracking.sender import ignore_stop_signals

log = get_logger(__name__)
SENDER_MODULE = "gptforge.launcher.tracking.sender"


class MlflowTracker:
    """The logging rank's side: ``put`` appends an operation to the outbox (no network, no
    mlflow import); a child process (``python -m gptforge.launcher.tracking.sender RUN_DIR``)
    follows the outbox and sends. Being a process, its imports and HTTP waits never take the
    training process's interpreter lock."""

    def __init__(self, run_dir: str | Path, logging_cfg, run_name: str, *, fresh: bool):
        import subprocess

        self.run_dir = Path(run_dir)
        if fresh:
            forget_run(self.run_dir)
        state = read_state(self.run_dir)
        uri = tracking_uri(logging_cfg, self.run_dir)
        if state.get("tracking_uri") not in (None, uri):  # another store: another MLflow run
            forget_run(self.run_dir)
            state = {}
        state.setdefault("run_uid", uuid.uuid4().hex)
        state.update(tracking_uri=uri, experiment=logging_cfg.experiment_name,
                     run_name=run_name)
        write_state(self.run_dir, state)
        self.state = state
        self.uri = uri
        self._path = state_dir(self.run_dir) / "outbox.jsonl"
        sent = read_sent(self.run_dir)
        self._seq = max([sent, *(op["seq"] for op in read_outbox(self.run_dir))])
        self._file = self._path.open("a", buffering=1)
        self._sender = subprocess.Popen(
            [sys.executable, "-m", SENDER_MODULE, str(self.run_dir)],
            stdin=subprocess.PIPE, preexec_fn=ignore_stop_signals,
            env={**os.environ, "PYTHONWARNINGS": "ignore"})

    def put(self, op: dict) -> None:
        self._seq += 1
        self._file.write(json.dumps({"seq": self._seq, "time": time.time(), **op}) + "\n")

    def log_metrics(self, step: int, values: dict, when: float | None = None) -> None:
        op = {"op": "metrics", "step": step, "values": values}
        if when is not None:
            op["time"] = when
        self.put(op)

    def close(self, timeout_s: float) -> int:
        """Tell the sender that nothing more comes; wait while it sends (at most
        ``timeout_s``; a dead server gets one more attempt). Returns the records left unsent."""
        import subprocess

        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        try:
            self._sender.stdin.close()  # end of input: send what is left, then exit
        except OSError:
            pass
        try:
            self._sender.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self._sender.kill()
            self._sender.wait()
        left_over = sum(1 for op in read_outbox(self.run_dir)
                        if op["seq"] > read_sent(self.run_dir))
        self.state = {**read_state(self.run_dir), "unsent": left_over}
        write_state(self.run_dir, self.state)
        if left_over:
            log.warning(f"MLflow: {left_over} records not sent to {self.uri}; they are kept in "
                        f"{self._path}: `gptforge mlflow sync {self.run_dir}` sends them (a "
                        f"resumed run does too)", extra=ANY_RANK)
        return left_over
