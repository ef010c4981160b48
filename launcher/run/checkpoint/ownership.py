"""One owner per checkpoint directory (and per run dir): who may write where, who may read.

- A run holds an advisory lock (``common/locks.py``) on its run dir and on its
  ``checkpoint.save`` for its whole life: a second run on either is refused in one line naming
  the first (pid, host, since when); the kernel drops the lock when the run ends, however.
- ``<checkpoint.save>/owner.json`` names the run dir that writes there (and what it started
  from). Another run dir whose ``checkpoint.save`` points there is refused, naming both: it
  may start from those checkpoints read-only, with ``checkpoint.load``.
- A run that has its own checkpoints resumes from them. A ``checkpoint.load`` there is honoured
  only as what it is, the run's own starting point (the same command, restarted); any other
  is refused, never silently ignored.
- A ``step-N`` directory without a manifest (an interrupted copy, a crash mid-rename) is never
  taken for a checkpoint: it is moved aside as ``step-N.incomplete-<time>`` and reported.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from gptforge.common.durable import Durability, write_atomic
from gptforge.common.locks import holder, sign, try_lock
from gptforge.common.log import get_logger
from gptforge.launcher.run.checkpoint import format as ck
from gptforge.parallel.engine import CheckpointError

OWNER_FILE = "owner.json"
LOCK_FILE = ".gptforge.lock"

log = get_logger(__name__)


def read_owner(save: Path) -> dict:
    try:
        return json.loads((save / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _owner_run_dir(save: Path) -> Path | None:
    """The run dir that writes ``save``: owner.json's, else (checkpoints from before owner.json)
    the run dir recorded in the newest manifest."""
    owner = read_owner(save).get("run_dir")
    if owner:
        return Path(owner)
    latest = ck.read_latest(save)
    if latest is None:
        return None
    return Path(ck.read_manifest(latest)["config"]["run"]["dir"]).resolve()


def check_owner(save: Path, run_dir: str | Path) -> None:
    """Refuse to write into another run's checkpoint directory, naming both runs."""
    owner, ours = _owner_run_dir(save), Path(run_dir).resolve()
    if owner is not None and owner != ours:
        raise CheckpointError(
            f"checkpoint.save: {save} holds the checkpoints of the run in {owner}; this run is "
            f"{ours}: start from them read-only with --checkpoint.load={save}, and give this "
            f"run its own checkpoint.save")


def check_load_here(save: Path, load: str, latest: Path) -> None:
    """A run resuming from its own ``latest`` takes ``checkpoint.load`` only if it is where the
    run started (the same command, restarted); anything else would be ignored: refused."""
    started = read_owner(save).get("started_from")
    if started and Path(load).resolve() == Path(started):
        log.info(f"checkpoint.load={load} is where this run started; it resumes from its own "
                 f"{latest.name}")
        return
    raise CheckpointError(
        f"checkpoint.load={load}: this run already has its own checkpoints (latest "
        f"{latest}, started from {started or 'scratch'}), which a restart resumes from; drop "
        f"checkpoint.load to continue it, or start over from {load} with --run.overwrite=true")


def find_start(cfg: ck.CheckpointConfig, run_dir: str | Path) -> tuple[Path | None, bool]:
    """(checkpoint to start from, whether it is this run resuming itself): its own latest (and
    ``checkpoint.load`` only as its starting point), else ``checkpoint.load``, else none."""
    own = ck.save_dir(cfg, run_dir)
    if cfg.enabled:
        check_owner(own, run_dir)
        latest = ck.read_latest(own)
        if latest is not None:
            if cfg.load:
                check_load_here(own, cfg.load, latest)
            return latest, True
    if cfg.load:
        return ck.resolve(cfg.load), False
    return None, False


def lock_dir(path: Path, what: str):
    """Hold ``path``'s run lock (the returned file) or refuse naming the holder."""
    handle = try_lock(path / LOCK_FILE)
    if handle is None:
        from gptforge.launcher.rundir import RunDirError

        raise RunDirError(f"{what}: {path} is in use by another gptforge run "
                          f"({holder(path / LOCK_FILE)}); wait for it to end, or choose "
                          f"another {what}")
    sign(handle, dir=str(path.resolve()))
    return handle


def probe_lock(path: Path, what: str) -> None:
    """Refuse now if another run holds ``path`` (preflight: nothing is kept)."""
    if path.is_dir():
        lock_dir(path, what).close()


def claim(save: Path, run_dir: str | Path, started_from: str | None) -> None:
    """Rank 0 at the start: record the owner (once), move incomplete step dirs aside."""
    if not (save / OWNER_FILE).is_file():
        write_atomic(save / OWNER_FILE, json.dumps(
            {"run_dir": str(Path(run_dir).resolve()),
             "started_from": str(Path(started_from).resolve()) if started_from else None,
             "since": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1) + "\n",
            Durability.DIRECTORY)
    for step_dir in sorted(save.glob("step-*")):
        if ck.STEP_RE.match(step_dir.name) and not (step_dir / ck.MANIFEST).is_file():
            move_aside(step_dir)


def move_aside(step_dir: Path) -> Path:
    """A step directory without a manifest is no checkpoint: renamed, reported (rank 0)."""
    aside = step_dir.with_name(f"{step_dir.name}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}")
    step_dir.rename(aside)
    log.warning(f"{step_dir}: no {ck.MANIFEST} (an interrupted save or copy): not a "
                f"checkpoint; moved aside to {aside.name}")
    return aside
