"""Generation through a pipeline: this rank's model chunks run as one model, at any TP/PP/VPP.

``model/generate.py`` drives decoding with a runner (``device``, ``decode_layout``,
``forward_fn``); ``Stages`` is that runner for a rank of a pipelined model. A forward call runs
every (virtual chunk, stage) pair in pipeline order, (0, 0), (0, 1), ... (1, 0), ...: the rank
of the stage runs its chunk on the hidden states it receives from the pair before (a
point-to-point recv; the first pair embeds the tokens) and sends its output to the pair after.
The last pair's last-position logits are broadcast to every stage, so that every rank samples
the same token from the same logits with the same seed and all stay in step. Tensor parallelism
needs nothing more: megatron gathers the logits over the TP ranks (``runtime_gather_output``).
Each chunk keeps its own KV cache.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from gptforge.model.decode_linears import decode_layout
from gptforge.model.generate import Window, advance, new_cache


def runner(ctx, chunks: list[torch.nn.Module], hidden_size: int, padded_vocab_size: int):
    """What ``generate_batch`` runs on this rank: the one model (TP shards included: megatron
    gathers their logits), or this rank's pipeline stages. ``chunks``: unwrapped GPTModels."""
    from gptforge.model.generate import OneModel

    if len(chunks) == 1 and ctx.pp_size == 1:
        return OneModel(chunks[0])
    return Stages(ctx, chunks, hidden_size, padded_vocab_size)


class Stages:
    def __init__(self, ctx, chunks: list[torch.nn.Module], hidden_size: int,
                 padded_vocab_size: int):
        from megatron.core import parallel_state as ps

        self.ctx, self.chunks = ctx, chunks
        self.hidden_size, self.vocab = hidden_size, padded_vocab_size
        self.group = ps.get_pipeline_model_parallel_group()
        self.prev = ps.get_pipeline_model_parallel_prev_rank()
        self.next = ps.get_pipeline_model_parallel_next_rank()
        self.last = ps.get_pipeline_model_parallel_last_rank()
        self.dtype = next(chunks[0].parameters()).dtype

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    def decode_layout(self):
        stack = contextlib.ExitStack()
        for chunk in self.chunks:
            stack.enter_context(decode_layout(chunk))
        return stack

    def forward_fn(self, batch: int, total: int, kv_cache: bool):
        for chunk in self.chunks:
            chunk.eval()
        caches = [new_cache(batch, total, kv_cache) for _ in self.chunks]
        pp, stage, chunks = self.ctx.pp_size, self.ctx.pp_rank, len(self.chunks)

        def forward(tokens: torch.Tensor, start: int, end: int) -> torch.Tensor:
            w = Window(tokens, start, end, kv_cache)
            shape = (w.tokens.shape[1], batch, self.hidden_size)  # megatron's [s, b, h]
            out = None
            for v, (chunk, cache) in enumerate(zip(self.chunks, caches)):
                if v > 0 or stage > 0:  # the pair before this one is on the previous rank
                    hidden = torch.empty(shape, dtype=self.dtype, device=self.device)
                    dist.recv(hidden, src=self.prev)
                    chunk.set_input_tensor(hidden)
                out = chunk(w.tokens, w.positions, None, inference_context=cache,
                            runtime_gather_output=True)
                advance(cache, start, end)
                if v < chunks - 1 or stage < pp - 1:  # the pair after is on the next rank
                    dist.send(out.contiguous(), dst=self.next)
            logits = out[:, -1, :].float().contiguous() if stage == pp - 1 else \
                torch.empty(batch, self.vocab, dtype=torch.float32, device=self.device)
            if pp > 1:
                dist.broadcast(logits, src=self.last, group=self.group)
            return logits

        return forward
