"""Advisory locks (flock) on a file: held by one process at a time, released by the kernel when
that process exits however it ends (SIGKILL, a node lost), so a stale lock never blocks a
restart. The holder writes who it is into the file, so a refusal can name it.

Used for one run per run dir and per checkpoint directory (``launcher/run/entry.py``) and for
one MLflow sender per run dir (``launcher/tracking/``).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import IO


def try_lock(path: str | Path, wait_s: float = 0.0) -> IO | None:
    """The lock on ``path`` (created if needed), waiting at most ``wait_s``; None if another
    process holds it then. Keep the returned file open to hold the lock; close it to release."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.open("a+")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except OSError:
            if time.monotonic() >= deadline:
                handle.close()
                return None
            time.sleep(0.1)


def sign(handle: IO, **facts) -> None:
    """Write who holds the lock (pid, host, time, and ``facts``) into its file."""
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "since": time.strftime("%Y-%m-%d %H:%M:%S"), **facts}) + "\n")
    handle.flush()


def holder(path: str | Path) -> str:
    """Who signed the lock file at ``path``: "pid 123 on host h since 2026-12-04 21:00:01"."""
    try:
        facts = json.loads(Path(path).read_text())
        return f"pid {facts['pid']} on host {facts['host']} since {facts['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"
