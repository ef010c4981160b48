"""The run configuration: typed dataclasses are the schema and hold every default.

YAML files hold only deltas and compose left to right; dotted CLI overrides come last
(``--optim.lr=3e-4``). Unknown keys, wrong types and inconsistent values fail here, before any
process group exists, with an error that names the key. Each component is handed only its own
section (``cfg.model``, ``cfg.data``, ...).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from gptforge.data.config import DataConfig, DataSourceConfig  # noqa: F401 (re-exported)
from gptforge.model.config import (  # noqa: F401 (re-exported)
    ModelConfig, default_ffn_hidden_size, padded_vocab_size)
from gptforge.parallel.config import ParallelConfig  # noqa: F401 (re-exported)


class ConfigError(ValueError):
    """A configuration problem; the message starts with the offending key."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")


@dataclass
class TrainConfig:
    train_iters: int = 20
    micro_batch_size: int = 2
    global_batch_size: int = 8
    seed: int = 1234
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    eval_interval: int = 10  # 0: never
    eval_iters: int = 2
    log_interval: int = 1
    initial_loss_scale: float = 2.0**16
    loss_scale_window: int = 1000
    min_loss_scale: float = 1.0
    loss_scale_hysteresis: int = 2  # overflows tolerated before the scale is lowered


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    lr_warmup_iters: int = 2
    lr_decay_iters: int | None = None  # None: train.train_iters
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # 0: no clipping


@dataclass
class CheckpointConfig:
    save_interval: int = 0  # 0: only at the end if save is set
    save: str = ""  # directory; empty: <run.dir>/checkpoints when save_interval > 0
    load: str = ""  # directory to resume from; empty: none


@dataclass
class LoggingConfig:
    mlflow: bool = False
    mlflow_tracking_uri: str = ""
    experiment_name: str = "gptforge"


@dataclass
class SampleConfig:
    """A text sample generated after training (needs data.tokenizer_model; TP=1, PP=1)."""

    prompt: str = ""  # empty: no sample
    max_new_tokens: int = 48
    temperature: float = 0.8
    top_k: int = 20


@dataclass
class RunConfig:
    dir: str = "runs/default"
    name: str = ""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    run: RunConfig = field(default_factory=RunConfig)


# ---------------------------------------------------------------- building from dicts


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


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
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
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
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise ConfigError(key, f"expected float, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected float, got {value!r}")
        return float(value)
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


def _merge(base: dict, delta: dict) -> dict:
    out = dict(base)
    for key, value in delta.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _parse_override(text: str) -> tuple[list[str], Any]:
    body = text[2:] if text.startswith("--") else text
    if "=" not in body:
        raise ConfigError(body, "override must look like --section.key=value")
    key, raw = body.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    return key.split("."), value


def load_config(files: list[str | Path] = (), overrides: list[str] = ()) -> Config:
    """Defaults ← each YAML file in order ← each ``section.key=value`` override; validated."""
    merged: dict = {}
    for path in files:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(str(path), "config file not found")
        try:
            delta = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(str(path), f"not valid YAML: {err}") from err
        if not isinstance(delta, dict):
            raise ConfigError(str(path), "a config file must hold a mapping of sections")
        merged = _merge(merged, delta)
    for text in overrides:
        parts, value = _parse_override(text)
        delta: dict = value
        for part in reversed(parts):
            delta = {part: delta}
        merged = _merge(merged, delta)
    cfg = _build(Config, merged)
    return cfg


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ---------------------------------------------------------------- validation


@dataclass(frozen=True)
class Derived:
    """Values that follow from the config and the world size."""

    data_parallel_size: int
    num_microbatches: int
    padded_vocab_size: int
    num_query_groups: int
    ffn_hidden_size: int
    notes: tuple[str, ...] = ()


