"""``data.source: mock``: seeded, learnable token batches, identical for every parallel layout.

Global sample ``g`` is an arithmetic sequence ``(start + stride * t) % vocab`` with start and
stride drawn from a generator seeded by (seed, split, g): a model can learn it, so the loss falls.
Data-parallel rank r of D takes the r-th contiguous slice of every global batch, so the union over
ranks (and the loss) is the same whatever D is. With ``data.format=sft`` each sample's first p
tokens are a "prompt" without loss, p drawn from the same generator (0 to seq_length - 1): very
unequal response lengths, the same for every layout (token-weighting tests).
"""

from __future__ import annotations

import torch

from gptforge.data.state import StateError

_SPLIT_OFFSET = {"train": 0, "valid": 1 << 40}


class MockBatches:
    def __init__(self, *, split: str, seq_length: int, micro_batch_size: int,
                 global_batch_size: int, dp_rank: int, dp_size: int, seed: int, vocab_size: int,
                 sft: bool = False):
        self.seq_length, self.mbs, self.gbs = seq_length, micro_batch_size, global_batch_size
        self.dp_rank, self.dp_size, self.seed, self.vocab = dp_rank, dp_size, seed, vocab_size
        self.offset, self.sft = _SPLIT_OFFSET[split], sft
        self.per_rank = global_batch_size // dp_size
        self.consumed = 0  # samples this rank has produced

    def state_dict(self) -> dict:
        """The global position: samples of every rank consumed so far (any DP size resumes)."""
        steps, within = divmod(self.consumed, self.per_rank)
        if within:
            raise StateError(f"mock data: state taken mid global batch ({within} of "
                             f"{self.per_rank} samples of dp_rank {self.dp_rank})")
        return {"kind": "mock", "global_samples": steps * self.gbs}

    def load_state_dict(self, state: dict) -> None:
        steps, within = divmod(int(state["global_samples"]), self.gbs)
        if state.get("kind") != "mock" or within:
            raise StateError(f"mock data: cannot restore {state!r} with a global batch of "
                             f"{self.gbs}")
        self.consumed = steps * self.per_rank

    def _global_indices(self) -> range:
        step, within = divmod(self.consumed, self.per_rank)
        first = step * self.gbs + self.dp_rank * self.per_rank + within
        return range(first, first + self.mbs)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        params = torch.empty(self.mbs, 2, dtype=torch.int64)
        prompt = torch.zeros(self.mbs, 1, dtype=torch.int64)
        gen = torch.Generator()
        for row, g in enumerate(self._global_indices()):
            gen.manual_seed(self.seed * 1_000_003 + self.offset + g)
            params[row] = torch.randint(0, self.vocab, (2,), generator=gen)
            if self.sft:
                prompt[row] = torch.randint(0, self.seq_length, (1,), generator=gen)
        self.consumed += self.mbs
        start, stride = params[:, :1], params[:, 1:] % 7 + 1
        t = torch.arange(self.seq_length + 1, dtype=torch.int64)
        seq = (start + stride * t) % self.vocab
        tokens, labels = seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
        return {"tokens": tokens, "labels": labels,
                "loss_mask": (t[:-1] >= prompt).to(torch.float32),
                "position_ids": t[:-1].expand(self.mbs, -1).contiguous()}
