"""How this project imports DeepSpeed: every ``deepspeed`` use in gptforge goes through
``import_deepspeed()``.

- Where CUDA is absent, DeepSpeed's CPU accelerator (``DS_ACCELERATOR=cpu``; it talks gloo) is
  chosen up front instead of being guessed with a warning.
- DeepSpeed's shared-memory all-reduce op is C++ compiled at ``init_distributed`` (50-85 s and
  ~2 GB of RAM on a fresh machine); only its inference all-reduce uses it, so it is not built.
- DeepSpeed's autotuner (gptforge does not run it) imports mlflow, and with it pandas, when
  ``deepspeed`` is imported: 0.9 s of every rank's start. ``deepspeed`` is imported with mlflow
  unimportable (the autotuner records ``has_mlflow = False``); mlflow imports as usual afterwards,
  where a run logs to it.
- DeepSpeed's INFO logging (config dumps at every initialize) and torch's deprecation warnings
  for the collectives DeepSpeed calls are off unless ``GPTFORGE_DEBUG`` is set.

``parallel/megatron/cpu_compat.py`` (megatron on a CPU-only torch) changes
``torch.cuda.current_device``, ``torch.cuda.synchronize`` and ``Tensor.cuda``; DeepSpeed's CPU
accelerator calls none of them, and tests/distributed/test_deepspeed_engine.py checks that a
DeepSpeed run is bitwise the same with and without that layer.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings

import torch

from gptforge.common.log import debug_enabled
from gptforge.common.patching import TESTED, Patches


def _no_shm_op() -> None:
    """DeepSpeed's shared-memory all-reduce op is not built (a 50-85 s C++ JIT build; only its
    inference all-reduce uses it)."""


# (The module, not the package attribute: ``deepspeed.comm.torch`` is torch itself.)
PATCHES = Patches("DeepSpeed compat", "deepspeed", TESTED["deepspeed"])
PATCHES.add("no shm op", "deepspeed.comm.torch:build_shm_op", _no_shm_op)


@contextlib.contextmanager
def _unimportable(name: str):
    """``import name`` raises ImportError inside (unless it is imported already)."""
    if name in sys.modules:
        yield
        return
    sys.modules[name] = None
    try:
        yield
    finally:
        if sys.modules.get(name, 0) is None:
            del sys.modules[name]


def import_deepspeed():
    """``import deepspeed`` configured as described above; idempotent."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with _unimportable("mlflow") if "deepspeed" not in sys.modules else contextlib.nullcontext():
        import deepspeed

    PATCHES.install()
    if not debug_enabled():
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", category=FutureWarning,
                                message=r".*torch\.distributed\..* is deprecated")
    return deepspeed
