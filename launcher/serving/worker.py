"""The generation side of ``gptforge serve``: rank 0 batches the queued requests and every rank
generates each batch together (the other ranks follow rank 0's broadcasts).

Requests that can share a batch do (``CompletionRequest.batch_key``, and prompt + tokens within
the context); a batch waits at most ``WINDOW_S`` for more after its first request. Tokens reach
each request as they come (``Pending``: decoded text, held back while it could still be a stop
sequence or half a character), on the HTTP loop's thread. A batch that fails fails its requests
with a 500 and the worker goes on: the server never dies of a request.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
import time
from dataclasses import dataclass

from gptforge.common.log import get_logger
from gptforge.data.tokenizer import settled_text
from gptforge.launcher.serving.protocol import CompletionRequest
from gptforge.model.generate import Sampling, generate_batch

log = get_logger(__name__)
WINDOW_S = 0.005


@dataclass
class Job:
    """What every rank generates together (broadcast by rank 0)."""

    prompts: list[list[int]]
    max_new_tokens: int
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

    def finish(self) -> None:
        """After the batch: the rest of the text, then the end (EOD or the batch's end)."""
        if self.finish_reason is None:
            text = self.tok.decode(self.ids)
            stops = [text.find(s) for s in self.request.stop if s in text]
            text = text[:min(stops)] if stops else text
            if len(text) > self.sent:
                self._put(("delta", text[self.sent:]))
            self.finish_reason = "length" if len(self.ids) >= self.request.max_tokens else "stop"
        self._put(("done", self.finish_reason, len(self.prompt_ids), len(self.ids)))

    def fail(self, message: str) -> None:
        self._put(("error", message))


class Worker:
    """Rank 0's generation thread (``start``) fed by ``submit``."""

    def __init__(self, loaded, *, max_batch_size: int, eod_id: int | None):
        self.loaded, self.max_batch_size, self.eod_id = loaded, max_batch_size, eod_id
        self.runner = loaded.runner
        self.context = loaded.cfg.model.seq_length
        self.queue: queue.Queue = queue.Queue()
        self.waiting: collections.deque = collections.deque()
        self.thread = threading.Thread(target=self._run, name="gptforge-generate", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, pending: Pending) -> None:
        self.queue.put(pending)

    def stop(self) -> None:
        self.queue.put(None)
        self.thread.join()

    def _next(self, block: bool, timeout: float | None = None):
        if self.waiting:
            return self.waiting.popleft()
        try:
            return self.queue.get(block=block, timeout=timeout)
        except queue.Empty:
            return None

    def _batch(self, first: Pending) -> list[Pending]:
        batch, skipped = [first], []
        deadline = time.monotonic() + WINDOW_S
        while len(batch) < self.max_batch_size:
            item = self._next(block=True, timeout=max(0.0, deadline - time.monotonic()))
            if item is None:
                break
            if self._fits(batch, item):
                batch.append(item)
            else:
                skipped.append(item)
        self.waiting.extendleft(reversed(skipped))
        return batch

    def _fits(self, batch: list[Pending], item) -> bool:
        if item is None or item.request.batch_key() != batch[0].request.batch_key():
            return False
        rows = [*batch, item]
        longest = max(len(p.prompt_ids) for p in rows)
        return longest + max(p.request.max_tokens for p in rows) <= self.context

    def _run(self) -> None:
        with self.runner.decode_layout():
            while True:
                first = self._next(block=True)
                if first is None:
                    broadcast_job(self.loaded.ctx, None)
                    return
                self._generate(self._batch(first))

    def _generate(self, batch: list[Pending]) -> None:
        first = batch[0].request
        job = Job([p.prompt_ids for p in batch], max(p.request.max_tokens for p in batch),
                  first.sampling, first.seed, self.eod_id)
        try:
            broadcast_job(self.loaded.ctx, job)
            run_job(self.loaded, self.runner, job,
                    on_token=lambda row, token: batch[row].token(token))
        except Exception as err:  # noqa: BLE001 (a batch fails, never the server)
            log.warning(f"serve: a batch of {len(batch)} failed: {err}")
            for pending in batch:
                pending.fail(f"generation failed: {err}")
            return
        for pending in batch:
            pending.finish()


def run_job(loaded, runner, job: Job, on_token=None) -> list[list[int]]:
    return generate_batch(runner, job.prompts, max_new_tokens=job.max_new_tokens,
                          vocab_size=loaded.cfg.model.vocab_size,
                          context=loaded.cfg.model.seq_length, sampling=job.sampling,
                          seed=job.seed, eod_id=job.eod_id, on_token=on_token)


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
