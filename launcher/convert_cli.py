"""``gptforge convert``: checkpoint conversions (a verb with subcommands).

``gptforge convert zero-to-fp32 --checkpoint DIR --out OUT`` turns a checkpoint of the deepspeed
engine (any ZeRO stage and data-parallel size, tensor parallel size 1) into one of the megatron
engine: DeepSpeed's zero_to_fp32 rebuilds the fp32 weights, a one-process megatron engine (TP=1)
takes them and saves ``OUT/state/`` with its own save, and ``OUT/manifest.json`` marks the result
weights-only (it holds no optimizer state): load it with ``--checkpoint.load=OUT
--checkpoint.load_optim=false``. OUT is written as ``OUT.partial`` and renamed when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import yaml

# Settings the conversion's one-process megatron engine runs with (the rest of the config is the
# checkpoint's own): fp32 so that the saved tensors are the fp32 master weights.
_MEGATRON_ONE_PROCESS = {
    "parallel": {"engine": "megatron", "tensor_model_parallel_size": 1,
                 "pipeline_model_parallel_size": 1, "virtual_pipeline_model_parallel_size": None,
                 "sequence_parallel": False, "use_distributed_optimizer": False,
                 "zero_stage": 0, "offload_optimizer": "none", "offload_param": "none"},
    "precision": {"dtype": "fp32"},
    "sample": {"prompt": ""},
}


def _merge(base: dict, delta: dict) -> dict:
    out = dict(base)
    for key, value in delta.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and key in out else value
    return out


def _source(checkpoint: str) -> tuple[Path, dict]:
    from gptforge.launcher import checkpoint as ck
    from gptforge.parallel.engine import CheckpointError

    step_dir = ck.resolve(checkpoint)
    manifest = ck.read_manifest(step_dir)
    engine = manifest["layout"].get("engine")
    if engine != "deepspeed":
        raise CheckpointError(f"{step_dir}: saved by the {engine} engine; zero-to-fp32 converts "
                              f"checkpoints of parallel.engine=deepspeed")
    tp = manifest["layout"]["tensor_model_parallel_size"]
    if tp != 1:
        raise CheckpointError(f"{step_dir}: saved with tensor_model_parallel_size={tp}; "
                              f"zero-to-fp32 converts TP=1 checkpoints")
    problem = ck.verify_files(step_dir, manifest, 0, 1)
    if problem:
        raise CheckpointError(problem)
    return step_dir, manifest


def _check_out(out: Path) -> Path:
    from gptforge.parallel.config import ConfigError

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError("--out", f"{out} exists and is not empty (choose a new directory)")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    return partial


def _config_for_conversion(manifest: dict):
    from gptforge.launcher.config import load_config

    merged = _merge(manifest["config"], _MEGATRON_ONE_PROCESS)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(merged, f)
    try:
        return load_config([f.name])
    finally:
        os.unlink(f.name)


def _manifest(source: dict, step_dir: Path, cfg, files: dict) -> dict:
    from gptforge.launcher import checkpoint as ck
    from gptforge.launcher.config import to_dict

    return {**source, "reason": "converted", "weights_only": True,
            "converted_from": str(step_dir), "config": to_dict(cfg),
            "layout": {"world_size": 1, "tensor_model_parallel_size": 1,
                       "pipeline_model_parallel_size": 1,
                       "virtual_pipeline_model_parallel_size": None, "data_parallel_size": 1,
                       "engine": "megatron", "use_distributed_optimizer": False},
            "versions": ck.versions(), "saved_at": ck.now(), "async": False,
            "resumed_from": None, "files": files}


def zero_to_fp32(checkpoint: str, out: str) -> Path:
    """Convert; returns OUT (a complete step directory of the megatron engine)."""
    from gptforge.launcher import checkpoint as ck
    from gptforge.launcher.config import validate
    from gptforge.launcher.train import build_engine
    from gptforge.parallel.context import destroy_parallel, init_parallel
    from gptforge.parallel.deepspeed_convert import fp32_state_dict
    from gptforge.parallel.weights import load_gpt_weights

    step_dir, source = _source(checkpoint)
    out_dir = Path(out)
    partial = _check_out(out_dir)
    cfg = _config_for_conversion(source)
    layout = validate(cfg, 1)
    weights = fp32_state_dict(step_dir / ck.STATE_DIR)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        os.environ.pop(key, None)  # this process alone
    try:
        ctx = init_parallel(cfg.parallel)
        engine = build_engine(cfg, layout, ctx)
        load_gpt_weights(engine.model_chunks[0], weights)
        engine.optimizer.reload_model_params()
        partial.mkdir(parents=True)
        handle = engine.save(partial / ck.STATE_DIR).wait()
    finally:
        destroy_parallel()
    files = {f"{ck.STATE_DIR}/{f.path}": {"bytes": f.bytes, "rank": 0,
                                           "crc32": ck.file_crc32(partial / ck.STATE_DIR / f.path)}
             for f in handle.files}
    ck.write_atomic(partial / ck.MANIFEST,
                    json.dumps(_manifest(source, step_dir, cfg, files), indent=1))
    if out_dir.exists():
        out_dir.rmdir()  # empty (checked above)
    partial.rename(out_dir)
    return out_dir


def _zero_to_fp32(args) -> int:
    out = zero_to_fp32(args.checkpoint, args.out)
    print(f"[gptforge] {out}: megatron-engine weights (fp32, TP=1); load with "
          f"--checkpoint.load={out} --checkpoint.load_optim=false")
    return 0


def register(verbs) -> None:
    parser = verbs.add_parser("convert", help="convert checkpoints between formats")
    sub = parser.add_subparsers(dest="convert_verb", required=True, metavar="CONVERSION")
    p = sub.add_parser(
        "zero-to-fp32", help="a deepspeed-engine (ZeRO) checkpoint -> megatron-engine weights",
        description="Rebuild the fp32 weights of a deepspeed-engine checkpoint (any ZeRO stage, "
                    "TP=1) and save them as a weights-only megatron-engine checkpoint.")
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="a save directory (its latest) or a step-N directory")
    p.add_argument("--out", required=True, metavar="OUT",
                   help="the new step directory (must not exist or be empty)")
    p.set_defaults(func=_zero_to_fp32)
