"""The one place that decides which megatron ModuleSpec (and so which kernels) a model uses.

- ``te``: Transformer Engine layers, when TE imports and a GPU is present.
- ``sdpa``: megatron's local (pure PyTorch) layers with our SDPA core attention.
- ``local``: megatron's local layers as they are (unfused attention).
``auto`` picks te where possible, else sdpa. sdpa and local use our torch norm
(``model/norm.py``), which also runs under sequence parallelism; te uses TE's norms.
"""

from __future__ import annotations

import dataclasses

import torch

from gptforge.model.config import ModelConfig
from gptforge.model.norm import SequenceParallelTorchNorm


def te_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def resolve_backend(model: ModelConfig) -> str:
    if model.attention_backend == "te" and not te_available():
        raise ValueError("model.attention_backend: 'te' needs Transformer Engine and a GPU")
    if model.attention_backend != "auto":
        return model.attention_backend
    if model.window_size is not None:
        return "sdpa"  # the sliding window is ours (model/attention.py)
    return "te" if te_available() else "sdpa"


def layer_spec(model: ModelConfig):
    from megatron.core.models.gpt import gpt_layer_specs

    backend = resolve_backend(model)
    if backend == "te":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization=model.normalization)
    layer = dataclasses.replace(spec.submodules, input_layernorm=SequenceParallelTorchNorm,
                                pre_mlp_layernorm=SequenceParallelTorchNorm)
    spec = dataclasses.replace(spec, submodules=layer)
    if backend == "sdpa":
        from gptforge.model.attention import SDPAttention

        from megatron.core.transformer.spec_utils import ModuleSpec

        attn = spec.submodules.self_attention
        core, module, params = SDPAttention, attn.module, attn.params
        if model.window_size is not None:
            from gptforge.model.window_cache import WindowedSelfAttention

            window = {"window_size": model.window_size,
                      "window_size_every_n": model.window_size_every_n}
            core = ModuleSpec(module=SDPAttention, params=window)
            module, params = WindowedSelfAttention, {**params, **window}  # its KV cache
        attn_sub = dataclasses.replace(attn.submodules, core_attention=core)
        spec.submodules.self_attention = dataclasses.replace(attn, module=module, params=params,
                                                             submodules=attn_sub)
    return spec


def chunk_spec(model: ModelConfig, tcfg, *, pp_rank: int, vp_stage: int | None):
    """What GPTModel takes as ``transformer_layer_spec`` for one pipeline chunk: the layer spec
    (te), or the chunk's layers plus our final norm (sdpa, local; megatron would otherwise pick
    its own torch norm for the final norm)."""
    spec = layer_spec(model)
    if resolve_backend(model) == "te":
        return spec
    from megatron.core.transformer.transformer_block import (TransformerBlockSubmodules,
                                                             get_num_layers_to_build)

    num_layers = get_num_layers_to_build(tcfg, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[spec] * num_layers,
                                      layer_norm=SequenceParallelTorchNorm)
