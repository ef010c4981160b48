"""The ``data`` config section (defaults; validated in launcher/config.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class DataSourceConfig:
    path: str = ""  # shard spec: directory, glob, brace pattern or "pipe:" command
    weight: float = 1.0


@dataclass
class DataConfig:
    source: Literal["mock", "webdataset"] = "mock"
    sources: list[DataSourceConfig] = field(default_factory=list)
    valid_sources: list[DataSourceConfig] = field(default_factory=list)
    tokenizer_model: str = ""  # sentencepiece .model file; shards record its hash
    num_workers: int = 0
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    skip_corrupt: bool = False
