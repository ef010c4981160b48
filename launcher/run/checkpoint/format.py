"""Checkpoints: the ``checkpoint`` section, the on-disk format, saving, resuming, retention.

On disk, under ``checkpoint.save`` (default ``<run.dir>/checkpoints``)::

    latest                    "step-0000020 <sha256 of its manifest.json>": the newest COMPLETE one
    step-0000020/
      manifest.json           step, consumed samples/tokens, resolved config, layout, loader
                              state (global: restores at any DP size), tokenizer hash,
                              versions, and {path: bytes, crc32, rank} of every file
      state/                  the engine's shards (megatron-core dist_checkpointing)
      rng/rank-00000.json     each rank's generator states (plain JSON)
    step-0000030.partial/     a save in progress (or cut off): ignored, removed by the next save

Commit protocol: every rank writes and fsyncs its files into ``step-N.partial``; their checksums
are gathered to rank 0, which writes ``manifest.json`` (temp, fsync, rename), renames the
directory to ``step-N``, then replaces ``latest`` (temp, fsync, rename) and fsyncs the parent;
only then do the ranks leave the save. A crash at any point leaves ``latest`` on the previous
complete checkpoint. Nothing is unpickled on load: JSON, and tensors through the engine's safe
reader (``parallel/megatron/checkpoint.py``).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from gptforge.parallel.engine import CheckpointError

FORMAT = "gptforge-checkpoint-v1"
MANIFEST = "manifest.json"
LATEST = "latest"
STATE_DIR = "state"
RNG_DIR = "rng"
PARTIAL_SUFFIX = ".partial"
STEP_RE = re.compile(r"^step-(\d{7,})$")
# Model settings a checkpoint's tensors depend on: a mismatch cannot load.
SHAPE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
              "ffn_hidden_size", "vocab_size", "make_vocab_size_divisible_by",
              "position_embedding_type", "normalization", "activation", "tie_embeddings",
              "add_bias_linear")


@dataclass
class CheckpointConfig:
    enabled: bool = True
    """Save checkpoints (at save_interval, at the end, and when a stop signal arrives)."""
    save: str = ""
    """Directory of the checkpoints; empty: <run.dir>/checkpoints."""
    save_interval: int = 0
    """Save every this many steps; 0: only at the end and on a stop signal."""
    keep_last: int = 3
    """Keep this many complete checkpoints (the newest is never deleted)."""
    async_save: bool = False
    """Write interval checkpoints in the background; the loop waits only for staging."""
    load: str = ""
    """Start from this checkpoint (a save dir with `latest`, or a step-N dir); empty: resume
    from checkpoint.save when it has one."""
    load_optim: bool = True
    """Also restore optimizer, LR schedule, data position and RNG; false: weights only, a new
    schedule from step 0 (fine-tuning)."""


def validate_checkpoint(cfg: CheckpointConfig) -> None:
    from gptforge.common.errors import ConfigError

    if cfg.save_interval < 0:
        raise ConfigError("checkpoint.save_interval", f"must be >= 0, got {cfg.save_interval}")
    if cfg.keep_last < 1:
        raise ConfigError("checkpoint.keep_last", f"must be >= 1, got {cfg.keep_last}")


def save_dir(cfg: CheckpointConfig, run_dir: str | Path) -> Path:
    return Path(cfg.save) if cfg.save else Path(run_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"step-{step:07d}"


# ------------------------------------------------------------------ files



def file_crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            crc = zlib.crc32(chunk, crc)
    return crc


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_manifest(step_dir: Path) -> dict:
    path = step_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{step_dir}: no {MANIFEST} (not a complete checkpoint)") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable manifest: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} manifest")
    return manifest


def complete_checkpoints(directory: Path) -> list[Path]:
    """Step directories with a manifest, oldest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and STEP_RE.match(p.name)
             and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: int(STEP_RE.match(p.name).group(1)))


def partial_checkpoints(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.name.endswith(PARTIAL_SUFFIX))


def read_latest(directory: Path) -> Path | None:
    """The checkpoint ``latest`` names if its manifest matches; else the newest complete one."""
    latest = directory / LATEST
    if latest.is_file():
        parts = latest.read_text().split()
        if len(parts) == 2 and (directory / parts[0] / MANIFEST).is_file() \
                and _sha256(directory / parts[0] / MANIFEST) == parts[1]:
            return directory / parts[0]
    done = complete_checkpoints(directory)
    return done[-1] if done else None


