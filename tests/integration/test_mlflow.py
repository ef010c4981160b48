"""MLflow against a real `mlflow server` on 127.0.0.1 and the embedded sqlite default: params,
metric history, tags and artifacts read back with MlflowClient; a server killed mid-run and
started again loses no metric; a resumed run continues the same MLflow run; statuses say how
a run really ended; the step never waits for MLflow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import TINY, child_pids, metrics, train_losses
from tests.services import GPTFORGE, clean_env, gptforge, mlflow_server

pytestmark = pytest.mark.slow
__all__ = ["mlflow_server"]


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def the_run(uri: str):
    c = client(uri)
    runs = c.search_runs([c.get_experiment_by_name("gptforge").experiment_id])
    assert len(runs) == 1, [(r.info.run_name, r.info.status) for r in runs]
    return c, runs[0]


def history(c, run, key="loss") -> dict[int, float]:
    points = c.get_metric_history(run.info.run_id, key)
    steps = [m.step for m in points]
    assert len(steps) == len(set(steps)), f"{key} logged twice for a step: {sorted(steps)}"
    return {m.step: m.value for m in points}


def artifacts(c, run, path=None) -> set[str]:
    out = set()
    for a in c.list_artifacts(run.info.run_id, path):
        out |= artifacts(c, run, a.path) if a.is_dir else {a.path}
    return out


def wait_for(predicate, timeout=120, what=""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    return sum(1 for line in path.read_text().splitlines() if '"loss"' in line)


def test_server_kept_through_an_outage_and_a_resume(mlflow_server, tmp_path):
    run_dir = tmp_path / "runs" / "outage"
    args = ["train", "--config", TINY, "--run.dir", run_dir, "--logging.mlflow=true",
            f"--logging.mlflow_tracking_uri={mlflow_server.uri}", "--run.name=outage run",
            "--train.eval_interval=10", "--train.log_interval=1"]
    proc = subprocess.Popen([GPTFORGE, *map(str, args), "--train.train_iters=40"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=clean_env())
    state = run_dir / "mlflow" / "state.json"
    wait_for(lambda: logged_steps(run_dir) >= 3 or proc.poll() is not None, what="step 3")
    # hold the trainer (its sender process goes on) until the server has the run: however
    # loaded this machine, the server dies mid-run
    proc.send_signal(signal.SIGSTOP)
    killed_at = logged_steps(run_dir)
    try:
        assert killed_at < 40, "the run ended before the server could be stopped"
        wait_for(lambda: state.is_file() and "run_id" in state.read_text(), what="the run id")
        mlflow_server.stop()  # SIGKILL: the server dies mid-run
    finally:
        proc.send_signal(signal.SIGCONT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    records = [r for r in metrics(run_dir) if "loss" in r]
    assert len(records) == 40
    # (that a log call never waits for the server: test_a_dead_server_costs_the_step_nothing)
    assert "is unreachable" in out and "records not sent" in out
    unsent = json.loads(state.read_text())["unsent"]
    assert unsent > 0
    # the server comes back: `gptforge mlflow sync` sends what waited, nothing is lost
    mlflow_server.start()
    sync = gptforge("mlflow", "sync", run_dir, check=True)
    assert f"sent {unsent} records" in sync.stdout
    c, run = the_run(mlflow_server.uri)
    assert (run.info.run_name, run.info.status) == ("outage run", "FINISHED")
    losses = history(c, run)
    assert sorted(losses) == list(range(1, 41))
    assert [losses[s] for s in range(1, 41)] == pytest.approx(train_losses(run_dir), rel=1e-12)
    assert sorted(history(c, run, "val_loss")) == [10, 20, 30, 40]
    for key in ("lr", "grad_norm", "tokens_per_s", "tflops_per_device", "mfu", "mem_bytes",
                "val_ppl", "skipped"):
        assert len(history(c, run, key)) == (4 if key == "val_ppl" else 40), key
    params = run.data.params
    assert params["train.train_iters"] == "40" and params["model.hidden_size"] == "64"
    assert params["derived.data_parallel_size"] == "1"
    assert params["derived.padded_vocab_size"] == "256"
    assert params["derived.num_microbatches"] == "4"
    tags = run.data.tags
    assert len(tags["git.commit"]) == 40 and tags["layout"] == "TP=1 PP=1 DP=1"
    assert (tags["engine"], tags["host_count"]) == ("megatron", "1")
    assert {"config.yaml", "report.png", "checkpoints/step-0000040/manifest.json"} \
        <= artifacts(c, run)
    # a resumed run (more steps) continues the SAME MLflow run, with the server up all along
    gptforge(*args, "--train.train_iters=50", check=True)
    c, run = the_run(mlflow_server.uri)
    assert run.info.status == "FINISHED"
    assert sorted(history(c, run)) == list(range(1, 51))
    assert run.data.params["train.train_iters"] == "40"  # params are immutable: a tag says
    assert run.data.tags["gptforge.param_changed.train.train_iters"] == "40 -> 50"
    assert "checkpoints/step-0000050/manifest.json" in artifacts(c, run)


def test_embedded_default_next_to_the_runs_and_statuses(tmp_path):
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    run_dir = tmp_path / "runs" / "emb"
    common = ["train", "--config", TINY, "--run.dir", run_dir, "--logging.mlflow=true",
              "--train.eval_interval=0"]
    proc = gptforge(*common, "--train.train_iters=4", cwd=cwd, check=True)
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert f"mlflow ui --backend-store-uri {uri}" in proc.stdout  # printed at the start
    assert not list(cwd.iterdir()), "MLflow wrote into the current directory"
    c, run = the_run(uri)
    assert (run.info.run_name, run.info.status) == ("emb", "FINISHED")
    assert sorted(history(c, run)) == [1, 2, 3, 4]
    assert (tmp_path / "runs" / "mlartifacts").is_dir()
    assert {"config.yaml", "report.png"} <= artifacts(c, run)
    # a run that fails after its MLflow run exists ends FAILED (here: a corrupted checkpoint
    # met when resuming it)
    ckpt = run_dir / "checkpoints" / "step-0000004"
    shard = next((ckpt / "state").glob("*.distcp"))
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    failed = gptforge(*common, "--train.train_iters=6", cwd=cwd)
    assert failed.returncode == 2 and "checksum" in failed.stderr, failed.stderr[-2000:]
    c, run = the_run(uri)
    assert run.info.status == "FAILED"


def test_a_dead_server_costs_the_step_nothing_and_the_records_wait(tmp_path):
    """Sink level: a tracking URI nobody answers. Each log call appends to the outbox; close
    is bounded; the outbox holds every record, in order."""
    import socket

    from gptforge.launcher.run.metrics import LoggingConfig, MetricsSink
    from gptforge.launcher.tracking.outbox import read_outbox, read_state

    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(16)  # accepts, never answers: each HTTP attempt waits for its timeout
    cfg = LoggingConfig(mlflow=True, mlflow_close_timeout_s=30,
                        mlflow_tracking_uri=f"http://127.0.0.1:{hole.getsockname()[1]}")
    sink = MetricsSink(tmp_path / "run", cfg, fresh=True)
    worst = 0.0
    for step in range(1, 201):
        t = time.perf_counter()
        sink.log({"step": step, "loss": 1.0 / step, "skipped": False})
        worst = max(worst, time.perf_counter() - t)
    t = time.perf_counter()
    sink.close("FINISHED", report=False)
    closing = time.perf_counter() - t
    hole.close()
    assert worst < 0.05, f"a log call took {worst:.3f} s"
    assert closing < 25, f"close took {closing:.1f} s"
    ops = read_outbox(tmp_path / "run")
    steps = [op["step"] for op in ops if op["op"] == "metrics"]
    assert steps == list(range(1, 201))
    assert ops[-1] == {**ops[-1], "op": "status", "status": "FINISHED"}
    assert read_state(tmp_path / "run")["unsent"] == len(ops)


def test_records_wait_for_the_store_and_a_resumed_run_replays_them(tmp_path):
    """The store is unreachable (its directory is blocked by a file): the records wait in the
    outbox; a resumed run's sender replays them first, into the same MLflow run, and keeps
    sending when the store comes back mid-run. The sender ignores stop signals (scancel --full
    signals every process of the step) and ends when its rank closes."""
    from gptforge.launcher.run.metrics import LoggingConfig, MetricsSink
    from gptforge.launcher.tracking.outbox import read_outbox, read_state

    blocker = tmp_path / "store"
    blocker.write_text("not a directory")
    uri = f"sqlite:///{blocker / 'mlflow.db'}"
    cfg = LoggingConfig(mlflow=True, mlflow_tracking_uri=uri, mlflow_close_timeout_s=60)
    run_dir = tmp_path / "run"

    def sink(fresh):
        return MetricsSink(run_dir, cfg, fresh=fresh, run_name="replay")

    first = sink(True)
    first.log_params({"a.b": 1})
    for step in range(1, 6):
        first.log({"step": step, "loss": float(step)})
    first.close("KILLED", report=False)
    left = read_state(run_dir)["unsent"]
    assert left == len(read_outbox(run_dir)) == 8  # status, params, 5 steps, status
    # the resumed run: its sender starts while the store is still blocked
    second = sink(False)
    sender = second._mlflow._sender
    sender.send_signal(signal.SIGUSR1)  # at once: it ignores them from its first instruction
    sender.send_signal(signal.SIGTERM)
    second.log({"step": 6, "loss": 6.0})
    blocker.unlink()  # the store comes back mid-run
    sent = run_dir / "mlflow" / "sent"
    wait_for(lambda: sent.is_file() and int(sent.read_text()) >= 10, timeout=90,
             what="the sender to replay while the run goes on")
    second.log({"step": 7, "loss": 7.0})
    second.close("FINISHED", report=False)
    assert sender.returncode == 0 and read_state(run_dir)["unsent"] == 0
    c, run = the_run(uri)
    assert (run.info.run_name, run.info.status) == ("replay", "FINISHED")
    assert history(c, run) == {s: float(s) for s in range(1, 8)}
    # created late (the store came back mid-run), the run still starts when training did
    stamps = [m.timestamp for m in c.get_metric_history(run.info.run_id, "loss")]
    assert run.info.start_time <= min(stamps) <= max(stamps) <= run.info.end_time
    assert run.data.params == {"a.b": "1"}


@pytest.mark.parametrize("killed_rank", [0, 1])
def test_a_rank_killed_mid_run_leaves_its_mlflow_run_failed_not_running(tmp_path, killed_rank):
    """SIGKILL leaves the logging rank no chance to end its MLflow run (rank 0 killed), and a
    failing peer can leave it stuck until the launcher kills it (rank 1 killed): the launcher,
    which outlives the ranks, ends the run FAILED. The metrics sent before stay."""
    run_dir = tmp_path / "runs" / "crash"
    proc = subprocess.Popen(
        [GPTFORGE, "train", "--config", str(TINY), "--nproc-per-node", "2",
         "--run.dir", str(run_dir), "--logging.mlflow=true", "--train.train_iters=100000",
         "--train.eval_interval=0", "--train.log_interval=1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    try:
        wait_for(lambda: logged_steps(run_dir) >= 3 or proc.poll() is not None, what="3 steps")
        ranks = child_pids(proc.pid)
        assert len(ranks) == 2, ranks
        os.kill(sorted(ranks)[killed_rank], signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0 and f"rank {killed_rank} was killed by SIGKILL" in err, err[-2000:]
    c, run = the_run(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    assert run.info.status == "FAILED"
    assert len(history(c, run)) >= 3  # what was logged before the crash is kept
    # ending it again (the Slurm batch shell does so after any failed step) changes nothing
    from gptforge.launcher.tracking.sender import end_unfinished

    assert end_unfinished(run_dir, "FAILED") is False


def test_an_end_written_but_never_sent_is_sent_by_whoever_outlives_the_ranks(tmp_path):
    """A rank wrote FAILED into its outbox, then its sender was killed before sending it
    (the launcher SIGKILLs the ranks' process group): ``end_unfinished`` appends nothing, but
    sends what waits, so MLflow does not show RUNNING."""
    from gptforge.launcher.tracking.outbox import read_state, write_state
    from gptforge.launcher.tracking.sender import end_unfinished

    run_dir = tmp_path / "runs" / "late"
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    write_state(run_dir, {"run_uid": "u1", "tracking_uri": uri, "experiment": "gptforge",
                          "run_name": "late"})
    ops = [{"op": "status", "status": "RUNNING"},
           {"op": "metrics", "step": 1, "values": {"loss": 5.0}},
           {"op": "status", "status": "FAILED"}]
    (run_dir / "mlflow" / "outbox.jsonl").write_text("".join(
        json.dumps({"seq": i + 1, "time": time.time(), **op}) + "\n" for i, op in enumerate(ops)))
    assert end_unfinished(run_dir, "FAILED") is False  # the run had ended itself
    c, run = the_run(uri)
    assert run.info.status == "FAILED" and history(c, run) == {1: 5.0}
    assert read_state(run_dir)["unsent"] == 0
