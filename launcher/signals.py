"""Stop requests on a rank: SIGTERM, SIGINT and SIGUSR1 ask the run to stop at a step boundary.

The handler only records the signal; the trainer asks ``StopRequest.requested`` after each step,
and the ranks agree (a collective in ``gptforge.parallel.context.max_over_ranks``) so that all of
them stop after the same step, for the same signal. A second signal while no checkpoint is being
written ends the process at once; during a save it is noted and the save finishes (a save is never
left half-committed).
"""

from __future__ import annotations

import os
import signal
import sys
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopRequest:
    def __init__(self, announce: bool = True):
        self.signum: int | None = None
        self.count = 0
        self.announce = announce
        self._saving = False
        self._adopted = False  # signum came from another rank; none arrived here yet
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def adopt(self, signum: int) -> None:
        """Stop for ``signum``, which reached another rank: this rank's own copy of it (scancel
        --full, a launcher forwarding late) then counts as the first signal, not a second."""
        if self.signum is None:
            self.signum, self._adopted = signum, True

    def install(self) -> "StopRequest":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.count += 1
        if self._adopted and signum == self.signum:
            self._adopted = False  # the same stop, arriving here late
            return
        if self.signum is None:
            self.signum = signum
            if self.announce:
                print(f"[gptforge] {signal.Signals(signum).name}: stopping after this step "
                      f"(again to stop at once)", file=sys.stderr, flush=True)
            return
        if self._saving:
            if self.announce:
                print("[gptforge] a checkpoint is being written; it finishes first",
                      file=sys.stderr, flush=True)
            return
        os._exit(128 + signum)

    @contextmanager
    def saving(self):
        """Within this block a second signal does not end the process."""
        self._saving = True
        try:
            yield
        finally:
            self._saving = False
