"""Process groups: torch.distributed + megatron ``parallel_state`` → an explicit ParallelContext.

This module and the rest of ``gptforge.parallel`` are the only readers of megatron's global
parallel state; everything else is handed a ``ParallelContext``.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from gptforge.common.errors import UserError
from gptforge.common.patching import TESTED, Patches

from gptforge.parallel.megatron import cpu_compat, startup


class CollectiveTimeout(UserError):
    """A collective waited ``parallel.distributed_timeout_minutes`` for a rank that never came."""


class PeerLost(UserError):
    """A collective's connection to another rank broke: that rank (or its node) is gone."""

    consequence = True


_TIMEOUT_TEXT = re.compile(r"timed out|timeout", re.IGNORECASE)
_PEER_LOST_TEXT = re.compile(r"connection (reset|closed) by peer|broken pipe", re.IGNORECASE)
_GPTFORGE_ROOT = str(Path(__file__).resolve().parents[1])  # where gptforge's parts are


def _ours(filename: str) -> bool:
    return filename.startswith(_GPTFORGE_ROOT) or "/megatron/" in filename \
        or "/deepspeed/" in filename


def collective_timeout(exc: BaseException,
                       timeout_minutes: float) -> CollectiveTimeout | PeerLost | None:
    """``exc`` as a one-line CollectiveTimeout if it is a process group's timeout (gloo's
    "Timed out waiting ...ms", NCCL's watchdog, the store's wait), naming where it waited; as
    a PeerLost if another rank's connection broke (it died: a lost node)."""
    if not isinstance(exc, (RuntimeError, dist.DistError)):
        return None
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if _ours(f.filename)]
    where = f" in {frames[-1].name} ({Path(frames[-1].filename).name}:{frames[-1].lineno})" \
        if frames else ""
    detail = str(exc).strip().splitlines()[0].split("] ", 1)[-1][:100]
    if _PEER_LOST_TEXT.search(str(exc)):
        return PeerLost(f"a collective{where} lost its connection to another rank (it died, or "
                        f"its node: {detail.split('. ')[0]}); the newest checkpoint resumes the "
                        f"run (an elastic launch restarts on its own)")
    if not _TIMEOUT_TEXT.search(str(exc)):
        return None
    return CollectiveTimeout(
        f"a collective{where} waited parallel.distributed_timeout_minutes={timeout_minutes:g} "
        f"for a rank that did not answer (stalled, stopped or dead: {detail}); the newest "
        f"checkpoint resumes the run")


class LaunchError(UserError):
    """The environment of a rank is wrong (missing MASTER_ADDR, ...); the message says what."""


@dataclass(frozen=True)
class ParallelContext:
    rank: int
    world_size: int
    local_rank: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    vpp_size: int | None
    dp_rank: int
    dp_size: int
    device: torch.device
    backend: str
    control_group: Any = None  # gloo group over all ranks for small CPU collectives

    @property
    def is_logging_rank(self) -> bool:
        """The one rank that logs: last pipeline stage (it holds the loss), TP rank 0, DP rank 0."""
        return self.pp_rank == self.pp_size - 1 and self.tp_rank == 0 and self.dp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def env_rank_info() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun, Slurm (srun) or deepspeed environment."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def world_size_from_env() -> int:
    return env_rank_info()[1]


