"""``python -m tests.integration.paced_rank PACE_FILE [config arguments]``: one rank of
``gptforge train`` that sleeps after every step as many seconds as PACE_FILE then holds (through
the rank entry's ``at_point`` callback), so that a test can lose or add a node at a step of its
choosing on a machine where a tiny model's step takes milliseconds, and let the run finish
unpaced once it is done with it (``0``). Nothing else differs from ``python -m
gptforge.launcher.run``: the losses are those of an unpaced run."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from gptforge.launcher.signals import record_early


def main() -> int:
    record_early()
    from gptforge.common.shutdown import collect_nothing_at_exit

    collect_nothing_at_exit()
    pace_file = Path(sys.argv[1])

    def at_point(point: str, step: int) -> None:
        if point == "after_step":
            time.sleep(float(pace_file.read_text()))

    from gptforge.launcher.run.entry import main as rank_main
    from gptforge.parallel.megatron.startup import before_megatron_import

    before_megatron_import()
    return rank_main(sys.argv[2:], at_point=at_point)


if __name__ == "__main__":
    sys.exit(main())
