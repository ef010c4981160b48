"""``gptforge launch deepspeed`` end to end: the real deepspeed launcher on this machine (one
host, and two "hosts" through real ssh + pdsh to an sshd on 127.0.0.1), the dry run, the Slurm
hostfile, and bad input refused before any rank starts.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gptforge.parallel.context import free_port
from tests.conftest import ROOT, TINY, metrics

GPTFORGE = str(Path(sys.executable).parent / "gptforge")
SHORT = ["--config", str(TINY), "--train.train_iters=3", "--train.eval_interval=0",
         "--parallel.engine=deepspeed"]


def gptforge(*args, env=None, timeout=300):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([GPTFORGE, *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env=env)


def hostfile(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "hostfile"
    path.write_text(text)
    return path


@pytest.mark.slow
def test_localhost_hostfile_runs_a_two_rank_job_to_completion(tmp_path):
    run_dir = tmp_path / "run"
    proc = gptforge("launch", "deepspeed", "--hostfile",
                    str(hostfile(tmp_path, "localhost slots=2\n")), *SHORT,
                    "--parallel.zero_stage=2", f"--run.dir={run_dir}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "deepspeed.launcher.launch" in proc.stdout + proc.stderr  # DeepSpeed's own launcher
    assert [r["step"] for r in metrics(run_dir) if "loss" in r] == [1, 2, 3]
    config = json.loads((run_dir / "deepspeed_config.json").read_text())
    assert config["zero_optimization"]["stage"] == 2 and config["train_batch_size"] == 8
    assert (run_dir / "checkpoints" / "step-0000003" / "manifest.json").is_file()


def test_dry_run_prints_the_command_and_environment_and_starts_nothing(tmp_path):
    run_dir = tmp_path / "run"
    proc = gptforge("launch", "deepspeed", "--hostfile",
                    str(hostfile(tmp_path, "# two ranks here\nlocalhost slots=2\n")), "--dry-run",
                    *SHORT, f"--run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    command = lines[-1]
    assert "--no_ssh_check" in command and "--master_addr=127.0.0.1" in command
    assert "--num_nodes=1" in command and "--num_gpus=2" in command
    assert "--module gptforge.launcher.run" in command and "--no_local_rank" in command
    assert command.endswith(f"--run.dir={run_dir}")
    assert "DS_ACCELERATOR=cpu" in lines and any(x.startswith("OMP_NUM_THREADS=") for x in lines)
    assert not run_dir.exists()


def test_inside_slurm_the_hostfile_comes_from_scontrol(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text("#!/bin/sh\n[ \"$1 $2 $3\" = 'show hostnames gpu[01-02]' ] && "
                        "printf 'gpu01\\ngpu02\\n'\n")
    scontrol.chmod(0o755)
    run_dir = tmp_path / "run"
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu[01-02]"}
    proc = gptforge("launch", "deepspeed", "--num-gpus", "2", "--master-addr", "10.0.0.1",
                    "--dry-run", *SHORT, f"--run.dir={run_dir}", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "gpu01 slots=2\ngpu02 slots=2\n" in proc.stdout
    assert "world size 4" in proc.stdout
    assert f"--hostfile {(run_dir / 'hostfile').resolve()}" in proc.stdout
    assert "--num_nodes=2 --num_gpus=2" in proc.stdout


@pytest.mark.parametrize("extra, hosts, culprit", [
    (["--parallel.zero_stage=4"], "localhost slots=2", "parallel.zero_stage"),
    (["--parallel.pipeline_model_parallel_size=2"], "localhost slots=2",
     "parallel.pipeline_model_parallel_size"),
    (["--parallel.zero_stage=2", "--parallel.offload_param=cpu"], "localhost slots=2",
     "parallel.offload_param"),
    (["--parallel.tensor_model_parallel_size=2"], "localhost slots=3", "hostfile"),
    ([], "localhost slots=2\nlocalhost slots=2", "hostfile"),
])
@pytest.mark.slow
def test_bad_input_is_refused_in_one_line_before_any_rank_starts(tmp_path, extra, hosts,
                                                                   culprit):
    run_dir = tmp_path / "run"
    path = hostfile(tmp_path, hosts + "\n")
    proc = gptforge("launch", "deepspeed", "--hostfile", str(path), *SHORT, *extra,
                    f"--run.dir={run_dir}")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"gptforge: error: {culprit}"), lines
    if culprit == "hostfile":
        assert str(path) in lines[0]
    assert "deepspeed.launcher" not in proc.stdout + proc.stderr and not run_dir.exists()


# ---------------------------------------------------------------- two hosts through ssh + pdsh

PACKAGES = ("openssh-server", "openssh-client", "pdsh")


def _ensure_packages() -> None:
    if all(Path(p).exists() for p in ("/usr/sbin/sshd", "/usr/bin/ssh", "/usr/bin/pdsh")):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(f"needs {', '.join(PACKAGES)} (installed by this test as root with apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    if subprocess.run(install, capture_output=True, env=env).returncode != 0:
        subprocess.run(["apt-get", "update"], capture_output=True, env=env, check=True)
        subprocess.run(install, capture_output=True, env=env, check=True)


def _wait_for_port(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"sshd did not listen on 127.0.0.1:{port}")


@pytest.fixture
def sshd(tmp_path):
    """An sshd of this test on 127.0.0.1 (its own host key, authorized key and port) and an ssh
    config that makes "node1" and "node2" two names for it."""
    _ensure_packages()
    d = tmp_path / "ssh"
    d.mkdir()
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)],
                       check=True)
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    (d / "authorized_keys").chmod(0o600)
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPidFile {d / 'sshd.pid'}\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
        "PermitRootLogin prohibit-password\nUsePAM no\nStrictModes no\n")
    (d / "ssh_config").write_text(
        f"Host node1 node2\n  HostName 127.0.0.1\n  Port {port}\n"
        f"  IdentityFile {d / 'client_key'}\n  IdentitiesOnly yes\n  BatchMode yes\n"
        "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    subprocess.run(["/usr/sbin/sshd", "-f", str(d / "sshd_config"), "-E", str(d / "sshd.log")],
                   check=True)
    try:
        _wait_for_port(port)
        yield d
    finally:
        pid_file = d / "sshd.pid"
        if pid_file.is_file():
            os.kill(int(pid_file.read_text()), 15)  # the daemon this fixture started


@pytest.mark.slow
def test_two_nodes_through_ssh_and_pdsh_run_to_completion(sshd, tmp_path):
    run_dir = tmp_path / "run"
    path = hostfile(tmp_path, "node1 slots=1\nnode2 slots=1\n")
    proc = gptforge("launch", "deepspeed", "--hostfile", str(path), "--master-addr",
                    "127.0.0.1", *SHORT, "--parallel.zero_stage=1", f"--run.dir={run_dir}",
                    env={"PDSH_SSH_ARGS_APPEND": f"-F {sshd / 'ssh_config'}"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "pdsh" in out  # DeepSpeed's multi-node runner
    # each host's deepspeed launcher ran under pdsh (its output is prefixed by the host name)
    assert "node1: " in out and "node2: " in out
    accepted = (sshd / "sshd.log").read_text().count("Accepted publickey")
    assert accepted >= 4, accepted  # our ssh check of each host, then pdsh to each
    assert "Setting accelerator to CPU" not in out  # DS_ACCELERATOR reached the remote ranks
    assert [r["step"] for r in metrics(run_dir) if "loss" in r] == [1, 2, 3]
