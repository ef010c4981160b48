"""``gptforge launch deepspeed``: the ranks of a run started by DeepSpeed's own launcher.

    gptforge launch deepspeed --hostfile H [--num-nodes N] [--num-gpus G]
        [--master-addr A] [--master-port P] [--dry-run] --config ... [--section.key=value ...]

runs ``deepspeed --hostfile H ... --module gptforge.launcher.run <config arguments>``: one
``deepspeed.launcher.launch`` per host (pdsh over ssh when the hostfile names other hosts), one
rank per slot. Before anything starts, the hostfile is read (``host slots=N`` lines, DeepSpeed's
format), trimmed by ``--num-nodes``/``--num-gpus`` as DeepSpeed does, and the config is checked
for that many ranks (config, run dir, data: ``launcher/run/entry.py: preflight``); a hostfile whose
slots do not fit the layout is refused naming it. Inside a Slurm allocation
(``SLURM_JOB_NODELIST`` set) the hostfile is written from ``scontrol show hostnames`` (to
``--hostfile`` if given and absent, else ``<run.dir>/hostfile``) with ``--num-gpus`` (or
``SLURM_GPUS_ON_NODE``) slots per node.

The environment the ranks need (the CPU accelerator where there is no GPU, OMP_NUM_THREADS, which
the deepspeed launcher leaves unset, our error directory) reaches remote hosts through a
``DS_ENV_FILE`` written for this launch. ``--dry-run`` prints the command and that environment
and starts nothing. ssh to every remote host is checked here (BatchMode) and DeepSpeed's own check
is skipped; the master address is always passed (127.0.0.1 for a localhost-only hostfile).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from gptforge.common.errors import ConfigError

_HOST_LINE = re.compile(r"^(\S+)\s+slots=(\d+)\s*$")
_LOCAL_HOSTS = ("localhost", "127.0.0.1")
# Environment variables passed to the ranks on every host (values are checked: no newlines or
# quotes, which DeepSpeed's pdsh command line cannot carry).
_PASSED_ENV = ("DS_ACCELERATOR", "OMP_NUM_THREADS", "PYTHONWARNINGS", "GPTFORGE_DEBUG",
               "GPTFORGE_ERROR_DIR", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME",
               "NCCL_DEBUG", "CUDA_DEVICE_MAX_CONNECTIONS", "GPTFORGE_TRAIN_ITERS")


class LaunchConfigError(ConfigError):
    """A launch option or hostfile that cannot work; names it."""


@dataclass(frozen=True)
class Hosts:
    path: Path
    slots: dict[str, int]  # host -> ranks on it, in launch order

    @property
    def world_size(self) -> int:
        return sum(self.slots.values())

    @property
    def local_only(self) -> bool:
        return all(h in _LOCAL_HOSTS for h in self.slots)

    def describe(self) -> str:
        return ", ".join(f"{h} slots={n}" for h, n in self.slots.items())


def read_hostfile(path: Path) -> dict[str, int]:
    """DeepSpeed's hostfile format: ``host slots=N`` lines, ``#`` comments, no repeated host."""
    key = f"hostfile {path}"
    if not path.is_file():
        raise LaunchConfigError(key, "not found")
    slots: dict[str, int] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _HOST_LINE.match(line)
        if not match:
            raise LaunchConfigError(f"{key}:{number}", f"{line!r} is not 'host slots=N'")
        host, count = match.group(1), int(match.group(2))
        if host in slots:
            raise LaunchConfigError(f"{key}:{number}", f"host {host} is listed twice")
        if count < 1:
            raise LaunchConfigError(f"{key}:{number}", f"{host} has slots={count}")
        slots[host] = count
    if not slots:
        raise LaunchConfigError(key, "names no host ('host slots=N' lines)")
    return slots


