"""The request and response shapes of OpenAI's ``/v1/completions`` that ``gptforge serve`` takes.

A request is checked field by field before it is queued; a field it cannot honour is a 400 with
OpenAI's error body naming the field (``param``), never a crash. ``top_k`` is an extension (as in
vLLM); ``n``, ``best_of``, ``echo``, ``logprobs`` and ``suffix`` keep their defaults only.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from gptforge.model.generate import Sampling

DEFAULT_MAX_TOKENS = 16  # OpenAI's default


class RequestError(Exception):
    """A request field that cannot be served: a 400 naming it."""

    def __init__(self, param: str, message: str, status: int = 400):
        super().__init__(message)
        self.param, self.message, self.status = param, message, status

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": "invalid_request_error",
                          "param": self.param, "code": None}}


@dataclass
class CompletionRequest:
    prompt: str
    max_tokens: int = DEFAULT_MAX_TOKENS
    sampling: Sampling = field(default_factory=Sampling)
    seed: int | None = None  # None: any (unseeded requests share a batch's random seed)
    stop: tuple[str, ...] = ()
    stream: bool = False
    model: str = ""

    def batch_key(self) -> tuple:
        """Requests generated together: all greedy ones; sampled ones only with the same
        settings and seed (a row's draws would otherwise depend on its batch)."""
        if self.sampling.temperature <= 0:
            return ("greedy",)
        return ("sampled", self.sampling, self.seed)


def _number(body: dict, name: str, kind, default, low=None, high=None, low_open=False):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (kind is int and not float(value).is_integer()):
        raise RequestError(name, f"{name} must be a {'integer' if kind is int else 'number'}, "
                                 f"got {value!r}")
    value = kind(value)
    if low is not None and (value <= low if low_open else value < low):
        raise RequestError(name, f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise RequestError(name, f"{name} must be <= {high}, got {value}")
    return value


def _prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise RequestError("prompt", "prompt must be a string (or a list of one string)")
    if not prompt:
        raise RequestError("prompt", "prompt is empty")
    return prompt


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or \
            len(stops) > 4:
        raise RequestError("stop", "stop must be a non-empty string or a list of up to 4")
    return tuple(stops)


_UNSUPPORTED = {"n": 1, "best_of": 1, "echo": False, "logprobs": None, "suffix": None}


def parse_completion(body) -> CompletionRequest:
    """The request in ``body`` (parsed JSON), or RequestError naming the first bad field."""
    if not isinstance(body, dict):
        raise RequestError("body", "the request body must be a JSON object")
    for name, default in _UNSUPPORTED.items():
        if body.get(name, default) not in (default, None):
            raise RequestError(name, f"{name}={body[name]!r} is not supported (only "
                                     f"{default!r})")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("stream", f"stream must be true or false, got {stream!r}")
    sampling = Sampling(temperature=_number(body, "temperature", float, 1.0, 0.0, 2.0),
                        top_k=_number(body, "top_k", int, 0, 0),
                        top_p=_number(body, "top_p", float, 1.0, 0.0, 1.0, low_open=True))
    return CompletionRequest(prompt=_prompt(body),
                             max_tokens=_number(body, "max_tokens", int, DEFAULT_MAX_TOKENS, 1),
                             sampling=sampling, seed=_number(body, "seed", int, None),
                             stop=_stop(body), stream=stream, model=str(body.get("model", "")))


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex[:24]}"


def choice(text: str, finish_reason: str | None) -> dict:
    return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}


def completion(cid: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
               completion_tokens: int) -> dict:
    return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [choice(text, finish_reason)],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def chunk(cid: str, model: str, text: str, finish_reason: str | None) -> dict:
    return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [choice(text, finish_reason)]}