def validate(cfg: Config, world_size: int) -> Derived:
    """Check cross-field consistency for ``world_size`` ranks; every error names its key."""
    m, p, t, o = cfg.model, cfg.parallel, cfg.train, cfg.optim
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    vpp = p.virtual_pipeline_model_parallel_size
    for key, value in [
        ("model.num_layers", m.num_layers), ("model.hidden_size", m.hidden_size),
        ("model.num_attention_heads", m.num_attention_heads), ("model.seq_length", m.seq_length),
        ("model.vocab_size", m.vocab_size), ("parallel.tensor_model_parallel_size", tp),
        ("parallel.pipeline_model_parallel_size", pp), ("train.train_iters", t.train_iters),
        ("train.micro_batch_size", t.micro_batch_size),
        ("train.global_batch_size", t.global_batch_size), ("train.log_interval", t.log_interval),
    ]:
        if value < 1:
            raise ConfigError(key, f"must be >= 1, got {value}")
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError("model.hidden_size", f"{m.hidden_size} is not divisible by "
                          f"model.num_attention_heads={m.num_attention_heads}")
    if m.num_attention_heads % tp:
        raise ConfigError("model.num_attention_heads", f"{m.num_attention_heads} heads are not "
                          f"divisible by parallel.tensor_model_parallel_size={tp}")
    groups = m.num_query_groups or m.num_attention_heads
    if m.num_attention_heads % groups:
        raise ConfigError("model.num_query_groups", f"{groups} does not divide "
                          f"model.num_attention_heads={m.num_attention_heads}")
    if groups % tp:
        raise ConfigError("model.num_query_groups", f"{groups} query groups are not divisible by "
                          f"parallel.tensor_model_parallel_size={tp}")
    if world_size % (tp * pp):
        raise ConfigError("parallel", f"world size {world_size} is not a multiple of "
                          f"tensor_model_parallel_size={tp} x pipeline_model_parallel_size={pp}")
    dp = world_size // (tp * pp)
    if vpp is not None:
        if vpp < 1:
            raise ConfigError("parallel.virtual_pipeline_model_parallel_size", f"must be >= 1, got {vpp}")
        if pp < 2 and vpp > 1:
            raise ConfigError("parallel.virtual_pipeline_model_parallel_size",
                              "needs parallel.pipeline_model_parallel_size >= 2")
    chunks = pp * (vpp or 1)
    if m.num_layers % chunks:
        raise ConfigError("model.num_layers", f"{m.num_layers} layers are not divisible by "
                          f"pipeline_model_parallel_size x virtual_pipeline_model_parallel_size"
                          f" = {chunks}")
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError("train.global_batch_size", f"{t.global_batch_size} is not divisible by "
                          f"train.micro_batch_size={t.micro_batch_size} x data-parallel size {dp}")
    num_microbatches = t.global_batch_size // (t.micro_batch_size * dp)
    if vpp and vpp > 1 and num_microbatches % pp:
        raise ConfigError("train.global_batch_size", f"interleaved pipeline needs the number of "
                          f"micro-batches ({num_microbatches}) to be a multiple of "
                          f"parallel.pipeline_model_parallel_size={pp}")
    if p.sequence_parallel and tp == 1:
        raise ConfigError("parallel.sequence_parallel", "needs tensor_model_parallel_size > 1")
    if o.min_lr > o.lr:
        raise ConfigError("optim.min_lr", f"{o.min_lr} is larger than optim.lr={o.lr}")
    if o.lr_warmup_iters > (o.lr_decay_iters or t.train_iters):
        raise ConfigError("optim.lr_warmup_iters", f"{o.lr_warmup_iters} exceeds the decay length")
    if cfg.data.source == "webdataset" and not cfg.data.sources:
        raise ConfigError("data.sources", "data.source=webdataset needs at least one source")
    if cfg.sample.prompt and (tp > 1 or pp > 1):
        raise ConfigError("sample.prompt", "generation needs tensor and pipeline parallel size 1")
    if cfg.sample.prompt and not cfg.data.tokenizer_model:
        raise ConfigError("sample.prompt", "needs data.tokenizer_model to encode the prompt")
    notes = []
    vocab = padded_vocab_size(m, tp)
    if vocab != m.vocab_size:
        notes.append(f"model.vocab_size: padded {m.vocab_size} -> {vocab} (multiple of "
                     f"model.make_vocab_size_divisible_by={m.make_vocab_size_divisible_by} and TP={tp})")
    return Derived(data_parallel_size=dp, num_microbatches=num_microbatches,
                   padded_vocab_size=vocab, num_query_groups=groups,
                   ffn_hidden_size=default_ffn_hidden_size(m), notes=tuple(notes))
