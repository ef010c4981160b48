"""The front door, as a user meets it: one-line errors, run dirs that never mix, signals.

Every case runs the installed ``gptforge`` command in a subprocess.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gptforge.data import tokenizer
from gptforge.data.synthetic import write_text_corpus, write_token_dataset
from tests.conftest import ROOT, TINY, child_pids, metrics

GPTFORGE = str(Path(sys.executable).parent / "gptforge")
BUILDING = "[gptforge] building the model"


def gptforge(*args, timeout=300, env=None):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    env.pop("GPTFORGE_DEBUG", None)
    return subprocess.run([GPTFORGE, *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env=env)


def assert_one_line_error(proc, *culprits):
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-2000:]
    assert "Traceback" not in out, out[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    for culprit in culprits:
        assert str(culprit) in errors[0], (culprit, errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tokenizer (vocab 600), a second one, and shards made with the first."""
    root = tmp_path_factory.mktemp("frontdoor")
    corpus = write_text_corpus(root / "corpus", ("textwrap.py", "json/*.py"))
    tok = tokenizer.train([str(corpus)], str(root / "tok"), 600, txt_unit="file")
    other = tokenizer.train([str(corpus)], str(root / "other"), 500, txt_unit="file")
    rng = np.random.default_rng(0)
    docs = [[rng.integers(0, 600, 200) for _ in range(20)] for _ in range(2)]
    write_token_dataset(root / "shards", {"train": docs, "valid": docs[:1]}, vocab_size=600,
                        eod_id=2, tokenizer_sha256=tokenizer.info(tok.path).sha256)
    return {"root": root, "tok": Path(tok.path), "other": Path(other.path),
            "shards": root / "shards"}


def shard_args(data, shards=None, tok=None, vocab=600):
    return ["--data.source=webdataset", f"--data.sources=[{{path: {shards or data['shards']}}}]",
            f"--data.tokenizer_model={tok or data['tok']}", f"--model.vocab_size={vocab}"]


def train(tmp_path, *extra, nproc=None):
    launch = ["--nproc-per-node", str(nproc)] if nproc else []
    return gptforge("train", "--config", str(TINY), *launch, "--run.dir", str(tmp_path / "run"),
                    "--train.train_iters=3", "--train.eval_interval=0", *extra)


# ------------------------------------------------------------------ user errors, one line each


@pytest.mark.slow
def test_missing_shard_dir(tmp_path, data):
    proc = train(tmp_path, *shard_args(data, shards=tmp_path / "nope"), nproc=2)
    assert_one_line_error(proc, tmp_path / "nope")
    assert BUILDING not in proc.stdout


@pytest.mark.slow
def test_truncated_shard_fails_before_the_model(tmp_path, data):
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(data["shards"], shards)
    shard = shards / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    proc = train(tmp_path, *shard_args(data, shards=shards))
    assert_one_line_error(proc, shard)
    assert BUILDING not in proc.stdout


@pytest.mark.slow
def test_tokenizer_mismatch(tmp_path, data):
    proc = train(tmp_path, *shard_args(data, tok=data["other"]))
    assert_one_line_error(proc, data["other"])
    assert BUILDING not in proc.stdout


@pytest.mark.slow
def test_vocab_smaller_than_the_tokenizer(tmp_path, data):
    proc = train(tmp_path, *shard_args(data, vocab=200))
    assert_one_line_error(proc, "model.vocab_size")
    assert BUILDING not in proc.stdout


@pytest.mark.parametrize("make_dir, culprit", [
    (lambda t: (t / "file").write_text("x") and t / "file", "is a file"),
    (lambda t: Path("/proc/gptforge-run-dir"), "/proc/gptforge-run-dir"),
])
@pytest.mark.slow
def test_unusable_run_dir(tmp_path, make_dir, culprit):
    run_dir = make_dir(tmp_path)
    proc = gptforge("train", "--config", str(TINY), "--nproc-per-node", "2",
                    "--run.dir", str(run_dir))
    assert_one_line_error(proc, "run.dir", culprit)
    assert BUILDING not in proc.stdout


