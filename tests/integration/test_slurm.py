"""`gptforge launch slurm` against a real Slurm (slurm/local_cluster.sh: munge, slurmctld, two
slurmd "nodes" on this host): a 2-node job equals the same run on 2 local ranks; preemption
(USR1) checkpoints, requeues and resumes to the same metrics in ONE MLflow run; a sweep is an
array job with one run dir per point; hostile strings arrive as data and nothing else runs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY, assert_close_losses, metrics, train_losses
from tests.services import (gptforge, job_id, job_output, scontrol_job, slurm_cluster,
                            wait_job)

pytestmark = pytest.mark.slow
__all__ = ["slurm_cluster"]  # the fixture, imported for pytest

STEPS = 40
COMMON = [f"--train.train_iters={STEPS}", "--train.eval_interval=20", "--train.log_interval=1"]
JOB = ["--partition", "debug", "--time", "00:10:00", "--gpus-per-node", "0"]


def val_losses(run_dir: Path) -> list[float]:
    return [r["val_loss"] for r in metrics(run_dir) if "val_loss" in r]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same run, uninterrupted, on 2 local ranks (`gptforge train --nproc-per-node 2`)."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    gptforge("train", "--config", TINY, "--nproc-per-node", "2", *COMMON, "--run.dir", run_dir,
             check=True)
    return run_dir


def submit(run_dir: Path, *extra) -> str:
    proc = gptforge("launch", "slurm", "--config", TINY, *COMMON, "--run.dir", run_dir, *JOB,
                    *extra, "--submit", check=True)
    assert "submitted job" in proc.stdout
    return job_id(run_dir)


def test_two_node_job_trains_like_two_local_ranks(slurm_cluster, reference, tmp_path):
    run_dir = tmp_path / "two-nodes"
    job = submit(run_dir, "--nodes", "2")
    script = (run_dir / "job.sbatch").read_text()
    assert "#SBATCH --nodes=2" in script and "#SBATCH --requeue" in script
    assert "#SBATCH --signal=USR1@300" in script
    waited = gptforge("launch", "status", run_dir, "--wait", "--json")  # until the job ends
    assert waited.returncode == 0, waited.stdout + waited.stderr + job_output(run_dir)
    assert json.loads(waited.stdout)["state"] == "COMPLETED"
    record = scontrol_job(job)[""]
    assert record["NodeList"] == "n[1-2]"
    out = job_output(run_dir)
    assert "master n1:" in out  # MASTER_ADDR: the allocation's first host
    assert "TP=1 PP=1 DP=2" in out
    assert_close_losses(train_losses(run_dir), train_losses(reference), rel=1e-6)
    assert val_losses(run_dir) == pytest.approx(val_losses(reference), rel=1e-6)
    config = yaml.safe_load((run_dir / "job_config.yaml").read_text())
    assert config["run"]["dir"] == str(run_dir) and config["train"]["train_iters"] == STEPS
    status = gptforge("launch", "status", run_dir, "--json", check=True)
    s = json.loads(status.stdout)
    assert (s["job_id"], s["state"], s["last_step"]) == (job, "COMPLETED", STEPS)
    assert s["checkpoint"].endswith(f"step-{STEPS:07d}")


def test_preemption_checkpoints_requeues_and_resumes_into_one_mlflow_run(
        slurm_cluster, reference, tmp_path):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "runs" / "preempted"
    job = submit(run_dir, "--nodes", "2", "--logging.mlflow=true")
    wait_for_step(run_dir, job, 3)
    # preemption as a user or an admin sends it: the batch shell, srun and the ranks all get it
    subprocess.run(["scancel", "--signal=USR1", "--full", job], check=True, timeout=60)
    record = wait_job(job, done=("PENDING",), timeout=120)[""]
    assert record["Restarts"] == "1", record
    stopped = [r for r in metrics(run_dir) if r.get("event") == "stopped"]
    assert len(stopped) == 1 and stopped[0]["signal"] == "SIGUSR1"
    assert stopped[0]["step"] < STEPS, "the signal came too late to test a resume"
    uri = f"sqlite:///{run_dir.parent / 'mlflow.db'}"
    client = MlflowClient(uri)
    (between,) = client.search_runs([client.get_experiment_by_name("gptforge").experiment_id])
    assert between.info.status == "KILLED"  # stopped by a signal, to be continued
    record = wait_job(job, release=True)[""]
    assert record["JobState"] == "COMPLETED", job_output(run_dir)
    out = job_output(run_dir)
    assert "checkpointed: requeueing job" in out and "restart 1 on" in out
    restarts = [r for r in metrics(run_dir) if r.get("event") == "restart"]
    assert [r["step"] for r in restarts] == [stopped[0]["step"]]
    # the final metrics equal the uninterrupted run's, step by step
    assert_close_losses(train_losses(run_dir), train_losses(reference), rel=1e-6)
    assert val_losses(run_dir) == pytest.approx(val_losses(reference), rel=1e-6)
    # one MLflow run (embedded sqlite next to the runs), continued by the requeued job
    runs = client.search_runs([client.get_experiment_by_name("gptforge").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_id == between.info.run_id
    assert (run.info.run_name, run.info.status) == ("preempted", "FINISHED")
    assert run.data.tags["slurm.job_id"] == job and run.data.tags["slurm.restart_count"] == "1"
    assert run.data.tags["host_count"] == "2"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))
    by_step = {m.step: m.value for m in history}
    assert [by_step[s] for s in range(1, STEPS + 1)] == pytest.approx(train_losses(run_dir))
    status = json.loads(gptforge("launch", "status", run_dir, "--json", check=True).stdout)
    assert (status["state"], status["requeues"], status["restarts_logged"]) == \
        ("COMPLETED", "1", 1)
    assert status["mlflow_run_id"] == run.info.run_id and status["last_step"] == STEPS


def test_a_killed_job_step_ends_its_mlflow_run_failed(slurm_cluster, tmp_path):
    """SIGKILL to the ranks (the OOM killer, a node's watchdog) gives the logging rank no
    chance to end its MLflow run; the batch shell, which outlives them, ends it FAILED."""
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "runs" / "killed"
    job = submit(run_dir, "--nodes", "1", "--logging.mlflow=true", "--train.train_iters=100000")
    wait_for_step(run_dir, job, 3)
    subprocess.run(["scancel", "--signal=KILL", f"{job}.0"], check=True, timeout=60)
    record = wait_job(job)[""]
    assert record["JobState"] == "FAILED" and record["Restarts"] == "0", record
    client = MlflowClient(f"sqlite:///{run_dir.parent / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("gptforge").experiment_id])
    assert run.info.status == "FAILED", job_output(run_dir)
    assert len(client.get_metric_history(run.info.run_id, "loss")) >= 3


def wait_for_step(run_dir: Path, job: str, step: int) -> None:
    metrics_file = run_dir / "metrics.jsonl"
    for _ in range(600):
        if metrics_file.is_file() and f'"step": {step},' in metrics_file.read_text():
            return
        state = scontrol_job(job)[""]["JobState"]
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), job_output(run_dir)
        subprocess.run(["sleep", "0.2"])
    raise AssertionError(f"step {step} never logged: {job_output(run_dir)}")


def test_torchrun_per_node_preempted_through_the_batch_shell(slurm_cluster, reference,
                                                             tmp_path):
    """--launcher torchrun: the warning goes to the batch shell (B:USR1), which passes it to
    srun → torchrun → the ranks; torchrun does not exit 75, the run dir's stopped.json says
    the ranks checkpointed."""
    run_dir = tmp_path / "torchrun"
    job = submit(run_dir, "--nodes", "2", "--launcher", "torchrun")
    assert "#SBATCH --signal=B:USR1@300" in (run_dir / "job.sbatch").read_text()
    wait_for_step(run_dir, job, 3)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=60)
    record = wait_job(job, release=True)[""]
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "1", job_output(run_dir)
    assert "checkpointed: requeueing job" in job_output(run_dir)
    assert len([r for r in metrics(run_dir) if r.get("event") == "restart"]) == 1
    assert not (run_dir / "stopped.json").exists()  # removed by the restart
    assert_close_losses(train_losses(run_dir), train_losses(reference), rel=1e-6)


def test_deepspeed_engine_ranks_are_srun_tasks(slurm_cluster, tmp_path):
    run_dir = tmp_path / "ds"
    job = submit(run_dir, "--nodes", "2", "--engine", "deepspeed", "--train.train_iters=4",
                 "--train.eval_interval=0")
    record = wait_job(job)[""]
    assert record["JobState"] == "COMPLETED", job_output(run_dir)
    assert "(deepspeed engine)" in job_output(run_dir)
    assert len(train_losses(run_dir)) == 4


def test_sweep_is_one_array_job_with_a_run_dir_per_point(slurm_cluster, tmp_path):
    root = tmp_path / "sweep"
    job = submit(root, "--nodes", "1", "--sweep", "train.seed=1,2",
                 "--train.train_iters=4", "--train.eval_interval=0")
    grid = json.loads((root / "sweep.json").read_text())["points"]
    assert [p["overrides"] for p in grid] == [{"train.seed": "1"}, {"train.seed": "2"}]
    assert "#SBATCH --array=0-1" in (root / "job.sbatch").read_text()
    records = wait_job(job)
    assert {k: r["JobState"] for k, r in records.items()} == {"0": "COMPLETED",
                                                             "1": "COMPLETED"}
    losses = []
    for i, point in enumerate(grid):
        point_dir = Path(point["run_dir"])
        assert point_dir == root / f"point-{i}"
        saved = yaml.safe_load((point_dir / "config.yaml").read_text())
        assert saved["train"]["seed"] == i + 1 and saved["run"]["dir"] == str(point_dir)
        losses.append(train_losses(point_dir))
        assert len(losses[-1]) == 4
    assert losses[0] != losses[1]  # each point trained with its own seed
    status = json.loads(gptforge("launch", "status", root, "--json", check=True).stdout)
    assert [(p["task_id"], p["state"], p["last_step"]) for p in status["points"]] == \
        [(0, "COMPLETED", 4), (1, "COMPLETED", 4)]


HOSTILE = "it's \"quoted\" $(touch {marker}) `touch {marker}` ; rm -rf / #\nline two \\ %j"


def test_hostile_strings_arrive_as_data_and_nothing_runs(slurm_cluster, tmp_path):
    marker = tmp_path / "INJECTED"
    text = HOSTILE.format(marker=marker)
    run_dir = tmp_path / "a dir with 'quotes' $(touch INJECTED) `x` %j" / "run"
    # the ranks import sitecustomize from PYTHONPATH (itself a hostile path): it writes what
    # the rank received in $HOSTILE, byte for byte
    hooks = tmp_path / "py path $(touch INJECTED) 'q'"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import os, pathlib\n"
        "if 'SLURM_PROCID' in os.environ and 'HOSTILE' in os.environ:\n"
        "    pathlib.Path(os.environ['GPTFORGE_TEST_OUT'], 'env-' + os.environ['SLURM_PROCID'])"
        ".write_text(os.environ['HOSTILE'])\n")
    name = "job 'name' \"q\" $(touch INJECTED) `touch INJECTED`"
    job = submit(run_dir, "--nodes", "1", "--job-name", name, "--env", f"HOSTILE={text}",
                 "--env", f"PYTHONPATH={hooks}", "--env", f"GPTFORGE_TEST_OUT={tmp_path}",
                 f"--run.name={text}",  # a string key takes the text as it is
                 "--train.train_iters=3", "--train.eval_interval=0")
    record = wait_job(job)[""]
    assert record["JobState"] == "COMPLETED", job_output(run_dir)
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    assert f"JobName={name}\n" in out
    assert (tmp_path / "env-0").read_text() == text
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["run"]["name"] == text
    assert len(train_losses(run_dir)) == 3 and list(run_dir.glob("slurm-*.out"))
    assert not marker.exists() and not list(tmp_path.rglob("INJECTED"))
    # a newline cannot live in a #SBATCH line: refused, naming the option, nothing written
    bad = gptforge("launch", "slurm", "--config", TINY, "--run.dir", tmp_path / "nl", *JOB,
                   "--nodes", "1", "--job-name", "two\nlines")
    assert bad.returncode == 2
    assert bad.stderr.startswith("gptforge: error: --job-name: 'two\\nlines': holds a newline")
    assert not (tmp_path / "nl" / "job.sbatch").exists()