def trim(slots: dict[str, int], path: Path, num_nodes: int | None,
         num_gpus: int | None) -> dict[str, int]:
    """``--num-nodes``: the first N hosts; ``--num-gpus``: G slots on each (DeepSpeed's rule)."""
    hosts = list(slots)
    if num_nodes is not None:
        if num_nodes < 1 or num_nodes > len(hosts):
            raise LaunchConfigError("--num-nodes", f"{num_nodes}: hostfile {path} has "
                                    f"{len(hosts)} host(s)")
        hosts = hosts[:num_nodes]
    out = {}
    for host in hosts:
        if num_gpus is not None:
            if num_gpus < 1 or num_gpus > slots[host]:
                raise LaunchConfigError("--num-gpus", f"{num_gpus}: hostfile {path} gives "
                                        f"{host} slots={slots[host]}")
            out[host] = num_gpus
        else:
            out[host] = slots[host]
    return out


def slurm_hostnames() -> list[str]:
    nodelist = os.environ["SLURM_JOB_NODELIST"]
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise LaunchConfigError("SLURM_JOB_NODELIST", f"scontrol show hostnames {nodelist} "
                                f"failed: {err}") from None
    hosts = out.split()
    if not hosts:
        raise LaunchConfigError("SLURM_JOB_NODELIST", f"{nodelist!r} names no host")
    return hosts


def write_slurm_hostfile(path: Path, num_gpus: int | None, dry_run: bool) -> str:
    slots = num_gpus or int(os.environ.get("SLURM_GPUS_ON_NODE", "0") or 0)
    if slots < 1:
        raise LaunchConfigError("--num-gpus", "needed to write the hostfile of this Slurm "
                                "allocation (SLURM_GPUS_ON_NODE is not set)")
    text = "".join(f"{host} slots={slots}\n" for host in slurm_hostnames())
    if not dry_run:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return text


def resolve_hosts(args, run_dir: str) -> tuple[Hosts, str | None]:
    """The hosts and slots of this launch; (hosts, hostfile text written from Slurm or None)."""
    written = None
    if os.environ.get("SLURM_JOB_NODELIST") and (args.hostfile is None
                                                 or not Path(args.hostfile).exists()):
        path = Path(args.hostfile) if args.hostfile else Path(run_dir) / "hostfile"
        written = write_slurm_hostfile(path, args.num_gpus, args.dry_run)
        slots = {line.split()[0]: int(line.split("=")[1]) for line in written.splitlines()}
    elif args.hostfile is None:
        raise LaunchConfigError("--hostfile", "needed outside a Slurm allocation")
    else:
        path = Path(args.hostfile)
        slots = read_hostfile(path)
    return Hosts(path.resolve(), trim(slots, path, args.num_nodes, args.num_gpus)), written


def check_layout(cfg, hosts: Hosts, *, dry_run: bool):
    """The config checked on its own (one data-parallel rank: any error is the config's), then
    for the hostfile's world size (an error now is the hostfile's: named), then run dir and
    data (``preflight``; a dry run leaves the run dir alone)."""
    from gptforge.launcher.config import validate
    from gptforge.launcher.run.build import check_data
    from gptforge.launcher.run.entry import preflight

    p = cfg.parallel
    validate(cfg, max(1, p.tensor_model_parallel_size) * max(1, p.pipeline_model_parallel_size))
    try:
        validate(cfg, hosts.world_size)
    except ConfigError as err:
        raise LaunchConfigError(f"hostfile {hosts.path}", f"{hosts.describe()} = world size "
                                f"{hosts.world_size}, which does not fit the config: "
                                f"{err}") from None
    if dry_run:
        check_data(cfg)
        return validate(cfg, hosts.world_size)
    return preflight(cfg, hosts.world_size, is_run_dir_owner=True)


def check_ssh(hosts: Hosts, ssh_port: int | None) -> None:
    """Every host answers ssh without a password, with the options pdsh will use
    (``PDSH_SSH_ARGS_APPEND``); a localhost-only hostfile needs no ssh."""
    if hosts.local_only:
        return
    extra = shlex.split(os.environ.get("PDSH_SSH_ARGS_APPEND", ""))
    for host in hosts.slots:
        cmd = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", *extra,
               *(["-p", str(ssh_port)] if ssh_port else []), host, "true"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as err:
            raise LaunchConfigError(f"hostfile {hosts.path}", f"ssh {host}: {err}") from None
        if proc.returncode != 0:
            why = (proc.stderr.strip().splitlines() or ["no answer"])[-1]
            raise LaunchConfigError(f"hostfile {hosts.path}", f"ssh {host} (passwordless, "
                                    f"BatchMode) failed: {why}")


