"""The loss is token-weighted on every layout (model/loss.py): an SFT batch whose responses are
very unequal in length gives the same loss, step after step, whatever the micro-batch size, the
number of micro-batches, TP, PP, DP or the engine (fp32, within 1e-6 relative).

A mean per micro-batch (then averaged over micro-batches and DP ranks) weighs a token of a short
response more than one of a long response, so each split of the same global batch would give
another loss and another gradient.
"""

from __future__ import annotations

import pytest

from tests.conftest import assert_close_losses, run_layouts

pytestmark = pytest.mark.slow  # several real processes

COMMON = ["--train.train_iters=4", "--train.eval_interval=0", "--data.format=sft",
          "--train.global_batch_size=8"]
TP2, PP2 = "--parallel.tensor_model_parallel_size=2", "--parallel.pipeline_model_parallel_size=2"
DEEPSPEED = ["--parallel.engine=deepspeed", "--parallel.zero_stage=1"]


def _losses(result):
    return [r["loss"] for r in result["records"] if "loss" in r]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return run_layouts(1, tmp_path_factory.mktemp("one"), {
        f"mbs{m}": [f"--train.micro_batch_size={m}"] for m in (1, 2, 4, 8)}, COMMON)


def test_micro_batch_split_does_not_change_the_loss(one_process):
    want = _losses(one_process["mbs8"])
    assert want[-1] < want[0]
    for name in ("mbs1", "mbs2", "mbs4"):
        assert_close_losses(_losses(one_process[name]), want, rel=1e-6, name=name)


def test_dp_tp_pp_and_deepspeed_give_the_same_loss(one_process, tmp_path):
    out = run_layouts(2, tmp_path, {
        "dp2_mbs1": ["--train.micro_batch_size=1"],
        "dp2_mbs4_distopt": ["--train.micro_batch_size=4",
                             "--parallel.use_distributed_optimizer=true"],
        "tp2_mbs1": [TP2, "--train.micro_batch_size=1"],
        "pp2_mbs2": [PP2, "--train.micro_batch_size=2"],
        "deepspeed_dp2_mbs1": [*DEEPSPEED, "--train.micro_batch_size=1"],
        "deepspeed_dp2_mbs4": [*DEEPSPEED, "--train.micro_batch_size=4"],
    }, COMMON)
    want = _losses(one_process["mbs8"])
    for name, result in out.items():
        assert_close_losses(_losses(result), want, rel=1e-6, name=name)
