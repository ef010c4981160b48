"""The generation side of ``gptforge serve``: rank 0 batches the queued requests and every rank
generates each batch together (the other ranks follow rank 0's broadcasts).

Requests that can share a batch do (``CompletionRequest.batch_key``: greedy ones together,
sampled ones with the same settings and seed); a batch waits at most ``WINDOW_S`` for more after
its first request. Each row stops at its own max_tokens or EOD and is answered then (a stop
sequence answers at once, while the batch goes on). Batching is static: requests that come while
a batch runs wait for the next one. Tokens reach each request as they come (``Pending``:
decoded text, held back while it could still be a stop sequence or half a character), on the
HTTP loop's thread. A batch that fails fails its requests
with a 500 and the worker goes on: the server never dies of a request.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import random
import time
from dataclasses import dataclass

from gptforge.common.log import get_logger
from gptforge.data.tokenizer import settled_text
from gptforge.launcher.serving.protocol import CompletionRequest
from gptforge.model.generate import Sampling, generate_batch

log = get_logger(__name__)
WINDOW_S = 0.02


@dataclass
class Job:
    """What every rank generates together (broadcast by rank 0)."""

    prompts: list[list[int]]
    max_new_tokens: list[int]  # each row's own
    sampling: Sampling
    seed: int
    eod_id: int | None


class Pending:
    """One request on rank 0: its prompt ids, its stream of events to the HTTP handler."""

    def __init__(self, request: CompletionRequest, prompt_ids: list[int], tok,
                 loop: asyncio.AbstractEventLoop):
        self.request, self.prompt_ids, self.tok, self.loop = request, prompt_ids, tok, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.ids: list[int] = []
        self.sent = 0  # characters of the completion already sent
        self.finish_reason: str | None = None
        self.closed = False

    def _put(self, event: tuple) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def token(self, token: int) -> None:
        if self.finish_reason is not None:
            return  # stopped (a stop sequence, or max_tokens): the batch goes on without it
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        stops = [text.find(s) for s in self.request.stop if s in text]
        if stops:
            self.finish_reason = "stop"
            text = text[:min(stops)]
        elif len(self.ids) >= self.request.max_tokens:
            self.finish_reason = "length"
        else:  # what later tokens cannot change, less what may begin a stop sequence
            text = settled_text(self.tok, self.ids)
            hold = max([len(s) - 1 for s in self.request.stop] + [0])
            text = text[:len(text) - hold] if hold else text
        if len(text) > self.sent:
            self._put(("delta", text[self.sent:]))
            self.sent = len(text)
        if self.finish_reason is not None:
            self.finish()  # answered now, while the batch goes on

    def finish(self) -> None:
        """Once the row ends (EOD, max_tokens, a stop sequence): the rest of the text, then the
        end. Called again (the batch's end) it does nothing."""
        if self.closed:
            return
        self.closed = True
        if self.finish_reason is None:
            text = self.tok.decode(self.ids)
            stops = [text.find(s) for s in self.request.stop if s in text]
            text = text[:min(stops)] if stops else text
            if len(text) > self.sent:
                self._put(("delta", text[self.sent:]))
            self.finish_reason = "length" if len(self.ids) >= self.request.max_tokens else "stop"
        self._put(("done", self.finish_reason, len(self.prompt_ids), len(self.ids)))

    def fail(self, message: str, status: int = 500) -> None:
        if not self.closed:  # (one already answered keeps its answer)
            self.closed = True
            self._put(("error", message, status))


class Worker:
    """Rank 0's generation loop (``run``, on the main thread: torch spreads its operations over
    the CPU's cores only from there) fed by ``submit`` from the HTTP thread."""

    def __init__(self, loaded, *, max_batch_size: int, eod_id: int | None):
        self.loaded, self.max_batch_size, self.eod_id = loaded, max_batch_size, eod_id
        self.runner = loaded.runner
        self.batches = self.rows = 0  # generated so far (``/health`` shows them)
        self.queue: queue.SimpleQueue = queue.SimpleQueue()  # (put is safe in a signal handler)
        self.waiting: collections.deque = collections.deque()
        self.stopping = False

    def submit(self, pending: Pending) -> None:
        if self.stopping:
            pending.fail("the server is stopping", status=503)
        else:
            self.queue.put(pending)

    def stop(self) -> None:
        """End ``run`` after the batch in hand (callable from a signal handler)."""
        self.queue.put(None)

    def run(self) -> None:
        with self.runner.decode_layout():
            while (first := self._next(wait_s=None)) is not None:
                self._generate(self._batch(first))
        broadcast_job(self.loaded.ctx, None)  # the other ranks leave their loop
        for pending in self._left():
            pending.fail("the server is stopping", status=503)

    def _next(self, wait_s: float | None) -> Pending | None:
        """The next request (the skipped ones first); None: none within ``wait_s`` (None: as
        long as it takes), or the server is stopping."""
        if self.waiting and not self.stopping:
            return self.waiting.popleft()
        deadline = None if wait_s is None else time.monotonic() + wait_s
        while not self.stopping:
            left = 0.5 if deadline is None else deadline - time.monotonic()
            try:
                item = self.queue.get(timeout=max(0.0, min(left, 0.5)))
            except queue.Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    return None
                continue
            if item is not None:
                return item
            self.stopping = True
        return None

    def _left(self) -> list[Pending]:
        """The requests not generated when the server stops."""
        left = list(self.waiting)
        while not self.queue.empty():
            item = self.queue.get_nowait()
            if item is not None:
                left.append(item)
        return left

    def _batch(self, first: Pending) -> list[Pending]:
        batch, skipped = [first], []
        deadline = time.monotonic() + WINDOW_S
        while len(batch) < self.max_batch_size and not self.stopping:
            item = self._next(wait_s=max(0.0, deadline - time.monotonic()))
            if item is None:
                break
            (batch if self._fits(batch, item) else skipped).append(item)
        self.waiting.extendleft(reversed(skipped))
        return batch

    @staticmethod
    def _fits(batch: list[Pending], item) -> bool:
        """Each row fits the context on its own (checked on arrival): only the sampling must
        agree."""
        return item.request.batch_key() == batch[0].request.batch_key()

    def _generate(self, batch: list[Pending]) -> None:
        first = batch[0].request
        self.batches, self.rows = self.batches + 1, self.rows + len(batch)
        job = Job([p.prompt_ids for p in batch], [p.request.max_tokens for p in batch],
                  first.sampling, _seed(first.seed), self.eod_id)
        try:
            broadcast_job(self.loaded.ctx, job)
            run_job(self.loaded, self.runner, job,
                    on_token=lambda row, token: batch[row].token(token),
                    on_done=lambda row: batch[row].finish())
        except Exception as err:  # noqa: BLE001 (a batch fails, never the server)
            log.warning(f"serve: a batch of {len(batch)} failed: {err}")
            for pending in batch:
                pending.fail(f"generation failed: {err}")
            return
        for pending in batch:
            pending.finish()


def _seed(seed: int | None) -> int:
    """A request's seed, or a fresh one for unseeded requests (each call differs, as OpenAI's)."""
    return random.getrandbits(31) if seed is None else seed


def run_job(loaded, runner, job: Job, on_token=None, on_done=None) -> list[list[int]]:
    return generate_batch(runner, job.prompts, max_new_tokens=job.max_new_tokens,
                          vocab_size=loaded.cfg.model.vocab_size,
                          context=loaded.cfg.model.seq_length, sampling=job.sampling,
                          seed=job.seed, eod_id=job.eod_id, on_token=on_token, on_done=on_done)


def broadcast_job(ctx, job: Job | None) -> Job | None:
    """Rank 0's job to every rank (None: the server is ending)."""
    if ctx.world_size == 1:
        return job
    import torch.distributed as dist

    box = [job]
    dist.broadcast_object_list(box, src=0, group=ctx.control_group)
    return box[0]


def follow(loaded) -> None:
    """A rank other than 0: generate every batch rank 0 announces, until it says stop."""
    runner = loaded.runner
    with runner.decode_layout():
        while (job := broadcast_job(loaded.ctx, None)) is not None:
            try:
                run_job(loaded, runner, job)
            except Exception as err:  # noqa: BLE001 (rank 0 fails the batch's requests)
                log.error(f"serve: rank {loaded.ctx.rank}: a batch failed: {err}")
