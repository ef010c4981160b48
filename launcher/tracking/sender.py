"""The MLflow sender: ships a run dir's outbox to one MLflow run, in order, in LogBatch-sized
groups.

Run as a process by the logging rank (``python -m gptforge.launcher.tracking.sender RUN_DIR``:
follow the outbox until the rank closes stdin), by ``gptforge mlflow sync`` (send what waits)
and by whoever outlives the ranks (the local launcher, the Slurm batch shell: ``--end RUN_DIR
STATUS`` ends a run the ranks could not). If the server is unreachable or dies, operations wait
in the outbox and the sender retries with backoff (each attempt bounded by
``MLFLOW_HTTP_REQUEST_TIMEOUT`` and no HTTP retries). A resumed or requeued run replays what was
left and continues the SAME MLflow run (its id is in state.json; a run created but not yet
recorded is found again by its ``gptforge.run_uid`` tag, so a retry never leaves a ghost run).

This module is the only importer of mlflow."""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path

from gptforge.common.durable import Durability, write_atomic
from gptforge.common.log import ANY_RANK, get_logger, set_rank
from gptforge.launcher.tracking.outbox import (SENDER_LOCK, artifact_location, read_outbox,
                                               read_sent, read_state, sender_lock, short_error,
                                               state_dir, write_state)

HTTP_TIMEOUT_S = "5"  # one HTTP attempt's bound (MLflow's default: 120 s, with 7 retries)
MAX_BACKOFF_S = 30.0
PARAM_CHARS = 6000  # MLflow's limit on a param value
BATCH_METRICS = 1000
BATCH_PARAMS = 100

log = get_logger(__name__)


def _bound_http() -> None:
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", HTTP_TIMEOUT_S)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


