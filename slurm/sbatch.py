"""The Slurm job script: options → ``<run.dir>/job.sbatch`` (one renderer, every value quoted).

``render`` fills ``job.sbatch.tmpl``. Every value that comes from the user (job name, paths,
``--env`` values, the config's strings) reaches the script as shell-quoted data
(``shlex.quote``), in ``#SBATCH`` lines too (sbatch reads shell-style quotes there); the config
itself travels as YAML (``job_config.yaml`` beside the script), never as shell words. Values
that a line-based ``#SBATCH`` directive cannot carry (newlines) are refused, naming the option.

Launchers (``--launcher``):
- ``srun`` (default): one task per GPU (``--gpus-per-node 0``: one per node, or
  ``--ntasks-per-node``); each task is a rank (``SLURM_PROCID``/``SLURM_NTASKS``), so
  ``--signal=USR1@N`` reaches the ranks themselves.
- ``torchrun``: one task per node running torchrun (c10d rendezvous at MASTER_ADDR:MASTER_PORT,
  ``--signals-to-handle``); the warning signal goes to the batch shell (``B:``), which passes it
  to srun.
- elastic (``--nodes MIN-MAX``): MAX nodes (sbatch's own ``--nodes=MIN-MAX`` would start
  with as few as MIN), torchrun per node with ``--nnodes MIN:MAX``, c10d rendezvous on
  the batch host (the first node: its loss ends the job in any case), ``--max-restarts``, and
  ``#SBATCH --no-kill`` with ``srun --no-kill``: a failed node no longer ends the job (Slurm's
  default on NODE_FAIL) nor the step; the ranks on the other nodes see their collective fail,
  their agents meet again without it and restart every rank from ``latest`` at the smaller
  data-parallel size (``launcher/run/resize.py``). torchrun's sharing of its rendezvous store
  with the ranks is turned off (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``): with it, a node that
  joins a later round waits forever for keys the old rank 0 never writes again.
- ``deepspeed``: ``gptforge launch deepspeed`` in the batch shell; its hostfile is written from
  the allocation (``scontrol show hostnames``). No checkpoint on preemption there (DeepSpeed's
  launcher passes no USR1 on); ``--engine deepspeed`` with the srun launcher has it.
"""

from __future__ import annotations

import re
import shlex
import string
from dataclasses import dataclass, field
from pathlib import Path

from gptforge.common.errors import ConfigError

