"""``gptforge convert to-hf`` and ``from-hf``: our checkpoints ↔ Hugging Face folders.

to-hf: our checkpoint (any saved layout, resharded to TP=1 on load) → ``GPT2LMHeadModel`` or
``LlamaForCausalLM`` safetensors, config.json, generation_config.json and the tokenizer's files,
so that ``AutoTokenizer.from_pretrained(OUT)`` gives our token ids. A model shape with no Hugging
Face equivalent is refused before anything loads, naming the setting.

from-hf: a local GPT-2 or Llama folder → a weights-only checkpoint of ours (OUT: a step directory
with the folder's tokenizer copied to ``OUT/tokenizer`` and ``OUT/model.yaml``, the model section
and tokenizer to train it with). It loads at any TP/PP layout.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import yaml
from tqdm import tqdm

from gptforge.launcher.modelio.converted import check_out, finish, write_weights_only
from gptforge.parallel.engine import CheckpointError

TOKENIZER_DIR = "tokenizer"
MODEL_YAML = "model.yaml"


def _stages(names: list[str], quiet: bool):
    return tqdm(names, desc="convert", unit="stage", disable=quiet, leave=False)


def _check_exportable(checkpoint: str, tokenizer: str | None) -> str:
    """Refuse a shape Hugging Face cannot express, or a missing tokenizer, before loading; the
    tokenizer to export (``tokenizer``, else the one the checkpoint records, found)."""
    from gptforge.launcher.run.checkpoint import format as ck
    from gptforge.launcher.config import config_from_dict
    from gptforge.launcher.modelio.recorded_tokenizer import find_tokenizer
    from gptforge.model.hf_config import architecture_of

    step_dir = ck.resolve(checkpoint)
    manifest = ck.read_manifest(step_dir)
    architecture_of(config_from_dict(manifest["config"]).model)
    path = tokenizer or find_tokenizer(step_dir, manifest).path
    if not path:
        raise CheckpointError(f"{checkpoint}: its config has no data.tokenizer_model; a Hugging "
                              f"Face folder needs the tokenizer the model was trained with "
                              f"(pass --tokenizer PATH)")
    return path


def to_hf(checkpoint: str, out: str, *, tokenizer: str | None = None,
          quiet: bool = False) -> Path:
    from gptforge.launcher.modelio.hf_folder import generation_config, write_hf_folder
    from gptforge.launcher.modelio.inference import load_checkpoint, one_process
    from gptforge.model import hf_weights
    from gptforge.model.hf_config import architecture_of, to_hf_config
    from gptforge.parallel.weights import gpt_state_dict

    tokenizer = _check_exportable(checkpoint, tokenizer)
    partial = check_out(out)
    stages = iter(_stages(["load", "tokenizer", "convert", "write"], quiet))
    next(stages)
    with one_process():
        loaded = load_checkpoint(checkpoint)
        model = loaded.cfg.model
        next(stages)
        tok = _export_tokenizer(tokenizer, partial, model.seq_length)
        if tok.vocab_size > model.vocab_size:
            raise CheckpointError(f"{tokenizer}: {tok.vocab_size} tokens, more than "
                                  f"the model's vocab_size {model.vocab_size}")
        next(stages)
        arch = architecture_of(model)
        state = hf_weights.to_hf(arch, gpt_state_dict(loaded.engine.model_chunks[0]), model,
                                 model.vocab_size)
    next(stages)
    ids = {"bos_token_id": _id(tok.bos_id), "eos_token_id": _id(tok.eos_id),
           "pad_token_id": _id(tok.pad_id)}
    config = to_hf_config(model, vocab_size=model.vocab_size, bos_id=ids["bos_token_id"],
                          eos_id=ids["eos_token_id"], pad_id=ids["pad_token_id"])
    write_hf_folder(partial, config, state, generation=generation_config(ids))
    return finish(partial, out)


def _export_tokenizer(path: str, out: Path, seq_length: int):
    """A Hugging Face tokenizer folder is copied as it is; a sentencepiece model is written as
    Hugging Face files (``data/hf_tokenizer.py``)."""
    from gptforge.data import tokenizer
    from gptforge.data.hf_tokenizer import save_hf_tokenizer
    from gptforge.launcher.modelio.hf_folder import copy_tokenizer_files

    if Path(path).is_dir():
        copy_tokenizer_files(Path(path), out)
        return tokenizer.info(path)
    return save_hf_tokenizer(path, out, model_max_length=seq_length)


def _id(value: int) -> int | None:
    return value if value is not None and value >= 0 else None


def _tokenizer_or_none(hf_dir: Path):
    from gptforge.data import tokenizer

    try:
        return tokenizer.info(hf_dir)
    except tokenizer.TokenizerError:
        return None


def from_hf(hf_dir: str, out: str, *, quiet: bool = False) -> Path:
    from gptforge.launcher.modelio.hf_folder import copy_tokenizer_files, read_config
    from gptforge.launcher.modelio.inference import load_hf, one_process

    hf_path = Path(hf_dir)
    _, _, model = read_config(hf_path)  # an unsupported architecture is refused first
    tok = _tokenizer_or_none(hf_path)
    if tok is not None and tok.vocab_size > model.vocab_size:
        raise CheckpointError(f"{hf_path}: its tokenizer has {tok.vocab_size} tokens, more "
                              f"than config.json's vocab_size {model.vocab_size}")
    partial = check_out(out)
    final_tokenizer = Path(out).resolve() / TOKENIZER_DIR
    stages = iter(_stages(["tokenizer", "load", "save"], quiet))
    next(stages)
    if tok is not None:
        copy_tokenizer_files(hf_path, partial / TOKENIZER_DIR)
    delta = {"data": {"tokenizer_model": str(final_tokenizer) if tok else ""}}
    next(stages)
    with one_process():
        loaded = load_hf(hf_path, delta=delta)
        next(stages)
        write_weights_only(loaded.engine, loaded.cfg, partial,
                           source={"converted_from": str(hf_path.resolve())},
                           tokenizer_sha256=tok.sha256 if tok else None)
        model = {"model": asdict(loaded.cfg.model), "data": delta["data"]}
    (partial / MODEL_YAML).write_text(
        "# The model (and tokenizer) of this converted checkpoint: pass it with --config.\n"
        + yaml.safe_dump(model, sort_keys=False))
    return finish(partial, out)
