"""The run directory and the ``run`` section: one directory holds exactly one run.

A directory that already holds a run is either that run continued (resumed from its
checkpoint, with a restart record in ``metrics.jsonl``) or refused, naming the directory,
unless ``run.overwrite`` asks to replace it. Checks run before any model is built.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from gptforge.common.durable import make_writable_dir
from gptforge.common.errors import ConfigError, UserError
from gptforge.common.metrics_file import METRICS_FILE, metrics_path, read_records, step_records


@dataclass
class RunConfig:
    dir: str = "runs/default"
    """Directory of this run: config.yaml, metrics.jsonl, checkpoints/, sample.txt."""
    name: str = ""
    """Run name (MLflow); empty: the directory's name."""
    overwrite: bool = False
    """Replace a previous run found in run.dir instead of refusing to start."""


def validate_run(cfg: RunConfig) -> None:
    if not cfg.dir:
        raise ConfigError("run.dir", "must name a directory")


class RunDirError(UserError):
    """A run directory that cannot be used; the message names it."""


RUN_FILES = (METRICS_FILE, "config.yaml", "sample.txt")


def _steps_logged(run_dir: Path) -> str:
    steps = [r["step"] for r in step_records(read_records(run_dir))]
    return f"steps {min(steps)}-{max(steps)}" if steps else "no steps"


def previous_run(path: Path, checkpoint_dir: Path | None = None) -> str:
    """A description of the run ``path`` already holds, or "" when it holds none."""
    found = []
    metrics = metrics_path(path)
    if metrics.is_file() and metrics.stat().st_size:
        found.append(f"{METRICS_FILE} with {_steps_logged(path)}")
    elif (path / "config.yaml").is_file():
        found.append("config.yaml")
    if checkpoint_dir is not None and checkpoint_dir.is_dir() and any(
            p.name.startswith("step-") for p in checkpoint_dir.iterdir()):
        found.append(f"checkpoints in {checkpoint_dir}")
    return ", ".join(found)


def check_run_dir(path: str | Path) -> Path:
    """Create ``path`` if needed and prove it writable; raise RunDirError naming it otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"run.dir: {path} is a file, not a directory")
    try:
        make_writable_dir(path)
    except OSError as err:
        raise RunDirError(f"run.dir: {path} is not a writable directory "
                          f"({err.strerror or err})") from None
    return path


def refuse_previous_run(path: Path, *, overwrite: bool, resuming: bool,
                        checkpoint_dir: Path | None = None) -> bool:
    """Raise RunDirError if ``path`` holds another run and neither ``resuming`` nor
    ``overwrite`` allows it; return whether there is a previous run to replace."""
    if resuming:
        return False
    previous = previous_run(path, checkpoint_dir)
    if previous and not overwrite:
        raise RunDirError(f"run.dir: {path} already holds a run ({previous}); pass "
                          f"--run.overwrite=true to replace it, or choose another --run.dir")
    return bool(previous)


def replace_previous_run(path: Path, checkpoint_dir: Path | None = None) -> None:
    """Remove the files of the run ``path`` holds (only ours: others stay)."""
    for name in RUN_FILES:
        (path / name).unlink(missing_ok=True)
    if checkpoint_dir is not None and checkpoint_dir.is_dir():
        shutil.rmtree(checkpoint_dir)
