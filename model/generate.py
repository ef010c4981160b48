"""Text generation from one full model (TP=1, PP=1) with megatron-core's static KV cache.

A batch of prompts of different lengths is run as megatron's static engine does it: the prefill
covers the shortest prompt, then every step feeds one token per row with the cache
(``StaticInferenceContext``); a row still inside its prompt takes its next prompt token instead
of a sampled one. So no padding or attention mask is needed and each row's tokens are exactly
those of a batch of one. Sampling follows transformers' order: repetition penalty, temperature,
top-k, top-p.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from gptforge.common.errors import ConfigError, UserError
from gptforge.model.decode_linears import decode_layout


@dataclass
class SampleConfig:
    """A text sample generated after training (needs data.tokenizer_model; any layout)."""

    prompt: str = ""
    """Text to continue after training; empty: no sample."""
    max_new_tokens: int = 48
    """Tokens to generate."""
    temperature: float = 0.8
    """Sampling temperature; 0: greedy."""
    top_k: int = 20
    """Sample among the k most likely tokens."""


def validate_sample(cfg: SampleConfig, *, tokenizer_model: str) -> None:
    """The sample section: a prompt needs a tokenizer to encode it."""
    if cfg.prompt and not tokenizer_model:
        raise ConfigError("sample.prompt", "needs data.tokenizer_model to encode the prompt")
    if cfg.max_new_tokens < 1:
        raise ConfigError("sample.max_new_tokens", f"must be >= 1, got {cfg.max_new_tokens}")


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: all tokens
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def check(self) -> None:
        for key, ok in (("temperature", self.temperature >= 0), ("top_k", self.top_k >= 0),
                        ("top_p", 0 < self.top_p <= 1),
                        ("repetition_penalty", self.repetition_penalty > 0)):
            if not ok:
                raise GenerationError(f"--{key.replace('_', '-')}: {getattr(self, key)} is out "
                                      f"of range")


class GenerationError(UserError):
    """A prompt or setting generation cannot use; names it."""


def _penalise(logits: torch.Tensor, seen: list[torch.Tensor], penalty: float) -> torch.Tensor:
    if penalty == 1.0:
        return logits
    logits = logits.clone()
    for row, ids in enumerate(seen):
        score = logits[row, ids]
        logits[row, ids] = torch.where(score < 0, score * penalty, score / penalty)
    return logits


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the fewest tokens reaching top_p
        logits = logits.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    return logits


def choose(logits: torch.Tensor, seen: list[torch.Tensor], sampling: Sampling,
           gen: torch.Generator) -> torch.Tensor:
    """Next token per row from ``[rows, vocab]`` float32 logits."""
    logits = _penalise(logits, seen, sampling.repetition_penalty)
    if sampling.temperature <= 0:
        return logits.argmax(-1)
    logits = _filter(logits / sampling.temperature, sampling.top_k, sampling.top_p)
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=gen).squeeze(-1)


SHOWN_CHARS = 60  # of a prompt's text in a message


def prompt_label(index: int, text: str | None = None) -> str:
    """How a message names a prompt: ``prompt 3``, with the start of its text where known
    (``prompt 3 ('word word ...' (10000 characters))``: a long prompt does not flood a line)."""
    if text is None:
        return f"prompt {index}"
    if len(text) <= SHOWN_CHARS:
        return f"prompt {index} ({text!r})"
    shown = repr(text[:SHOWN_CHARS])[:SHOWN_CHARS + 20]  # (escapes may lengthen it)
    return f"prompt {index} ({shown}... ({len(text)} characters))"


def check_prompts(prompts: list[list[int]], limits: list[int], context: int,
                  texts: list[str] | None = None) -> int:
    """Every prompt has tokens and fits the context with its limit of new tokens (a message
    names the prompt, with the start of its text from ``texts``); the longest total."""
    for i, (prompt, limit) in enumerate(zip(prompts, limits)):
        name = prompt_label(i, texts[i] if texts else None)
        if not prompt:
            raise GenerationError(f"{name}: empty (no tokens)")
        if len(prompt) + limit > context:
            raise GenerationError(
                f"{name}: {len(prompt)} tokens + --max-new-tokens {limit} exceed "
                f"the model's context of {context} tokens (model.seq_length)")
    return max(len(p) + limit for p, limit in zip(prompts, limits))


class Window:
    """The tokens a forward call sees: all of them (no cache) or those after ``start``."""

    def __init__(self, tokens: torch.Tensor, start: int, end: int, kv_cache: bool):
        first = start if kv_cache else 0
        self.tokens = tokens[:, first:end]
        self.positions = torch.arange(first, end, device=tokens.device).expand_as(self.tokens)


def new_cache(batch: int, total: int, kv_cache: bool):
    """megatron's static KV cache for ``batch`` rows of ``total`` tokens (None: no cache)."""
    if not kv_cache:
        return None
    from megatron.core.inference.contexts import StaticInferenceContext

    return StaticInferenceContext(batch, total)