def _client(uri: str):
    import logging

    _bound_http()
    for name in ("mlflow", "alembic"):  # table creation and migrations talk at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
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
            # the run starts when the training did (its first record), not when the sender
            # first reached the server, which may be much later
            first = min((op["time"] for op in read_outbox(self.run_dir)), default=time.time())
            run = client.create_run(exp, run_name=self.state["run_name"],
                                    start_time=int(first * 1000),
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
            from gptforge.launcher.tracking.report import write_report

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

def ignore_stop_signals() -> None:
    """Stop signals are for the ranks (``scancel --full`` signals every process of the step):
    the sender ends when its rank closes its stdin, or dies. Set in the child before exec (an
    ignored signal stays ignored across exec), so that no signal finds the sender still
    starting up with the default, fatal, disposition."""

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


def follow(run_dir: Path) -> int:
    """The sender process: follow the outbox, send in order, retry with backoff while the
    server is away; after end of stdin, send the rest (a dead server: one more attempt)."""
    import select

    ignore_stop_signals()  # (already so when the tracker started it; also for a bare start)
    set_rank(0, 1)  # a helper of the logging rank, not a rank: its messages always print

    lock = sender_lock(run_dir, wait_s=float("inf"))  # noqa: F841 (held until this exits)
    state = read_state(run_dir)
    sender = Sender(run_dir, state)
    sent = read_sent(run_dir)
    path = state_dir(run_dir) / "outbox.jsonl"
    pending: list[dict] = []
    offset = 0
    closing = False
    failing = False
    backoff = 0.5
    wait = 0.0
    while True:
        # wake on end of stdin (closing) or after ``wait`` seconds
        if not closing:
            ready, _, _ = select.select([sys.stdin], [], [], wait)
            if ready and not sys.stdin.buffer.read1(4096):
                closing = True
        if path.is_file():
            with path.open("rb") as f:
                f.seek(offset)
                chunk = f.read()
            complete = chunk[:chunk.rfind(b"\n") + 1]
            offset += len(complete)
            for line in complete.splitlines():
                try:
                    op = json.loads(line)
                except ValueError:
                    continue
                if op["seq"] > sent:
                    pending.append(op)
        if not pending:
            if closing:
                return 0
            wait = 0.2
            continue
        try:
            n = sender.send(pending[:BATCH_METRICS])
        except Exception as err:  # noqa: BLE001 (unreachable, refused, 5xx: retry later)
            if not failing:
                log.warning(f"MLflow at {state['tracking_uri']} is unreachable "
                            f"({short_error(err)}); training goes on, records wait in {path}")
            failing = True
            if closing:
                return 1
            wait = backoff * (0.5 + random.random())
            backoff = min(MAX_BACKOFF_S, backoff * 2)
            continue
        if failing:
            log.warning(f"MLflow at {state['tracking_uri']} is back; sending the "
                        f"{len(pending)} waiting records")
        failing, backoff, wait = False, 0.5, 0.0
        sent = pending[n - 1]["seq"]
        del pending[:n]
        write_atomic(state_dir(run_dir) / "sent", str(sent), Durability.ATOMIC)

def sync(run_dir: str | Path, wait_s: float = 30.0) -> tuple[int, int]:
    """Send a run dir's unsent operations now (``gptforge mlflow sync``); (sent, left).
    Waits up to ``wait_s`` for a sender still at work (one sender at a time: never twice)."""
    run_dir = Path(run_dir)
    state = read_state(run_dir)
    if not state.get("run_uid"):
        return 0, 0
    lock = sender_lock(run_dir, wait_s)
    if lock is None:
        raise RuntimeError(f"another process is still sending this run's records "
                           f"({state_dir(run_dir) / SENDER_LOCK} is held)")
    with lock:
        return _sync_locked(run_dir, state)


def _sync_locked(run_dir: Path, state: dict) -> tuple[int, int]:
    sent = read_sent(run_dir)
    pending = [op for op in read_outbox(run_dir) if op["seq"] > sent]
    sender = Sender(run_dir, state)
    done = 0
    while pending:
        n = sender.send(pending[:BATCH_METRICS])  # raises when the server is unreachable
        sent = pending[n - 1]["seq"]
        write_atomic(state_dir(run_dir) / "sent", str(sent), Durability.ATOMIC)
        done += n
        del pending[:n]
    write_state(run_dir, {**read_state(run_dir), "unsent": 0})
    return done, len(pending)


def end_unfinished(run_dir: str | Path, status: str) -> bool:
    """End a run dir's MLflow run with ``status`` if it is still RUNNING: its logging rank
    could not (SIGKILL, or stopped by another rank's failure). Called by whoever outlives the
    ranks (the local launcher, the Slurm batch shell). The status goes into the outbox, then
    everything waiting is sent; if the server is away it waits there for ``gptforge mlflow
    sync``. Returns whether the run was ended here."""
    run_dir = Path(run_dir)
    if not read_state(run_dir).get("run_uid"):
        return False  # MLflow off, or never started
    ops = read_outbox(run_dir)
    statuses = [op["status"] for op in ops if op["op"] == "status"]
    ended_here = bool(statuses) and statuses[-1] == "RUNNING"
    if ended_here:
        path = state_dir(run_dir) / "outbox.jsonl"
        seq = max([read_sent(run_dir), *(op["seq"] for op in ops)]) + 1
        with path.open("ab") as f:
            if f.tell() and not path.read_bytes().endswith(b"\n"):
                f.write(b"\n")  # a line cut off by the crash stays unreadable, ours does not
            f.write((json.dumps({"seq": seq, "time": time.time(), "op": "status",
                                 "status": status}) + "\n").encode())
    # the run's own end (FAILED written by a rank whose sender was then killed) may wait too
    if any(op["seq"] > read_sent(run_dir) for op in read_outbox(run_dir)):
        try:
            sync(run_dir)
        except Exception as err:  # noqa: BLE001 (server away, or a sender still at it)
            log.warning(f"MLflow: records of {run_dir} not sent ({short_error(err)}); "
                        f"`gptforge mlflow sync {run_dir}` sends them", extra=ANY_RANK)
    return ended_here


if __name__ == "__main__":
    if sys.argv[1] == "--end":  # the Slurm batch shell, after ranks that did not finish
        end_unfinished(sys.argv[2], sys.argv[3])
        sys.exit(0)
    sys.exit(follow(Path(sys.argv[1])))
