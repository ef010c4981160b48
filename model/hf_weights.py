"""Hugging Face GPT-2 / Llama tensors ↔ our GPTModel's (one TP=1, PP=1 model).

Keys on our side are megatron's local-spec names (``input_layernorm``, ``pre_mlp_layernorm``);
``to_model_keys`` renames them for a Transformer Engine model, whose norms live inside the
fused linears. The three layout facts that matter (``docs/HUGGINGFACE.md``):

- fused QKV: megatron groups rows per query group: [r query heads, 1 key head, 1 value head] x g
  (r = heads / groups); GPT-2's ``c_attn`` is [all q | all k | all v] and a Conv1D ([in, out]).
- SwiGLU fc1 is [gate ; up] by rows.
- the embedding (and an untied output layer) has the padded vocabulary: rows past the tokenizer's
  are zero on import and dropped on export.
"""

from __future__ import annotations

import torch

from gptforge.model.config import ModelConfig, num_query_groups

_TE_ALIASES = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
               "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}


def _pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    out = weight.new_zeros((rows, *weight.shape[1:]))
    out[:weight.shape[0]] = weight
    return out


def _qkv_to_ours(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """[n·d, …], [g·d, …], [g·d, …] → megatron's grouped [(n+2g)·d, …]."""
    rest = q.shape[1:]
    parts = (q.reshape(groups, -1, *rest), k.reshape(groups, -1, *rest),
             v.reshape(groups, -1, *rest))
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def _qkv_from_ours(qkv: torch.Tensor, heads: int, groups: int, head_dim: int):
    rest = qkv.shape[1:]
    per_group = heads // groups * head_dim
    grouped = qkv.reshape(groups, per_group + 2 * head_dim, *rest)
    q, k, v = torch.split(grouped, [per_group, head_dim, head_dim], dim=1)
    return tuple(t.reshape(-1, *rest) for t in (q, k, v))


# ------------------------------------------------------------------------------- GPT-2

# (ours, Hugging Face, Conv1D weight: transposed) per GPT-2 layer, besides the fused QKV.
_GPT2_LAYER = (("input_layernorm.weight", "ln_1.weight", False),
               ("input_layernorm.bias", "ln_1.bias", False),
               ("self_attention.linear_proj.weight", "attn.c_proj.weight", True),
               ("self_attention.linear_proj.bias", "attn.c_proj.bias", False),
               ("pre_mlp_layernorm.weight", "ln_2.weight", False),
               ("pre_mlp_layernorm.bias", "ln_2.bias", False),
               ("mlp.linear_fc1.weight", "mlp.c_fc.weight", True),
               ("mlp.linear_fc1.bias", "mlp.c_fc.bias", False),
               ("mlp.linear_fc2.weight", "mlp.c_proj.weight", True),
               ("mlp.linear_fc2.bias", "mlp.c_proj.bias", False))


def _gpt2_layer_from_hf(hf: dict, p: str, model: ModelConfig) -> dict:
    h, n = model.hidden_size, model.num_attention_heads
    d = h // n
    out = {ours: hf[p + theirs].t() if conv else hf[p + theirs]
           for ours, theirs, conv in _GPT2_LAYER}
    # c_attn: Conv1D [h, 3h] of [all q | all k | all v] → per head (q_i, k_i, v_i) rows
    w = hf[p + "attn.c_attn.weight"].t().reshape(3, n, d, h)
    b = hf[p + "attn.c_attn.bias"].reshape(3, n, d)
    out["self_attention.linear_qkv.weight"] = w.transpose(0, 1).reshape(3 * h, h)
    out["self_attention.linear_qkv.bias"] = b.transpose(0, 1).reshape(3 * h)
    return out


def _gpt2_layer_to_hf(ours: dict, p: str, model: ModelConfig) -> dict:
    h, n = model.hidden_size, model.num_attention_heads
    d = h // n
    out = {theirs: ours[p + key].t() if conv else ours[p + key]
           for key, theirs, conv in _GPT2_LAYER}
    w = ours[p + "self_attention.linear_qkv.weight"].reshape(n, 3, d, h).transpose(0, 1)
    b = ours[p + "self_attention.linear_qkv.bias"].reshape(n, 3, d).transpose(0, 1)
    out["attn.c_attn.weight"] = w.reshape(3 * h, h).t()
    out["attn.c_attn.bias"] = b.reshape(3 * h)
    return out


def _gpt2_from_hf(hf: dict, model: ModelConfig, padded_vocab: int) -> dict:
    hf = {k.removeprefix("transformer."): v for k, v in hf.items()}
    out = {"embedding.word_embeddings.weight": _pad_rows(hf["wte.weight"], padded_vocab),
           "embedding.position_embeddings.weight": hf["wpe.weight"][:model.seq_length],
           "decoder.final_layernorm.weight": hf["ln_f.weight"],
           "decoder.final_layernorm.bias": hf["ln_f.bias"]}
    for i in range(model.num_layers):
        for key, value in _gpt2_layer_from_hf(hf, f"h.{i}.", model).items():
            out[f"decoder.layers.{i}.{key}"] = value
    return out


def _gpt2_to_hf(ours: dict, model: ModelConfig, vocab_size: int) -> dict:
    out = {"wte.weight": ours["embedding.word_embeddings.weight"][:vocab_size],
           "wpe.weight": ours["embedding.position_embeddings.weight"],
           "ln_f.weight": ours["decoder.final_layernorm.weight"],
           "ln_f.bias": ours["decoder.final_layernorm.bias"]}
    for i in range(model.num_layers):
        for key, value in _gpt2_layer_to_hf(ours, f"decoder.layers.{i}.", model).items():
            out[f"h.{i}.{key}"] = value
    return {f"transformer.{k}": v for k, v in out.items()}


# ------------------------------------------------------------------------------- Llama

def _llama_layer_from_hf(hf: dict, p: str, model: ModelConfig) -> dict:
    g = num_query_groups(model)
    out = {"input_layernorm.weight": hf[p + "input_layernorm.weight"],
           "pre_mlp_layernorm.weight": hf[p + "post_attention_layernorm.weight"],
           "self_attention.linear_proj.weight": hf[p + "self_attn.o_proj.weight"],
           "mlp.linear_fc2.weight": hf[p + "mlp.down_proj.weight"]}
    for kind in ("weight", "bias") if model.add_bias_linear else ("weight",):
        q, k, v = (hf[f"{p}self_attn.{x}_proj.{kind}"] for x in "qkv")
        out[f"self_attention.linear_qkv.{kind}"] = _qkv_to_ours(q, k, v, g)
        out[f"mlp.linear_fc1.{kind}"] = torch.cat([hf[f"{p}mlp.gate_proj.{kind}"],
                                                   hf[f"{p}mlp.up_proj.{kind}"]])
    if model.add_bias_linear:
        out["self_attention.linear_proj.bias"] = hf[p + "self_attn.o_proj.bias"]
        out["mlp.linear_fc2.bias"] = hf[p + "mlp.down_proj.bias"]
    return out


def _llama_layer_to_hf(ours: dict, p: str, model: ModelConfig) -> dict:
    n, g = model.num_attention_heads, num_query_groups(model)
    d = model.hidden_size // n
    out = {"input_layernorm.weight": ours[p + "input_layernorm.weight"],
           "post_attention_layernorm.weight": ours[p + "pre_mlp_layernorm.weight"],
           "self_attn.o_proj.weight": ours[p + "self_attention.linear_proj.weight"],
           "mlp.down_proj.weight": ours[p + "mlp.linear_fc2.weight"]}
    for kind in ("weight", "bias") if model.add_bias_linear else ("weight",):
        q, k, v = _qkv_from_ours(ours[f"{p}self_attention.linear_qkv.{kind}"], n, g, d)
        out.update({f"self_attn.q_proj.{kind}": q, f"self_attn.k_proj.{kind}": k,
                    f"self_attn.v_proj.{kind}": v})
        gate, up = torch.chunk(ours[f"{p}mlp.linear_fc1.{kind}"], 2)
        out.update({f"mlp.gate_proj.{kind}": gate, f"mlp.up_proj.{kind}": up})
    if model.add_bias_linear:
        out["self_attn.o_proj.bias"] = ours[p + "self_attention.linear_proj.bias"]
        out["mlp.down_proj.bias"] = ours[p + "mlp.linear_fc2.bias"]
    return out


def _llama_from_hf(hf: dict, model: ModelConfig, padded_vocab: int) -> dict:
    out = {"embedding.word_embeddings.weight": _pad_rows(hf["model.embed_tokens.weight"],
                                                          padded_vocab),
           "decoder.final_layernorm.weight": hf["model.norm.weight"]}
    if not model.tie_embeddings:
        out["output_layer.weight"] = _pad_rows(hf["lm_head.weight"], padded_vocab)
    for i in range(model.num_layers):
        for key, value in _llama_layer_from_hf(hf, f"model.layers.{i}.", model).items():
            out[f"decoder.layers.{i}.{key}"] = value
    return out


def _llama_to_hf(ours: dict, model: ModelConfig, vocab_size: int) -> dict:
    out = {"model.embed_tokens.weight": ours["embedding.word_embeddings.weight"][:vocab_size],
           "model.norm.weight": ours["decoder.final_layernorm.weight"]}
    if not model.tie_embeddings:
        out["lm_head.weight"] = ours["output_layer.weight"][:vocab_size]
    for i in range(model.num_layers):
        for key, value in _llama_layer_to_hf(ours, f"decoder.layers.{i}.", model).items():
            out[f"model.layers.{i}.{key}"] = value
    return out


# ------------------------------------------------------------------------------- entry points

def from_hf(arch: str, hf: dict, model: ModelConfig, padded_vocab: int) -> dict:
    """Our TP=1 state dict (local-spec names) from a Hugging Face state dict."""
    convert = _gpt2_from_hf if arch == "gpt2" else _llama_from_hf
    return {k: v.contiguous() for k, v in convert(hf, model, padded_vocab).items()}


def to_hf(arch: str, ours: dict, model: ModelConfig, vocab_size: int) -> dict:
    """The Hugging Face state dict (rows :vocab_size of the embedding) of our TP=1 one."""
    convert = _gpt2_to_hf if arch == "gpt2" else _llama_to_hf
    ours = {canonical_key(k): v for k, v in ours.items() if not k.endswith("_extra_state")}
    return {k: v.detach().clone().contiguous() for k, v in convert(ours, model,
                                                                   vocab_size).items()}


def canonical_key(key: str) -> str:
    """A Transformer Engine model's key → the local-spec name."""
    for local, te in _TE_ALIASES.items():
        key = key.replace(te, local)
    return key


def to_model_keys(state: dict, model_keys) -> dict:
    """``state`` (local-spec names) renamed to ``model_keys``' naming (local or TE)."""
    by_canonical = {canonical_key(k): k for k in model_keys}
    return {by_canonical.get(k, k): v for k, v in state.items()}