def advance(cache, start: int, end: int) -> None:
    """After a forward call over ``start..end``: the cache holds it, the next call decodes."""
    if cache is not None:
        cache.increment_sequence_len_offset(end - start)
        cache.enable_decode_mode()


class OneModel:
    """A whole model in this process (TP=1, PP=1, or a TP shard whose logits are gathered):
    what ``generate_batch`` runs. A pipeline's stages run through
    ``gptforge.parallel.pipeline_generate.Stages``, which answers the same three calls."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def decode_layout(self):
        return decode_layout(self.model)

    def forward_fn(self, batch: int, total: int, kv_cache: bool):
        """The last-position logits of a call over tokens ``start..end`` (cache or not)."""
        self.model.eval()
        cache = new_cache(batch, total, kv_cache)

        def forward(tokens: torch.Tensor, start: int, end: int) -> torch.Tensor:
            w = Window(tokens, start, end, kv_cache)
            logits = self.model(w.tokens, w.positions, None, inference_context=cache,
                                runtime_gather_output=True)
            advance(cache, start, end)
            return logits[:, -1, :].float()

        return forward


@torch.inference_mode()
def generate_batch(model, prompts: list[list[int]], *, max_new_tokens: int | list[int],
                   vocab_size: int, context: int, sampling: Sampling = Sampling(),
                   seed: int = 0, eod_id: int | None = None, kv_cache: bool = True,
                   on_token: Callable[[int, int], None] | None = None,
                   on_done: Callable[[int], None] | None = None) -> list[list[int]]:
    """The generated ids of each prompt (without the prompt; stops after ``eod_id``, which is not
    returned). ``max_new_tokens``: one limit, or one per prompt (a row that is done is no longer
    waited for). ``on_token(row, id)`` is called for each generated token as it comes,
    ``on_done(row)`` once a row ends (EOD or its limit). ``model``: an ``nn.Module``
    (``OneModel``) or a runner with the same calls (a pipeline's stages); on several ranks every
    rank calls this together and gets the same ids."""
    sampling.check()
    runner = OneModel(model) if isinstance(model, torch.nn.Module) else model
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) \
        else list(max_new_tokens)
    if len(limits) != len(prompts):
        raise GenerationError(f"{len(limits)} max_new_tokens for {len(prompts)} prompts")
    total = check_prompts(prompts, limits, context)
    lengths = [len(p) for p in prompts]
    tokens = torch.zeros(len(prompts), total, dtype=torch.int64, device=runner.device)
    for row, prompt in enumerate(prompts):
        tokens[row, :len(prompt)] = torch.tensor(prompt, dtype=torch.int64)
    with runner.decode_layout():
        return _decode(tokens, lengths, runner.forward_fn(len(prompts), total, kv_cache),
                       limits=limits, vocab_size=vocab_size, sampling=sampling,
                       gen=torch.Generator(device="cpu").manual_seed(seed), eod_id=eod_id,
                       on_token=on_token or (lambda row, token: None),
                       on_done=on_done or (lambda row: None))


def _decode(tokens: torch.Tensor, lengths: list[int], forward, *, limits: list[int],
            vocab_size: int, sampling: Sampling, gen: torch.Generator, eod_id: int | None,
            on_token, on_done) -> list[list[int]]:
    total = tokens.shape[1]
    out: list[list[int]] = [[] for _ in lengths]
    done = [limit == 0 for limit in limits]
    for row in range(len(lengths)):
        if done[row]:
            on_done(row)
    pos = min(lengths)
    logits = forward(tokens, 0, pos)
    while not all(done) and pos < total:
        seen = [tokens[row, :pos].cpu() for row in range(len(lengths))] \
            if sampling.repetition_penalty != 1.0 else []
        picked = choose(logits[:, :vocab_size].cpu(), seen, sampling, gen)
        for row in range(len(lengths)):
            if pos < lengths[row] or done[row]:
                continue  # inside the prompt (its token stays) or finished (ignored)
            token = int(picked[row])
            tokens[row, pos] = token
            if token != eod_id:
                out[row].append(token)
                on_token(row, token)
            done[row] = token == eod_id or len(out[row]) >= limits[row]
            if done[row]:
                on_done(row)
        pos += 1
        if not all(done) and pos < total:
            logits = forward(tokens, pos - 1, pos)
    return out


def generate(model, prompt_ids: list[int], *, max_new_tokens: int,
             vocab_size: int, seq_length: int, temperature: float = 0.8, top_k: int = 20,
             seed: int = 0, eod_id: int | None = None) -> list[int]:
    """One prompt's continuation (the post-training sample): as many of ``max_new_tokens`` as
    the context leaves room for."""
    prompt = list(prompt_ids)[-(seq_length - 1):]
    room = min(max_new_tokens, seq_length - len(prompt))
    return generate_batch(model, [prompt], max_new_tokens=room, vocab_size=vocab_size,
                          context=seq_length, sampling=Sampling(temperature, top_k),
                          seed=seed, eod_id=eod_id)[0]