def resolve(path: str | Path) -> Path:
    """A step directory from a save directory (its ``latest``) or a step directory."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    found = read_latest(path)
    if found is None:
        raise CheckpointError(f"{path}: holds no complete checkpoint (no {LATEST} and no "
                              f"step-*/{MANIFEST})")
    return found


def check_compatible(manifest: dict, model_cfg: dict, where: Path) -> None:
    """Refuse a checkpoint of another model shape, naming the key."""
    saved = manifest["config"]["model"]
    for key in SHAPE_KEYS:
        if saved.get(key) != model_cfg.get(key):
            raise CheckpointError(f"{where}: model.{key} is {saved.get(key)!r} in the "
                                  f"checkpoint but {model_cfg.get(key)!r} in this config")
    if model_cfg["position_embedding_type"] == "learned_absolute" and \
            saved["seq_length"] != model_cfg["seq_length"]:
        raise CheckpointError(f"{where}: model.seq_length is {saved['seq_length']} in the "
                              f"checkpoint but {model_cfg['seq_length']} here (learned "
                              f"positions have one row per position)")


def check_engine(manifest: dict, engine: str, where: Path, *, load_optim: bool,
                 own: bool = False) -> None:
    """A checkpoint loads into the engine that saved it (one line naming both engines, the
    checkpoint and the ways out); a weights-only one (``gptforge convert``) holds no optimizer
    state to restore. ``own``: it is the run dir's own checkpoint (a restart), not a
    ``checkpoint.load``. Checked before any model (preflight, each rank) and again at load."""
    saved = manifest["layout"].get("engine", "megatron")
    if saved != engine:
        ways = [f"keep --parallel.engine={saved}"]
        if own:
            ways += ["start a new run with another --run.dir",
                     "replace this run with --run.overwrite=true"]
        if saved == "deepspeed" and engine == "megatron":
            ways.append(f"make megatron-engine weights of it with `gptforge convert zero-to-fp32 "
                        f"--checkpoint {where} --out DIR` and start from those "
                        f"(--checkpoint.load=DIR --checkpoint.load_optim=false)")
        raise CheckpointError(f"{where}: saved by the {saved} engine, but this run has "
                              f"parallel.engine={engine}: {', or '.join(ways)}")
    if load_optim and manifest.get("weights_only"):
        raise CheckpointError(f"{where}: a weights-only checkpoint (no optimizer state, "
                              f"{manifest.get('reason', 'converted')}); load it with "
                              f"checkpoint.load_optim=false")


def verify_files(step_dir: Path, manifest: dict, rank: int, world_size: int) -> str | None:
    """Check this rank's share of the files against the manifest; the first problem or None."""
    for i, (rel, entry) in enumerate(sorted(manifest["files"].items())):
        if i % world_size != rank:
            continue
        path = step_dir / rel
        if not path.is_file():
            return f"{path}: missing (listed in {step_dir / MANIFEST})"
        size = path.stat().st_size
        if size != entry["bytes"]:
            return f"{path}: {size} bytes, the manifest says {entry['bytes']} (truncated?)"
        if file_crc32(path) != entry["crc32"]:
            return f"{path}: checksum mismatch (corrupted)"
    return None


def versions() -> dict:
    import importlib.metadata as md
    import platform

    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist_name in ("gptforge", "megatron-core", "deepspeed"):
        try:
            out[dist_name] = md.version(dist_name)
        except md.PackageNotFoundError:
            pass
    return out


# ------------------------------------------------------------------ retention


def apply_retention(directory: Path, keep_last: int, protect: set[Path]) -> list[Path]:
    """Delete complete checkpoints beyond the newest ``keep_last`` (never a protected one) and
    leftover partial ones; returns what was removed. Rank 0 only."""
    removed = []
    done = complete_checkpoints(directory)
    for old in done[:-keep_last] if keep_last else []:
        if old.resolve() in protect:
            continue
        (old / MANIFEST).unlink()  # invalid first, then gone
        shutil.rmtree(old, ignore_errors=True)
        removed.append(old)
    return removed


def remove_partials(directory: Path) -> None:
    for partial in partial_checkpoints(directory):
        shutil.rmtree(partial, ignore_errors=True)


# ------------------------------------------------------------------ inspection (CLI)


def summarize(path: str | Path) -> dict:
    """What ``gptforge checkpoint inspect`` prints."""
    step_dir = resolve(path)
    manifest = read_manifest(step_dir)
    files = manifest["files"]
    return {"checkpoint": str(step_dir), "step": manifest["step"],
            "consumed_samples": manifest["consumed_samples"],
            "consumed_tokens": manifest["consumed_tokens"], "reason": manifest["reason"],
            "layout": manifest["layout"], "num_parameters": _num_parameters(step_dir),
            "files": len(files), "bytes": sum(f["bytes"] for f in files.values()),
            "tokenizer_sha256": manifest.get("tokenizer_sha256"),
            "versions": manifest["versions"], "saved_at": manifest["saved_at"],
            "model": manifest["config"]["model"]}


def _num_parameters(step_dir: Path) -> int:
    """Model parameters, from the global shapes in the shard index (layout-free)."""
    import math

    from gptforge.parallel.deepspeed.convert import RECORD_FILE, read_record
    from gptforge.parallel.megatron.checkpoint import read_metadata

    if (step_dir / STATE_DIR / RECORD_FILE).is_file():  # saved by the deepspeed engine
        return read_record(step_dir / STATE_DIR).get("num_parameters")
    metadata = read_metadata(step_dir / STATE_DIR)
    total = 0
    for key, meta in metadata.state_dict_metadata.items():
        if key.startswith("optimizer.") or not hasattr(meta, "size"):
            continue
        size = list(meta.size)
        total += math.prod(size)
    return total


def listing(directory: str | Path) -> list[dict]:
    """Complete and partial checkpoints of a save directory (``gptforge checkpoint list``)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such directory")
    latest = read_latest(directory)
    rows = []
    for step_dir in complete_checkpoints(directory):
        manifest = read_manifest(step_dir)
        rows.append({"name": step_dir.name, "state": "complete", "step": manifest["step"],
                     "bytes": sum(f["bytes"] for f in manifest["files"].values()),
                     "latest": latest is not None and step_dir == latest})
    for partial in partial_checkpoints(directory):
        size = sum(p.stat().st_size for p in partial.rglob("*") if p.is_file())
        rows.append({"name": partial.name, "state": "partial", "step": None, "bytes": size,
                     "latest": False})
    return rows


def now() -> float:
    return time.time()
