"""Writing a converter's output: an OUT directory that must be new or empty, built as
``OUT.partial`` and renamed when complete; a weights-only checkpoint of the one-process megatron
engine (``launcher/modelio/inference.py``) with its manifest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from gptforge.common.durable import Durability, write_atomic

def check_out(out: str | Path) -> Path:
    """The ``.partial`` directory to build OUT in; OUT must not exist or be empty."""
    from gptforge.common.errors import ConfigError

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError("--out", f"{out} exists and is not empty (choose a new directory)")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    return partial


def finish(partial: Path, out: str | Path) -> Path:
    out = Path(out)
    if out.exists():
        out.rmdir()  # empty (checked by check_out)
    partial.rename(out)
    return out


def _manifest(cfg, source: dict, files: dict, tokenizer_sha256: str | None) -> dict:
    from gptforge.launcher.run.checkpoint import format as ck
    from gptforge.launcher.config import to_dict

    return {"format": ck.FORMAT, "step": 0, "consumed_samples": 0, "consumed_tokens": 0,
            "data": {"source": cfg.data.source, "loader_state": None},
            "tokenizer_sha256": tokenizer_sha256, **source,
            "reason": "converted", "weights_only": True, "config": to_dict(cfg),
            "layout": {"world_size": 1, "tensor_model_parallel_size": 1,
                       "pipeline_model_parallel_size": 1,
                       "virtual_pipeline_model_parallel_size": None, "data_parallel_size": 1,
                       "engine": "megatron", "use_distributed_optimizer": False},
            "versions": ck.versions(), "saved_at": ck.now(), "async": False,
            "resumed_from": None, "files": files}


def write_weights_only(engine, cfg, partial: Path, *, source: dict,
                       tokenizer_sha256: str | None = None) -> None:
    """Save ``engine``'s model (one process, TP=1) into ``partial`` as a step directory whose
    manifest marks it weights-only; ``source`` adds or overrides manifest fields."""
    from gptforge.launcher.run.checkpoint import format as ck

    partial.mkdir(parents=True, exist_ok=True)
    handle = engine.save(partial / ck.STATE_DIR).wait()
    files = {f"{ck.STATE_DIR}/{f.path}": {"bytes": f.bytes, "rank": 0,
                                           "crc32": ck.file_crc32(partial / ck.STATE_DIR / f.path)}
             for f in handle.files}
    write_atomic(partial / ck.MANIFEST,
                 json.dumps(_manifest(cfg, source, files, tokenizer_sha256), indent=1),
                 Durability.DIRECTORY)
