"""``gptforge launch status <run.dir>``: the Slurm job of a run and where the run stands.

Shows the job id, its state and requeue count (``scontrol show job``), the last logged step and
loss (``metrics.jsonl``), the newest checkpoint (``checkpoints/latest``) and the MLflow run (one
per run dir, kept across requeues). For a sweep: one block per point.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from gptforge.launcher.cli.slurm import JOB_RECORD, SWEEP_FILE
from gptforge.slurm.sbatch import JOB_CONFIG, SlurmOptionError


def scontrol_job(job: str) -> dict[str, str]:
    """``scontrol show job -o`` as a dict (for an array, its tasks' records by task id)."""
    try:
        proc = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True,
                              text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        return {"JobState": f"unknown (scontrol: {err})"}
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or ["no answer"])[-1]
        if "Invalid job id" in why:
            why = ("Slurm no longer lists it: finished jobs are forgotten after MinJobAge; "
                   "sacct has them where accounting is on")
        return {"JobState": f"unknown ({why})"}
    records = {}
    for line in proc.stdout.splitlines():
        fields = {}
        for token in line.split():
            key, sep, value = token.partition("=")
            if sep:
                fields[key] = value
        records[fields.get("ArrayTaskId", "")] = fields
    if len(records) == 1:
        return next(iter(records.values()))
    return {"tasks": records}


def run_progress(run_dir: Path) -> dict:
    """Last step and loss, restarts logged, newest checkpoint, MLflow run of ``run_dir``."""
    out: dict = {"run_dir": str(run_dir)}
    from gptforge.common.metrics_file import read_records

    last = None
    restarts = 0
    for record in read_records(run_dir):
        if record.get("event") == "restart":
            restarts += 1
        elif "loss" in record:
            last = record
    out["last_step"] = last["step"] if last else None
    out["last_loss"] = last["loss"] if last else None
    out["restarts_logged"] = restarts
    latest = None
    try:
        from gptforge.launcher.run.checkpoint.format import read_latest, save_dir
        from gptforge.launcher.config import load_config

        cfg_path = run_dir / JOB_CONFIG
        cfg = load_config([cfg_path]) if cfg_path.is_file() else None
        ckdir = save_dir(cfg.checkpoint, run_dir) if cfg else run_dir / "checkpoints"
        latest = read_latest(ckdir) if ckdir.is_dir() else None
    except Exception:  # noqa: BLE001 (a status line, not a check)
        latest = None
    out["checkpoint"] = str(latest) if latest else None
    from gptforge.launcher.tracking.outbox import read_state

    state = read_state(run_dir)
    out["mlflow_run_id"] = state.get("run_id")
    out["mlflow_uri"] = state.get("tracking_uri")
    out["mlflow_unsent"] = state.get("unsent")
    return out


def status(run_dir: Path) -> dict:
    record_path = run_dir / JOB_RECORD
    if not run_dir.is_dir():
        raise SlurmOptionError("run dir", f"{run_dir} does not exist")
    job = json.loads(record_path.read_text()) if record_path.is_file() else {}
    result: dict = {"run_dir": str(run_dir), "job_id": job.get("job_id")}
    info = scontrol_job(job["job_id"]) if job.get("job_id") else {}
    sweep = run_dir / SWEEP_FILE
    if sweep.is_file():
        tasks = info.get("tasks", {})
        points = []
        for point in json.loads(sweep.read_text())["points"]:
            task = str(point["task_id"])
            rec = tasks.get(task, info if info.get("ArrayTaskId") == task else {})
            if not rec and tasks:  # pending tasks are listed together, e.g. "1-3"
                rec = next((r for k, r in tasks.items() if _in_range(task, k)), {})
            points.append({"task_id": point["task_id"], "overrides": point["overrides"],
                           "state": rec.get("JobState"), "requeues": rec.get("Restarts"),
                           **run_progress(Path(point["run_dir"]))})
        result["points"] = points
    else:
        result.update(state=info.get("JobState"), requeues=info.get("Restarts"),
                      nodes=info.get("NodeList"), reason=info.get("Reason"),
                      **run_progress(run_dir))
    return result


def _in_range(task: str, spec: str) -> bool:
    spec = spec.split("%")[0]
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit() and (hi or lo).isdigit() and int(lo) <= int(task) <= int(hi or lo):
            return True
    return False


def _lines(s: dict, indent: str = "") -> list[str]:
    loss = f"{s['last_loss']:.4f}" if s.get("last_loss") is not None else "-"
    mlflow = s.get("mlflow_run_id") or "-"
    if s.get("mlflow_unsent"):
        mlflow += f" ({s['mlflow_unsent']} records not yet sent: gptforge mlflow sync)"
    return [f"{indent}state       {s.get('state') or '-'}"
            + (f" ({s['reason']})" if s.get("reason") not in (None, "None") else ""),
            f"{indent}requeues    {s.get('requeues') or '-'} (restarts in metrics.jsonl: "
            f"{s['restarts_logged']})",
            f"{indent}last step   {s['last_step'] if s['last_step'] is not None else '-'}"
            f"  loss {loss}",
            f"{indent}checkpoint  {s.get('checkpoint') or '-'}",
            f"{indent}mlflow run  {mlflow}"]


ACTIVE = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD",
          "REQUEUE_FED", "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING")


def _states(s: dict) -> list[str]:
    return [p.get("state") or "" for p in s["points"]] if "points" in s else [s.get("state") or ""]


def wait_for_job(run_dir: Path, poll_s: float = 2.0) -> dict:
    """The status once the run's job (every task of a sweep) has left Slurm's active states,
    requeues included."""
    import time

    while True:
        s = status(run_dir)
        if not s.get("job_id"):
            raise SlurmOptionError("--wait", f"{run_dir} has no submitted job ({JOB_RECORD})")
        if not any(state.split()[0] in ACTIVE for state in _states(s) if state):
            return s
        time.sleep(poll_s)


def _status(args) -> int:
    s = wait_for_job(Path(args.run_dir)) if args.wait else status(Path(args.run_dir))
    code = 0 if not args.wait or all(x == "COMPLETED" for x in _states(s)) else 1
    if args.json:
        print(json.dumps(s, indent=1))
        return code
    print(f"run dir     {s['run_dir']}")
    print(f"job         {s.get('job_id') or '- (not submitted: no slurm_job.json)'}")
    if "points" in s:
        for p in s["points"]:
            label = ",".join(f"{k}={v}" for k, v in p["overrides"].items())
            print(f"point {p['task_id']}     {label}  ({p['run_dir']})")
            print("\n".join(_lines(p, "  ")))
    else:
        if s.get("nodes"):
            print(f"nodes       {s['nodes']}")
        print("\n".join(_lines(s)))
    return code


def add_parser(sub) -> None:
    p = sub.add_parser("status", help="job state, requeues, last step and loss, newest "
                       "checkpoint, MLflow run of a run dir",
                       description="Where a Slurm run stands.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--wait", action="store_true",
                   help="wait until the job (every task of a sweep) has ended, requeues "
                        "included; exit code 0 when it COMPLETED, 1 otherwise")
    p.set_defaults(func=_status)
