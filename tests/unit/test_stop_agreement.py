"""The stop agreement costs at most 1% of a step: when an all-reduce is dear against the step,
the ranks agree every K steps (the same K on every rank), and a stop is agreed at the next one."""

from __future__ import annotations

import types

from gptforge.launcher.run import stopping


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _agreement(monkeypatch, agree_s: float, gathered_ratio=None):
    clock = Clock()
    calls = []

    def max_over_ranks(ctx, value):
        calls.append(value)
        clock.now += agree_s
        return value

    import gptforge.parallel.context as pc

    monkeypatch.setattr(stopping.time, "perf_counter", clock)
    monkeypatch.setattr(pc, "max_over_ranks", max_over_ranks)
    monkeypatch.setattr(pc, "all_gather_objects",
                        lambda ctx, obj: [obj] if gathered_ratio is None else [obj, gathered_ratio])
    stop = types.SimpleNamespace(signum=None)
    return stopping.StopAgreement(ctx=None, stop=stop), clock, calls, stop


def test_a_dear_agreement_is_made_every_k_steps_and_still_stops(monkeypatch):
    agreement, clock, calls, stop = _agreement(monkeypatch, agree_s=0.001)
    for step in range(1, 21):
        clock.now += 0.020  # a 20 ms step; an agreement costs 1 ms: 5% -> every 5 steps
        assert agreement.agree(step) == 0
    assert agreement.every == 5
    assert len(calls) == 5 + 3  # steps 1-5 (calibration), then 10, 15, 20
    stop.signum = 10  # SIGUSR1 arrives during step 21
    agreed = [agreement.agree(step) for step in range(21, 26)]
    assert agreed == [0, 0, 0, 0, 10]  # agreed after step 25, the next multiple of 5


def test_a_cheap_agreement_is_made_after_every_step(monkeypatch):
    agreement, clock, calls, _ = _agreement(monkeypatch, agree_s=0.0001)
    for step in range(1, 11):
        clock.now += 0.5
        agreement.agree(step)
    assert agreement.every == 1 and len(calls) == 10


def test_the_slowest_rank_decides_k_for_all(monkeypatch):
    agreement, clock, _, _ = _agreement(monkeypatch, agree_s=0.0001, gathered_ratio=0.031)
    for step in range(1, 6):
        clock.now += 0.5
        agreement.agree(step)
    assert agreement.every == 4  # ceil(3.1% / 1%)
