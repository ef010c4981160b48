"""The ``data`` config section: its defaults and ``validate_data``, its own checks."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from gptforge.common.errors import ConfigError


@dataclass
class DataSourceConfig:
    path: str = ""
    """Shard spec: a directory with index.json, a glob, a brace pattern or a "pipe:" command."""
    weight: float = 1.0
    """Share of this source in the blend (relative to the other sources)."""


@dataclass
class DataConfig:
    source: Literal["mock", "webdataset"] = "mock"
    """mock: generated learnable batches (same for every layout); webdataset: token shards."""
    sources: list[DataSourceConfig] = field(default_factory=list)
    """Training sources, e.g. "[{path: shards, weight: 1}]"."""
    valid_sources: list[DataSourceConfig] = field(default_factory=list)
    """Validation sources; empty: the valid split of the training sources."""
    tokenizer_model: str = ""
    """sentencepiece .model file, or Hugging Face tokenizer folder or tokenizer.json; the shards
    record its hash and must match it."""
    format: Literal["pretrain", "sft"] = "pretrain"
    """pretrain: every token is learned; sft: prompt/response shards (data prepare --format
    sft), the prompt tokens carry no loss. The shards must be of this format. With mock data,
    sft masks a random prefix of each sample (responses of very different lengths)."""
    num_workers: int = 0
    """DataLoader worker processes per rank; 0: read in the training process."""
    reset_position_ids: bool = False
    """Restart position ids at every document boundary in a packed window."""
    reset_attention_mask: bool = False
    """Mask attention across document boundaries in a packed window."""
    skip_corrupt: bool = False
    """Skip (and log) missing or corrupt shards instead of failing."""


def validate_data(cfg: DataConfig) -> None:
    """The data section on its own: sources named where needed, a sane worker count."""
    if cfg.source == "webdataset" and not cfg.sources:
        raise ConfigError("data.sources", "data.source=webdataset needs at least one source")
    if cfg.num_workers < 0:
        raise ConfigError("data.num_workers", f"must be >= 0, got {cfg.num_workers}")


def with_tokenizer_resolved(cfg: DataConfig) -> DataConfig:
    """This section with ``tokenizer_model`` made absolute where it names an existing path, so
    the run's config.yaml and checkpoints name the file from any directory."""
    path = Path(cfg.tokenizer_model)
    if not cfg.tokenizer_model or path.is_absolute() or not path.exists():
        return cfg
    return replace(cfg, tokenizer_model=str(path.resolve()))
