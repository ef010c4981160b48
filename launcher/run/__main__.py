"""``python -m gptforge.launcher.run [--config FILE ...] [--section.key=value ...]``: one rank.

What torchrun, srun, the deepspeed launcher and ``gptforge train --nproc-per-node`` start on each
rank. A stop signal that arrives while the rank still imports torch and megatron is kept, not
fatal: it is recorded before anything else is imported. megatron-core's notes that Apex and
Transformer Engine are not installed (one set per rank) are silenced before it is imported, and
on CPU its JIT fuser is turned off (``parallel/megatron/startup.py``); the interpreter's last
garbage-collection passes are skipped at exit (``common/shutdown.py``).
"""

import sys

from gptforge.launcher.signals import record_early

record_early()

from gptforge.common.shutdown import collect_nothing_at_exit  # noqa: E402

collect_nothing_at_exit()

from gptforge.parallel.megatron.startup import before_megatron_import  # noqa: E402

before_megatron_import()

from gptforge.launcher.run.entry import main  # noqa: E402 (after record_early, on purpose)

sys.exit(main())
