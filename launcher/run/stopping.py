"""When the ranks agree on a stop signal: often enough to stop soon, rarely enough to cost nothing.

All ranks must stop after the same step, for the same signal, so after a step they agree (an
all-reduce on the control group). That costs ~0.8 ms on gloo; against a tiny model's 20 ms step
that is 4% (``bench/bench_stop_agreement.py``). So the ranks agree after every step at first,
measure what an agreement costs against a step, and from then on agree every K steps, K the
smallest that keeps the cost under ``BUDGET`` of the step time; K is the same on every rank (the
slowest rank's ratio decides), so they still agree at the same steps. A stop takes effect at most
K - 1 steps later; for models whose steps take more than ~0.1 s, K is 1.
"""

from __future__ import annotations

import math
import statistics
import time

from gptforge.common.log import get_logger

log = get_logger(__name__)
BUDGET = 0.01  # of a step's time
CALIBRATION_STEPS = 5  # agreements timed (after every step) before K is chosen


class StopAgreement:
    """``agree(step)`` after each step on every rank: the agreed stop signal (0: none)."""

    def __init__(self, ctx, stop):
        self.ctx, self.stop = ctx, stop
        self.every = 1
        self._step_s: list[float] = []
        self._agree_s: list[float] = []
        self._last = time.perf_counter()

    def agree(self, step: int) -> int:
        from gptforge.parallel.context import all_gather_objects, max_over_ranks

        now = time.perf_counter()
        step_s, self._last = now - self._last, now
        if step % self.every:
            return 0
        agreed = max_over_ranks(self.ctx, self.stop.signum or 0)
        self._last = time.perf_counter()
        if len(self._agree_s) < CALIBRATION_STEPS:
            self._step_s.append(step_s)
            self._agree_s.append(self._last - now)
            if len(self._agree_s) == CALIBRATION_STEPS and not agreed:
                ratio = statistics.median(self._agree_s) / max(statistics.median(self._step_s),
                                                               1e-9)
                ratio = max(all_gather_objects(self.ctx, ratio))
                self.every = max(1, math.ceil(ratio / BUDGET - 1e-9))
                if self.every > 1:
                    log.info(f"stop signals are agreed every {self.every} steps (an agreement "
                             f"costs {ratio:.1%} of a step)")
        return agreed
