"""Elastic training: two torchrun agents on 127.0.0.1 act as two nodes (``--nnodes 1:2``, c10d
rendezvous). One is SIGKILLed mid-run (agent and rank: a node lost), the survivor goes on at DP=1;
later a new agent joins (a node back) and both go on at DP=2; then that one hangs (SIGSTOP) and
the survivor's collective gives up after parallel.distributed_timeout_minutes, not never. Every
step after each restart equals a run resumed from the same checkpoint at that size; the data are
read exactly once; the run is one MLflow run, FINISHED. On Slurm: a node of an elastic job dies
and is set DOWN; the job finishes on the other."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gptforge.common.metrics_file import read_records
from gptforge.data.state import doc_order, epoch_items
from gptforge.data.synthetic import write_token_dataset
from gptforge.launcher.run.checkpoint import format as ck
from tests.conftest import ROOT, TINY, child_pids, metrics
from tests.services import slurm_cluster

pytestmark = pytest.mark.slow
__all__ = ["slurm_cluster"]  # the fixture, imported for pytest
GPTFORGE = str(Path(sys.executable).parent / "gptforge")
TRAIN_ITERS = 120
TIMEOUT_MIN = 0.5  # how long a collective waits for a hung rank
PACE_S = 0.2  # a step of the tiny model takes milliseconds: time to lose and add a node
# a lost agent is dropped after 3 missed 1-second heartbeats; a round closes 2 s after the
# fewest nodes (1) have joined
RDZV_CONF = "last_call_timeout=2,keep_alive_interval=1,keep_alive_max_attempt=3"
DOCS = 140


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three shards of documents of random lengths, more tokens than the run reads (the
    loader's accounting below counts within the first epoch)."""
    root = tmp_path_factory.mktemp("elastic-shards")
    rng = np.random.default_rng(5)
    docs = [[(np.arange(rng.integers(100, 300)) * rng.integers(1, 7) + rng.integers(0, 250))
             % 250 for _ in range(DOCS)] for _ in range(3)]
    write_token_dataset(root, {"train": docs}, vocab_size=256, eod_id=255)
    return root, docs


def train_args(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--config", str(TINY), "--run.dir", str(run_dir),
            f"--train.train_iters={TRAIN_ITERS}", "--train.eval_interval=0",
            "--checkpoint.save_interval=4", "--checkpoint.keep_last=100",
            "--data.source=webdataset", f"--data.sources=[{{path: {shards}}}]", *extra]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_agent(name: str, args: list[str], port: int, logs: Path, *,
                is_host: bool = False) -> subprocess.Popen:
    """One "node": a torchrun agent with one rank, as the README's elastic example runs it,
    paced by ``logs/pace`` (seconds after each step; PACE_S until the test writes 0).
    ``is_host``: its agent holds the rendezvous store (every agent here is on the endpoint's
    host: left to guess, the first to bind would, and it may be one the test kills)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1:2",
           "--nproc-per-node", "1", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "elastic-test",
           "--rdzv-conf", f"{RDZV_CONF},is_host={str(is_host).lower()}",
           "--max-restarts", "5", "--monitor-interval", "0.5",
           "-m", "tests.integration.paced_rank", str(logs / "pace"), *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(logs / f"{name}.log", "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def set_pace(logs: Path, seconds: float) -> None:
    """The ranks' pause after each step from now on (replaced whole: a rank never reads half)."""
    (logs / "pace.new").write_text(str(seconds))
    os.replace(logs / "pace.new", logs / "pace")


def wait_for(what: str, check, agents, logs: Path, timeout_s: float = 240):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.05)
    tails = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs.glob("*.log"))
    for agent in agents:
        kill_tree(agent.pid)
    pytest.fail(f"no {what} within {timeout_s} s\n{tails}")


