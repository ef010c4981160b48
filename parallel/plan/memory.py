"""Per-rank memory of a layout: model states, activations, in-flight micro-batches, overheads.

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models", section 4): the tensors autograd keeps per layer and token, divided by TP
where the layer is split and by TP again where sequence parallelism splits the sequence. The
paper counts 34·s·b·h bytes per layer at 16 bits with dropout (16 h-sized tensors plus two masks);
the counts below are the tensors *our* layers keep (megatron's local layers, our SDPA core
attention and our torch norm), read off autograd's saved tensors on CPU:

per token and layer, in elements (h hidden, d head dim, g query groups, f ffn width, t TP,
t_sp = t with sequence parallelism else 1):
- norms: input and output of each of the two, 2·2·h / t_sp (RMSNorm: torch's composite also
  keeps the normalised input, 2·3·h / t_sp); the output is what the next linear layer keeps
  (under SP its sequence shard; it re-gathers in backward);
- attention: the fused QKV output (h + 2·g·d) / t, kept whole by the q/k/v views SDPA saves; with
  RoPE the rotated q and k (h + g·d) / t; the attention output h / t (SDPA's output is the
  projection's input). Flash-style kernels keep no s×s scores; megatron's unfused ``local``
  attention adds the softmax output a·s / t (and with attention dropout its mask and output);
- MLP: GeLU input and output 2·f / t; SwiGLU the fc1 output 2·f, its gate and up halves'
  products 2·f and the fc2 input f, so 5·f / t;
- dropout masks, one byte per element, when hidden_dropout > 0: 2·h / t_sp;
- RoPE's cos/sin tables: 4·s·d per layer and micro-batch.

Recompute: ``selective`` recomputes the core attention (drops the s×s terms of ``local``;
nothing for SDPA), ``full`` keeps only each layer's input (h / t_sp per token) plus one layer's
full set while it is recomputed in backward.

Per micro-batch the last chunk adds the final norm and the cross entropy's fp32 softmax
(s·b·V / t · 4 bytes, megatron casts the logits to fp32); a pipeline stage keeps each in-flight
micro-batch's output tensor (megatron's ``deallocate_pipeline_outputs`` is off). In flight on
pipeline rank r of p with m micro-batches: none (p = 1): one; 1F1B: min(p - r, m); interleaved
with v chunks: min(2·(p - r - 1) + (v - 1)·p + 1, m·v) chunk-micro-batches of L / (p·v) layers
(megatron's warmup counts), i.e. L·(1 + (p - 1)/(p·v)) layers' worth on rank 0 (the paper's
interleaving factor).

The step's transient peak beyond the stored activations (``working``) is the largest of three
moments: the cross entropy's forward (half-precision logits alive next to their fp32 copy), the
start of the backward on the last stage (the logit layer's weight gradient, V·h / t in the
parameter dtype, which megatron's DDP adds into its grad buffer and frees, and the gradient of
the logit layer's input), and a layer's backward (the two s·b·f / t activation gradients through
the MLP, plus the recomputed layer under full recompute), by when the micro-batch's logits and
final norm have been freed. The optimizer step needs less: the activations are gone by then.
"""

from __future__ import annotations

from dataclasses import dataclass

from gptforge.model.config import ModelConfig, default_ffn_hidden_size, num_query_groups

FP32_BYTES = 4


@dataclass(frozen=True)
class ActivationShape:
    """What sets activation memory, besides the model: the micro-batch and the layout."""

    seq_length: int
    micro_batch_size: int
    tensor_model_parallel_size: int
    sequence_parallel: bool
    recompute: str  # none / selective / full
    activation_bytes: int  # 4 fp32, 2 bf16/fp16
    attention_backend: str  # sdpa / te (flash-style) or local (unfused)

    @property
    def tokens(self) -> int:
        return self.seq_length * self.micro_batch_size

    @property
    def sp_divisor(self) -> int:
        return self.tensor_model_parallel_size if self.sequence_parallel else 1


def _norm_tensors(model: ModelConfig) -> int:
    """h-sized tensors one norm keeps: input and output (RMSNorm also the normalised input)."""
    return 3 if model.normalization == "RMSNorm" else 2


def _head_dim(model: ModelConfig) -> int:
    return model.hidden_size // model.num_attention_heads


def layer_activation_bytes(model: ModelConfig, a: ActivationShape) -> int:
    """Bytes one layer keeps for backward for one micro-batch, without recompute."""
    h, t, d = model.hidden_size, a.tensor_model_parallel_size, _head_dim(model)
    gd = num_query_groups(model) * d
    ffn = default_ffn_hidden_size(model)
    rope = model.position_embedding_type == "rope"
    norms = 2 * _norm_tensors(model) * h / a.sp_divisor
    attention = ((h + 2 * gd) + (h + gd if rope else 0) + h) / t
    mlp = (5 if model.activation == "swiglu" else 2) * ffn / t
    per_token = (norms + attention + mlp) * a.activation_bytes
    if model.hidden_dropout > 0:
        per_token += 2 * h / a.sp_divisor  # masks, one byte per element
    if a.attention_backend == "local" and a.recompute == "none":
        scores = model.num_attention_heads * a.seq_length / t
        per_token += scores * a.activation_bytes
        if model.attention_dropout > 0:
            per_token += scores * (1 + a.activation_bytes)
    tables = 4 * a.seq_length * d * a.activation_bytes if rope else 0
    return int(per_token * a.tokens + tables)


