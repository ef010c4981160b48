"""Real daemons for the integration tests: the local Slurm cluster (slurm/local_cluster.sh, which
installs Slurm and munge if absent) and an `mlflow server` on 127.0.0.1. Whatever a fixture
starts, it stops (by PID / its own process group)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT

CLUSTER = ROOT / "slurm" / "local_cluster.sh"
BIN = Path(sys.executable).parent
GPTFORGE = str(BIN / "gptforge")


# Set in this process by tests that start process groups in-process: never for a child's run.
LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
              "LOCAL_WORLD_SIZE", "GROUP_RANK")


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    return {**env, "PYTHONWARNINGS": "ignore", **extra}


def gptforge(*args, timeout=300, cwd=ROOT, env=None, check=False):
    env = clean_env(**(env or {}))
    proc = subprocess.run([GPTFORGE, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env=env)
    if check:
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


# ---------------------------------------------------------------- Slurm


def _cluster(action: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER), action], capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="session")
def slurm_cluster():
    """Two idle nodes n1, n2 (partition debug); taken down at the end if this started them."""
    if os.geteuid() != 0:
        pytest.fail("the Slurm tests start system daemons: run them as root (CI does)")
    running = "slurmctld: running" in _cluster("status").stdout
    up = _cluster("up")
    assert up.returncode == 0, up.stdout + up.stderr
    yield
    if not running:
        down = _cluster("down")
        assert down.returncode == 0, down.stdout + down.stderr


def scontrol_job(job: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True,
                         text=True, timeout=60).stdout
    records = {}
    for line in out.splitlines():
        fields = dict(t.split("=", 1) for t in line.split() if "=" in t)
        records[fields.get("ArrayTaskId", "")] = fields
    return records


def job_id(run_dir: Path) -> str:
    return json.loads((run_dir / "slurm_job.json").read_text())["job_id"]


def wait_job(job: str, done=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                             "OUT_OF_MEMORY"), timeout=240, release=False) -> dict:
    """Wait until every record of ``job`` is in a final state; ``release``: start a requeued
    (held until its BeginTime, ~2 min) job now."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        records = scontrol_job(job)
        states = {r.get("JobState") for r in records.values()}
        if records and states <= set(done):
            return records
        if release and any(r.get("JobState") == "PENDING" and r.get("Reason") == "BeginTime"
                           for r in records.values()):
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"],
                           capture_output=True, timeout=60)
        time.sleep(0.5)
    raise AssertionError(f"job {job} not done after {timeout} s: {scontrol_job(job)}")


def job_output(run_dir: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(run_dir.glob("slurm-*.*")))


# ---------------------------------------------------------------- MLflow server


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 (sqlite store, proxied artifacts) in its own process
    group; ``stop`` ends that group, ``start`` brings it back on the same port and store."""

    def __init__(self, root: Path, port: int):
        self.root, self.port = root, port
        self.uri = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> float:
        began = time.time()
        log = open(self.root / "server.log", "a")
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri",
             f"sqlite:///{self.root / 'server.db'}", "--artifacts-destination",
             str(self.root / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1"], stdout=log, stderr=log, env=env, start_new_session=True)
        while time.time() - began < timeout:
            if self.proc.poll() is not None:
                log_text = (self.root / "server.log").read_text()[-2000:]
                raise AssertionError(f"mlflow server exited: {log_text}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return time.time() - began
            except OSError:
                pass
            time.sleep(0.3)
        raise AssertionError("mlflow server did not answer /health")

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group this fixture created
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    from gptforge.parallel.context import free_port

    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"), free_port())
    server.start()
    yield server
    server.stop()