def descendants(pid: int) -> list[int]:
    """``pid`` and every process under it (collected before any is signalled)."""
    found = [pid]
    for child in child_pids(pid):
        found += descendants(child)
    return found


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    """SIGKILL an agent and its rank: the node is gone (SIGSTOP: it hangs)."""
    for p in descendants(pid):
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def last_step(run_dir: Path) -> int:
    return max((r["step"] for r in read_records(run_dir) if "loss" in r), default=0)


def resized(run_dir: Path, count: int) -> list[dict] | None:
    events = [r for r in read_records(run_dir) if r.get("event") == "resized"]
    return events if len(events) >= count else None


def consumed_tokens(state: dict, docs: list[list[np.ndarray]]) -> int:
    """Tokens of epoch 0 read so far, from a checkpoint's global loader state: the epoch's
    tokens less what every stream still has queued (its items' documents, less the offset)."""
    seed, num_shards, streams = state["seed"], state["num_shards"][0], state["all_streams"]

    def unit_tokens(item) -> int:
        shard = docs[item[1]]
        return sum(len(shard[i]) + 1 for i in doc_order(seed, 0, item, len(shard)))

    left = 0
    for stream_id, stream in enumerate(streams):
        src = stream["sources"][0]
        queue = src["queue"] if src["next_epoch"] > 0 else epoch_items(
            seed, 0, 0, num_shards, stream_id, len(streams))
        left += sum(unit_tokens(item) - item[4] for item in queue if item[0] == 0)
    return sum(len(d) + 1 for shard in docs for d in shard) - left


def losses_between(records: list[dict], first: int, last: int) -> dict[int, float]:
    """{step: loss} of the records between positions ``first`` and ``last`` of the list."""
    return {r["step"]: r["loss"] for r in records[first:last] if "loss" in r}


