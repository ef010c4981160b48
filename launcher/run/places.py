"""Every place a run writes, checked before any rank builds a model: the run dir, the checkpoint
directory and the embedded MLflow store must be writable directories with room for what will go
there (a checkpoint of this model: its weights and Adam state). A read-only or full disk is a
one-line refusal at the start, not an error at the end of a long run."""

from __future__ import annotations

import shutil
from pathlib import Path

from gptforge.common.durable import make_writable_dir
from gptforge.common.errors import ConfigError
from gptforge.launcher.config import Config

RUN_DIR_BYTES = 64 << 20  # metrics, config, MLflow spool, sample: generous


def checkpoint_bytes(cfg: Config, padded_vocab_size: int) -> int:
    """About what one checkpoint of this model takes: weights in their dtype, plus fp32 master
    weights (mixed precision) and Adam's two moments."""
    from gptforge.parallel.plan.params import (embedding_param_count, layer_param_count,
                                               output_param_count)

    m = cfg.model
    params = (m.num_layers * layer_param_count(m, 1)
              + embedding_param_count(m, 1, padded_vocab_size)
              + output_param_count(m, 1, padded_vocab_size, holds_embedding=True))
    per_param = {"fp32": 4 + 8, "bf16": 2 + 4 + 8, "fp16": 2 + 4 + 8}[cfg.precision.dtype]
    return params * per_param


def _writable_dir(path: Path, key: str) -> Path:
    try:
        make_writable_dir(path)
    except OSError as err:
        raise ConfigError(key, f"{path} is not a writable directory "
                               f"({err.strerror or err})") from None
    return path


def _room(path: Path, key: str, need: int, what: str) -> None:
    free = shutil.disk_usage(path).free
    if free < need:
        raise ConfigError(key, f"{path} has {free / 2**30:.2f} GiB free; {what} needs about "
                               f"{need / 2**30:.2f} GiB")


def check_places(cfg: Config, padded_vocab_size: int) -> None:
    """Refuse now, naming the key and the path, what would fail later for room or rights."""
    from gptforge.launcher.run.checkpoint.format import save_dir
    from gptforge.launcher.tracking.outbox import tracking_uri

    run_dir = Path(cfg.run.dir)
    _room(run_dir, "run.dir", RUN_DIR_BYTES, "a run's metrics, config and MLflow spool")
    if cfg.checkpoint.enabled:
        save = _writable_dir(save_dir(cfg.checkpoint, cfg.run.dir), "checkpoint.save")
        _room(save, "checkpoint.save", int(checkpoint_bytes(cfg, padded_vocab_size) * 1.1),
              "one checkpoint of this model")
    if cfg.logging.mlflow:
        uri = tracking_uri(cfg.logging, run_dir)
        if uri.startswith("sqlite:///"):
            store = _writable_dir(Path(uri[len("sqlite:///"):]).parent,
                                  "logging.mlflow_tracking_uri")
            _room(store, "logging.mlflow_tracking_uri", RUN_DIR_BYTES, "the MLflow store")
