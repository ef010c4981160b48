"""`gptforge launch slurm` without a cluster: what it writes, and its one-line refusals."""

from __future__ import annotations

import json

import yaml

from tests.conftest import TINY
from tests.services import gptforge

JOB = ["--partition", "debug", "--time", "01:00:00", "--gpus-per-node", "0"]


def test_writes_script_and_resolved_config_and_prints_the_sbatch_command(tmp_path):
    run_dir = tmp_path / "r"
    proc = gptforge("launch", "slurm", "--config", TINY, "--run.dir", run_dir, *JOB,
                    "--nodes", "2", "--optim.lr=3e-4", "--run.overwrite=true", check=True)
    assert proc.stdout.splitlines()[-1] == f"sbatch {run_dir / 'job.sbatch'}"
    cfg = yaml.safe_load((run_dir / "job_config.yaml").read_text())
    assert cfg["optim"]["lr"] == 3e-4 and cfg["run"]["dir"] == str(run_dir)
    assert cfg["run"]["overwrite"] is False  # a requeued job resumes, never replaces
    assert not (run_dir / "slurm_job.json").exists()


def test_refusals_name_the_culprit(tmp_path):
    cases = [
        (["--nodes", "3", "--parallel.tensor_model_parallel_size=2"],
         "gptforge: error: --nodes: 3 node(s) x 1 rank(s) = world size 3, which does not fit"),
        (["--nodes", "1", "--sweep", "optim.nope=1,2"], "gptforge: error: optim.nope"),
        (["--nodes", "1", "--env", "SLURM_JOB_ID=1"], "gptforge: error: --env: SLURM_JOB_ID"),
        (["--nodes", "1", "--time", "00:01:00"], "gptforge: error: --signal-seconds: 300"),
    ]
    for extra, want in cases:
        proc = gptforge("launch", "slurm", "--config", TINY, "--run.dir", tmp_path / "x", *JOB,
                        *extra)
        assert proc.returncode == 2 and proc.stderr.startswith(want), (extra, proc.stderr)
        assert not (tmp_path / "x" / "job.sbatch").exists()


def test_sweep_writes_one_config_per_point(tmp_path):
    root = tmp_path / "sw"
    gptforge("launch", "slurm", "--config", TINY, "--run.dir", root, *JOB, "--nodes", "1",
             "--sweep", "optim.lr=1e-4,3e-4", "--sweep", "train.seed=1,2", check=True)
    points = json.loads((root / "sweep.json").read_text())["points"]
    assert len(points) == 4
    for i, point in enumerate(points):
        cfg = yaml.safe_load((root / f"point-{i}" / "job_config.yaml").read_text())
        assert cfg["optim"]["lr"] == float(point["overrides"]["optim.lr"])
        assert cfg["train"]["seed"] == int(point["overrides"]["train.seed"])
        label = ",".join(f"{k}={v}" for k, v in point["overrides"].items())
        assert cfg["run"]["name"] == f"sw[{label}]"
