"""Communication/compute overlap (parallel.overlap_grad_reduce, parallel.overlap_param_gather,
on by default) changes when the collectives run, not what a step computes: DP=2 with overlap on
equals overlap off step for step (losses and grad norms, fp32, within 1e-6) for megatron DDP,
megatron's distributed optimizer and DeepSpeed ZeRO-2 -- and the overlap is really on (the
built engines hold it; megatron's bucket reductions are issued asynchronously from inside the
backward and still in flight when the grads are finalized; the distributed optimizer's
all-gather leaves the optimizer step for the next forward).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gptforge.parallel.context import free_port
from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # several real processes

WORKER = ROOT / "tests" / "distributed" / "overlap_worker.py"
STEPS = 4
REL = 1e-6
CASES = {
    "ddp": [],
    "distopt": ["--parallel.use_distributed_optimizer=true"],
    "zero2": ["--parallel.engine=deepspeed", "--parallel.zero_stage=2"],
}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("overlap")
    spec = out / "cases.json"
    spec.write_text(json.dumps({"steps": STEPS, "cases": CASES}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
           f"--master-port={free_port()}", str(WORKER), str(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads((out / "results.json").read_text())


def _close(got: list[float], want: list[float], what: str) -> None:
    assert len(got) == len(want) == STEPS, (what, got, want)
    for step, (g, w) in enumerate(zip(got, want), start=1):
        assert abs(g - w) <= REL * abs(w), f"{what}, step {step}: {g} vs {w}"


@pytest.mark.parametrize("case", list(CASES))
def test_overlap_on_equals_overlap_off(results, case):
    off, on = results[case]["off"], results[case]["on"]
    _close(on["losses"], off["losses"], f"{case} loss")
    _close(on["grad_norms"], off["grad_norms"], f"{case} grad norm")
    assert off["losses"][-1] < off["losses"][0]


def _events(run: dict, call: str) -> list[dict]:
    return [e for e in run["events"] if e["call"] == call]


@pytest.mark.parametrize("case", ["ddp", "distopt"])
def test_megatron_reduces_gradients_during_the_backward(results, case):
    off, on = results[case]["off"], results[case]["on"]
    assert on["built"]["overlap_grad_reduce"] and not off["built"]["overlap_grad_reduce"]
    # off: one synchronous reduction per bucket group, after the backward (finalize_model_grads)
    starts = _events(off, "start_grad_sync")
    assert starts and not any(e["in_backward"] or e["is_async"] for e in starts)
    # on: from the second step (the first records which grads each bucket waits for), every
    # bucket's reduction is issued asynchronously by a backward hook, and is still in flight
    # when finalize_model_grads comes to wait for it
    for step in range(2, STEPS + 1):
        starts = [e for e in _events(on, "start_grad_sync") if e["step"] == step]
        finishes = [e for e in _events(on, "finish_grad_sync") if e["step"] == step]
        assert starts and all(e["in_backward"] and e["is_async"] for e in starts), starts
        assert len(finishes) == len(starts) and all(e["in_flight"] for e in finishes)


def test_distributed_optimizer_gathers_parameters_in_the_next_forward(results):
    off, on = results["distopt"]["off"], results["distopt"]["on"]
    assert on["built"]["overlap_param_gather"] and not off["built"]["overlap_param_gather"]
    gathers_off = _events(off, "start_param_sync")
    assert gathers_off and all(e["phase"] == "step_optimizer" and not e["is_async"]
                               for e in gathers_off)
    gathers_on = _events(on, "start_param_sync")
    assert {e["step"] for e in gathers_on} == set(range(1, STEPS + 1))
    assert all(e["phase"] == "run" and e["is_async"] for e in gathers_on), gathers_on


def test_deepspeed_overlap_comm_is_on(results):
    """ZeRO-2 reduces each bucket as it fills, from the backward's hooks (the worker makes the
    buckets a tenth of the model, so several fill in a backward and overlap_comm's double
    buffer is used). On a GPU overlap_comm runs them on a side stream; DeepSpeed's CPU
    accelerator has no streams, so here they run in order and only the flag tells the runs
    apart -- the losses and norms above show it changes nothing."""
    off, on = results["zero2"]["off"], results["zero2"]["on"]
    assert on["built"] == {"overlap_comm": True, "zero_overlap_comm": True}
    assert off["built"] == {"overlap_comm": False, "zero_overlap_comm": False}
    for step in range(1, STEPS + 1):
        reductions = [e for e in _events(on, "average_tensor") if e["step"] == step]
        assert sum(e["in_backward"] for e in reductions) >= 2, reductions
