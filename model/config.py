"""The ``model`` config section, and ModelConfig (+ parallel/precision facts) → TransformerConfig.

The TransformerConfig is generated here, never written by hand. Layout-dependent fields come
from the ``parallel`` section; everything about the network comes from the ``model`` section.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from gptforge.parallel.config import ParallelConfig


@dataclass
class ModelConfig:
    num_layers: int = 4
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: int | None = None  # None: multi-head attention (== num_attention_heads)
    ffn_hidden_size: int | None = None  # None: 4 * hidden_size (gelu) or 8/3 rounded (swiglu)
    seq_length: int = 128
    vocab_size: int = 512
    make_vocab_size_divisible_by: int = 128
    position_embedding_type: Literal["learned_absolute", "rope"] = "learned_absolute"
    rotary_base: int = 10000
    normalization: Literal["LayerNorm", "RMSNorm"] = "LayerNorm"
    layernorm_epsilon: float = 1e-5
    activation: Literal["gelu", "swiglu"] = "gelu"
    tie_embeddings: bool = True
    add_bias_linear: bool = True
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_method_std: float = 0.02
    attention_backend: Literal["auto", "sdpa", "local", "te"] = "auto"


def padded_vocab_size(model: ModelConfig, tensor_model_parallel_size: int) -> int:
    """Pad to a multiple of ``make_vocab_size_divisible_by`` and of TP.

    The multiple does not depend on TP while TP divides ``make_vocab_size_divisible_by``, so the
    padded vocabulary (which enters the softmax) is the same for every layout.
    """
    multiple = math.lcm(model.make_vocab_size_divisible_by, tensor_model_parallel_size)
    return -(-model.vocab_size // multiple) * multiple


def default_ffn_hidden_size(model: ModelConfig) -> int:
    if model.ffn_hidden_size is not None:
        return model.ffn_hidden_size
    if model.activation == "swiglu":
        return -(-int(8 * model.hidden_size / 3) // 64) * 64
    return 4 * model.hidden_size


PARAMS_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _recompute_fields(recompute: str) -> dict:
    if recompute == "full":
        return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if recompute == "selective":
        return dict(recompute_granularity="selective")
    return {}


def transformer_config(model: ModelConfig, parallel: ParallelConfig, precision: str,
                       on_cpu: bool) -> "TransformerConfig":
    from megatron.core.transformer.transformer_config import TransformerConfig

    from gptforge.model.specs import resolve_backend

    if parallel.sequence_parallel and resolve_backend(model) != "te":
        raise ValueError("parallel.sequence_parallel: needs Transformer Engine layers (megatron's "
                         "local torch norm refuses sequence parallelism)")
    swiglu = model.activation == "swiglu"
    vpp = parallel.virtual_pipeline_model_parallel_size
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        ffn_hidden_size=default_ffn_hidden_size(model),
        kv_channels=model.hidden_size // model.num_attention_heads,
        normalization=model.normalization,
        layernorm_epsilon=model.layernorm_epsilon,
        activation_func=F.silu if swiglu else F.gelu,
        gated_linear_unit=swiglu,
        bias_activation_fusion=False,
        add_bias_linear=model.add_bias_linear,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=vpp if vpp and vpp > 1 else None,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=PARAMS_DTYPE[precision],
        pipeline_dtype=PARAMS_DTYPE[precision],
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        # Every rank builds the same master weight: exact TP comparisons, layout-free init.
        use_cpu_initialization=True,
        perform_initialization=True,
        # gloo matches sends/receives by arrival order: batched p2p with VPP gives wrong results.
        batch_p2p_comm=not on_cpu,
        batch_p2p_sync=not on_cpu,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False,
        **_recompute_fields(parallel.recompute),
    )