def reference(args: list[str], checkpoint: Path, run_dir: Path, nproc: int) -> dict[int, float]:
    """A run resumed from ``checkpoint`` at ``nproc`` ranks with the same config (unpaced)."""
    cmd = [GPTFORGE, "train", "--nproc-per-node", str(nproc), *args,
           "--run.dir", str(run_dir), f"--checkpoint.load={checkpoint}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


def test_a_node_lost_one_back_and_one_hung_the_run_goes_on_as_the_same_training(corpus, tmp_path):
    shards, docs = corpus
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    set_pace(logs, PACE_S)
    args = train_args(shards, run_dir, "--logging.mlflow=true",
                      f"--parallel.distributed_timeout_minutes={TIMEOUT_MIN}")
    port = free_port()
    a = start_agent("a", args, port, logs, is_host=True)
    b = start_agent("b", args, port, logs)
    agents = [a, b]
    wait_for("step 9 at DP=2", lambda: last_step(run_dir) >= 9, agents, logs)
    kill_tree(b.pid)  # a node lost
    (shrink,) = wait_for("a resize to DP=1", lambda: resized(run_dir, 1), agents, logs)
    s1 = shrink["step"]
    wait_for(f"step {s1 + 6} at DP=1", lambda: last_step(run_dir) >= s1 + 6, agents, logs)
    c = start_agent("c", args, port, logs)  # a node back
    agents.append(c)
    _, grow = wait_for("a resize to DP=2", lambda: resized(run_dir, 2), agents, logs)
    s2 = grow["step"]
    wait_for(f"step {s2 + 6} at DP=2", lambda: last_step(run_dir) >= s2 + 6, agents, logs)
    kill_tree(c.pid, signal.SIGSTOP)  # that node hangs (a stuck filesystem, a debugger)
    *_, hung = wait_for("a resize to DP=1 again", lambda: resized(run_dir, 3), agents, logs)
    s3 = hung["step"]
    set_pace(logs, 0)  # nothing more to do at a chosen step: the rest unpaced
    assert a.wait(timeout=300) == 0, (logs / "a.log").read_text()[-3000:]
    kill_tree(c.pid)
    a_log = (logs / "a.log").read_text()
    assert f"waited parallel.distributed_timeout_minutes={TIMEOUT_MIN:g} for a rank" in a_log
    # noticed after the timeout, then the rendezvous and a start: never a hang
    assert TIMEOUT_MIN * 60 <= hung["down_seconds"] < TIMEOUT_MIN * 60 + 60, hung

    # the events: sizes, micro-batches (the global batch kept), the work lost
    assert {k: shrink[k] for k in ("from_world_size", "to_world_size", "from_num_microbatches",
                                   "to_num_microbatches")} == {
        "from_world_size": 2, "to_world_size": 1, "from_num_microbatches": 2,
        "to_num_microbatches": 4}
    assert (grow["from_world_size"], grow["to_world_size"], grow["to_num_microbatches"]) == \
        (1, 2, 2)
    assert s1 % 4 == 0 and s1 >= 8 and shrink["lost_steps"] >= 1 and shrink["lost_seconds"] > 0
    assert grow["lost_steps"] == 0  # the joining node's restart checkpoints first (SIGTERM)
    assert s1 + 6 <= s2 < s3 < TRAIN_ITERS and (hung["from_world_size"], hung["to_world_size"]) \
        == (2, 1)

    # every step after each restart equals a run resumed from that checkpoint at that size
    records = metrics(run_dir)
    at = [i for i, r in enumerate(records) if r.get("event") == "resized"]
    segments = [losses_between(records, at[0], at[1]), losses_between(records, at[1], at[2]),
                losses_between(records, at[2], len(records))]
    assert sorted(segments[0]) == list(range(s1 + 1, s2 + 1))
    assert sorted(segments[1])[0] == s2 + 1 and max(segments[1]) >= s3
    assert sorted(segments[2]) == list(range(s3 + 1, TRAIN_ITERS + 1))
    ckpts = run_dir / "checkpoints"
    plain = train_args(shards, run_dir)
    for i, (start, nproc) in enumerate(((s1, 1), (s2, 2), (s3, 1))):
        resumed = reference(plain, ckpts / ck.step_name(start), tmp_path / f"ref{i}", nproc)
        for step, loss in segments[i].items():
            assert loss == pytest.approx(resumed[step], rel=1e-5, abs=1e-6), (i, step)

    # each sample read once: the loader state's position grows by one global batch a step,
    # across both resizes (a repeat or a skip would move it off the line)
    per_step = consumed_tokens(ck.read_manifest(ckpts / ck.step_name(4))["data"]
                               ["loader_state"], docs) / 4
    for step in (s1, s2, s3, TRAIN_ITERS):
        state = ck.read_manifest(ckpts / ck.step_name(step))["data"]["loader_state"]
        assert consumed_tokens(state, docs) == per_step * step, step
    assert per_step == 8 * 64  # a global batch: 8 samples of seq_length tokens

    # one MLflow run, FINISHED, that charts the world size
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("gptforge").experiment_id])
    assert [(r.info.run_name, r.info.status) for r in runs] == [("run", "FINISHED")]
    sizes = {m.step: m.value for m in client.get_metric_history(runs[0].info.run_id,
                                                                "world_size")}
    assert sizes == {s1: 1.0, s2: 2.0, s3: 1.0}
    assert runs[0].data.tags["gptforge.last_resize"].startswith(
        f"resized at step {s3}: world size 2 -> 1")


# ---------------------------------------------------------------- on Slurm


def steps_on(job: str, node: str) -> list[str]:
    """The step ids of ``job`` running on ``node`` (an elastic job has one per node)."""
    out = subprocess.run(["squeue", "-h", "-s", "-j", job, "-o", "%i %N"], capture_output=True,
                         text=True, timeout=60).stdout
    return [line.split()[0] for line in out.splitlines()
            if line.split()[1:] == [node] and not line.split()[0].endswith(".batch")]


