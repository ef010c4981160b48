"""MLflow for a training run: one MLflow run per run dir, sent from a background thread that
never makes a training step wait, with everything spooled on disk until the server has it.

Files in ``<run.dir>/mlflow/``:

    state.json     run uid (minted once per run dir), MLflow run id, tracking URI, experiment,
                   records not yet sent
    outbox.jsonl   every operation (params, tags, metrics, artifacts, status), numbered
    sent           the number of the last operation the server acknowledged

The trainer appends an operation to the outbox and returns (microseconds); the sender thread
ships them in order, in LogBatch-sized groups. If the server is unreachable or dies, operations
wait in the outbox and the sender retries with backoff (each attempt bounded by
``MLFLOW_HTTP_REQUEST_TIMEOUT`` and no HTTP retries: it is the sender's thread that waits,
never the step). A resumed or requeued run replays what was left and continues the SAME MLflow
run (its id is in state.json; a run created but not yet recorded is found again by its
``gptforge.run_uid`` tag, so a retry never leaves a ghost run). ``gptforge mlflow sync
<run.dir>`` replays by hand.

Default tracking URI: ``sqlite:///<parent of run.dir>/mlflow.db``, artifacts in
``<parent of run.dir>/mlartifacts`` (next to the runs, never the current directory).

This module and ``launcher/metrics.py`` are the only importers of mlflow; it is imported in
the sender thread of the logging rank only.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
import uuid
from pathlib import Path

STATE_DIR = "mlflow"
HTTP_TIMEOUT_S = "5"  # one HTTP attempt's bound (MLflow's default: 120 s, with 7 retries)
MAX_BACKOFF_S = 30.0
PARAM_CHARS = 6000  # MLflow's limit on a param value
BATCH_METRICS = 1000
BATCH_PARAMS = 100


def tracking_uri(logging_cfg, run_dir: str | Path) -> str:
    if logging_cfg.mlflow_tracking_uri:
        return logging_cfg.mlflow_tracking_uri
    return f"sqlite:///{Path(run_dir).resolve().parent / 'mlflow.db'}"


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps artifacts: beside a sqlite file; a server decides itself."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return None


def _bound_http() -> None:
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", HTTP_TIMEOUT_S)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


def _client(uri: str):
    _bound_http()
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri)


def experiment_id(client, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(uri))
    except Exception:  # noqa: BLE001 (created meanwhile by another run)
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def prepare_store(uri: str, experiment: str = "gptforge") -> None:
    """Create the store's tables and the experiment now (before array tasks start together)."""
    experiment_id(_client(uri), experiment, uri)


# ---------------------------------------------------------------- state in the run dir


def _dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / STATE_DIR


def read_state(run_dir: str | Path) -> dict:
    try:
        return json.loads((_dir(run_dir) / "state.json").read_text())
    except (OSError, ValueError):
        return {}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_state(run_dir: str | Path, state: dict) -> None:
    _dir(run_dir).mkdir(parents=True, exist_ok=True)
    _write_atomic(_dir(run_dir) / "state.json", json.dumps(state, indent=1) + "\n")


def forget_run(run_dir: str | Path) -> None:
    """A new run in this dir (not a resume): a new MLflow run; the old outbox is dropped."""
    d = _dir(run_dir)
    for name in ("state.json", "outbox.jsonl", "sent"):
        (d / name).unlink(missing_ok=True)


