"""The run configuration: typed dataclasses are the schema and hold every default.

Each section lives with the component that reads it (``model/config.py``, ``parallel/config.py``,
``data/config.py``, ``launcher/run/loop.py``, ...), and so does its check (``validate_model``,
``validate_train``, ``validate_precision``, ``validate_optim``, ``validate_checkpoint``,
``validate_engine``, ``validate_data``, ``validate_sample``, ``validate_run``); this module
composes them, loads YAML deltas left to right, applies dotted CLI overrides
(``--optim.lr=3e-4``) and runs the checks in order. Unknown keys, wrong types and inconsistent
values fail here, before any process group exists, with an error that names the key. Each
component is handed only its own section.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from gptforge.common.errors import ConfigError
from gptforge.data.config import DataConfig, validate_data
from gptforge.launcher.run.checkpoint.format import CheckpointConfig, validate_checkpoint
from gptforge.launcher.run.distill import DistillConfig, validate_distill
from gptforge.launcher.run.loop import TrainConfig, validate_train
from gptforge.launcher.run.metrics import LoggingConfig
from gptforge.launcher.rundir import RunConfig, validate_run
from gptforge.model.config import ModelConfig, num_query_groups, validate_model
from gptforge.model.generate import SampleConfig, validate_sample
from gptforge.parallel.config import (OptimConfig, ParallelConfig, PrecisionConfig,
                                      validate_precision)
from gptforge.parallel.engine import validate_engine
from gptforge.parallel.layout import Layout, derive_layout
from gptforge.parallel.optim import validate_optim

__all__ = ["Config", "load_config", "dump_config", "validate", "layout_notes",
           "to_dict"]


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    run: RunConfig = field(default_factory=RunConfig)


# ---------------------------------------------------------------- building from dicts


def type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(str(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _finite_float(key: str, value: Any) -> float:
    """A float setting: numbers (YAML 1.1 reads 3e-4, without a dot, as a string), finite."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(key, f"expected float, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(key, f"expected float, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(key, f"must be a finite number, got {value!r}")
    return float(value)


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, arg, value)
            except ConfigError:
                continue
        raise ConfigError(key, f"expected {type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(key, f"must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", args[0], v) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected bool, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected int, got {value!r}")
        return value
    if tp is float:
        return _finite_float(key, value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected str, got {value!r}")
        return value
    raise ConfigError(key, f"unsupported type {tp}")


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(where, f"unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in values.items():
        where = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(where, hints[name], value)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def merge_dicts(base: dict, delta: dict) -> dict:
    """``delta`` over ``base``, section by section (nested mappings merge, the rest replaces)."""
    out = dict(base)
    for key, value in delta.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = value
    return out


def field_type(dotted: list[str]) -> Any:
    """The annotation of ``section.key`` (None when the path names no field)."""
    tp: Any = Config
    for part in dotted:
        if not dataclasses.is_dataclass(tp):
            return None
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return None
        tp = hints[part]
    return tp


def _parse_override(text: str) -> tuple[list[str], Any]:
    body = text[2:] if text.startswith("--") else text
    if "=" not in body:
        raise ConfigError(body, "override must look like --section.key=value")
    key, raw = body.split("=", 1)
    parts = key.split(".")
    if field_type(parts) is str or raw == "":
        return parts, raw  # a string key takes the text as it is (newlines, ': ', quotes)
    try:
        return parts, yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(key, f"value {raw!r} is not valid YAML ({err.problem})") from None


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(str(path), "config file not found")
    try:
        delta = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(str(path), f"not valid YAML: {err}") from None
    if not isinstance(delta, dict):
        raise ConfigError(str(path), "a config file must hold a mapping of sections")
    return delta


def load_config(files: list[str | Path] = (), overrides: list[str] = ()) -> Config:
    """Defaults ← each YAML file in order ← each ``section.key=value`` override."""
    merged: dict = {}
    for path in files:
        merged = merge_dicts(merged, _read_yaml(Path(path)))
    for text in overrides:
        parts, value = _parse_override(text)
        delta: dict = value
        for part in reversed(parts):
            delta = {part: delta}
        merged = merge_dicts(merged, delta)
    return _build(Config, merged)


def config_from_dict(values: dict) -> Config:
    """A Config from a nested mapping (a manifest's config, a converter's): checked like a file."""
    return _build(Config, values)


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ---------------------------------------------------------------- validation


def validate(cfg: Config, world_size: int) -> Layout:
    """Check ``cfg`` for ``world_size`` ranks and return the layout; every error names its key."""
    validate_model(cfg.model)
    validate_train(cfg.train)
    validate_precision(cfg.precision)
    validate_checkpoint(cfg.checkpoint)
    validate_optim(cfg.optim, cfg.train.train_iters)
    m, t = cfg.model, cfg.train
    layout = derive_layout(cfg.parallel, world_size=world_size, num_layers=m.num_layers,
                           num_attention_heads=m.num_attention_heads,
                           num_query_groups=num_query_groups(m), vocab_size=m.vocab_size,
                           make_vocab_size_divisible_by=m.make_vocab_size_divisible_by,
                           micro_batch_size=t.micro_batch_size,
                           global_batch_size=t.global_batch_size)
    validate_engine(cfg.parallel, cfg.precision)
    validate_data(cfg.data)
    validate_sample(cfg.sample, tokenizer_model=cfg.data.tokenizer_model)
    validate_distill(cfg.distill, cfg.parallel)
    validate_run(cfg.run)
    return layout


def layout_notes(cfg: Config, layout: Layout) -> list[str]:
    """What the user should know about values derived from the config."""
    notes = [f"layout: {layout.describe()}, {layout.num_microbatches} micro-batches of "
             f"{layout.micro_batch_size} per step and data-parallel rank"]
    if layout.padded_vocab_size != cfg.model.vocab_size:
        notes.append(f"model.vocab_size: padded {cfg.model.vocab_size} -> "
                     f"{layout.padded_vocab_size} (multiple of model.make_vocab_size_divisible_by="
                     f"{cfg.model.make_vocab_size_divisible_by} and TP="
                     f"{layout.tensor_model_parallel_size})")
    return notes
