"""What a run tells MLflow about itself: its name and tags, params, artifacts (logging rank)."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

from gptforge.launcher.config import Config, to_dict
from gptforge.parallel.layout import Layout

SOURCE = Path(__file__).resolve().parents[2]  # the checkout gptforge runs from
RUN_FILES = ("config.yaml", "job.sbatch", "job_config.yaml", "sweep.json", "sample.txt")


def host_count(ctx) -> int:
    """Hosts of this run (collective outside Slurm: every rank names its host)."""
    from gptforge.parallel.context import all_gather_objects

    if os.environ.get("SLURM_NNODES"):  # (two Slurm "nodes" may share a host name in tests)
        return int(os.environ["SLURM_NNODES"])
    return len(set(all_gather_objects(ctx, socket.gethostname())))


def git_commit() -> dict[str, str]:
    try:
        head = subprocess.run(["git", "-C", str(SOURCE), "rev-parse", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return {}
        dirty = subprocess.run(["git", "-C", str(SOURCE), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    commit = head.stdout.strip()
    return {"git.commit": commit, "mlflow.source.git.commit": commit,
            "git.dirty": str(bool(dirty)).lower()}


def mlflow_run(cfg: Config, layout: Layout, ctx, *, resuming: bool) -> dict:
    """What the logging rank's MLflow run is called and tagged with (collective when on)."""
    if not cfg.logging.mlflow:
        return {}
    from gptforge.launcher.slurm_rank import job_tags

    hosts = host_count(ctx)  # every rank takes part
    if not ctx.is_logging_rank:
        return {}
    tags = {"gptforge.run_dir": str(Path(cfg.run.dir).resolve()), "layout": layout.describe(),
            "engine": cfg.parallel.engine, "world_size": str(ctx.world_size),
            "host_count": str(hosts), "host": socket.gethostname(), **git_commit(),
            **job_tags()}
    return {"run_name": cfg.run.name or Path(cfg.run.dir).resolve().name,
            "fresh": not resuming, "tags": tags}


def params(cfg: Config, layout: Layout) -> dict:
    """The flattened resolved config, and what the layout derives from it."""
    out = {f"{s}.{k}": v for s, sec in to_dict(cfg).items() for k, v in sec.items()}
    out.update({"derived.world_size": layout.world_size,
                "derived.data_parallel_size": layout.data_parallel_size,
                "derived.num_microbatches": layout.num_microbatches,
                "derived.padded_vocab_size": layout.padded_vocab_size})
    return out


def artifacts(cfg: Config) -> list[tuple[Path, str | None]]:
    """What the MLflow run keeps: config, job script, sample, checkpoint manifests."""
    from gptforge.launcher.run.checkpoint.format import MANIFEST, save_dir

    run_dir = Path(cfg.run.dir)
    out: list[tuple[Path, str | None]] = [
        (run_dir / name, None) for name in RUN_FILES if (run_dir / name).is_file()]
    ckpt_dir = save_dir(cfg.checkpoint, cfg.run.dir)
    if cfg.checkpoint.enabled and ckpt_dir.is_dir():
        for manifest in sorted(ckpt_dir.glob(f"step-*/{MANIFEST}")):
            out.append((manifest, f"checkpoints/{manifest.parent.name}"))
    return out
