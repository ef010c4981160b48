"""``python -m tests.unit.prepare_crash N [data prepare arguments]``: ``gptforge data prepare``
in this process, ended abruptly (``os._exit(3)``, nothing cleaned up) right after its N-th
written document, through ``prepare``'s ``after_document`` callback: an interrupted run."""

from __future__ import annotations

import os
import sys

import gptforge.data.prepare as prep
from gptforge.launcher.cli.main import main as gptforge


def main() -> int:
    crash_after, argv = int(sys.argv[1]), sys.argv[2:]
    real = prep.prepare

    def crash(written: int) -> None:
        if written >= crash_after:
            os._exit(3)

    prep.prepare = lambda settings, **kw: real(settings, after_document=crash, **kw)
    return gptforge(["data", "prepare", *argv])


if __name__ == "__main__":
    sys.exit(main())