def free_port() -> int:
    """A TCP port free on this host right now (for MASTER_PORT of a local launch)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_node(world_size: int) -> bool:
    env = os.environ
    if "LOCAL_WORLD_SIZE" in env:
        return int(env["LOCAL_WORLD_SIZE"]) == world_size
    if "SLURM_NNODES" in env:
        return int(env["SLURM_NNODES"]) == 1
    return world_size == 1


def check_launch_env(rank: int, world_size: int) -> None:
    """Fail early (before any model) when a multi-node rank lacks MASTER_ADDR."""
    if "MASTER_ADDR" not in os.environ and not _single_node(world_size):
        raise LaunchError(f"MASTER_ADDR is not set for a multi-node run of {world_size} "
                          f"ranks (rank {rank}): set it to the first node's address")


_SET_BY_US: list[str] = []  # MASTER_*, LOCAL_RANK variables defaulted in this process


def _set_master_env(rank: int, world_size: int) -> None:
    """MASTER_ADDR/PORT: required for a multi-node run; defaulted on one node."""
    check_launch_env(rank, world_size)
    if "MASTER_PORT" not in os.environ and world_size > 1:
        raise LaunchError(f"MASTER_PORT is not set for a multi-rank run (rank {rank})")
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", None)):
        if key not in os.environ:  # one process alone: ours to set, and to take back
            os.environ[key] = value or str(free_port())
            _SET_BY_US.append(key)


def _choose_backend(requested: str) -> str:
    if requested != "auto":
        return requested
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(backend: str = "auto",
                     timeout_minutes: float = 10) -> tuple[int, int, int, str]:
    """Initialise the default process group (a one-rank group when run alone)."""
    rank, world_size, local_rank = env_rank_info()
    backend = _choose_backend(backend)
    if not dist.is_initialized():
        _set_master_env(rank, world_size)
        if "LOCAL_RANK" not in os.environ:  # DeepSpeed asks for it even in a lone process
            os.environ["LOCAL_RANK"] = str(local_rank)
            _SET_BY_US.append("LOCAL_RANK")
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    apply_default_timeout(timeout_minutes)
    return rank, world_size, local_rank, backend


def apply_default_timeout(timeout_minutes: float) -> None:
    """Every process group created from now on without a timeout of its own (megatron's
    sub-groups, DeepSpeed's) waits ``parallel.distributed_timeout_minutes``, not torch's 30
    (or NCCL's 10) minute default."""
    timeout = datetime.timedelta(minutes=timeout_minutes)
    defaults = Patches("process-group timeout", "torch", TESTED["torch"])
    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
        defaults.add(name, f"torch.distributed.distributed_c10d:{name}", timeout)
    defaults.install()


def init_parallel(cfg_parallel, backend: str | None = None) -> ParallelContext:
    """torch.distributed + megatron model-parallel groups for the ``parallel`` config section."""
    startup.before_megatron_import()  # (the entry points have; a worker or a library user may not)
    cpu_compat.apply()
    rank, world_size, local_rank, backend = init_distributed(
        backend or cfg_parallel.backend, cfg_parallel.distributed_timeout_minutes)
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    vpp = cfg_parallel.virtual_pipeline_model_parallel_size
    ps.initialize_model_parallel(
        tensor_model_parallel_size=cfg_parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg_parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=vpp if vpp and vpp > 1 else None,
        distributed_timeout_minutes=cfg_parallel.distributed_timeout_minutes,
    )
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    return ParallelContext(
        rank=rank, world_size=world_size, local_rank=local_rank,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        vpp_size=vpp if vpp and vpp > 1 else None,
        dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size(),
        device=device, backend=backend,
        control_group=dist.group.WORLD if backend == "gloo" else _gloo_world_group(
            datetime.timedelta(minutes=cfg_parallel.distributed_timeout_minutes)),
    )


_GLOO_WORLD = None


def _gloo_world_group(timeout: datetime.timedelta):
    global _GLOO_WORLD
    if _GLOO_WORLD is None:
        _GLOO_WORLD = dist.new_group(backend="gloo", timeout=timeout)
    return _GLOO_WORLD


def all_gather_objects(ctx: ParallelContext, obj) -> list:
    """Every rank's ``obj`` (small, picklable), on every rank, indexed by global rank."""
    if ctx.world_size == 1:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj, group=ctx.control_group)
    return out


def barrier(ctx: ParallelContext) -> None:
    if ctx.world_size > 1:
        dist.barrier(group=ctx.control_group)


def max_over_ranks(ctx: ParallelContext, value: int) -> int:
    """The largest of every rank's ``value``, on every rank (a collective over all ranks)."""
    if ctx.world_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=ctx.control_group)
    return int(tensor.item())


def destroy_model_parallel() -> None:
    """Drop megatron's groups; the default process group stays for the next layout."""
    if "megatron.core.parallel_state" not in sys.modules:  # none made (an early error): no
        return  # import of megatron (seconds) on the way out
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()


def destroy_parallel() -> None:
    """Tear down the process groups, and the MASTER_* defaults a lone process set for itself
    (an in-process caller, a test, must not hand them to the processes it starts later)."""
    global _GLOO_WORLD
    destroy_model_parallel()
    _GLOO_WORLD = None
    if dist.is_initialized():
        dist.destroy_process_group()
    while _SET_BY_US:
        os.environ.pop(_SET_BY_US.pop(), None)
