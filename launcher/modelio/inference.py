"""A model for inference (fp32) from our checkpoint or a Hugging Face folder: what ``gptforge
generate``, ``eval``, ``serve`` and ``convert`` work on, in this process (TP=1, PP=1) or on the
ranks of a launch at a TP x PP layout (``layout``).

Our checkpoint may have been saved at any layout: megatron's distributed checkpoint reshards it
into the requested one on load, as a training resume does (a deepspeed-engine save goes through
DeepSpeed's zero_to_fp32: TP=1 saves, into TP=1, PP=1). A Hugging Face folder (GPT-2 or Llama)
is converted on the fly (``model/hf_weights.py``) into TP=1, PP=1; for a larger layout the
launcher first writes it as our checkpoint (``as_checkpoint``). Its padded vocabulary rows take
no probability mass (``model/vocab_mask.py``), so losses equal transformers'.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from gptforge.launcher.config import Config, config_from_dict, merge_dicts, validate
from gptforge.launcher.modelio.hf_folder import HFModel, check_keys, is_hf_folder, read_hf_folder
from gptforge.launcher.modelio.recorded_tokenizer import RecordedTokenizer, find_tokenizer
from gptforge.parallel.layout import Layout

# What an inference engine runs with (the rest of the config is the checkpoint's own): fp32, so
# that tensors are the fp32 master weights; TP=1, PP=1 unless ``layout`` says otherwise.
ONE_PROCESS = {
    "parallel": {"engine": "megatron", "tensor_model_parallel_size": 1,
                 "pipeline_model_parallel_size": 1, "virtual_pipeline_model_parallel_size": None,
                 "sequence_parallel": False, "use_distributed_optimizer": False,
                 "zero_stage": 0, "offload_optimizer": "none", "offload_param": "none"},
    "precision": {"dtype": "fp32"},
    "sample": {"prompt": ""},
    "logging": {"mlflow": False},
    "distill": {"teacher": ""},
}


@dataclass
class Loaded:
    cfg: Config
    layout: Layout
    engine: object  # the megatron engine (its optimizer unused)
    ctx: object  # this process's ParallelContext
    path: Path  # the step directory or the Hugging Face folder
    hf: HFModel | None  # set for a Hugging Face folder
    tokenizer: RecordedTokenizer | None = None  # our checkpoint's (its path may be relative)
    quantize: str = "none"  # int8: weight-only quantized linear layers (``quantize``)

    @property
    def model(self):
        from gptforge.parallel.weights import unwrapped

        return unwrapped(self.engine.model_chunks[0])

    @property
    def runner(self):
        """What ``generate_batch`` runs: the model, or this rank's pipeline stages."""
        from gptforge.parallel.pipeline_generate import runner
        from gptforge.parallel.weights import unwrapped

        return runner(self.ctx, [unwrapped(c) for c in self.engine.model_chunks],
                      self.cfg.model.hidden_size, self.layout.padded_vocab_size)

    @property
    def is_output_rank(self) -> bool:
        """The rank that prints and writes results (global rank 0)."""
        return self.ctx.rank == 0

    @property
    def tokenizer_path(self) -> str:
        """The model's tokenizer ("" if none is named): a path our checkpoint recorded relative
        to where its run started is found (``recorded_tokenizer.py``) or refused, naming it."""
        return self.tokenizer.path if self.tokenizer else self.cfg.data.tokenizer_model


@contextmanager
def one_process() -> Iterator[None]:
    """This process alone (no launcher's rank variables), process groups torn down after."""
    from gptforge.parallel.context import destroy_parallel

    saved = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                             "LOCAL_WORLD_SIZE") if k in os.environ}
    try:
        yield
    finally:
        destroy_parallel()
        os.environ.update(saved)


def layout_delta(tensor_model_parallel_size: int = 1,
                 pipeline_model_parallel_size: int = 1) -> dict:
    """The config delta of an inference layout (no virtual stages, no sequence parallelism)."""
    return {"parallel": {"tensor_model_parallel_size": tensor_model_parallel_size,
                         "pipeline_model_parallel_size": pipeline_model_parallel_size}}


def _build(cfg: Config):
    from gptforge.launcher.run.build import build_engine
    from gptforge.parallel.context import init_parallel, world_size_from_env

    layout = validate(cfg, world_size_from_env())
    ctx = init_parallel(cfg.parallel)
    return layout, ctx, build_engine(cfg, layout, ctx)


