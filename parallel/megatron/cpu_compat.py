"""Run megatron-core on a CPU-only torch. Applied by ``apply()`` only when CUDA is absent.

megatron-core 0.16 hard-codes CUDA in four ways; each is answered here
and nowhere else:

1. ``torch.cuda.current_device()`` as an allocation device → returns the CPU device;
   ``torch.cuda.synchronize`` → no-op; ``Tensor.cuda()`` → the tensor itself.
2. The CUDA RNG tracker → a tracker over CPU generator states (``CpuRNGStatesTracker``), installed
   under megatron's class name so that ``initialize_rng_tracker`` builds it.
3. Literal ``device="cuda"`` in a few modules (schedules, optimizer, grad scaler, clip_grads, grad
   buffers) → those modules see a ``torch`` whose factory functions map "cuda" to "cpu". This is a
   per-module name binding, so the model's forward/backward pays nothing for it.
4. ``p.type() == 'torch.cuda.FloatTensor'`` checks in the optimizers → ``optimizer_context()``, a
   TorchFunctionMode that answers with CUDA type names. The engine enters it around optimizer
   construction only. In a step the one such check is gradient clipping's; clipping runs as
   ``clip_grad_by_total_norm_cpu`` (the same scaling, the check made on the dtype), so a step
   runs no TorchFunctionMode at all.

Every assignment goes through ``common/patching.py`` (``TORCH_PATCHES``, ``PATCHES``): a target
an upgrade renamed stops the run with one line naming it, instead of silently patching nothing.
"""

from __future__ import annotations

import contextlib
import functools
import types

import torch
from torch.overrides import TorchFunctionMode

from gptforge.common.patching import TESTED, Patches

_APPLIED = False
_CPU = torch.device("cpu")

# Modules that allocate with a literal device="cuda".
_LITERAL_CUDA_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.tensor_parallel.data",
    "megatron.core.transformer.utils",
    "megatron.core.utils",  # local_multi_tensor_l2_norm (grad norm without apex)
)
_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "zeros_like", "ones_like",
              "empty_like", "full_like", "randn", "rand")


def needed() -> bool:
    return not torch.cuda.is_available()


def _cpu_device(device):
    if device is None:
        return None
    text = str(device) if not isinstance(device, int) else "cuda"
    return _CPU if text.startswith("cuda") else device


def _map_device(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    return wrapper


class _CpuTorch(types.ModuleType):
    """``torch`` as seen by a megatron module that writes device="cuda"."""

    def __init__(self):
        super().__init__("torch")
        for name in _FACTORIES:
            setattr(self, name, _map_device(getattr(torch, name)))

    def __getattr__(self, name):  # first use of any other name: bind it, later reads are plain
        value = getattr(torch, name)
        setattr(self, name, value)
        return value


class CpuRNGStatesTracker:
    """megatron's CudaRNGStatesTracker interface over CPU generator states."""

    def __init__(self, use_cudagraphable_rng=False, is_inference_rng_tracker=False):
        self.reset()
        self.use_cudagraphable_rng = False
        self.is_inference_rng_tracker = is_inference_rng_tracker

    def is_initialized(self):
        return self._is_initialized

    def reset(self):
        self._is_initialized = False
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise RuntimeError(f"seed {seed} already exists")
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


class _CudaTypeNames(TorchFunctionMode):
    """``t.type()`` answers 'torch.cuda.XTensor' for CPU tensors; device="cuda" → CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if ".cuda." not in name else name
        if "device" in kwargs:
            kwargs = {**kwargs, "device": _cpu_device(kwargs["device"])}
        return func(*args, **kwargs)


def optimizer_context():
    """Enter around megatron optimizer construction and step (no-op where CUDA exists)."""
    return _CudaTypeNames() if _APPLIED else contextlib.nullcontext()


def _tensor_cuda(self, *args, **kwargs):
    return self


def clip_grad_by_total_norm_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron's ``clip_grad_by_total_norm_fp32`` (optimizer/clip_grads.py:138) for CPU grads.

    The same in-place scaling by ``max_norm / (total_norm + 1e-6)`` when that is below 1
    (bitwise: megatron's apex-free path multiplies each fp32 grad by the same float). Its
    ``grad.type() == 'torch.cuda.FloatTensor'`` assertion becomes a dtype check.
    """
    from megatron.core.utils import to_local_if_dtensor

    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [to_local_if_dtensor(grad).detach() for param in parameters
             if (grad := getattr(param, attr, None)) is not None]
    allowed = (torch.float32, torch.bfloat16) if use_decoupled_grad else (torch.float32,)
    for grad in grads:
        if grad.dtype not in allowed:
            raise TypeError(f"gradient clipping expects fp32 main grads, got {grad.dtype}")
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


def _cpu_current_device():
    return _CPU


def _no_synchronize(*args, **kwargs) -> None:
    return None


def _cpu_rng_state(*args, **kwargs):
    return torch.get_rng_state()


def _set_cpu_rng_state(state, *args, **kwargs) -> None:
    torch.set_rng_state(state)


_RANDOM = "megatron.core.tensor_parallel.random"
# torch's CUDA entry points megatron calls, on a torch without CUDA (common/patching.py).
TORCH_PATCHES = Patches("CPU layer", "torch", TESTED["torch"])
TORCH_PATCHES.add("cuda device", "torch.cuda:current_device", _cpu_current_device)
TORCH_PATCHES.add("cuda synchronize", "torch.cuda:synchronize", _no_synchronize)
TORCH_PATCHES.add("Tensor.cuda", "torch:Tensor.cuda", _tensor_cuda, inherited=True)
# megatron's CUDA-only pieces; clipping's body is re-written (its source hash is checked).
PATCHES = Patches("CPU layer", "megatron-core", TESTED["megatron-core"])
PATCHES.add("rng tracker", f"{_RANDOM}:CudaRNGStatesTracker", CpuRNGStatesTracker)
PATCHES.add("rng state", f"{_RANDOM}:_get_cuda_rng_state", _cpu_rng_state)
PATCHES.add("set rng state", f"{_RANDOM}:_set_cuda_rng_state", _set_cpu_rng_state)
PATCHES.add("rng tracker init", f"{_RANDOM}:initialize_rng_tracker")
PATCHES.add("clip", "megatron.core.optimizer.optimizer:clip_grad_by_total_norm_fp32",
            clip_grad_by_total_norm_cpu, copied_sha256="8edb9da5365045a5")
_CPU_TORCH = _CpuTorch()
for _name in _LITERAL_CUDA_MODULES:
    PATCHES.add(f"device='cuda' in {_name}", f"{_name}:torch", _CPU_TORCH)


def apply() -> bool:
    """Install the compatibility layer if CUDA is absent (idempotent: each target checked, one
    line if one is missing); returns whether it is in place."""
    global _APPLIED
    if not needed():
        return False
    TORCH_PATCHES.install()
    PATCHES.install()
    if not _APPLIED:
        from megatron.core.tensor_parallel import random as mrandom

        mrandom.initialize_rng_tracker(force_reset=True)  # builds a CpuRNGStatesTracker now
    _APPLIED = True
    return True
