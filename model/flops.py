"""Model FLOPs per trained token: the one formula behind throughput records and the planner.

Model FLOPs per trained token (PaLM, appendix B; recompute not counted, causal mask not
discounted):  6 * (N_matmul + V * h) + 12 * L * s * h
where N_matmul is the transformer layers' matrix parameters (QKV, output projection, MLP),
V * h the logit layer, and 12 * L * s * h the attention scores and weighted values (fwd + bwd).
"""

from __future__ import annotations

from gptforge.model.config import ModelConfig, default_ffn_hidden_size, num_query_groups


def matmul_params_per_layer(model: ModelConfig) -> int:
    """QKV, output projection and MLP matrix elements of one layer (no biases, no norms)."""
    h = model.hidden_size
    head_dim = h // model.num_attention_heads
    qkv = h * (h + 2 * num_query_groups(model) * head_dim)
    proj = h * h
    mlp = h * default_ffn_hidden_size(model) * (3 if model.activation == "swiglu" else 2)
    return qkv + proj + mlp


def attention_flops_per_token(model: ModelConfig) -> float:
    """Attention scores and weighted values, forward + backward: 12 * L * s * h."""
    return 12.0 * model.num_layers * model.seq_length * model.hidden_size


def flops_per_token(model: ModelConfig, padded_vocab_size: int) -> float:
    n_matmul = model.num_layers * matmul_params_per_layer(model)
    logits = padded_vocab_size * model.hidden_size
    return 6.0 * (n_matmul + logits) + attention_flops_per_token(model)
