"""Compute time of one micro-batch through one pipeline rank: a roofline, kernel by kernel.

Each kernel of a layer is priced as the larger of its arithmetic time (FLOPs over the device's
peak times the fraction large GEMMs reach in a training step, ``gemm_efficiency``) and its memory
time (bytes moved over the achieved memory bandwidth). That makes the efficiency depend on the
GEMM shape (micro-batch × sequence × hidden shard): large shards are compute-bound at
``gemm_efficiency``, thin ones (small hidden / TP, short sequences) fall to the memory roof.
Kernels that do little arithmetic (norms, activations, dropout, residual adds, the softmax of
unfused attention, the cross entropy) are priced by their bytes alone.

Per token and layer, forward, in elements (h hidden, f FFN width, d head dim, g query groups,
a heads, s sequence, t TP, t_sp = t with sequence parallelism else 1):
- GEMMs M×K×N, M = micro-batch tokens: QKV h × (h + 2gd)/t, projection h/t × h, fc1 h × f/t
  (2f/t SwiGLU), fc2 f/t × h; the backward is two GEMMs of each shape (data and weight gradient);
- attention core: flash kernels (sdpa, te) at ``attention_efficiency`` of peak on the causal half
  of 4·s·h/t FLOPs, backward 2.5× the forward (it recomputes the scores); megatron's unfused
  ``local`` attention as two batched GEMMs per head plus ``UNFUSED_SOFTMAX_PASSES`` passes over the
  a·s/t scores per token (scale-mask-softmax, dropout, their backward);
- memory-bound elementwise (``ELEMENTWISE_ELEMENTS``): two norms 2·2h/t_sp, two bias-dropout-add
  3h/t_sp each, the activation 2f/t (SwiGLU 3f/t), RoPE 2(h + gd)/t; backward twice the forward.
Recompute adds a forward of the layer (full) or of the attention core (selective).
The last pipeline stage adds the logit GEMM (h × V/t) and the cross entropy (the fp32 logits read
and written ``CROSS_ENTROPY_PASSES`` times); the first the embedding lookup.

Kernels are launched from the host: on a GPU the launches run ahead of the device, so a layer
takes the larger of its device time and its launch time (``launch_s_per_layer``); on a CPU the
two add (the host is the device).
"""

from __future__ import annotations

from dataclasses import dataclass

from gptforge.model.config import ModelConfig, default_ffn_hidden_size, num_query_groups
from gptforge.parallel.plan.clusters import ClusterShape

UNFUSED_SOFTMAX_PASSES = 20  # fwd: GEMM out, softmax r+w, dropout r+w, AV read; bwd ~2x that
CROSS_ENTROPY_PASSES = 6  # fp32 logits: cast write, softmax r+w, backward r+w, grad write


@dataclass(frozen=True)
class ChunkShape:
    """What sets a micro-batch's compute on one rank."""

    micro_batch_size: int
    tensor_model_parallel_size: int
    sequence_parallel: bool
    recompute: str  # none / selective / full
    activation_bytes: int  # 2 bf16/fp16, 4 fp32


def _gemm_s(cluster: ClusterShape, m: float, k: float, n: float, nbytes: int) -> float:
    flops = 2.0 * m * k * n
    moved = nbytes * (m * k + k * n + m * n)
    return max(flops / (cluster.peak_tflops * 1e12 * cluster.gemm_efficiency),
               moved / (cluster.memory_gbps * 1e9))


def _bytes_s(cluster: ClusterShape, nbytes: float) -> float:
    return nbytes / (cluster.memory_gbps * 1e9)


def _ffn_out(model: ModelConfig) -> int:
    return default_ffn_hidden_size(model) * (2 if model.activation == "swiglu" else 1)


