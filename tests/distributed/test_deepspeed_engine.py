"""The deepspeed engine against the megatron engine, on real gloo ranks (CPU).

Both engines build the same GPTModel from the seed and read the same mock batches, so ZeRO 1/2/3
must reproduce megatron DDP's losses step for step (fp32); a resumed run must continue exactly;
a ZeRO-3 checkpoint converted by ``gptforge convert zero-to-fp32`` must evaluate the same in the
megatron engine; model-state memory per rank must follow ``parallel/plan/zero_memory.py``; and
``parallel/megatron/cpu_compat.py`` (megatron's CPU layer) must not change a DeepSpeed run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gptforge.parallel.context import free_port
from tests.conftest import ROOT, assert_close_losses, run_layouts

pytestmark = pytest.mark.slow  # several real processes

WORKER = ROOT / "tests" / "distributed" / "deepspeed_worker.py"
GPTFORGE = str(Path(sys.executable).parent / "gptforge")
COMMON = ["--train.train_iters=5", "--train.eval_interval=5"]
DS = ["--parallel.engine=deepspeed"]
REL = 1e-4  # the acceptance bound: relative, per step


def _losses(result) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in result["records"] if "loss" in r}


def _grad_norms(result) -> list[float]:
    return [r["grad_norm"] for r in result["records"] if "loss" in r]


def _val_loss(result) -> float:
    return next(r["val_loss"] for r in result["records"] if "val_loss" in r)


def run_cases(nproc: int, out_dir: Path, cases: list[dict], timeout: int = 600) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = out_dir / "cases.json"
    spec.write_text(json.dumps({"cases": cases}))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", str(WORKER), str(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads((out_dir / "results.json").read_text())


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One launch of 2 ranks: megatron DP=2, ZeRO 1/2/3 (ZeRO-1/3 save at step 3), both
    resumed from that save, and bf16 ZeRO-3 with optimizer offload, saved and resumed too."""
    out = tmp_path_factory.mktemp("ds2")
    at3 = "--checkpoint.load={dir}/%s/checkpoints/step-0000003"
    layouts = {
        "megatron_dp2": [],
        "zero1": [*DS, "--parallel.zero_stage=1", "--checkpoint.save_interval=3"],
        "zero2": [*DS, "--parallel.zero_stage=2"],
        "zero3": [*DS, "--parallel.zero_stage=3", "--checkpoint.save_interval=3"],
        "zero1_resumed": [*DS, "--parallel.zero_stage=1", at3 % "zero1"],
        "zero3_resumed": [*DS, "--parallel.zero_stage=3", at3 % "zero3"],
        "zero3_bf16_offload": [*DS, "--parallel.zero_stage=3", "--precision.dtype=bf16",
                               "--parallel.offload_optimizer=cpu", "--checkpoint.save_interval=3"],
        "zero3_bf16_offload_resumed": [*DS, "--parallel.zero_stage=3", "--precision.dtype=bf16",
                                       "--parallel.offload_optimizer=cpu",
                                       at3 % "zero3_bf16_offload"],
    }
    return out, run_layouts(2, out, layouts, COMMON)


def test_zero_stages_match_megatron_data_parallel(two_ranks):
    _, out = two_ranks
    want = _losses(out["megatron_dp2"])
    assert len(want) == 5 and want[5] < want[1]
    want_norms = _grad_norms(out["megatron_dp2"])
    for name in ("zero1", "zero2", "zero3"):
        got = _losses(out[name])
        assert_close_losses([got[s] for s in sorted(got)], [want[s] for s in sorted(want)],
                            rel=REL, name=name)
        # the gradient norm before clipping too: it sees what 5 losses barely show (e.g.
        # weight decay on biases and norms)
        assert_close_losses(_grad_norms(out[name]), want_norms, rel=REL, name=f"{name} norm")


def test_resume_at_step_3_continues_exactly(two_ranks):
    _, out = two_ranks
    for stage in ("zero1", "zero3", "zero3_bf16_offload"):  # bf16: megatron's Float16Module
        whole, resumed = _losses(out[stage]), _losses(out[f"{stage}_resumed"])
        assert sorted(resumed) == [4, 5], f"{stage}: resumed steps {sorted(resumed)}"
        assert_close_losses([resumed[4], resumed[5]], [whole[4], whole[5]], rel=1e-6,
                            name=f"{stage} resumed")


def test_bf16_zero3_with_optimizer_offload_trains(two_ranks):
    _, out = two_ranks
    losses = _losses(out["zero3_bf16_offload"])
    assert losses[5] < losses[1] - 0.02, losses
    # and stays near the fp32 run (bf16 weights): a broken offload path would not
    want = _losses(out["megatron_dp2"])
    assert all(abs(losses[s] - want[s]) < 1e-3 * want[s] for s in want), (losses, want)


def test_generated_deepspeed_config_is_written_to_the_run_dir(two_ranks):
    out_dir, _ = two_ranks
    config = json.loads((out_dir / "zero3" / "deepspeed_config.json").read_text())
    assert config["zero_optimization"]["stage"] == 3
    assert config["train_batch_size"] == 8  # tiny.yaml's global batch
    assert config["gradient_accumulation_steps"] == 2  # 8 / (micro 2 x DP 2)
    assert config["gradient_clipping"] == 1.0
    assert config["zero_force_ds_cpu_optimizer"] is False


