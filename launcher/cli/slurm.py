"""``gptforge launch slurm``: write ``<run.dir>/job.sbatch`` (and submit it with ``--submit``).

    gptforge launch slurm --config ... [overrides] --nodes N|MIN-MAX --gpus-per-node G --partition P
        --time HH:MM:SS [--job-name S --account A --qos Q --constraint C --exclusive
        --mail-user M --env K=V ... --ntasks-per-node T --launcher srun|torchrun|deepspeed
        --engine megatron|deepspeed --sweep section.key=v1,v2 ...] [--submit]

Before anything is written the config is resolved and checked for the job's world size
(nodes × ranks per node), with the run dir and data (``launcher/run/entry.py: preflight``). Beside
the script: ``job_config.yaml`` (the resolved config the ranks read, run.dir absolute) and, after
``--submit``, ``slurm_job.json`` (job id, submission time). Sweeps: one array job; point ``i``
trains in ``<run.dir>/point-<i>/`` (its own job_config.yaml); the grid is ``<run.dir>/sweep.json``.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from gptforge.slurm.sbatch import (JOB_CONFIG, LAUNCHERS, SCRIPT, SIGNALS, JobSpec,
                                   SlurmOptionError, parse_env, parse_job_id, parse_nodes,
                                   render, sweep_points)

JOB_RECORD = "slurm_job.json"
SWEEP_FILE = "sweep.json"


def _resolve(config_args: list[str], extra: list[str], prog: str):
    from gptforge.launcher.config import load_config
    from gptforge.launcher.overrides import parse_train_args

    files, overrides = parse_train_args(config_args, prog=prog)
    return load_config(files, [*overrides, *extra]), files, overrides


def _check_point(cfg, spec: JobSpec, *, owner: bool):
    """The config for the job's world size, every one an elastic job may run at (an error
    names the job shape), run dir, data."""
    from gptforge.launcher.config import validate
    from gptforge.launcher.run.entry import preflight
    from gptforge.common.errors import ConfigError

    p = cfg.parallel
    validate(cfg, max(1, p.tensor_model_parallel_size) * max(1, p.pipeline_model_parallel_size))
    for nodes in range(spec.min_nodes if spec.elastic else spec.nodes, spec.nodes + 1):
        world_size = nodes * spec.ranks_per_node
        try:
            validate(cfg, world_size)
        except ConfigError as err:
            elastic = f" (of --nodes {spec.min_nodes}-{spec.nodes})" if spec.elastic else ""
            raise SlurmOptionError("--nodes", f"{nodes} node(s){elastic} x "
                                   f"{spec.ranks_per_node} rank(s) = world size {world_size}, "
                                   f"which does not fit the config: {err}") from None
    return preflight(cfg, spec.world_size, is_run_dir_owner=owner)


def _write_job_config(cfg, run_dir: Path) -> Path:
    """The resolved config the ranks read: run.dir absolute, overwrite done here (a requeued
    job must resume, never replace)."""
    from gptforge.launcher.run.checkpoint.format import save_dir
    from gptforge.launcher.config import dump_config
    from gptforge.launcher.rundir import check_run_dir, refuse_previous_run, replace_previous_run
    from gptforge.launcher.run.entry import find_start

    if cfg.run.overwrite:
        start = find_start(cfg)
        own = save_dir(cfg.checkpoint, run_dir)
        if refuse_previous_run(check_run_dir(run_dir), overwrite=True, resuming=False,
                               checkpoint_dir=own if cfg.checkpoint.enabled else None):
            replace_previous_run(run_dir, None if start.checkpoint is not None
                                 and own in start.checkpoint.parents else own)
        from gptforge.launcher.tracking.outbox import forget_run

        forget_run(run_dir)
    cfg.run.dir = str(run_dir)
    cfg.run.overwrite = False
    path = run_dir / JOB_CONFIG
    dump_config(cfg, path)
    return path


def _spec(args, run_dir: Path, array_size: int) -> JobSpec:
    min_nodes, nodes = parse_nodes(args.nodes)
    elastic = min_nodes is not None and min_nodes < nodes
    launcher = args.launcher or ("torchrun" if elastic else "srun")
    return JobSpec(run_dir=run_dir, nodes=nodes, min_nodes=min_nodes if elastic else None,
                   max_restarts=args.max_restarts, gpus_per_node=args.gpus_per_node,
                   partition=args.partition, time=args.time, python=sys.executable,
                   job_name=args.job_name or "", ntasks_per_node=args.ntasks_per_node,
                   cpus_per_task=args.cpus_per_task, account=args.account, qos=args.qos,
                   constraint=args.constraint, exclusive=args.exclusive,
                   mail_user=args.mail_user, env=parse_env(args.env), launcher=launcher,
                   signal=args.signal, signal_seconds=args.signal_seconds,
                   max_requeues=args.max_requeues, array_size=array_size,
                   array_parallel=args.array_parallel)


def _prepare_mlflow(cfg) -> None:
    """Create the embedded MLflow store before the job starts (array tasks starting together
    must not race on creating its tables)."""
    if cfg.logging.mlflow:
        from gptforge.launcher.tracking.outbox import tracking_uri
        from gptforge.launcher.tracking.sender import prepare_store

        prepare_store(tracking_uri(cfg.logging, cfg.run.dir))


def _submit(script: Path, run_dir: Path) -> str:
    try:
        proc = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True,
                              text=True, timeout=120)
    except FileNotFoundError:
        raise SlurmOptionError("--submit", "sbatch is not on PATH (no Slurm here? "
                               "try: bash slurm/local_cluster.sh up)") from None
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise SlurmOptionError("--submit", f"sbatch {script} failed: {why}")
    job = parse_job_id(proc.stdout)
    record = {"job_id": job, "submitted_at": time.time(), "script": str(script)}
    (run_dir / JOB_RECORD).write_text(json.dumps(record, indent=1) + "\n")
    return job


def launch_slurm(args) -> int:
    from gptforge.launcher.rundir import check_run_dir

    prog = "gptforge launch slurm"
    if args.engine:
        args.config_args = [*args.config_args, f"--parallel.engine={args.engine}"]
    cfg, _, _ = _resolve(args.config_args, [], prog)
    run_dir = Path(cfg.run.dir).resolve()
    points = sweep_points(args.sweep)
    spec = _spec(args, run_dir, len(points))
    render(spec)  # the options on their own first: an error names the option, nothing written
    if not points:
        _check_point(cfg, spec, owner=True)
        _write_job_config(cfg, run_dir)
        _prepare_mlflow(cfg)
        what = "one run"
    else:
        check_run_dir(run_dir)
        base_name = cfg.run.name or run_dir.name
        grid = []
        for i, point in enumerate(points):
            point_dir = run_dir / f"point-{i}"
            label = ",".join(f"{k}={v}" for k, v in point)
            pcfg, _, _ = _resolve(args.config_args,
                                  [f"--{k}={v}" for k, v in point]
                                  + [f"--run.dir={point_dir}"], prog)
            if not pcfg.run.name:
                pcfg.run.name = f"{base_name}[{label}]"
            _check_point(pcfg, spec, owner=True)
            _write_job_config(pcfg, point_dir)
            _prepare_mlflow(pcfg)
            grid.append({"task_id": i, "run_dir": str(point_dir), "run_name": pcfg.run.name,
                         "overrides": {k: v for k, v in point}})
        (run_dir / SWEEP_FILE).write_text(json.dumps({"points": grid}, indent=1) + "\n")
        what = f"a sweep of {len(points)} points (job array)"
    script = run_dir / SCRIPT
    script.write_text(render(spec, what))
    script.chmod(0o755)
    shape = (f"{spec.nodes} node(s) x {spec.ranks_per_node} rank(s) ({spec.launcher}), "
             f"world size {spec.world_size}")
    if not args.submit:
        print(f"[gptforge] wrote {script} ({shape}; {what})")
        print(f"sbatch {shlex.quote(str(script))}")
        return 0
    job = _submit(script, run_dir)
    print(f"[gptforge] submitted job {job}: {script} ({shape}; {what})")
    print(f"[gptforge] follow it: gptforge launch status {shlex.quote(str(run_dir))}")
    return 0


def add_parser(sub, keep_config_args) -> None:
    p = sub.add_parser(
        "slurm", allow_abbrev=False,
        help="write a Slurm job script for the run (and submit it with --submit)",
        usage="gptforge launch slurm --nodes N --gpus-per-node G --partition P --time T "
              "[options] [--submit] [--config FILE ...] [--section.key=value ...]",
        description="Write <run.dir>/job.sbatch (one rank per GPU via srun, preemption: "
                    "checkpoint, requeue, resume) and the resolved config beside it; "
                    "--submit calls sbatch.")
    p.add_argument("--nodes", required=True, metavar="N|MIN-MAX",
                   help="nodes; MIN-MAX: an elastic job (torchrun), which goes on at a smaller "
                        "data-parallel size while MIN nodes are left")
    p.add_argument("--gpus-per-node", type=int, required=True, metavar="G",
                   help="GPUs per node; 0: a CPU job (one rank per node unless "
                        "--ntasks-per-node)")
    p.add_argument("--partition", required=True, metavar="P")
    p.add_argument("--time", required=True, metavar="HH:MM:SS", help="the job's time limit")
    p.add_argument("--ntasks-per-node", type=int, metavar="T",
                   help="ranks per node (default: G, or 1 for a CPU job)")
    p.add_argument("--cpus-per-task", type=int, metavar="C")
    p.add_argument("--job-name", metavar="S", help="default: the run dir's name")
    p.add_argument("--account", metavar="A")
    p.add_argument("--qos", metavar="Q")
    p.add_argument("--constraint", metavar="C")
    p.add_argument("--exclusive", action="store_true")
    p.add_argument("--mail-user", metavar="M")
    p.add_argument("--env", action="append", default=[], metavar="K=V",
                   help="export K=V to the ranks (repeatable; the value is data, quoted)")
    p.add_argument("--launcher", choices=LAUNCHERS,
                   help="srun: one task per rank (default); torchrun: one per node (the "
                        "default of an elastic job); deepspeed: DeepSpeed's launcher, hostfile "
                        "from the allocation")
    p.add_argument("--max-restarts", type=int, default=10, metavar="K",
                   help="elastic job: torchrun restarts the ranks after at most K failures "
                        "(nodes that leave or join do not count; default 10)")
    p.add_argument("--engine", choices=("megatron", "deepspeed"),
                   help="sets parallel.engine")
    p.add_argument("--signal", choices=SIGNALS, default="USR1",
                   help="the warning signal Slurm sends before the time limit (default USR1)")
    p.add_argument("--signal-seconds", type=int, default=300, metavar="S",
                   help="how long before the time limit it comes (default 300)")
    p.add_argument("--max-requeues", type=int, default=20, metavar="K",
                   help="requeue after a checkpointed stop at most K times (default 20)")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                   help="one array task per point of the grid (repeatable)")
    p.add_argument("--array-parallel", type=int, metavar="P",
                   help="run at most P sweep points at once")
    p.add_argument("--submit", action="store_true", help="call sbatch and record the job id")
    p.set_defaults(func=launch_slurm, config_args=[])
    keep_config_args(p)
