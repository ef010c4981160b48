"""The ``model`` section (the network's shape) and ModelConfig → megatron TransformerConfig.

The TransformerConfig is generated here, never written by hand: the network's fields come from
ModelConfig, the layout's from ``gptforge.parallel.layout.transformer_layout_fields`` (passed
in by the caller), so this module knows nothing of parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

from gptforge.common.errors import ConfigError

if TYPE_CHECKING:
    from megatron.core.transformer.transformer_config import TransformerConfig


@dataclass
class ModelConfig:
    num_layers: int = 4
    """Transformer layers."""
    hidden_size: int = 128
    """Model width (d_model)."""
    num_attention_heads: int = 4
    """Attention heads per layer."""
    num_query_groups: int | None = None
    """Key/value heads (grouped-query attention); None: one per attention head."""
    ffn_hidden_size: int | None = None
    """MLP width; None: 4 x hidden_size (gelu) or 8/3 x hidden_size rounded to 64 (swiglu)."""
    seq_length: int = 128
    """Tokens per training sequence (the context length)."""
    vocab_size: int = 512
    """Tokenizer vocabulary; padded for the embedding (see make_vocab_size_divisible_by)."""
    make_vocab_size_divisible_by: int = 128
    """Pad the embedding's vocabulary to a multiple of this (and of TP)."""
    position_embedding_type: Literal["learned_absolute", "rope"] = "learned_absolute"
    """Learned absolute positions (GPT-2) or rotary embeddings (Llama)."""
    rotary_base: int = 10000
    """RoPE base frequency."""
    normalization: Literal["LayerNorm", "RMSNorm"] = "LayerNorm"
    """Norm layer type."""
    layernorm_epsilon: float = 1e-5
    """Norm epsilon."""
    activation: Literal["gelu", "gelu_tanh", "swiglu"] = "gelu"
    """MLP activation: gelu (exact, erf), gelu_tanh (tanh approximation: GPT-2's gelu_new) or
    swiglu (gated, Llama)."""
    tie_embeddings: bool = True
    """Share the input embedding and the output layer's weight."""
    add_bias_linear: bool = True
    """Biases in the linear layers."""
    hidden_dropout: float = 0.0
    """Dropout after attention and MLP."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    init_method_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""
    attention_backend: Literal["auto", "sdpa", "local", "te"] = "auto"
    """Layer implementation: te (Transformer Engine, GPU), sdpa (torch SDPA), local (megatron's
    unfused attention); auto: te where available, else sdpa."""
    window_size: int | None = None
    """Sliding-window attention: each token attends to itself and the window_size - 1 tokens
    before it (null: the whole causal context). sdpa backend (auto picks it)."""
    window_size_every_n: int | None = None
    """With window_size: every n-th layer (n, 2n, ...) attends to the whole context, the others
    to the window (Gemma-style alternation); null: every layer windowed."""


def validate_model(model: ModelConfig) -> None:
    """Checks of the shape alone (the layout's checks are in parallel/layout.py)."""
    for key in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "vocab_size",
                "make_vocab_size_divisible_by"):
        if getattr(model, key) < 1:
            raise ConfigError(f"model.{key}", f"must be >= 1, got {getattr(model, key)}")
    if model.hidden_size % model.num_attention_heads:
        raise ConfigError("model.hidden_size", f"{model.hidden_size} is not divisible by "
                               f"model.num_attention_heads={model.num_attention_heads}")
    groups = num_query_groups(model)
    if groups < 1 or model.num_attention_heads % groups:
        raise ConfigError("model.num_query_groups", f"{groups} does not divide "
                               f"model.num_attention_heads={model.num_attention_heads}")
    if model.ffn_hidden_size is not None and model.ffn_hidden_size < 1:
        raise ConfigError("model.ffn_hidden_size",
                               f"must be >= 1, got {model.ffn_hidden_size}")
    for key in ("hidden_dropout", "attention_dropout"):
        if not 0.0 <= getattr(model, key) < 1.0:
            raise ConfigError(f"model.{key}", f"must be in [0, 1), got {getattr(model, key)}")
    if model.init_method_std <= 0:
        raise ConfigError("model.init_method_std", f"must be > 0, got {model.init_method_std}")
    _validate_window(model)


def _validate_window(model: ModelConfig) -> None:
    if model.window_size is None:
        if model.window_size_every_n is not None:
            raise ConfigError("model.window_size_every_n", "needs model.window_size")
        return
    if model.window_size < 1:
        raise ConfigError("model.window_size", f"must be >= 1 (or null), got {model.window_size}")
    if model.window_size_every_n is not None and model.window_size_every_n < 1:
        raise ConfigError("model.window_size_every_n",
                          f"must be >= 1 (or null), got {model.window_size_every_n}")
    if model.attention_backend in ("local", "te"):
        raise ConfigError("model.window_size", f"needs model.attention_backend sdpa (or auto); "
                          f"{model.attention_backend!r} attends to the whole context")


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation (GPT-2's ``gelu_new``; Hugging Face ``gelu_pytorch_tanh``)."""
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": gelu_tanh, "swiglu": F.silu}


def num_query_groups(model: ModelConfig) -> int:
    return model.num_query_groups or model.num_attention_heads


def default_ffn_hidden_size(model: ModelConfig) -> int:
    if model.ffn_hidden_size is not None:
        return model.ffn_hidden_size
    if model.activation == "swiglu":
        return -(-int(8 * model.hidden_size / 3) // 64) * 64
    return 4 * model.hidden_size


def transformer_config(model: ModelConfig, *, params_dtype: torch.dtype,
                       layout_fields: dict) -> "TransformerConfig":
    """megatron's TransformerConfig: the network from ``model``, the layout from
    ``layout_fields`` (``parallel.layout.transformer_layout_fields``)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    swiglu = model.activation == "swiglu"
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        ffn_hidden_size=default_ffn_hidden_size(model),
        kv_channels=model.hidden_size // model.num_attention_heads,
        normalization=model.normalization,
        layernorm_epsilon=model.layernorm_epsilon,
        activation_func=ACTIVATIONS[model.activation],
        gated_linear_unit=swiglu,
        bias_activation_fusion=False,
        add_bias_linear=model.add_bias_linear,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        init_method_std=model.init_method_std,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        # Every rank builds the same master weight: exact TP comparisons, layout-free init.
        use_cpu_initialization=True,
        perform_initialization=True,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False,
        cuda_graph_scope=[],  # the default "full" only prints a deprecation warning
        **layout_fields,
    )