def test_zero3_checkpoint_converted_to_fp32_evaluates_the_same(two_ranks, tmp_path):
    out_dir, out = two_ranks
    source = out_dir / "zero3" / "checkpoints"
    converted = tmp_path / "fp32"
    proc = subprocess.run([GPTFORGE, "convert", "zero-to-fp32", "--checkpoint", str(source),
                           "--out", str(converted)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((converted / "manifest.json").read_text())
    assert manifest["weights_only"] and manifest["layout"]["engine"] == "megatron"
    result = run_cases(1, tmp_path / "eval", [{
        "name": "eval", "kind": "eval_converted", "converted": str(converted),
        "deepspeed": str(source / "step-0000005"),
        "overrides": [*COMMON, f"--run.dir={tmp_path / 'eval_run'}"]}])["eval"]
    want = _val_loss(out["zero3"])
    assert abs(result["val_loss"] - want) <= 1e-5 * want, (result["val_loss"], want)
    assert result["start_step"] == 0  # weights only: a new schedule
    errors = result["errors"]
    assert "weights-only" in errors["load_optim"] and "load_optim=false" in errors["load_optim"]
    assert "deepspeed engine" in errors["deepspeed_into_megatron"]
    assert "zero-to-fp32" in errors["deepspeed_into_megatron"]


def test_tp2_zero1_matches_megatron_tp2_dp2(tmp_path):
    out = run_layouts(4, tmp_path, {
        "megatron_tp2_dp2": ["--parallel.tensor_model_parallel_size=2"],
        "tp2_zero1": [*DS, "--parallel.zero_stage=1", "--parallel.tensor_model_parallel_size=2"],
    }, ["--train.train_iters=5", "--train.eval_interval=0"])
    want, got = _losses(out["megatron_tp2_dp2"]), _losses(out["tp2_zero1"])
    assert_close_losses([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rel=REL,
                        name="tp2_zero1")
    assert_close_losses(_grad_norms(out["tp2_zero1"]), _grad_norms(out["megatron_tp2_dp2"]),
                        rel=REL, name="tp2_zero1 norm")


# ---------------------------------------------------------------- memory and cpu_compat

# ~5.3M parameters: 4 layers, hidden 256, vocab 8192 (tied), sequence 128. Two micro-batches per
# step and rank, so ZeRO-0/1 hold full gradients between them.
MEMORY_MODEL = ["--model.num_layers=4", "--model.hidden_size=256",
                "--model.num_attention_heads=4", "--model.seq_length=128",
                "--model.vocab_size=8192", "--train.micro_batch_size=1",
                "--train.global_batch_size=4", "--train.eval_interval=0", *DS]
MEMORY_CASES = {  # name: overrides
    "bf16_zero0": ["--precision.dtype=bf16", "--parallel.zero_stage=0"],
    "bf16_zero1": ["--precision.dtype=bf16", "--parallel.zero_stage=1"],
    "bf16_zero2": ["--precision.dtype=bf16", "--parallel.zero_stage=2"],
    "bf16_zero3": ["--precision.dtype=bf16", "--parallel.zero_stage=3"],
    "bf16_zero3_offload": ["--precision.dtype=bf16", "--parallel.zero_stage=3",
                           "--parallel.offload_optimizer=cpu", "--parallel.offload_param=cpu"],
    "fp32_zero0": ["--parallel.zero_stage=0"],
    "fp32_zero1": ["--parallel.zero_stage=1"],  # ZeRO keeps an fp32 master partition
    "fp32_zero2": ["--parallel.zero_stage=2"],
    "fp32_zero3": ["--parallel.zero_stage=3"],
}


@pytest.fixture(scope="module")
def memory(tmp_path_factory):
    out = tmp_path_factory.mktemp("dsmem")
    cases = [{"name": "cpu_compat", "kind": "cpu_compat"}]
    cases += [{"name": name, "kind": "memory",
               "overrides": [*MEMORY_MODEL, *extra, f"--run.dir={out / name}"]}
              for name, extra in MEMORY_CASES.items()]
    return run_cases(2, out, cases)


def test_cpu_compat_does_not_change_a_deepspeed_run(memory):
    """cpu_compat patches torch.cuda.current_device/synchronize and Tensor.cuda for megatron;
    DeepSpeed's CPU accelerator does not depend on them: the same losses, bit for bit."""
    result = memory["cpu_compat"]
    assert result["applied"] and not result["cuda_available"]
    assert result["accelerator"] == "cpu"
    assert result["before"] == result["after"]


@pytest.mark.parametrize("name", list(MEMORY_CASES))
def test_model_state_memory_per_rank_follows_the_formula(memory, name):
    result = memory[name]
    formula = result["formula"]
    # on CPU, "host" memory is this process's too; ZeRO-3's gathered layer ("live") exists only
    # while the layer runs, not at the points sampled
    expected = formula["total"] - formula["live"] + formula["host"]
    for rank, peak in enumerate(result["peak"]):
        ratio = peak["total"] / expected
        assert abs(ratio - 1) <= 0.15, (f"{name} rank {rank}: measured {peak} vs formula "
                                        f"{formula} ({ratio:.3f}x)")
