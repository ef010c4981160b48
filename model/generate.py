"""Text generation from a trained GPT (one full model per rank: TP=1, PP=1), no KV cache yet."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SampleConfig:
    """A text sample generated after training (needs data.tokenizer_model; TP=1, PP=1)."""

    prompt: str = ""
    """Text to continue after training; empty: no sample."""
    max_new_tokens: int = 48
    """Tokens to generate."""
    temperature: float = 0.8
    """Sampling temperature; 0: greedy."""
    top_k: int = 20
    """Sample among the k most likely tokens."""


@torch.no_grad()
def generate(model: torch.nn.Module, prompt_ids: list[int], *, max_new_tokens: int,
             vocab_size: int, seq_length: int, temperature: float = 0.8, top_k: int = 20,
             seed: int = 0, eod_id: int | None = None) -> list[int]:
    """Sample continuation ids (temperature + top-k; temperature 0 is greedy)."""
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = list(prompt_ids)
    model.eval()
    for _ in range(max_new_tokens):
        window = ids[-seq_length:]
        tokens = torch.tensor([window], dtype=torch.int64, device=device)
        positions = torch.arange(len(window), device=device).unsqueeze(0)
        logits = model(tokens, positions, None)[0, -1, :vocab_size].float().cpu()
        if temperature <= 0:
            next_id = int(logits.argmax())
        else:
            top = torch.topk(logits / temperature, min(top_k, vocab_size))
            choice = torch.multinomial(torch.softmax(top.values, -1), 1, generator=gen)
            next_id = int(top.indices[choice])
        if eod_id is not None and next_id == eod_id:
            break
        ids.append(next_id)
    return ids[len(prompt_ids):]