def _at_one_rank(cfg: Config, what: str) -> None:
    p = cfg.parallel
    if p.tensor_model_parallel_size * p.pipeline_model_parallel_size > 1:
        from gptforge.parallel.engine import CheckpointError

        raise CheckpointError(f"{what} loads into TP=1, PP=1 only; write it as our checkpoint "
                              f"first (gptforge convert), which loads at any layout")


def load_checkpoint(path: str | Path, *, delta: dict | None = None) -> Loaded:
    """Our checkpoint (a save directory's latest or a step directory), at the layout of
    ``delta`` (default TP=1, PP=1)."""
    from gptforge.launcher.run.checkpoint import format as ck
    from gptforge.parallel.engine import CheckpointError

    step_dir = ck.resolve(path)
    manifest = ck.read_manifest(step_dir)
    problem = ck.verify_files(step_dir, manifest, 0, 1)
    if problem:
        raise CheckpointError(problem)
    tokenizer = find_tokenizer(step_dir, manifest)
    found = {"data": {"tokenizer_model": str(tokenizer.found)}} if tokenizer.found else {}
    config = manifest["config"]
    for layer in (found, ONE_PROCESS, delta or {}):
        config = merge_dicts(config, layer)
    cfg = config_from_dict(config)
    layout, ctx, engine = _build(cfg)
    if manifest["layout"].get("engine") == "deepspeed":
        from gptforge.parallel.deepspeed.convert import fp32_state_dict
        from gptforge.parallel.weights import load_gpt_weights

        tp = manifest["layout"]["tensor_model_parallel_size"]
        if tp != 1:
            raise CheckpointError(f"{step_dir}: a deepspeed-engine save with "
                                  f"tensor_model_parallel_size={tp}; only TP=1 ones load here")
        _at_one_rank(cfg, f"{step_dir}: a deepspeed-engine save")
        load_gpt_weights(engine.model_chunks[0], fp32_state_dict(step_dir / ck.STATE_DIR))
        engine.optimizer.reload_model_params()
    else:
        engine.load(step_dir / ck.STATE_DIR, load_optim=False)
    return Loaded(cfg, layout, engine, ctx, step_dir, None, tokenizer)


def hf_config_dict(hf: HFModel, delta: dict | None = None) -> dict:
    """Our config for a Hugging Face folder: its model, its tokenizer, one process."""
    base = {"model": asdict(hf.model), "data": {"tokenizer_model": str(hf.path.resolve())}}
    return merge_dicts(merge_dicts(base, ONE_PROCESS), delta or {})


def load_hf(path: str | Path, *, delta: dict | None = None) -> Loaded:
    """A Hugging Face GPT-2 / Llama folder, converted to our model on the fly (TP=1)."""
    from gptforge.model.hf_weights import from_hf, to_hf, to_model_keys
    from gptforge.parallel.weights import gpt_state_dict, load_gpt_weights

    hf = read_hf_folder(path)
    cfg = config_from_dict(hf_config_dict(hf, delta))
    _at_one_rank(cfg, f"{hf.path}: a Hugging Face folder")
    layout, ctx, engine = _build(cfg)
    fresh = gpt_state_dict(engine.model_chunks[0])
    shapes = {k: torch.empty(v.shape, device="meta") for k, v in fresh.items()}  # no copies
    expected = to_hf(hf.arch, shapes, cfg.model, cfg.model.vocab_size)
    check_keys(hf, {k: v.shape for k, v in expected.items()})
    ours = from_hf(hf.arch, hf.state, cfg.model, layout.padded_vocab_size)
    load_gpt_weights(engine.model_chunks[0], to_model_keys(ours, fresh))
    engine.optimizer.reload_model_params()
    return Loaded(cfg, layout, engine, ctx, hf.path, hf)


def quantize(loaded: Loaded, mode: str) -> Loaded:
    """Quantize the loaded model's weights in place (``model/quantize.py``): every chunk."""
    from gptforge.model.quantize import apply_quantize
    from gptforge.parallel.weights import unwrapped

    for chunk in loaded.engine.model_chunks:
        apply_quantize(unwrapped(chunk), mode)
    loaded.quantize = mode
    return loaded


def weights_bytes(loaded: Loaded) -> int:
    """Bytes of this rank's weights as stored."""
    from gptforge.model.quantize import weight_bytes
    from gptforge.parallel.weights import unwrapped

    return sum(weight_bytes(unwrapped(chunk)) for chunk in loaded.engine.model_chunks)


def load_any(path: str | Path, *, delta: dict | None = None) -> Loaded:
    """A Hugging Face folder (it has config.json) or our checkpoint."""
    if is_hf_folder(path):
        return load_hf(path, delta=delta)
    return load_checkpoint(path, delta=delta)
