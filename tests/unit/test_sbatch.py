"""The Slurm job script writer (slurm/sbatch.py) on its own: directives, launchers, quoting,
sweeps and option errors. (Submitting it to a real Slurm: tests/integration/test_slurm.py.)"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from gptforge.slurm.sbatch import (JobSpec, SlurmOptionError, parse_env, parse_job_id,
                                   parse_nodes, render, sweep_points, time_seconds)


def spec(**kw) -> JobSpec:
    base = dict(run_dir=Path("/runs/r"), nodes=2, gpus_per_node=8, partition="gpu",
                time="04:00:00", python="/venv/bin/python")
    return JobSpec(**{**base, **kw})


def directives(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("#SBATCH")]


def test_srun_mode_one_task_per_gpu_and_the_preemption_settings():
    text = render(spec())
    d = directives(text)
    for want in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=gpu",
                 "--time=04:00:00", "--signal=USR1@300", "--requeue", "--open-mode=append",
                 "--output=/runs/r/slurm-%j.out", "--error=/runs/r/slurm-%j.err",
                 "--job-name=r"):
        assert f"#SBATCH {want}" in d, (want, d)
    assert 'srun --unbuffered --wait=60 --ntasks-per-node=8 bash -c ' \
           '\'LOCAL_RANK="$SLURM_LOCALID" exec "$@"\' rank "$PYTHON" -m ' \
           'gptforge.launcher.run --config "$CONFIG"' in text
    assert "CONFIG=/runs/r/job_config.yaml" in text
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1' in text
    assert 'scontrol requeue "$JOB"' in text
    # sbatch exports the submitting shell's environment: its rank/rendezvous never leak in
    unset = "unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE GROUP_RANK MASTER_ADDR MASTER_PORT"
    assert text.index(unset) < text.index("export MASTER_ADDR")
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)  # valid bash


def test_cpu_job_is_one_task_per_node_unless_told():
    assert "#SBATCH --ntasks-per-node=1" in directives(render(spec(gpus_per_node=0)))
    d = directives(render(spec(gpus_per_node=0, ntasks_per_node=3)))
    assert "#SBATCH --ntasks-per-node=3" in d and not any("gpus" in x for x in d)
    assert spec(gpus_per_node=0, ntasks_per_node=3).world_size == 6


def test_launcher_modes_signal_the_batch_shell_and_forward():
    text = render(spec(launcher="torchrun"))
    assert "#SBATCH --signal=B:USR1@300" in directives(text)
    assert "#SBATCH --ntasks-per-node=1" in directives(text)
    assert "--nproc-per-node=8 --rdzv-backend=c10d" in text
    assert "--signals-to-handle=SIGUSR1,SIGTERM,SIGINT" in text
    assert 'kill -USR1 "$CHILD"' in text
    ds = render(spec(launcher="deepspeed"))
    assert "launch deepspeed --num-gpus=8 --hostfile=\"$RUN_DIR/hostfile\"" in ds
    assert ds.index('rm -f "$RUN_DIR/hostfile"') < ds.index("launch deepspeed")
    subprocess.run(["bash", "-n"], input=ds, text=True, check=True)


def test_an_elastic_job_survives_a_node_and_restarts_at_the_nodes_left():
    """--nodes 1-2: the job starts on 2 nodes and does not end when one fails; one
    torchrun per node rendezvous for 1 to 2 nodes (c10d on the batch host), restarts at most
    --max-restarts times, and does not share its store with the ranks."""
    assert parse_nodes("4") == (None, 4) and parse_nodes("2-4") == (2, 4)
    for bad in ("two", "3-2", "0-2", "2-"):
        with pytest.raises(SlurmOptionError, match="^--nodes:"):
            parse_nodes(bad)
    text = render(spec(launcher="torchrun", min_nodes=1, max_restarts=7))
    d = directives(text)
    assert "#SBATCH --nodes=2" in d and "#SBATCH --no-kill" in d and "#SBATCH --requeue" in d
    assert "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in text
    launch = next(line for line in text.splitlines() if "torch.distributed.run" in line)
    # a step per node: Slurm kills a failed node's step, and a step that loses a node dies
    # whole; the batch host's agent holds the rendezvous store, the job ends with its step
    assert 'for HOST in $(scontrol show hostnames "$SLURM_JOB_NODELIST"); do' in text
    assert 'IS_HOST=false; [[ $HOST == "$MASTER_ADDR" ]] && IS_HOST=true' in text
    assert launch.strip().startswith("srun --unbuffered --no-kill --kill-on-bad-exit=0 "
                                     '--nodes=1 --ntasks=1 --nodelist="$HOST" ')
    assert "--wait" not in launch  # one node's end must not end the others' tasks
    assert "--nnodes=1:2 --max-restarts=7 --rdzv-conf=last_call_timeout=10," in launch
    assert ',is_host="$IS_HOST"' in launch
    assert '--rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"' in launch
    assert "CHILD=${STEPS[0]}" in text and 'kill -USR1 "${STEPS[@]}"' in text
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)
    fixed = render(spec(launcher="torchrun", min_nodes=2))  # 2-2 is not elastic
    assert "--no-kill" not in fixed and '--nnodes="$SLURM_NNODES"' in fixed


def test_optional_directives_and_arrays():
    d = directives(render(spec(account="acct", qos="high", constraint="h100&ib",
                               exclusive=True, mail_user="a@b.c", cpus_per_task=12,
                               array_size=4, array_parallel=2, signal="TERM",
                               signal_seconds=120, job_name="nm")))
    for want in ("--account=acct", "--qos=high", "--constraint='h100&ib'", "--exclusive",
                 "--mail-user=a@b.c", "--cpus-per-task=12", "--array=0-3%2",
                 "--signal=TERM@120", "--output=/runs/r/point-%a/slurm-%A_%a.out",
                 "--job-name=nm"):
        assert f"#SBATCH {want}" in d, (want, d)


def test_every_user_value_is_quoted_data():
    hostile = "a b 'c' \"d\" $(touch /tmp/x) `id` ; # %j"
    text = render(spec(job_name=hostile, run_dir=Path(f"/runs/{hostile}"),
                       env=[("K", hostile + "\nnext line")]))
    assert f"#SBATCH --job-name={shlex.quote(hostile)}" in directives(text)
    assert f"export K={shlex.quote(hostile + chr(10) + 'next line')}" in text
    # '%' in a path is doubled for sbatch's patterns; the shell line holds the path as is
    assert "slurm-%j.out" in text and "%%j/slurm-%j.out" in text
    assert f"RUN_DIR={shlex.quote(f'/runs/{hostile}')}" in text
    # what bash makes of the export line is the value itself
    line = next(x for x in text.splitlines() if x.startswith("export K="))
    line += "\n" + text.split(line + "\n", 1)[1].split("\n", 1)[0]  # the quoted newline
    got = subprocess.run(["bash", "-c", f'{line}\nprintf "%s" "$K"'], capture_output=True,
                         text=True, check=True).stdout
    assert got == hostile + "\nnext line"


@pytest.mark.parametrize("kw, culprit", [
    (dict(nodes=0), "--nodes"),
    (dict(gpus_per_node=-1), "--gpus-per-node"),
    (dict(time="4h"), "--time"),
    (dict(time="00:04:00"), "--signal-seconds"),  # the warning would come before the start
    (dict(partition=""), "--partition"),
    (dict(launcher="mpirun"), "--launcher"),
    (dict(signal="USR2"), "--signal"),  # the ranks would die of it
    (dict(job_name="a\nb"), "--job-name"),
    (dict(run_dir=Path("/runs/a\nb")), "run.dir"),
    (dict(max_requeues=-1), "--max-requeues"),
    (dict(min_nodes=1, launcher="srun"), "--launcher"),  # elastic: torchrun on every node
    (dict(min_nodes=1, launcher="torchrun", max_restarts=-1), "--max-restarts"),
])
def test_bad_options_name_the_culprit(kw, culprit):
    with pytest.raises(SlurmOptionError) as err:
        render(spec(**kw))
    assert str(err.value).startswith(f"{culprit}:"), str(err.value)


def test_env_and_sweep_parsing():
    assert parse_env(["A=1", "B=x=y", "C="]) == [("A", "1"), ("B", "x=y"), ("C", "")]
    for bad in ("noval", "1A=2", "MASTER_ADDR=h", "SLURM_X=1"):
        with pytest.raises(SlurmOptionError, match="--env"):
            parse_env([bad])
    grid = sweep_points(["optim.lr=1e-4,3e-4", "train.seed=1,2"])
    assert grid == [[("optim.lr", "1e-4"), ("train.seed", "1")],
                    [("optim.lr", "1e-4"), ("train.seed", "2")],
                    [("optim.lr", "3e-4"), ("train.seed", "1")],
                    [("optim.lr", "3e-4"), ("train.seed", "2")]]
    assert sweep_points(["data.sources=[a,b]"]) == [[("data.sources", "[a,b]")]]
    for bad in (["lr=1"], ["optim.lr="], ["optim.lr=1,,2"], ["optim.lr=1", "optim.lr=2"]):
        with pytest.raises(SlurmOptionError, match="--sweep"):
            sweep_points(bad)


def test_times_and_job_ids():
    assert [time_seconds(t) for t in ("30", "30:15", "1:00:00", "2-00", "1-02:03:04")] == \
        [1800, 1815, 3600, 172800, 93784]
    assert parse_job_id("1234\n") == "1234" and parse_job_id("77;cluster\n") == "77"
    with pytest.raises(ValueError):
        parse_job_id("sbatch: error")
