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
from contextlib import contextmanager

from gptforge.common.log import get_logger

log = get_logger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

# Signals that reached a rank before its StopRequest existed (``record_early``), and the
# handlers they replaced.
_early: list[int] = []
_early_previous: dict[int, object] = {}


def record_early() -> None:
    """From a rank's first moment (before torch and megatron import, seconds), a stop signal is
    recorded instead of killing the process; ``StopRequest.install`` then acts on it."""
    if _early_previous:
        return
    for sig in STOP_SIGNALS:
        _early_previous[sig] = signal.signal(sig, lambda signum, frame: _early.append(signum))


def _take_early() -> tuple[list[int], dict[int, object]]:
    signums, previous = list(_early), dict(_early_previous)
    _early.clear()
    _early_previous.clear()
    return signums, previous


class StopRequest:
    def __init__(self):
        self.signum: int | None = None
        self.count = 0
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
        early, early_previous = _take_early()
        for sig in STOP_SIGNALS:
            replaced = signal.signal(sig, self._handle)
            self._previous[sig] = early_previous.get(sig, replaced)
        for signum in early:  # arrived during start-up: as if they arrived now, in order
            self._handle(signum, None)
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
            log.warning(f"{signal.Signals(signum).name}: stopping after this step "
                        f"(again to stop at once)")
            return
        if self._saving:
            log.warning("a checkpoint is being written; it finishes first")
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
