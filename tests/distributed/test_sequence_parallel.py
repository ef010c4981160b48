"""Sequence parallelism without Transformer Engine: TP=2 + SP reproduces one process (fp32, CPU).

Our torch norm (model/norm.py) runs on the TP rank's slice of the sequence; its weight and bias
gradients must be summed over the TP group, or the ranks' norms drift apart. A learning rate of
1e-2 makes such a drift visible within a few steps (with the default rate the losses of a run
without that sum still agree to 1e-5), and grad norms are compared too. The TP=1 reference runs
in the same 2-process launch, as DP=2 (test_parity.py holds DP=2 equal to one process); one launch
instead of two saves ~8 s.
"""

from __future__ import annotations

import pytest

from tests.conftest import assert_close_losses, run_layouts

pytestmark = pytest.mark.slow  # several real processes

STEPS = ["--train.train_iters=6", "--train.eval_interval=0", "--optim.lr=1e-2",
         "--optim.min_lr=1e-3"]
LLAMA = ["--model.position_embedding_type=rope", "--model.normalization=RMSNorm",
         "--model.activation=swiglu", "--model.num_query_groups=2", "--model.add_bias_linear=false",
         "--model.tie_embeddings=false"]
SP = ["--parallel.tensor_model_parallel_size=2", "--parallel.sequence_parallel=true"]


def _series(result, key):
    return [r[key] for r in result["records"] if "loss" in r]


def test_tp2_with_sequence_parallel_matches_one_process(tmp_path):
    out = run_layouts(2, tmp_path, {"gpt_tp1": [], "gpt_tp2_sp": SP, "llama_tp1": LLAMA,
                                    "llama_tp2_sp": [*LLAMA, *SP]}, STEPS)
    for name, base in (("gpt_tp2_sp", out["gpt_tp1"]), ("llama_tp2_sp", out["llama_tp1"])):
        losses = _series(base, "loss")
        assert losses[-1] < losses[0], f"{name}: the baseline does not learn: {losses}"
        assert_close_losses(_series(out[name], "loss"), losses, name=name)
        assert_close_losses(_series(out[name], "grad_norm"), _series(base, "grad_norm"),
                            name=f"{name} grad_norm")
