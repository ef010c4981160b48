"""``python -m tests.integration.paced_rank SECONDS [config arguments]``: one rank of
``gptforge train`` that sleeps SECONDS after every step (through the rank entry's ``at_point``
callback), so that a test can lose or add a node at a step of its choosing on a machine where a
tiny model's step takes milliseconds. Nothing else differs from ``python -m
gptforge.launcher.run``: the losses are those of an unpaced run."""

from __future__ import annotations

import sys
import time

from gptforge.launcher.signals import record_early


def main() -> int:
    record_early()
    pause_s = float(sys.argv[1])

    def at_point(point: str, step: int) -> None:
        if point == "after_step":
            time.sleep(pause_s)

    from gptforge.launcher.run.entry import main as rank_main
    from gptforge.parallel.megatron.startup import before_megatron_import

    before_megatron_import()
    return rank_main(sys.argv[2:], at_point=at_point)


if __name__ == "__main__":
    sys.exit(main())
