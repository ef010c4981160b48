"""A process's end without the interpreter's last garbage-collection passes.

While CPython shuts down it collects garbage several times as it tears the modules down. A
process that has imported torch and megatron-core tracks millions of objects, and those passes
took 0.6-0.9 s at the end of every rank and every ``gptforge`` verb (``bench/bench_startup.py``).
``collect_nothing_at_exit()``, called first thing, registers an atexit handler that runs after
every other one (atexit runs them in reverse order) and moves every object into the collector's
permanent generation (``gc.freeze()``), which those passes skip. Every atexit handler still runs
and every file is still closed, and flushed, when its last reference goes. Only the finalizers
of objects caught in reference cycles at exit do not run, and CPython does not promise to run
them anyway.
"""

from __future__ import annotations

import atexit
import gc

_REGISTERED = False


def collect_nothing_at_exit() -> None:
    """Register the handler (idempotent); call it before anything else registers one."""
    global _REGISTERED
    if not _REGISTERED:
        atexit.register(gc.freeze)
        _REGISTERED = True