def kill_node(job: str, node: str) -> None:
    """``node`` dies under ``job``: SIGKILL its step (slurmstepd, torchrun, the rank; two Slurm
    "nodes" share this host, so its slurmd is left), then Slurm is told, as it would conclude
    of a node that stopped answering: ``scontrol update NodeName=<node> State=DOWN``."""
    (step,) = steps_on(job, node)
    out = subprocess.run(["pgrep", "-f", rf"^slurmstepd: \[{step}\]"], capture_output=True,
                         text=True).stdout.split()
    assert out, f"no slurmstepd for step {step}"
    for stepd in out:
        kill_tree(int(stepd))
    subprocess.run(["scontrol", "update", f"NodeName={node}", "State=DOWN",
                    "Reason=gptforge test: node lost"], check=True, timeout=60)


def test_an_elastic_slurm_job_loses_a_node_and_finishes_on_the_other(slurm_cluster, corpus,
                                                                      tmp_path):
    from mlflow.tracking import MlflowClient

    from tests.services import gptforge, job_id, job_output  # noqa: F811

    shards, docs = corpus
    run_dir = tmp_path / "runs" / "elastic"
    # a wider model than tiny.yaml's (a step of ~0.1 s), so that the node dies mid-run
    args = [*train_args(shards, run_dir, "--model.hidden_size=256"),
            "--train.train_iters=60", "--logging.mlflow=true"]
    gptforge("launch", "slurm", *args, "--nodes", "1-2", "--gpus-per-node", "0",
             "--partition", "debug", "--time", "00:10:00", "--submit", check=True)
    job = job_id(run_dir)
    try:
        deadline = time.monotonic() + 180
        while last_step(run_dir) < 10:
            assert time.monotonic() < deadline, job_output(run_dir)[-3000:]
            time.sleep(0.2)
        kill_node(job, "n2")
        waited = gptforge("launch", "status", run_dir, "--wait", "--json", timeout=600)
    finally:
        subprocess.run(["scontrol", "update", "NodeName=n2", "State=RESUME"],
                       capture_output=True, timeout=60)  # (for the tests after this one)
    out = job_output(run_dir)
    assert waited.returncode == 0 and json.loads(waited.stdout)["state"] == "COMPLETED", out
    assert "#SBATCH --no-kill" in (run_dir / "job.sbatch").read_text()
    (shrink,) = [r for r in metrics(run_dir) if r.get("event") == "resized"]
    s1 = shrink["step"]
    assert (shrink["from_world_size"], shrink["to_world_size"]) == (2, 1), shrink
    assert (shrink["from_num_microbatches"], shrink["to_num_microbatches"]) == (2, 4)
    assert s1 % 4 == 0 and 8 <= s1 < 60 and "TP=1 PP=1 DP=1" in out

    records = metrics(run_dir)
    at = records.index(shrink)
    elastic_dp1 = losses_between(records, at, len(records))
    assert sorted(elastic_dp1) == list(range(s1 + 1, 61))
    plain = [*train_args(shards, run_dir, "--model.hidden_size=256"), "--train.train_iters=60"]
    dp1 = reference(plain, run_dir / "checkpoints" / ck.step_name(s1), tmp_path / "ref", 1)
    for step, loss in elastic_dp1.items():
        assert loss == pytest.approx(dp1[step], rel=1e-5, abs=1e-6), step

    ckpts = run_dir / "checkpoints"
    per_step = consumed_tokens(ck.read_manifest(ckpts / ck.step_name(4))["data"]
                               ["loader_state"], docs) / 4
    for step in (s1, 60):
        state = ck.read_manifest(ckpts / ck.step_name(step))["data"]["loader_state"]
        assert consumed_tokens(state, docs) == per_step * step, step

    client = MlflowClient(f"sqlite:///{run_dir.parent / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("gptforge").experiment_id])
    assert [(r.info.run_name, r.info.status) for r in runs] == [("elastic", "FINISHED")]