@pytest.mark.parametrize("args, culprit", [
    (["--nproc-per-node", "0"], "--nproc-per-node"),
    (["--nproc-per-node", "-1"], "--nproc-per-node"),
    (["--parallel.engine=deepspeed", "--parallel.zero_stage=5"], "parallel.zero_stage"),
    (["--parallel.engine=deepspeed", "--parallel.pipeline_model_parallel_size=2",
      "--nproc-per-node", "2"], "parallel.pipeline_model_parallel_size"),
    (["--optim.lr=-1e-3", "--optim.min_lr=-1e-2"], "optim.lr"),
    (["--train.train_iters=2"], "optim.lr_warmup_iters"),
    (["--train.train_iters"], "--train.train_iters needs a value"),
])
@pytest.mark.slow
def test_config_mistakes(tmp_path, args, culprit):
    proc = gptforge("train", "--config", str(TINY), "--run.dir", str(tmp_path), *args)
    line = assert_one_line_error(proc, culprit)
    assert proc.returncode == 2 and line.startswith("gptforge")
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("name, content, culprit", [
    ("empty", None, "empty"),
    ("binary.txt", b"\x00\x01\x02binary\x00" * 50, "binary.txt"),
    ("latin1.txt", "caf\u00e9 au lait\n".encode("latin-1"), "latin1.txt"),
    ("bad.jsonl", b'{"text": "ok"}\n{"text": oops}\n', "bad.jsonl:2"),
])
def test_data_prepare_mistakes_leave_no_output(tmp_path, data, name, content, culprit):
    inputs = tmp_path / "in"
    inputs.mkdir()
    if content is not None:
        (inputs / name).write_bytes(content)
    out = tmp_path / "shards"
    proc = gptforge("data", "prepare", "--input", str(inputs if content is None else
                                                      inputs / name),
                    "--tokenizer", str(data["tok"]), "--out", str(out), "--no-progress")
    assert_one_line_error(proc, culprit if content is not None else inputs)
    assert not out.exists()


@pytest.mark.slow
def test_debug_shows_the_traceback(tmp_path):
    proc = gptforge("--debug", "train", "--config", str(TINY), "--run.dir", str(tmp_path),
                    "--optim.lr=-1")
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "optim.lr" in proc.stderr


@pytest.mark.slow
def test_a_failure_inside_one_rank_is_reported_once(tmp_path, data):
    """A corrupt shard (right size, bad bytes) is found while reading, inside the ranks."""
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(data["shards"], shards)
    for shard in shards.glob("train-*.tar"):
        raw = bytearray(shard.read_bytes())
        raw[100:400] = b"\xff" * 300  # the tar header: same size, unreadable
        shard.write_bytes(bytes(raw))
    proc = train(tmp_path, *shard_args(data, shards=shards), nproc=2)
    line = assert_one_line_error(proc, "train-00000")
    assert "(rank " in line
    assert "ProcessGroupGloo" not in proc.stderr and "torchrun" not in proc.stderr


# ------------------------------------------------------------------ run dirs


@pytest.mark.slow
def test_a_second_identical_run_is_refused_and_overwrite_starts_fresh(tmp_path):
    """Without checkpoints a run cannot be continued: a second one is refused. (With them, the
    second run continues the first: tests/integration/test_checkpoint_resume.py.)"""
    first = train(tmp_path, "--checkpoint.enabled=false")
    assert first.returncode == 0, first.stderr[-2000:]
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    second = train(tmp_path, "--checkpoint.enabled=false")
    assert_one_line_error(second, "run.dir", tmp_path / "run", "--run.overwrite=true")
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before
    third = train(tmp_path, "--run.overwrite=true")
    assert third.returncode == 0, third.stderr[-2000:]
    assert [r["step"] for r in metrics(tmp_path / "run")] == [1, 2, 3]
    assert (tmp_path / "run" / "checkpoints" / "step-0000003").is_dir()
    fourth = train(tmp_path, "--run.overwrite=true")  # replaces checkpoints too: no resume
    assert fourth.returncode == 0 and "restart" not in (tmp_path / "run" /
                                                          "metrics.jsonl").read_text()


# ------------------------------------------------------------------ signals


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "State:\tZ" not in status.read_text()


