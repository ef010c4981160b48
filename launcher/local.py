"""``gptforge train --nproc-per-node N``: N local ranks, supervised by this process.

The ranks run ``python -m gptforge.launcher.run`` with the torchrun-style environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) in one process group of their own, so that:

- SIGINT, SIGTERM and SIGUSR1 sent to this process are forwarded to every rank (each stops at
  the same step boundary); a third SIGINT/SIGTERM kills them. No rank outlives this process:
  each is also bound to it with PR_SET_PDEATHSIG.
- When a rank fails, the others are stopped, and the first failing rank's one-line message
  (written to an error directory, see ``launcher/errors.py``) is printed once.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gptforge.common.log import PLAIN, get_logger
from gptforge.launcher.errors import (ERROR_DIR_ENV, EXIT_CHECKPOINTED, EXIT_INTERNAL_ERROR,
                                      EXIT_OK)

log = get_logger(__name__)
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
FAILURE_GRACE_S = 3.0  # after a rank fails, how long the others get before SIGKILL
_PR_SET_PDEATHSIG = 1


def _bind_to_parent() -> None:
    """In the child before exec: die with SIGKILL when the launcher dies."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _rank_env(rank: int, nproc: int, port: int, error_dir: str) -> dict:
    env = dict(os.environ)
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
               LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True",
               **{ERROR_DIR_ENV: error_dir})
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.setdefault("PYTHONWARNINGS", "ignore::UserWarning")
    return env


def _rendezvous_store():
    """The ranks' rendezvous store, hosted here as torchrun's agent hosts it: it listens on a
    port the kernel picked and holds it, so that no other launch can take the port between
    choosing it and the ranks' start (each rank connects as a client:
    ``TORCHELASTIC_USE_AGENT_STORE``)."""
    from torch.distributed import TCPStore

    return TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


class RankGroup:
    """The rank processes of one local launch (``python -m MODULE ARGV`` each)."""

    def __init__(self, nproc: int, argv: list[str], module: str = "gptforge.launcher.run"):
        self.error_dir = tempfile.mkdtemp(prefix="gptforge-errors-")
        self.store = _rendezvous_store()  # held until the ranks are gone
        port = self.store.port
        cmd = [sys.executable, "-m", module, *argv]
        self.procs: list[subprocess.Popen] = []
        for rank in range(nproc):
            group = {"process_group": 0 if rank == 0 else self.procs[0].pid}
            self.procs.append(subprocess.Popen(cmd, env=_rank_env(rank, nproc, port,
                                                                  self.error_dir),
                                               preexec_fn=_bind_to_parent, **group))
        self.pgid = self.procs[0].pid

    def signal_all(self, signum: int) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    proc.send_signal(signum)
                except ProcessLookupError:
                    pass

    def kill_all(self) -> None:
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.signal_all(signal.SIGKILL)

    def codes(self) -> list[int | None]:
        return [proc.poll() for proc in self.procs]

    def error_records(self) -> dict[int, dict]:
        records = {}
        for path in Path(self.error_dir).glob("rank-*.json"):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            records[record["rank"]] = record
        return records

    def cleanup(self) -> None:
        for path in Path(self.error_dir).glob("*"):
            path.unlink(missing_ok=True)
        os.rmdir(self.error_dir)


def _describe_exit(rank: int, code: int) -> str:
    if code < 0:
        return (f"rank {rank} was killed by {signal.Signals(-code).name}; the other ranks were "
                f"stopped (the newest complete checkpoint resumes the run)")
    return f"rank {rank} exited with code {code} (see its output above)"


def _failure_line(group: RankGroup, first_rank: int, first_code: int) -> str:
    """A user error anywhere explains the others' broken connections; else the rank that
    failed first, in its own words if it left any. A rank whose words are only that it lost
    another (a ``consequence``) gives way to a rank that ended without any (killed)."""
    records = group.error_records()
    users = sorted((r for r in records.values() if r.get("user_error")
                    and not r.get("consequence")), key=lambda r: r["time"])
    if users:
        return users[0]["line"]
    codes = group.codes()
    silent = [r for r, code in enumerate(codes) if r not in records
              and code not in (None, EXIT_OK, EXIT_CHECKPOINTED)]
    if records.get(first_rank, {}).get("consequence") and silent:
        return f"gptforge: error: {_describe_exit(silent[0], codes[silent[0]])}"
    if first_rank in records:
        return records[first_rank]["line"]
    return f"gptforge: error: {_describe_exit(first_rank, first_code)}"


def _supervise(group: RankGroup, stop: dict) -> int:
    """Wait for every rank; stop the rest when one fails. Returns the run's exit code."""
    first: tuple[int, int] | None = None  # (rank, code) of the first rank seen failing
    failed_at = None
    while True:
        codes = group.codes()
        if all(code is not None for code in codes):
            break
        for rank, code in enumerate(codes):
            if first is None and code not in (None, EXIT_OK, EXIT_CHECKPOINTED):
                first, failed_at = (rank, code), time.monotonic()
                group.signal_all(signal.SIGTERM)
        if failed_at is not None and time.monotonic() - failed_at > FAILURE_GRACE_S:
            group.kill_all()
        if stop["count"] >= 3:
            group.kill_all()
        time.sleep(0.05)
    codes = group.codes()
    if first is None:
        first = next(((r, c) for r, c in enumerate(codes)
                      if c not in (EXIT_OK, EXIT_CHECKPOINTED)), None)
    if first is None:
        if EXIT_CHECKPOINTED not in codes:
            return EXIT_OK
        name = signal.Signals(stop["signum"]).name if stop["signum"] else "a signal"
        log.warning(f"gptforge: stopped by {name} after saving a checkpoint; the same "
                    f"command resumes the run", extra=PLAIN)
        return EXIT_CHECKPOINTED
    if stop["signum"] is not None and not group.error_records():
        log.warning(f"gptforge: stopped by {signal.Signals(stop['signum']).name}", extra=PLAIN)
        return 128 + stop["signum"]
    log.error(_failure_line(group, *first), extra=PLAIN)
    return first[1] if first[1] > 0 else EXIT_INTERNAL_ERROR


def launch_local(nproc: int, argv: list[str], mlflow_run_dir: str | None = None,
                 module: str = "gptforge.launcher.run") -> int:
    """Run ``nproc`` ranks of ``python -m MODULE argv`` (the training rank by default; a verb of
    ``gptforge.launcher.cli.main`` for generate, eval, serve); forward signals; return a code.
    ``mlflow_run_dir``: the run dir of a run logging to MLflow, whose MLflow run is ended
    FAILED (or KILLED) here when the ranks could not end it themselves."""
    stop = {"count": 0, "signum": None}

    def forward(signum, frame):
        stop["count"] += 1
        stop["signum"] = stop["signum"] or signum
        group.signal_all(signum)

    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in FORWARDED}
    group = RankGroup(nproc, argv, module)
    try:
        for sig in FORWARDED:
            signal.signal(sig, forward)
        code = _supervise(group, stop)
    finally:
        group.kill_all()  # the ranks' process group: MLflow senders included
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        group.cleanup()
    if mlflow_run_dir and code not in (EXIT_OK, EXIT_CHECKPOINTED):
        from gptforge.launcher.tracking.sender import end_unfinished

        try:
            end_unfinished(mlflow_run_dir, "KILLED" if stop["signum"] else "FAILED")
        except Exception as err:  # noqa: BLE001 (the run's own outcome is what counts here)
            log.warning(f"gptforge: could not end the MLflow run of {mlflow_run_dir}: {err}",
                        extra=PLAIN)
    return code
