"""Durable writes for checkpoints: fsync a file or a directory entry (both engines, the launcher).

(``data/`` keeps its own copy: it imports nothing from the other parts.)
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """fsync a file, or a directory (its entries: a rename in it becomes durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