def _layer_gemms_s(model: ModelConfig, c: ChunkShape, cluster: ClusterShape) -> float:
    """The four GEMMs' forward time of one layer."""
    h, t = model.hidden_size, c.tensor_model_parallel_size
    tokens = model.seq_length * c.micro_batch_size
    gd = num_query_groups(model) * (h // model.num_attention_heads)
    f, b = default_ffn_hidden_size(model), c.activation_bytes
    return (_gemm_s(cluster, tokens, h, (h + 2 * gd) / t, b) + _gemm_s(cluster, tokens, h / t, h, b)
            + _gemm_s(cluster, tokens, h, _ffn_out(model) / t, b)
            + _gemm_s(cluster, tokens, f / t, h, b))


def _attention_s(model: ModelConfig, c: ChunkShape, cluster: ClusterShape) -> tuple[float, float]:
    """(forward, backward) time of the attention core of one layer."""
    s, h, t = model.seq_length, model.hidden_size, c.tensor_model_parallel_size
    heads, d = model.num_attention_heads / t, h // model.num_attention_heads
    b = c.micro_batch_size
    if model.attention_backend == "local":
        per_head = 2 * _gemm_s(cluster, s, d, s, c.activation_bytes)  # QK^T and PV
        gemms = b * heads * per_head
        softmax = _bytes_s(cluster, b * heads * s * s * c.activation_bytes
                           * UNFUSED_SOFTMAX_PASSES)
        fwd = gemms + softmax / 3
        return fwd, 2 * gemms + 2 * softmax / 3
    flops = 4.0 * b * s * s * h / t / 2  # causal: half the scores
    fwd = flops / (cluster.peak_tflops * 1e12 * cluster.attention_efficiency)
    return fwd, 2.5 * fwd


def _elementwise_s(model: ModelConfig, c: ChunkShape, cluster: ClusterShape) -> float:
    """Forward time of a layer's memory-bound kernels."""
    h, t = model.hidden_size, c.tensor_model_parallel_size
    t_sp = t if c.sequence_parallel else 1
    gd = num_query_groups(model) * (h // model.num_attention_heads)
    f = default_ffn_hidden_size(model)
    act = (3 if model.activation == "swiglu" else 2) * f / t
    rope = 2 * (h + gd) / t if model.position_embedding_type == "rope" else 0
    elements = (2 * 2 + 2 * 3) * h / t_sp + act + rope
    return _bytes_s(cluster, elements * model.seq_length * c.micro_batch_size * c.activation_bytes)


def layer_s(model: ModelConfig, c: ChunkShape, cluster: ClusterShape) -> float:
    """Device time of one layer, forward + backward (+ recompute), one micro-batch."""
    gemm, elementwise = _layer_gemms_s(model, c, cluster), _elementwise_s(model, c, cluster)
    attn_fwd, attn_bwd = _attention_s(model, c, cluster)
    fwd = gemm + elementwise + attn_fwd
    total = fwd + 2 * gemm + 2 * elementwise + attn_bwd
    if c.recompute == "full":
        total += fwd
    elif c.recompute == "selective":
        total += attn_fwd
    return total


def logit_s(model: ModelConfig, c: ChunkShape, cluster: ClusterShape, padded_vocab: int) -> float:
    """The logit layer and the cross entropy, forward + backward, one micro-batch."""
    tokens, t = model.seq_length * c.micro_batch_size, c.tensor_model_parallel_size
    gemm = _gemm_s(cluster, tokens, model.hidden_size, padded_vocab / t, c.activation_bytes)
    loss = _bytes_s(cluster, tokens * padded_vocab / t * 4 * CROSS_ENTROPY_PASSES)
    return 3 * gemm + loss


def embedding_s(model: ModelConfig, c: ChunkShape, cluster: ClusterShape) -> float:
    """The embedding lookup and its gradient scatter, one micro-batch."""
    return _bytes_s(cluster, 4 * model.seq_length * c.micro_batch_size * model.hidden_size
                    * c.activation_bytes)


def with_launches(device_s: float, launch_s: float, cluster: ClusterShape) -> float:
    """A GPU overlaps launching with running; on a CPU the host does both in turn."""
    if cluster.device == "gpu":
        return max(device_s, launch_s)
    return device_s + launch_s