def stored_layer_bytes(model: ModelConfig, a: ActivationShape) -> int:
    """What one layer keeps between its forward and backward (after recompute)."""
    if a.recompute == "full":
        return int(a.tokens * model.hidden_size / a.sp_divisor * a.activation_bytes)
    return layer_activation_bytes(model, a)


def output_activation_bytes(model: ModelConfig, a: ActivationShape, padded_vocab_size: int) -> int:
    """Final norm and the cross entropy's fp32 softmax, one micro-batch (last chunk)."""
    t = a.tensor_model_parallel_size
    norm = _norm_tensors(model) * model.hidden_size / a.sp_divisor * a.activation_bytes
    logits = padded_vocab_size / t * FP32_BYTES
    return int(a.tokens * (norm + logits))


def stage_output_bytes(model: ModelConfig, a: ActivationShape) -> int:
    """A chunk's output tensor that the pipeline schedule keeps until the backward."""
    return int(a.tokens * model.hidden_size / a.sp_divisor * a.activation_bytes)


def in_flight_chunks(*, pipeline_rank: int, pp: int, vpp: int | None, num_microbatches: int) -> int:
    """Chunk-micro-batches whose activations rank ``pipeline_rank`` holds at once (megatron's
    warmup count + 1, capped by the total)."""
    if pp == 1:
        return 1
    v = vpp or 1
    if v == 1:
        return min(pp - pipeline_rank, num_microbatches)
    warmup = 2 * (pp - pipeline_rank - 1) + (v - 1) * pp
    return min(warmup + 1, num_microbatches * v)


@dataclass(frozen=True)
class ActivationMemory:
    stored: int  # what the in-flight micro-batches keep
    working: int  # the backward pass's transient peak beyond it


def rank_activation_memory(model: ModelConfig, a: ActivationShape, *, pipeline_rank: int, pp: int,
                           vpp: int | None, num_microbatches: int, padded_vocab_size: int,
                           param_bytes: int) -> ActivationMemory:
    """Activation memory of pipeline rank ``pipeline_rank``: its in-flight micro-batches' stored
    tensors and the step's transient peak on top."""
    v = vpp or 1
    layers_per_chunk = model.num_layers // (pp * v)
    chunks = in_flight_chunks(pipeline_rank=pipeline_rank, pp=pp, vpp=vpp,
                              num_microbatches=num_microbatches)
    holds_output = pipeline_rank == pp - 1
    stored = chunks * layers_per_chunk * stored_layer_bytes(model, a)
    if pp > 1:
        # every in-flight chunk output except the model's last (its consumer is the loss)
        outputs = chunks - (1 if holds_output else 0)
        stored += outputs * stage_output_bytes(model, a)
    if holds_output:
        stored += output_activation_bytes(model, a, padded_vocab_size)
    return ActivationMemory(stored=stored, working=backward_working_bytes(
        model, a, holds_output=holds_output, padded_vocab_size=padded_vocab_size,
        param_bytes=param_bytes))


def backward_working_bytes(model: ModelConfig, a: ActivationShape, *, holds_output: bool,
                           padded_vocab_size: int, param_bytes: int) -> int:
    """The step's transient peak above the stored activations: the largest of three moments.

    - the cross entropy's forward (last stage): megatron casts the logits to fp32 while the
      half-precision logits are still referenced (nothing extra in fp32, where the cast is a no-op);
    - the start of the backward (last stage): the logit layer's weight gradient and the gradient of
      its input, with everything still stored;
    - a layer's backward: the MLP's two activation gradients (under full recompute also the layer's
      recomputed activations), when the micro-batch's logits and final norm are already freed.
    """
    t = a.tensor_model_parallel_size
    output = forward_end = backward_start = 0
    if holds_output:
        output = output_activation_bytes(model, a, padded_vocab_size)
        if a.activation_bytes != FP32_BYTES:
            forward_end = a.tokens * padded_vocab_size // t * a.activation_bytes
        backward_start = (padded_vocab_size * model.hidden_size // t * param_bytes
                          + a.tokens * model.hidden_size * a.activation_bytes)
    ffn = default_ffn_hidden_size(model) * (2 if model.activation == "swiglu" else 1)
    in_layer = int(2 * a.tokens * ffn / t * a.activation_bytes) - output
    if a.recompute == "full":
        in_layer += layer_activation_bytes(model, a)
    return max(forward_end, backward_start, in_layer, 0)
