"""The engine's own paths on CPU: fused AdamW, no TorchFunctionMode inside a training step, and
a checkpoint writer process that dies failing the save instead of hanging it."""

from __future__ import annotations

import pytest
import torch

from gptforge.launcher.config import load_config, validate
from gptforge.parallel.megatron import cpu_compat
from gptforge.parallel.context import destroy_parallel, init_parallel
from tests.conftest import TINY

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path only")


@pytest.fixture()
def engine():
    from gptforge.launcher.run.build import build_batches, build_engine
    from gptforge.parallel.seeding import set_seed

    cfg = load_config([TINY], ["--optim.clip_grad=0.05"])  # small enough to clip every step
    layout = validate(cfg, 1)
    ctx = init_parallel(cfg.parallel)
    try:
        set_seed(cfg.train.seed, ctx.pp_rank)
        engine = build_engine(cfg, layout, ctx)
        batches = iter(build_batches(cfg, layout, ctx, "train"))
        yield engine, [next(batches) for _ in range(layout.num_microbatches)]
    finally:
        destroy_parallel()


@pytest.fixture()
def fused_calls(monkeypatch) -> list:
    """One entry per call of torch's fused AdamW kernel from here on."""
    calls, kernel = [], torch._fused_adamw_
    monkeypatch.setattr(torch, "_fused_adamw_",
                        lambda *a, **k: (calls.append(1), kernel(*a, **k))[1])
    return calls


def test_clip_equals_megatrons_bitwise():
    from megatron.core.optimizer import clip_grads

    cpu_compat.apply()
    torch.manual_seed(0)
    theirs = [torch.nn.Parameter(torch.randn(n)) for n in (7, 300, 4096)]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in theirs]
    for a, b in zip(theirs, ours):
        a.grad = torch.randn_like(a) * 3
        b.grad = a.grad.clone()
    before = [p.grad.clone() for p in ours]
    with cpu_compat.optimizer_context():
        clip_grads.clip_grad_by_total_norm_fp32(theirs, 1.0, 57.3)
    cpu_compat.clip_grad_by_total_norm_cpu(ours, 1.0, 57.3)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(theirs, ours))
    assert not any(torch.equal(a, b.grad) for a, b in zip(before, ours))  # it did clip
    cpu_compat.clip_grad_by_total_norm_cpu(ours, 1.0, 0.5)  # coefficient > 1: untouched
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(theirs, ours))
    half = torch.nn.Parameter(torch.zeros(3, dtype=torch.float16))
    half.grad = torch.ones(3, dtype=torch.float16)
    with pytest.raises(TypeError, match="fp32 main grads"):
        cpu_compat.clip_grad_by_total_norm_cpu([half], 1.0, 10.0)


def test_a_step_runs_fused_adamw_and_no_torch_function_mode(engine, monkeypatch, fused_calls):
    engine, micro_batches = engine
    inner = [o.optimizer for o in engine.optimizer.chained_optimizers]
    assert inner and all(g["fused"] for opt in inner for g in opt.param_groups)
    seen = []
    original = cpu_compat._CudaTypeNames.__torch_function__

    def counting(self, func, types, args=(), kwargs=None):
        seen.append(func)
        return original(self, func, types, args, kwargs)

    monkeypatch.setattr(cpu_compat._CudaTypeNames, "__torch_function__", counting)
    params = [p.detach().clone() for p in engine.model_chunks[0].parameters()]
    results = [engine.train_step(micro_batches) for _ in range(2)]
    assert seen == [] and len(fused_calls) >= 2  # the fused kernel did the updates
    assert all(r.grad_norm > 0.05 and not r.skipped for r in results)  # clipped, and stepped
    after = list(engine.model_chunks[0].parameters())
    assert any(not torch.equal(a, b) for a, b in zip(params, after))
    steps = {float(s["step"]) for opt in inner for s in opt.state.values()}
    assert steps == {2.0}  # fused Adam keeps its step as an fp32 tensor, counted once a step