def master_address(hosts: Hosts, given: str | None) -> str:
    if given:
        return given
    first = next(iter(hosts.slots))
    if first in _LOCAL_HOSTS:
        return "127.0.0.1"
    try:
        return socket.gethostbyname(first)
    except OSError:
        raise LaunchConfigError("--master-addr", f"cannot resolve {first} (the first host of "
                                f"{hosts.path}); pass --master-addr") from None


def master_port(hosts: Hosts, given: int | None) -> int:
    from gptforge.parallel.context import free_port

    if given:
        return given
    if os.environ.get("MASTER_PORT"):
        return int(os.environ["MASTER_PORT"])
    return free_port() if hosts.local_only else 29500


def rank_env(hosts: Hosts, error_dir: str) -> dict[str, str]:
    """What every rank needs beyond DeepSpeed's RANK/WORLD_SIZE/MASTER_*."""
    import torch

    env = {"GPTFORGE_ERROR_DIR": error_dir}
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    per_host = max(hosts.slots.values())
    env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS",
                                            str(max(1, (os.cpu_count() or 1) // per_host)))
    env["PYTHONWARNINGS"] = os.environ.get("PYTHONWARNINGS", "ignore::UserWarning")
    for key in _PASSED_ENV:
        if key in os.environ and key not in env:
            env[key] = os.environ[key]
    for key, value in env.items():
        if any(c in value for c in "\n\r\"'"):
            raise LaunchConfigError(key, f"{value!r}: a value passed to remote hosts cannot "
                                    f"hold newlines or quotes")
    return env


def deepspeed_command(hosts: Hosts, *, addr: str, port: int, ssh_port: int | None,
                      config_args: list[str]) -> list[str]:
    script = Path(sys.executable).parent / "deepspeed"
    runner = [str(script)] if script.is_file() else [sys.executable, "-m",
                                                    "deepspeed.launcher.runner"]
    nodes, gpus = len(hosts.slots), max(hosts.slots.values())
    uniform = len(set(hosts.slots.values())) == 1
    cmd = [*runner, "--hostfile", str(hosts.path), "--no_ssh_check",
           f"--master_addr={addr}", f"--master_port={port}"]
    if uniform:
        cmd += [f"--num_nodes={nodes}", f"--num_gpus={gpus}"]
    else:  # DeepSpeed trims every host to --num_gpus: name the hosts and slots instead
        cmd += ["--include", "@".join(f"{h}:{','.join(map(str, range(n)))}"
                                      for h, n in hosts.slots.items())]
    if ssh_port:
        cmd.append(f"--ssh_port={ssh_port}")
    return [*cmd, "--no_local_rank", "--module", "gptforge.launcher.run", *config_args]


def _run(cmd: list[str], env: dict) -> int:
    """Run the deepspeed launcher and wait for it. A Ctrl-C reaches the whole foreground process
    group (the ranks stop at a step boundary and checkpoint): this process keeps waiting."""
    proc = subprocess.Popen(cmd, env=env)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # after the start: not inherited
    try:
        return proc.wait()
    finally:
        signal.signal(signal.SIGINT, previous)


def _first_error(error_dir: Path) -> str | None:
    records = []
    for path in error_dir.glob("rank-*.json"):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    users = sorted((r for r in records if r.get("user_error")), key=lambda r: r["time"])
    others = sorted(records, key=lambda r: r["time"])
    return (users or others)[0]["line"] if records else None


def _launch(args) -> int:
    from gptforge.launcher.config import load_config
    from gptforge.launcher.overrides import parse_train_args

    files, overrides = parse_train_args(args.config_args, prog="gptforge launch deepspeed")
    cfg = load_config(files, overrides)
    hosts, written = resolve_hosts(args, cfg.run.dir)
    layout = check_layout(cfg, hosts, dry_run=args.dry_run)
    addr = master_address(hosts, args.master_addr)
    port = master_port(hosts, args.master_port)
    workdir = Path(tempfile.mkdtemp(prefix="gptforge-launch-"))
    error_dir = workdir / "errors"
    error_dir.mkdir()
    try:
        env = rank_env(hosts, str(error_dir))
        env_file = workdir / "deepspeed_env"
        env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
        cmd = deepspeed_command(hosts, addr=addr, port=port, ssh_port=args.ssh_port,
                                config_args=args.config_args)
        launch_env = {**os.environ, **env, "DS_ENV_FILE": str(env_file)}
        if args.dry_run:
            if written is not None:
                print(f"# hostfile {hosts.path} (from scontrol show hostnames):\n{written}", end="")
            print(f"# layout: {layout.describe()}, world size {hosts.world_size} "
                  f"({hosts.describe()})")
            print("# environment of every rank (DS_ENV_FILE):")
            for key, value in env.items():
                print(f"{key}={shlex.quote(value)}")
            print(shlex.join(cmd))
            return 0
        check_ssh(hosts, args.ssh_port)
        print(f"[gptforge] {layout.describe()} on {hosts.describe()}: {shlex.join(cmd)}",
              flush=True)
        code = _run(cmd, launch_env)
        if code != 0:
            line = _first_error(error_dir)
            print(line or f"gptforge: error: the deepspeed launcher exited with code {code}",
                  file=sys.stderr, flush=True)
        return code
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _keep_config_args(parser: argparse.ArgumentParser) -> None:
    """Arguments this parser does not know (``--config``, overrides) are the config's: kept in
    ``config_args`` instead of being refused."""
    parse = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        namespace, extra = parse(args, namespace)
        namespace.config_args = list(getattr(namespace, "config_args", []) or []) + extra
        return namespace, []

    parser.parse_known_args = parse_known_args


def register(verbs) -> None:
    parser = verbs.add_parser("launch", help="start the ranks of a run with another launcher")
    sub = parser.add_subparsers(dest="launcher", required=True, metavar="LAUNCHER")
    p = sub.add_parser(
        "deepspeed", allow_abbrev=False,
        help="DeepSpeed's launcher: one rank per hostfile slot (pdsh/ssh across hosts)",
        usage="gptforge launch deepspeed [--hostfile H] [--num-nodes N] [--num-gpus G] "
              "[--dry-run] [--config FILE ...] [--section.key=value ...]",
        description="Check the config for the hostfile's slots, then run the deepspeed "
                    "launcher on `python -m gptforge.launcher.run` with the same config "
                    "arguments.")
    p.add_argument("--hostfile", metavar="H",
                   help="DeepSpeed hostfile ('host slots=N' lines); in a Slurm allocation, "
                        "written from scontrol show hostnames when absent")
    p.add_argument("--num-nodes", type=int, metavar="N", help="use the first N hosts")
    p.add_argument("--num-gpus", type=int, metavar="G", help="ranks per host (<= its slots)")
    p.add_argument("--master-addr", metavar="A",
                   help="rank 0's address (default: the first host; 127.0.0.1 for localhost)")
    p.add_argument("--master-port", type=int, metavar="P",
                   help="rank 0's port (default: $MASTER_PORT, a free port, or 29500)")
    p.add_argument("--ssh-port", type=int, metavar="PORT", help="ssh port of the hosts")
    p.add_argument("--dry-run", action="store_true",
                   help="print the command and the ranks' environment; start nothing")
    p.set_defaults(func=_launch, config_args=[])
    _keep_config_args(p)

    from gptforge.launcher.cli import launch_status
    from gptforge.launcher.cli import slurm as slurm_cli

    slurm_cli.add_parser(sub, _keep_config_args)
    launch_status.add_parser(sub)
