"""What a rank needs to know when it runs under Slurm (a job step's task, or below torchrun)."""

from __future__ import annotations

import os
import time

from gptforge.launcher.signals import StopRequest

REPEAT_WINDOW_S = 10.0


def in_slurm_job() -> bool:
    return bool(os.environ.get("SLURM_JOB_ID"))


def job_id() -> str:
    """``<array job>_<task>`` for an array task, else the job id ("" outside Slurm)."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID", "")


def job_tags() -> dict[str, str]:
    """Per-attempt facts of this Slurm job (MLflow tags)."""
    env = os.environ
    if not in_slurm_job():
        return {}
    tags = {"slurm.job_id": job_id(), "slurm.restart_count": env.get("SLURM_RESTART_COUNT", "0"),
            "slurm.nodelist": env.get("SLURM_JOB_NODELIST", ""),
            "slurm.partition": env.get("SLURM_JOB_PARTITION", "")}
    return {k: v for k, v in tags.items() if v}


class SlurmStopRequest(StopRequest):
    """Under Slurm one stop can arrive twice at a rank: ``scancel --signal=USR1 --full`` signals
    the task and also srun, which forwards it, and a preemption's SIGTERM reaches both too.
    A repeat of the first signal within REPEAT_WINDOW_S is the same request (the rank still
    checkpoints); another signal, or a repeat later on, stops at once as everywhere else."""

    def __init__(self):
        super().__init__()
        self._first_at = 0.0

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.signum is None:
            self._first_at = now
        elif signum == self.signum and now - self._first_at < REPEAT_WINDOW_S:
            self.count += 1
            return
        super()._handle(signum, frame)


def stop_request() -> StopRequest:
    return SlurmStopRequest() if in_slurm_job() else StopRequest()
