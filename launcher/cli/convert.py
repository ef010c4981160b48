"""``gptforge convert``: checkpoint conversions (a verb with subcommands).

``gptforge convert zero-to-fp32 --checkpoint DIR --out OUT`` turns a checkpoint of the deepspeed
engine (any ZeRO stage and data-parallel size, tensor parallel size 1) into one of the megatron
engine: DeepSpeed's zero_to_fp32 rebuilds the fp32 weights, a one-process megatron engine (TP=1)
takes them and saves ``OUT/state/`` with its own save, and ``OUT/manifest.json`` marks the result
weights-only (it holds no optimizer state): load it with ``--checkpoint.load=OUT
--checkpoint.load_optim=false``. OUT is written as ``OUT.partial`` and renamed when complete.
"""

from __future__ import annotations

from pathlib import Path

def _source(checkpoint: str) -> tuple[Path, dict]:
    from gptforge.launcher.run.checkpoint import format as ck
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


def zero_to_fp32(checkpoint: str, out: str) -> Path:
    """Convert; returns OUT (a complete step directory of the megatron engine)."""
    from gptforge.launcher.run.checkpoint import format as ck
    from gptforge.launcher.config import config_from_dict, merge_dicts, validate
    from gptforge.launcher.modelio.converted import check_out, finish, write_weights_only
    from gptforge.launcher.modelio.inference import ONE_PROCESS, one_process
    from gptforge.launcher.run.build import build_engine
    from gptforge.parallel.context import init_parallel
    from gptforge.parallel.deepspeed.convert import fp32_state_dict
    from gptforge.parallel.weights import load_gpt_weights

    step_dir, source = _source(checkpoint)
    partial = check_out(out)
    cfg = config_from_dict(merge_dicts(source["config"], ONE_PROCESS))
    layout = validate(cfg, 1)
    weights = fp32_state_dict(step_dir / ck.STATE_DIR)
    with one_process():
        engine = build_engine(cfg, layout, init_parallel(cfg.parallel))
        load_gpt_weights(engine.model_chunks[0], weights)
        engine.optimizer.reload_model_params()
        kept = {k: source[k] for k in ("step", "consumed_samples", "consumed_tokens", "data",
                                        "tokenizer_sha256") if k in source}
        write_weights_only(engine, cfg, partial,
                           source={**kept, "converted_from": str(step_dir)})
    return finish(partial, out)


def _zero_to_fp32(args) -> int:
    out = zero_to_fp32(args.checkpoint, args.out)
    print(f"[gptforge] {out}: megatron-engine weights (fp32, TP=1); load with "
          f"--checkpoint.load={out} --checkpoint.load_optim=false")
    return 0


def _to_hf(args) -> int:
    from gptforge.launcher.modelio.hf_convert import to_hf

    out = to_hf(args.checkpoint, args.out, tokenizer=args.tokenizer)
    print(f"[gptforge] {out}: Hugging Face folder (transformers: "
          f"AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    return 0


def _from_hf(args) -> int:
    from gptforge.launcher.modelio.hf_convert import MODEL_YAML, from_hf

    out = from_hf(args.hf, args.out)
    print(f"[gptforge] {out}: weights-only checkpoint; fine-tune it with\n"
          f"  gptforge train --config {out / MODEL_YAML} <your config> "
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
    p = sub.add_parser(
        "to-hf", help="our checkpoint -> a Hugging Face folder (GPT2LMHeadModel / "
                      "LlamaForCausalLM, safetensors, tokenizer)",
        description="Export a checkpoint saved at any layout as a Hugging Face folder that "
                    "transformers loads with from_pretrained (weights, config.json, "
                    "generation_config.json, tokenizer files).")
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="a save directory (its latest) or a step-N directory")
    p.add_argument("--out", required=True, metavar="HF_DIR", help="new or empty directory")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="the tokenizer to export instead of the one the checkpoint records")
    p.set_defaults(func=_to_hf)
    p = sub.add_parser(
        "from-hf", help="a Hugging Face GPT-2 / Llama folder -> our checkpoint",
        description="Import a local GPT2LMHeadModel or LlamaForCausalLM folder (safetensors or "
                    "pytorch_model.bin) as a weights-only checkpoint that loads at any TP/PP "
                    "layout; OUT/model.yaml holds its model section and tokenizer.")
    p.add_argument("--hf", required=True, metavar="HF_DIR", help="the Hugging Face folder")
    p.add_argument("--out", required=True, metavar="DIR", help="new or empty directory")
    p.set_defaults(func=_from_hf)