def _start_long_run(tmp_path):
    proc = subprocess.Popen(
        [GPTFORGE, "train", "--config", str(TINY), "--nproc-per-node", "2",
         "--run.dir", str(tmp_path / "run"), "--train.train_iters=100000",
         "--train.eval_interval=0", "--train.log_interval=1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONWARNINGS": "ignore"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait for the first logged step
        if (tmp_path / "run" / "metrics.jsonl").exists():
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    ranks = child_pids(proc.pid)
    assert len(ranks) == 2
    return proc, ranks


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_a_signal_to_the_launcher_leaves_no_rank_behind(tmp_path, signum):
    proc, ranks = _start_long_run(tmp_path)
    sent = time.monotonic()
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    deadline = sent + 30
    while any(_alive(r) for r in ranks) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(r) for r in ranks), "a rank outlived the launcher"
    if signum == signal.SIGKILL:
        return
    assert proc.returncode == 75  # checkpointed: the same command resumes
    assert "Traceback" not in out + err and "KeyboardInterrupt" not in out + err
    assert len([line for line in err.splitlines() if line.startswith("gptforge:")]) == 1
    stop = [r for r in metrics(tmp_path / "run") if r.get("event") == "stopped"]
    assert len(stop) == 1 and stop[0]["signal"] == signal.Signals(signum).name
    steps = [r["step"] for r in metrics(tmp_path / "run") if "loss" in r]
    assert steps[-1] == stop[0]["step"]  # both ranks stopped after the same step


def _catches(pid: int, signum: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


def _torch_loaded(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.slow
def test_a_stop_signal_during_rank_start_up_stops_after_the_first_step(tmp_path):
    """Slurm's USR1 (or a SIGTERM) that reaches a rank while it still imports torch and
    megatron must not kill it: the rank trains one step, checkpoints it and exits 75."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptforge.launcher.run", "--config", str(TINY),
         f"--run.dir={run_dir}", "--train.train_iters=100000", "--train.eval_interval=0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        while not _catches(proc.pid, signal.SIGUSR1):
            assert not _torch_loaded(proc.pid), "SIGUSR1 is not caught before torch imports"
            assert proc.poll() is None
            time.sleep(0.002)
        assert not _torch_loaded(proc.pid)  # still starting up: nothing imported yet
        proc.send_signal(signal.SIGUSR1)
        out, err = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 75, err[-3000:]
    assert "SIGUSR1: stopping after this step" in err
    stop = [r for r in metrics(run_dir) if r.get("event") == "stopped"]
    assert len(stop) == 1 and stop[0]["signal"] == "SIGUSR1" and stop[0]["step"] == 1
    assert (run_dir / "checkpoints" / "latest").exists()


@pytest.mark.slow
def test_master_addr_is_required_for_a_multi_node_rank(tmp_path):
    env = {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "MASTER_PORT": "29999"}
    env_all = {**os.environ, **env, "PYTHONWARNINGS": "ignore"}
    env_all.pop("MASTER_ADDR", None)
    proc = subprocess.run([sys.executable, "-m", "gptforge.launcher.run", "--config", str(TINY),
                           "--run.dir", str(tmp_path), "--parallel.tensor_model_parallel_size=4"],
                          capture_output=True, text=True, cwd=ROOT, env=env_all, timeout=120)
    assert_one_line_error(proc, "MASTER_ADDR", "multi-node", "rank 0")


@pytest.mark.slow
def test_a_rank_killed_with_sigkill_stops_the_run_naming_it(tmp_path):
    proc, ranks = _start_long_run(tmp_path)
    os.kill(ranks[1], signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    lines = [line for line in err.splitlines() if line.startswith("gptforge:")]
    assert lines == [lines[0]] and "rank 1 was killed by SIGKILL" in lines[0], err[-2000:]
    assert "Traceback" not in out + err
    assert not any(_alive(r) for r in ranks)


# ------------------------------------------------------------------ plain torchrun


@pytest.mark.slow
@pytest.mark.parametrize("bad, culprit", [
    (["--model.bogus_key=1"], "bogus_key"),  # the config: every rank alike, rank 0 says it
    (["--data.source=webdataset", "--data.sources=[{path: /nonexistent/shards}]"],
     "/nonexistent/shards"),  # a node's files: its first rank says it
])
def test_a_user_error_under_plain_torchrun_is_printed_once(tmp_path, bad, culprit):
    """Under `torchrun -m gptforge.launcher.run`, an error found before the process group is
    printed once, not once per rank, and megatron's Apex/TE fallback warnings are silenced.
    (torchrun itself exits 1 whatever the ranks' code: not ours to change.)"""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "GPTFORGE_DEBUG")}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-port", "0", "-m", "gptforge.launcher.run", "--config", str(TINY),
         "--run.dir", str(tmp_path / "run"), *bad],
        capture_output=True, text=True, cwd=ROOT, timeout=300, env={**env, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("gptforge: error:")]
    assert len(lines) == 1 and culprit in lines[0], proc.stderr[-3000:]
    assert "Apex" not in proc.stderr and "Transformer Engine" not in proc.stderr
    assert "exitcode  : 2" in proc.stderr  # every rank: the user-error code
