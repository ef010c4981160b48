"""Checkpoints: the ``checkpoint`` section (saving and resuming are wired by the trainer)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CheckpointConfig:
    save_interval: int = 0
    """Save every this many steps; 0: only at the end."""
    save: str = ""
    """Directory of the checkpoints; empty: <run.dir>/checkpoints."""
    load: str = ""
    """Checkpoint directory to start from; empty: resume from `save` when it has one."""
