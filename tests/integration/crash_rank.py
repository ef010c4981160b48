"""``python -m tests.integration.crash_rank NAME:STEP [config arguments]``: one rank of
``gptforge train`` that SIGKILLs itself at a named point of step STEP (``after_step``,
``before_manifest``, ``before_rename``): no handler runs, nothing is cleaned up. The point is
injected through the rank entry's ``at_point`` callback, the seam the crash tests use."""

from __future__ import annotations

import os
import signal
import sys

from gptforge.launcher.signals import record_early


def main() -> int:
    record_early()
    name, step = sys.argv[1].rsplit(":", 1)

    def at_point(point: str, at_step: int) -> None:
        if (point, at_step) == (name, int(step)):
            os.kill(os.getpid(), signal.SIGKILL)

    from gptforge.launcher.run.entry import main as rank_main

    return rank_main(sys.argv[2:], at_point=at_point)


if __name__ == "__main__":
    sys.exit(main())
