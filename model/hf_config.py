"""Hugging Face ``config.json`` (GPT-2, Llama) ↔ our ``model`` section.

Only shapes both sides can express are converted; anything else is refused with a
``ConfigError`` naming the setting (ours ``model.*`` on export, the ``config.json`` key on
import). The tables and the traps behind them: ``docs/HUGGINGFACE.md``.
"""

from __future__ import annotations

import dataclasses

from gptforge.model.config import ModelConfig, default_ffn_hidden_size, num_query_groups
from gptforge.common.errors import ConfigError

ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
                 "mistral": "MistralForCausalLM"}  # mistral: a Llama with a sliding window
# Hugging Face activation names of our GPT-2-shaped activations.
_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                     "gelu_fast": None, "gelu": "gelu"}


def architecture_of(model: ModelConfig) -> str:
    """``gpt2``, ``llama`` or ``mistral`` (a Llama whose every layer attends to a sliding window):
    the Hugging Face family that expresses this shape, or an error naming the first setting none
    does."""
    if model.window_size is not None:
        if model.position_embedding_type != "rope":
            raise _no_hf("model.window_size", model.window_size, "GPT-2 attends to the whole "
                         "context; a windowed Llama shape (RoPE) exports as Mistral")
        _require(model, "mistral", normalization="RMSNorm", activation="swiglu",
                 add_bias_linear=False)
        if model.window_size_every_n is not None:
            raise _no_hf("model.window_size_every_n", model.window_size_every_n,
                         "Mistral windows every layer")
        return "mistral"
    if model.position_embedding_type == "learned_absolute":
        _require(model, "gpt2", normalization="LayerNorm", add_bias_linear=True,
                 tie_embeddings=True)
        if model.activation not in ("gelu", "gelu_tanh"):
            raise _no_hf("model.activation", model.activation, "gpt2 uses gelu or gelu_tanh")
        if num_query_groups(model) != model.num_attention_heads:
            raise _no_hf("model.num_query_groups", model.num_query_groups,
                         "GPT-2 has one key/value head per attention head")
        return "gpt2"
    _require(model, "llama", normalization="RMSNorm", activation="swiglu")
    return "llama"


def _require(model: ModelConfig, arch: str, **wanted) -> None:
    for key, value in wanted.items():
        if getattr(model, key) != value:
            raise _no_hf(f"model.{key}", getattr(model, key),
                         f"{ARCHITECTURES[arch]} needs {value!r} with "
                         f"position_embedding_type={model.position_embedding_type!r}")


def _no_hf(key: str, value, why: str) -> ConfigError:
    return ConfigError(key, f"{value!r} has no Hugging Face equivalent ({why})")