TEMPLATE = Path(__file__).with_name("job.sbatch.tmpl")
LAUNCHERS = ("srun", "torchrun", "deepspeed")
SIGNALS = ("USR1", "TERM", "INT")  # the stop signals the ranks handle (launcher/signals.py)
SCRIPT = "job.sbatch"
JOB_CONFIG = "job_config.yaml"
_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Set by Slurm or by the script itself: an --env value for them would be silently replaced.
_RESERVED_ENV = ("MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                 "GROUP_RANK", "PATH")


# torchrun's rendezvous for an elastic job: a round closes 10 s after the fewest nodes have
# joined (torch's default 30 s), a node is dropped after 3 missed 5-second heartbeats
ELASTIC_RDZV_CONF = "last_call_timeout=10,keep_alive_interval=5,keep_alive_max_attempt=3"
# the agent and the ranks do not share the rendezvous store (see the module docstring)
ELASTIC_AGENT_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


class SlurmOptionError(ConfigError):
    """An option of ``gptforge launch slurm`` that cannot work; names it."""


@dataclass
class JobSpec:
    run_dir: Path  # absolute; for a sweep, the sweep's root (points in point-<i>/)
    nodes: int
    gpus_per_node: int
    partition: str
    time: str
    python: str  # the interpreter of the ranks (this venv's)
    job_name: str = ""
    ntasks_per_node: int | None = None
    cpus_per_task: int | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclusive: bool = False
    mail_user: str | None = None
    env: list[tuple[str, str]] = field(default_factory=list)
    launcher: str = "srun"
    signal: str = "USR1"
    signal_seconds: int = 300
    max_requeues: int = 20
    array_size: int = 0  # sweep points (0: not an array)
    array_parallel: int | None = None  # at most this many points at once
    shutdown_timeout_s: int = 120  # torchrun: how long ranks get after a forwarded signal
    min_nodes: int | None = None  # elastic: the job goes on while this many nodes are left
    max_restarts: int = 10  # elastic: torchrun restarts after failures (not membership changes)
    rdzv_conf: str = ELASTIC_RDZV_CONF

    @property
    def elastic(self) -> bool:
        return self.min_nodes is not None and self.min_nodes < self.nodes

    @property
    def tasks_per_node(self) -> int:
        """srun tasks per node (ranks per node for --launcher srun)."""
        if self.launcher != "srun":
            return 1
        if self.ntasks_per_node is not None:
            return self.ntasks_per_node
        return self.gpus_per_node or 1

    @property
    def ranks_per_node(self) -> int:
        if self.launcher == "srun":
            return self.tasks_per_node
        return self.ntasks_per_node or self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node


def time_seconds(text: str) -> int:
    """Slurm's time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:
        h, m, s = (parts + [0, 0])[:3]
        return int(days) * 86400 + h * 3600 + m * 60 + s
    if len(parts) == 1:
        return parts[0] * 60
    if len(parts) == 2:
        return parts[0] * 60 + parts[1]
    return parts[0] * 3600 + parts[1] * 60 + parts[2]


def parse_nodes(text: str) -> tuple[int | None, int]:
    """``--nodes``: ``N``, or ``MIN-MAX`` for an elastic job; (min or None, max)."""
    low, sep, high = str(text).partition("-")
    try:
        nodes = (int(low), int(high)) if sep else (None, int(low))
    except ValueError:
        raise SlurmOptionError("--nodes", f"{text!r} is not N or MIN-MAX (e.g. 4 or 2-4)") \
            from None
    if nodes[0] is not None and not 1 <= nodes[0] <= nodes[1]:
        raise SlurmOptionError("--nodes", f"{text!r}: MIN-MAX needs 1 <= MIN <= MAX")
    return nodes


def parse_env(items: list[str]) -> list[tuple[str, str]]:
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not _ENV_KEY.match(key):
            raise SlurmOptionError("--env", f"{item!r} is not NAME=VALUE with a shell variable "
                                   f"name")
        if key in _RESERVED_ENV or key.startswith("SLURM_"):
            raise SlurmOptionError("--env", f"{key} is set by Slurm or by the job script")
        out.append((key, value))
    return out


def check(spec: JobSpec) -> None:
    """Every option on its own, before anything is written."""
    if spec.nodes < 1:
        raise SlurmOptionError("--nodes", f"must be >= 1, got {spec.nodes}")
    if spec.gpus_per_node < 0:
        raise SlurmOptionError("--gpus-per-node", f"must be >= 0, got {spec.gpus_per_node}")
    if spec.ntasks_per_node is not None and spec.ntasks_per_node < 1:
        raise SlurmOptionError("--ntasks-per-node", f"must be >= 1, got {spec.ntasks_per_node}")
    if spec.cpus_per_task is not None and spec.cpus_per_task < 1:
        raise SlurmOptionError("--cpus-per-task", f"must be >= 1, got {spec.cpus_per_task}")
    if spec.launcher not in LAUNCHERS:
        raise SlurmOptionError("--launcher", f"{spec.launcher!r}: one of {', '.join(LAUNCHERS)}")
    if spec.signal not in SIGNALS:
        raise SlurmOptionError("--signal", f"{spec.signal!r}: one of {', '.join(SIGNALS)}")
    if not spec.partition:
        raise SlurmOptionError("--partition", "is required")
    if not _TIME.match(spec.time or ""):
        raise SlurmOptionError("--time", f"{spec.time!r} is not a Slurm time (HH:MM:SS, "
                               f"D-HH:MM:SS or minutes)")
    limit = time_seconds(spec.time)
    if limit <= 0:
        raise SlurmOptionError("--time", f"{spec.time!r} is no time at all")
    if not 0 < spec.signal_seconds < limit:
        raise SlurmOptionError("--signal-seconds", f"{spec.signal_seconds}: the stop signal "
                               f"must come after the start and before --time {spec.time} "
                               f"({limit} s)")
    if spec.elastic and spec.launcher != "torchrun":
        raise SlurmOptionError("--launcher", f"{spec.launcher}: an elastic job (--nodes "
                               f"{spec.min_nodes}-{spec.nodes}) runs torchrun on every node "
                               f"(--launcher torchrun, or leave it out)")
    if spec.max_restarts < 0:
        raise SlurmOptionError("--max-restarts", f"must be >= 0, got {spec.max_restarts}")
    if spec.max_requeues < 0:
        raise SlurmOptionError("--max-requeues", f"must be >= 0, got {spec.max_requeues}")
    if spec.launcher in ("torchrun", "deepspeed") and spec.ntasks_per_node is None \
            and spec.gpus_per_node == 0:
        pass  # one rank per node on CPU
    for name, value in (("--job-name", spec.job_name), ("--partition", spec.partition),
                        ("--account", spec.account), ("--qos", spec.qos),
                        ("--constraint", spec.constraint), ("--mail-user", spec.mail_user),
                        ("run.dir", str(spec.run_dir))):
        if value and ("\n" in value or "\r" in value or "\0" in value):
            raise SlurmOptionError(name, f"{value!r}: holds a newline, which a #SBATCH line "
                                   f"cannot carry")
    for key, value in spec.env:
        if "\0" in value:
            raise SlurmOptionError("--env", f"{key}: holds a NUL byte")


def _q(value) -> str:
    return shlex.quote(str(value))


def _slurm_path(path: Path) -> str:
    """A path in --output/--error: '%' would start one of sbatch's patterns."""
    return str(path).replace("%", "%%")


def directives(spec: JobSpec) -> list[str]:
    run = spec.run_dir
    if spec.array_size:
        out = f"{_slurm_path(run)}/point-%a/slurm-%A_%a"
    else:
        out = f"{_slurm_path(run)}/slurm-%j"
    sig = ("" if spec.launcher == "srun" else "B:") + f"{spec.signal}@{spec.signal_seconds}"
    opts: list[tuple[str, object]] = [
        ("job-name", spec.job_name or run.name), ("nodes", spec.nodes),
        ("ntasks-per-node", spec.tasks_per_node), ("partition", spec.partition),
        ("time", spec.time), ("output", out + ".out"), ("error", out + ".err"),
        ("open-mode", "append"), ("signal", sig), ("requeue", True)]
    if spec.elastic:  # a failed node does not end the job (see the module docstring)
        opts.append(("no-kill", True))
    if spec.gpus_per_node:
        opts.append(("gpus-per-node", spec.gpus_per_node))
    if spec.cpus_per_task:
        opts.append(("cpus-per-task", spec.cpus_per_task))
    for name, value in (("account", spec.account), ("qos", spec.qos),
                        ("constraint", spec.constraint), ("mail-user", spec.mail_user)):
        if value:
            opts.append((name, value))
    if spec.mail_user:
        opts.append(("mail-type", "END,FAIL,REQUEUE"))
    if spec.exclusive:
        opts.append(("exclusive", True))
    if spec.array_size:
        limit = f"%{spec.array_parallel}" if spec.array_parallel else ""
        opts.append(("array", f"0-{spec.array_size - 1}{limit}"))
    return [f"#SBATCH --{k}" if v is True else f"#SBATCH --{k}={_q(v)}" for k, v in opts]


def _launch_line(spec: JobSpec) -> tuple[str, str, str]:
    """(command, what the USR1 trap adds, what the TERM trap adds)."""
    # --wait: when one task ends (a failed rank), the others get 60 s, then are ended; not
    # --kill-on-bad-exit: ranks that checkpointed leave with 75 and must not cut others short
    srun = "srun --unbuffered --wait=60"
    if spec.launcher == "srun":
        # each task execs the rank with LOCAL_RANK = its SLURM_LOCALID (DeepSpeed asks for it)
        return (f'{srun} --ntasks-per-node={spec.tasks_per_node} bash -c '
                f'\'LOCAL_RANK="$SLURM_LOCALID" exec "$@"\' rank "$PYTHON" -m '
                f'gptforge.launcher.run --config "$CONFIG"', "", "")
    if spec.launcher == "torchrun":
        sig = f"SIG{spec.signal}"
        nnodes = '"$SLURM_NNODES"'
        if spec.elastic:  # a step per node (see _launch_block); no --wait
            srun = ('srun --unbuffered --no-kill --kill-on-bad-exit=0 --nodes=1 --ntasks=1 '
                    '--nodelist="$HOST"')
            nnodes = (f'{spec.min_nodes}:{spec.nodes} --max-restarts={spec.max_restarts} '
                      f'--rdzv-conf={_q(spec.rdzv_conf)},is_host="$IS_HOST"')
        cmd = (f'{srun} --ntasks-per-node=1 "$PYTHON" -m torch.distributed.run '
               f'--nnodes={nnodes} --nproc-per-node={spec.ranks_per_node} '
               f'--rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" '
               f'--rdzv-id="$SLURM_JOB_ID" --signals-to-handle={sig},SIGTERM,SIGINT '
               f'--shutdown-timeout={spec.shutdown_timeout_s} '
               f'-m gptforge.launcher.run --config "$CONFIG"')
        ranks = '"${STEPS[@]}"' if spec.elastic else '"$CHILD"'
        return (cmd, f'; kill -{spec.signal} {ranks} 2>/dev/null',
                f'; kill -TERM {ranks} 2>/dev/null')
    gptforge = str(Path(spec.python).parent / "gptforge")
    # (its hostfile is written from this attempt's allocation: see pre_launch in render)
    cmd = (f'{_q(gptforge)} launch deepspeed --num-gpus={spec.ranks_per_node} '
           f'--hostfile="$RUN_DIR/hostfile" --master-addr="$MASTER_ADDR" '
           f'--master-port="$MASTER_PORT" --config "$CONFIG"')
    # DeepSpeed's launcher passes no USR1 on and reaches other nodes over ssh: the signal is
    # only noted here (preemptible DeepSpeed jobs: --launcher srun with parallel.engine=deepspeed)
    return cmd, '; echo "[gptforge] (not passed on to the DeepSpeed launcher)"', ""


def _launch_block(spec: JobSpec, launch: str) -> str:
    """Start the launch in the background as CHILD. Elastic: one srun step per node (a failed
    node's step is killed by Slurm, and a step that loses a node dies whole even with
    ``--no-kill``, so each node has its own); CHILD is the batch host's, whose agent holds the
    rendezvous store (``is_host``, said rather than guessed from host names) and whose exit
    code is the job's; the traps signal every step."""
    if not spec.elastic:
        return f"{launch} &\nCHILD=$!"
    return ("STEPS=()\n"
            'for HOST in $(scontrol show hostnames "$SLURM_JOB_NODELIST"); do\n'
            '    IS_HOST=false; [[ $HOST == "$MASTER_ADDR" ]] && IS_HOST=true  # the store\n'
            f"    {launch} &\n"
            "    STEPS+=($!)\n"
            "done\n"
            "CHILD=${STEPS[0]}  # the batch host's step")


def render(spec: JobSpec, what: str = "") -> str:
    check(spec)
    launch, fwd_usr1, fwd_term = _launch_line(spec)
    array_block = ""
    if spec.array_size:
        array_block = ('RUN_DIR="$RUN_DIR/point-$SLURM_ARRAY_TASK_ID"  # this sweep point\n'
                       f'CONFIG="$RUN_DIR/{JOB_CONFIG}"\n')
    text = string.Template(TEMPLATE.read_text()).substitute(
        what=what or "one run", script_q=_q(spec.run_dir / SCRIPT),
        directives="\n".join(directives(spec)), run_dir_q=_q(spec.run_dir),
        config_q=_q(spec.run_dir / JOB_CONFIG) if not spec.array_size else '""',
        python_q=_q(spec.python), max_requeues=int(spec.max_requeues),
        array_block=array_block,
        env_exports="\n".join(f"export {k}={_q(v)}" for k, v in [
            *(ELASTIC_AGENT_ENV.items() if spec.elastic else ()), *spec.env]),
        forward_usr1=fwd_usr1, forward_term=fwd_term, launch_block=_launch_block(spec, launch),
        signal=spec.signal,
        pre_launch='rm -f "$RUN_DIR/hostfile"  # written from this allocation by the launcher\n'
        if spec.launcher == "deepspeed" else "")
    return text


def parse_job_id(sbatch_stdout: str) -> str:
    """``sbatch --parsable`` prints ``<id>`` or ``<id>;<cluster>``."""
    first = sbatch_stdout.strip().splitlines()[-1] if sbatch_stdout.strip() else ""
    job = first.split(";")[0]
    if not job.isdigit():
        raise ValueError(f"sbatch printed {sbatch_stdout!r}, not a job id")
    return job


def sweep_points(items: list[str]) -> list[list[tuple[str, str]]]:
    """``--sweep optim.lr=1e-4,3e-4 --sweep train.seed=1,2`` → the grid, in order (the last
    --sweep varies fastest). A value list in brackets is kept whole: ``key=[a,b]``."""
    axes: list[tuple[str, list[str]]] = []
    for item in items:
        key, sep, values = item.partition("=")
        key = key.removeprefix("--")
        if not sep or "." not in key or not values:
            raise SlurmOptionError("--sweep", f"{item!r} is not section.key=v1,v2,...")
        if any(k == key for k, _ in axes):
            raise SlurmOptionError("--sweep", f"{key} is swept twice")
        vals = [values] if values.startswith("[") else values.split(",")
        if any(v == "" for v in vals):
            raise SlurmOptionError("--sweep", f"{item!r} has an empty value")
        axes.append((key, vals))
    grid: list[list[tuple[str, str]]] = [[]]
    for key, vals in axes:
        grid = [point + [(key, v)] for point in grid for v in vals]
    return grid if axes else []
