"""Once per process, before megatron-core is first imported (the CLI, each rank).

megatron-core's fallback notes (Apex, Transformer Engine absent) are silenced, and where CUDA is
absent its JIT fuser is turned off. ``megatron.core.jit`` binds ``jit_fuser = torch.compile``;
some 40 functions of its fusion, activation and MoE modules are decorated with it as those
modules are imported, and the first decoration imports torch._dynamo and inductor: 1.5 s of
every process's start on CPU (torch + megatron-core's imports 3.8 s → 2.3 s, median of 5 in
``bench/bench_startup.py``).
No such function runs in a gptforge model: every megatron fusion is off (``model/config.py``).
megatron's own ``disable_jit_fuser()`` makes later decorations plain functions; it is called the
moment ``megatron.core.jit`` has run, before any decorated module imports its ``jit_fuser``.
With CUDA present megatron is imported as it is (its fusions are the GPU's business).
"""

from __future__ import annotations

import importlib.abc
import sys

from gptforge.common.log import quiet_fallback_warnings
from gptforge.common.patching import TESTED, Patches

JIT_MODULE = "megatron.core.jit"
# Read, not replaced: an upgrade that drops it costs start-up time only; the unit test of every
# patch target (tests/unit/test_patches.py) says so first.
UPSTREAM = Patches("start-up", "megatron-core", TESTED["megatron-core"])
UPSTREAM.add("JIT fuser off", f"{JIT_MODULE}:disable_jit_fuser")


def before_megatron_import() -> None:
    """Call before anything imports megatron (idempotent; too late once it is imported)."""
    quiet_fallback_warnings()
    if JIT_MODULE not in sys.modules and not any(isinstance(f, _JitFuserOff)
                                                 for f in sys.meta_path):
        sys.meta_path.insert(0, _JitFuserOff())


class _JitFuserOff(importlib.abc.MetaPathFinder):
    """Finds ``megatron.core.jit`` through the other finders and runs it through ``_Loader``."""

    def find_spec(self, fullname, path, target=None):
        if fullname != JIT_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                spec.loader = _Loader(spec.loader)
                return spec
        return None


class _Loader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        import torch

        disable = getattr(module, "disable_jit_fuser", None)
        if disable is not None and not torch.cuda.is_available():
            disable()

    def __getattr__(self, name):  # get_source, get_filename...: the real loader's
        return getattr(self.loader, name)