def to_hf_config(model: ModelConfig, *, vocab_size: int, bos_id: int, eos_id: int,
                 pad_id: int | None) -> dict:
    """config.json for ``model`` with the tokenizer's true vocabulary size and ids."""
    arch = architecture_of(model)
    common = {"architectures": [ARCHITECTURES[arch]], "model_type": arch,
              "vocab_size": vocab_size, "bos_token_id": bos_id, "eos_token_id": eos_id,
              "pad_token_id": pad_id, "initializer_range": model.init_method_std,
              "tie_word_embeddings": model.tie_embeddings, "torch_dtype": "float32",
              "use_cache": True}
    if arch == "gpt2":
        act = "gelu_new" if model.activation == "gelu_tanh" else "gelu"
        return {**common, "n_embd": model.hidden_size, "n_layer": model.num_layers,
                "n_head": model.num_attention_heads, "n_inner": default_ffn_hidden_size(model),
                "n_positions": model.seq_length, "n_ctx": model.seq_length,
                "activation_function": act, "layer_norm_epsilon": model.layernorm_epsilon,
                "resid_pdrop": model.hidden_dropout, "embd_pdrop": model.hidden_dropout,
                "attn_pdrop": model.attention_dropout, "scale_attn_weights": True,
                "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False}
    return {**common, "hidden_size": model.hidden_size, "num_hidden_layers": model.num_layers,
            "num_attention_heads": model.num_attention_heads,
            "num_key_value_heads": num_query_groups(model),
            "head_dim": model.hidden_size // model.num_attention_heads,
            "intermediate_size": default_ffn_hidden_size(model),
            "max_position_embeddings": model.seq_length, "hidden_act": "silu",
            "rms_norm_eps": model.layernorm_epsilon, "attention_bias": model.add_bias_linear,
            "mlp_bias": model.add_bias_linear, "attention_dropout": model.attention_dropout,
            "rope_theta": float(model.rotary_base),
            "rope_parameters": {"rope_type": "default", "rope_theta": float(model.rotary_base)},
            **({"sliding_window": model.window_size} if arch == "mistral" else {})}


def _get(hf: dict, key: str, where: str):
    if key not in hf:
        raise ConfigError(f"{where}: {key}", "missing")
    return hf[key]


def _refuse(hf: dict, where: str, key: str, ok) -> None:
    if key in hf and not ok(hf[key]):
        raise ConfigError(f"{where}: {key}", f"{hf[key]!r} is not supported")


def from_hf_config(hf: dict, where: str) -> tuple[str, ModelConfig]:
    """(architecture, our model section) of a Hugging Face config.json (``where`` names it)."""
    arch = hf.get("model_type")
    if arch not in ARCHITECTURES:
        archs = hf.get("architectures") or [arch]
        raise ConfigError(f"{where}: model_type", f"{archs} is not supported (only "
                               f"{', '.join(ARCHITECTURES.values())})")
    model = _gpt2(hf, where) if arch == "gpt2" else _llama(hf, where)
    if arch == "mistral" and hf.get("sliding_window") is not None:
        model = dataclasses.replace(model, window_size=int(hf["sliding_window"]))
    return arch, model


def _gpt2(hf: dict, where: str) -> ModelConfig:
    act = _GPT2_ACTIVATIONS.get(hf.get("activation_function", "gelu_new"))
    if act is None:
        raise ConfigError(f"{where}: activation_function",
                               f"{hf.get('activation_function')!r} is not supported")
    _refuse(hf, where, "scale_attn_weights", lambda v: v is True)
    _refuse(hf, where, "scale_attn_by_inverse_layer_idx", lambda v: not v)
    _refuse(hf, where, "reorder_and_upcast_attn", lambda v: not v)
    _refuse(hf, where, "add_cross_attention", lambda v: not v)
    _refuse(hf, where, "tie_word_embeddings", lambda v: v is True)
    hidden = _get(hf, "n_embd", where)
    return ModelConfig(
        num_layers=_get(hf, "n_layer", where), hidden_size=hidden,
        num_attention_heads=_get(hf, "n_head", where),
        ffn_hidden_size=hf.get("n_inner") or 4 * hidden,
        seq_length=_get(hf, "n_positions", where), vocab_size=_get(hf, "vocab_size", where),
        position_embedding_type="learned_absolute",
        normalization="LayerNorm", layernorm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        activation=act, tie_embeddings=True, add_bias_linear=True,
        hidden_dropout=hf.get("resid_pdrop", 0.0), attention_dropout=hf.get("attn_pdrop", 0.0),
        init_method_std=hf.get("initializer_range", 0.02))


def _rope_theta(hf: dict, where: str) -> float:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise ConfigError(f"{where}: rope_parameters",
                               f"rope_type {kind!r} is not supported (only default)")
    _refuse(hf, where, "partial_rotary_factor", lambda v: v == 1.0)
    return params.get("rope_theta", hf.get("rope_theta", 10000.0))


def _llama(hf: dict, where: str) -> ModelConfig:
    hidden, heads = _get(hf, "hidden_size", where), _get(hf, "num_attention_heads", where)
    _refuse(hf, where, "hidden_act", lambda v: v == "silu")
    _refuse(hf, where, "head_dim", lambda v: v == hidden // heads)
    if bool(hf.get("attention_bias", False)) != bool(hf.get("mlp_bias", False)):
        raise ConfigError(f"{where}: mlp_bias", "must equal attention_bias (one "
                               "model.add_bias_linear setting covers both)")
    theta = _rope_theta(hf, where)
    if theta != int(theta):
        raise ConfigError(f"{where}: rope_theta", f"{theta} is not a whole number")
    return ModelConfig(
        num_layers=_get(hf, "num_hidden_layers", where), hidden_size=hidden,
        num_attention_heads=heads, num_query_groups=hf.get("num_key_value_heads") or heads,
        ffn_hidden_size=_get(hf, "intermediate_size", where),
        seq_length=_get(hf, "max_position_embeddings", where),
        vocab_size=_get(hf, "vocab_size", where),
        position_embedding_type="rope", rotary_base=int(theta), normalization="RMSNorm",
        layernorm_epsilon=hf.get("rms_norm_eps", 1e-6), activation="swiglu",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        add_bias_linear=bool(hf.get("attention_bias", False)),
        attention_dropout=hf.get("attention_dropout", 0.0),
        init_method_std=hf.get("initializer_range", 0.02))
