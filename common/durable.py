"""The one way files are written in place: a temporary file, then a rename over the target.

A reader (another rank, a resumed run, a crash's survivor) sees the old file or the new one,
never half of one. How much survives a power loss is said by the caller, explicitly:

=========  ========================================================================================
ATOMIC     temp + rename. Cheap: for files rewritten often whose loss costs little (the MLflow
           sender's position, its state; a run's stop mark).
FILE       + fsync the file before the rename: once the name is there, the content is whole
           (prepare's resume state, a generated job config).
DIRECTORY  + fsync the directory after the rename: the rename itself is durable (checkpoint
           manifests, ``latest``, shards and their index: what a restart trusts).
=========  ========================================================================================

Every part may import this module (``common/`` imports nothing of the others).
"""

from __future__ import annotations

import enum
import os
from pathlib import Path


class Durability(enum.IntEnum):
    ATOMIC = 0
    FILE = 1
    DIRECTORY = 2


def fsync_path(path: str | Path) -> None:
    """fsync a file, or a directory (its entries: a rename in it becomes durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: str | Path) -> Path:
    """Where ``write_atomic`` stages ``path`` (``<name>.tmp`` beside it)."""
    path = Path(path)
    return path.with_name(path.name + ".tmp")


def publish(tmp: str | Path, path: str | Path, durability: Durability) -> None:
    """Rename the finished file ``tmp`` over ``path`` with the durability asked for."""
    if durability >= Durability.FILE:
        fsync_path(tmp)
    os.replace(tmp, path)
    if durability >= Durability.DIRECTORY:
        fsync_path(Path(path).parent)


def write_atomic(path: str | Path, data: str | bytes, durability: Durability) -> None:
    """Write ``data`` (text is UTF-8) to ``path`` through ``<path>.tmp`` and a rename."""
    path = Path(path)
    tmp = temp_path(path)
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    publish(tmp, path, durability)


def current_umask() -> int:
    """This process's umask (from /proc where it can be read, which changes nothing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def umask_mode(path: str | Path) -> None:
    """Give the file ``path`` the mode a new file gets under the umask (0644 under 022): for
    writers that create theirs 0600 (safetensors' ``save_file``, through a private temp file)."""
    os.chmod(path, 0o666 & ~current_umask())


def make_writable_dir(path: str | Path) -> Path:
    """Create ``path`` if needed and prove it writable (a probe file, written and removed);
    raises the OSError of whatever stood in the way."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".write-probe-{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()
    return path