def _bounded(seconds: int):
    """Fail (not hang) the test if the block takes longer than ``seconds``."""
    import signal

    def expire(signum, frame):
        raise TimeoutError(f"still waiting after {seconds} s: the save hangs")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    return previous


@pytest.mark.parametrize("death", ["psutil missing", "SIGKILL"])
def test_a_dead_checkpoint_writer_fails_the_save_instead_of_hanging(engine, tmp_path,
                                                                    monkeypatch, death):
    import os
    import signal

    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    engine, _ = engine
    if death == "psutil missing":  # upstream's _process_memory() raises outside its try
        monkeypatch.setattr(fa, "HAVE_PSUTIL", False)
    else:  # the OOM killer
        monkeypatch.setattr(fa.FileSystemWriterAsync, "write_preloaded_data",
                            staticmethod(lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)))
    previous = _bounded(60)
    try:
        with pytest.raises(Exception) as raised:
            engine.save(tmp_path / "ckpt")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    chain, err = [], raised.value
    while err is not None:
        chain.append(str(err))
        err = err.__cause__ or err.__context__
    text = " | ".join(chain)
    assert "checkpoint writer process 0 of" in text and "died" in text, text
    assert ("out of memory" in text) == (death == "SIGKILL"), text


def test_fused_survives_loading_a_checkpoint_saved_unfused(engine, tmp_path, fused_calls):
    """A checkpoint from before fused AdamW (param groups saved with fused=None): loading it
    restores those groups, and the engine must switch fused on again."""
    engine, micro_batches = engine
    engine.train_step(micro_batches)
    inner = [o.optimizer for o in engine.optimizer.chained_optimizers]
    for opt in inner:
        for group in opt.param_groups:
            group["fused"] = None
    engine.save(tmp_path / "old")
    engine.load(tmp_path / "old")
    assert all(g["fused"] for opt in inner for g in opt.param_groups)
    fused_calls.clear()  # the step before the save counted too
    assert not engine.train_step(micro_batches).skipped and fused_calls


# ---------------------------------------------------------------- start-up (startup.py)
_PROBE = """
import sys
{prepare}
import megatron.core.jit as jit
from megatron.core.fusions import fused_bias_gelu
compiled = getattr(fused_bias_gelu.bias_gelu, "_torchdynamo_orig_callable", None)
print(jit.jit_fuser is jit.noop_decorator, callable(compiled),
      "torch._inductor.compile_fx" in sys.modules)
"""


def _probe(prepare: str, probe: str = _PROBE) -> str:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-W", "ignore", "-c", probe.format(prepare=prepare)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.splitlines()[-1].split()  # (the last line: DeepSpeed prints too)


@pytest.mark.parametrize("prepare", [
    "from gptforge.parallel.megatron.startup import before_megatron_import\n"
    "before_megatron_import()",
    "import gptforge.launcher.cli.main",  # the CLI's import does it
])
def test_megatron_imported_after_the_start_up_step_has_no_jit_fuser_on_cpu(prepare):
    # megatron's decorated fusions are plain functions; torch.compile's inductor is never loaded
    assert _probe(prepare) == ["True", "False", "False"]


def test_megatron_imported_as_it_is_compiles_its_fusions():
    # the control: what the start-up step saves each process (bench/bench_startup.py)
    assert _probe("") == ["False", "True", "True"]


_DEEPSPEED_PROBE = """
import sys
{prepare}
import deepspeed.autotuning.autotuner as autotuner
loaded = "mlflow" in sys.modules
import mlflow
print(loaded, autotuner.has_mlflow, mlflow.MlflowClient.__name__)
"""


def test_deepspeed_is_imported_without_its_autotuners_mlflow_which_imports_after():
    # parallel/deepspeed/compat.py: 0.9 s of each DeepSpeed rank's start (bench_startup.py)
    prepare = "from gptforge.parallel.deepspeed import compat; compat.import_deepspeed()"
    assert _probe(prepare, _DEEPSPEED_PROBE) == ["False", "False", "MlflowClient"]
    assert _probe("import deepspeed", _DEEPSPEED_PROBE) == ["True", "True", "MlflowClient"]