def _read_sent(run_dir: Path) -> int:
    try:
        return int((_dir(run_dir) / "sent").read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def read_outbox(run_dir: str | Path) -> list[dict]:
    path = _dir(run_dir) / "outbox.jsonl"
    ops = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                ops.append(json.loads(line))
            except ValueError:  # a line cut off by a crash: it was never acknowledged
                continue
    return ops


# ---------------------------------------------------------------- sending


class Sender:
    """Ships the outbox's operations to one MLflow run, in order; ``send_some`` raises on
    any failure (the caller decides about retrying)."""

    def __init__(self, run_dir: Path, state: dict):
        self.run_dir = run_dir
        self.state = state
        self.client = None
        self.created_here = False

    def _ensure_run(self) -> str:
        if self.client is None:
            self.client = _client(self.state["tracking_uri"])
        if self.state.get("run_id"):
            return self.state["run_id"]
        client, uid = self.client, self.state["run_uid"]
        exp = experiment_id(client, self.state["experiment"], self.state["tracking_uri"])
        found = client.search_runs([exp], filter_string=f"tags.`gptforge.run_uid` = '{uid}'",
                                   max_results=1)
        if found:
            run_id = found[0].info.run_id
        else:
            run = client.create_run(exp, run_name=self.state["run_name"],
                                    tags={"gptforge.run_uid": uid})
            run_id = run.info.run_id
            self.created_here = True
        self.state.update(run_id=run_id, experiment_id=exp)
        write_state(self.run_dir, self.state)
        return run_id

    def send(self, ops: list[dict]) -> int:
        """Send a prefix of ``ops``; return how many were acknowledged (>= 1 unless empty)."""
        from mlflow.entities import Metric, Param, RunTag

        if not ops:
            return 0
        run_id = self._ensure_run()
        client = self.client
        op = ops[0]
        kind = op["op"]
        if kind == "metrics":  # consecutive metric records go in one LogBatch
            metrics, n = [], 0
            for o in ops:
                if o["op"] != "metrics" or len(metrics) + len(o["values"]) > BATCH_METRICS:
                    break
                ts = int(o["time"] * 1000)
                metrics += [Metric(k, float(v), ts, int(o["step"])) for k, v in o["values"].items()]
                n += 1
            client.log_batch(run_id, metrics=metrics)
            return n
        if kind == "params":
            self._params(run_id, op["values"])
        elif kind == "tags":
            tags = [RunTag(k, str(v)) for k, v in op["values"].items()]
            for i in range(0, len(tags), BATCH_PARAMS):
                client.log_batch(run_id, tags=tags[i:i + BATCH_PARAMS])
        elif kind == "status":
            if op["status"] == "RUNNING":
                client.update_run(run_id, status="RUNNING")
            else:
                client.set_terminated(run_id, op["status"], end_time=int(op["time"] * 1000))
        elif kind == "artifact":
            path = Path(op["path"])
            if path.is_file():  # a checkpoint removed by retention meanwhile: nothing to send
                client.log_artifact(run_id, str(path), op.get("artifact_path") or None)
        elif kind == "report":
            from gptforge.launcher.report import write_report

            png = write_report(self.run_dir)
            if png is not None:
                client.log_artifact(run_id, str(png))
        _ = Param  # (params are built in _params)
        return 1

    def _params(self, run_id: str, values: dict) -> None:
        """Params are immutable in MLflow: a resumed run logs only the missing ones; a changed
        value (a config edited between attempts) becomes a tag instead of an error."""
        from mlflow.entities import Param, RunTag

        values = {k: str(v)[:PARAM_CHARS] for k, v in values.items()}
        have = {} if self.created_here else self.client.get_run(run_id).data.params
        new = [Param(k, v) for k, v in values.items() if k not in have]
        changed = [RunTag(f"gptforge.param_changed.{k}", f"{have[k]} -> {v}"[:5000])
                   for k, v in values.items() if k in have and have[k] != v]
        for i in range(0, len(new), BATCH_PARAMS):
            self.client.log_batch(run_id, params=new[i:i + BATCH_PARAMS])
        for i in range(0, len(changed), BATCH_PARAMS):
            self.client.log_batch(run_id, tags=changed[i:i + BATCH_PARAMS])


class MlflowTracker:
    """The logging rank's side: ``put`` appends to the outbox and wakes the sender thread."""

    def __init__(self, run_dir: str | Path, logging_cfg, run_name: str, *, fresh: bool,
                 stream=None):
        self.run_dir = Path(run_dir)
        self._stream = stream
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
        self._path = _dir(self.run_dir) / "outbox.jsonl"
        sent = _read_sent(self.run_dir)
        self._pending = [op for op in read_outbox(self.run_dir) if op["seq"] > sent]
        self._seq = max([sent, *(op["seq"] for op in self._pending)])
        self._sent = sent
        self._file = self._path.open("a", buffering=1)
        self._cond = threading.Condition()
        self._closing = False
        self._failing = False  # the last attempt failed (server unreachable, ...)
        self._attempts_after_close = 0
        self._error = ""
        self.sender = Sender(self.run_dir, state)
        self._thread = threading.Thread(target=self._loop, name="gptforge-mlflow", daemon=True)
        self._thread.start()

    # -- trainer side (never blocks on the network)

    def put(self, op: dict) -> None:
        with self._cond:
            self._seq += 1
            op = {"seq": self._seq, "time": time.time(), **op}
            self._file.write(json.dumps(op) + "\n")
            self._pending.append(op)
            self._cond.notify()

    def log_metrics(self, step: int, values: dict, when: float | None = None) -> None:
        op = {"op": "metrics", "step": step, "values": values}
        if when is not None:
            op["time"] = when
        self.put(op)

    # -- the sender thread

    def _loop(self) -> None:
        backoff = 0.5
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending:
                    return
                batch = list(self._pending[:BATCH_METRICS])
            try:
                n = self.sender.send(batch)
            except Exception as err:  # noqa: BLE001 (unreachable, refused, 5xx: retry later)
                with self._cond:
                    if not self._failing:
                        self._say(f"MLflow at {self.uri} is unreachable ({_short(err)}); "
                                  f"training goes on, records wait in {self._path}")
                    self._failing = True
                    self._error = _short(err)
                    if self._closing:
                        self._attempts_after_close += 1
                        self._cond.notify_all()
                        return
                    self._cond.wait(timeout=backoff * (0.5 + random.random()))
                backoff = min(MAX_BACKOFF_S, backoff * 2)
                continue
            with self._cond:
                if self._failing:
                    self._say(f"MLflow at {self.uri} is back; sending the "
                              f"{len(self._pending)} waiting records")
                self._failing = False
                backoff = 0.5
                self._sent = batch[n - 1]["seq"]
                del self._pending[:n]
                _write_atomic(_dir(self.run_dir) / "sent", str(self._sent))
                self._cond.notify_all()

    def _say(self, text: str) -> None:
        import sys

        print(f"[gptforge] {text}", file=self._stream or sys.stderr, flush=True)

    def close(self, timeout_s: float) -> int:
        """Send what is left: wait while the sender makes progress (at most ``timeout_s``);
        a server that is down gets one more attempt. Returns the records left unsent."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            while self._pending and self._thread.is_alive():
                left = deadline - time.monotonic()
                if left <= 0 or (self._failing and self._attempts_after_close):
                    break
                self._cond.wait(timeout=min(left, 0.5))
                if self._failing and not self._attempts_after_close:
                    self._cond.notify_all()  # wake a sender sleeping in backoff
            left_over = len(self._pending)
        self._thread.join(timeout=max(0.0, min(2.0, deadline - time.monotonic())))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self.state = {**read_state(self.run_dir), "unsent": left_over}
        write_state(self.run_dir, self.state)
        if left_over:
            self._say(f"MLflow: {left_over} records not sent ({self._error or 'timed out'}); "
                      f"they are kept in {self._path}: `gptforge mlflow sync {self.run_dir}` "
                      f"sends them (a resumed run does too)")
        return left_over


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else type(err).__name__
    return (line[:160] + "...") if len(line) > 160 else line


def sync(run_dir: str | Path, stream=None) -> tuple[int, int]:
    """Send a run dir's unsent operations now (``gptforge mlflow sync``); (sent, left)."""
    run_dir = Path(run_dir)
    state = read_state(run_dir)
    if not state.get("run_uid"):
        return 0, 0
    sent = _read_sent(run_dir)
    pending = [op for op in read_outbox(run_dir) if op["seq"] > sent]
    sender = Sender(run_dir, state)
    done = 0
    while pending:
        n = sender.send(pending[:BATCH_METRICS])  # raises when the server is unreachable
        sent = pending[n - 1]["seq"]
        _write_atomic(_dir(run_dir) / "sent", str(sent))
        done += n
        del pending[:n]
    write_state(run_dir, {**read_state(run_dir), "unsent": 0})
    return done, len(pending)
