"""TP / PP / VPP / DP (+ distributed optimizer) match one process, step for step (gloo, fp32).

Nothing is copied between runs: every layout builds its weights from the seed alone, so these
also show that initial weights do not depend on the layout.
"""

from __future__ import annotations

import pytest

from tests.conftest import assert_close_losses, run_layouts

pytestmark = pytest.mark.slow  # several real processes

STEPS = ["--train.train_iters=5", "--train.eval_interval=0"]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    out = run_layouts(1, tmp_path_factory.mktemp("base"), {"single": []}, STEPS)
    return [r["loss"] for r in out["single"]["records"]]


def _losses(result):
    return [r["loss"] for r in result["records"] if "loss" in r]


def test_two_process_layouts_match_single_process(baseline, tmp_path):
    out = run_layouts(2, tmp_path, {
        "tp2": ["--parallel.tensor_model_parallel_size=2"],
        "pp2_1f1b": ["--parallel.pipeline_model_parallel_size=2"],
        "pp2_vpp2": ["--parallel.pipeline_model_parallel_size=2",
                     "--parallel.virtual_pipeline_model_parallel_size=2"],
        "dp2_distopt": ["--parallel.use_distributed_optimizer=true"],
    }, STEPS)
    assert baseline[-1] < baseline[0]
    for name, result in out.items():
        assert_close_losses(_losses(result), baseline, name=name)


def test_four_process_layouts_match_single_process(baseline, tmp_path):
    out = run_layouts(4, tmp_path, {
        "tp4": ["--parallel.tensor_model_parallel_size=4"],
        "tp2_dp2": ["--parallel.tensor_model_parallel_size=2"],
    }, STEPS)
    for name, result in out.items():
        assert_close_losses(_losses(result), baseline, name=name)


LLAMA = ["--model.position_embedding_type=rope", "--model.normalization=RMSNorm",
         "--model.activation=swiglu", "--model.num_query_groups=2", "--model.add_bias_linear=false",
         "--model.tie_embeddings=false"]


def test_llama_style_model_trains_and_matches_across_layouts(tmp_path):
    """RoPE + RMSNorm + SwiGLU + GQA: TP=2 and PP=2 match one process, and the loss falls."""
    single = run_layouts(1, tmp_path / "one", {"llama": LLAMA}, STEPS)
    baseline = _losses(single["llama"])
    assert baseline[-1] < baseline[0]
    out = run_layouts(2, tmp_path / "two", {
        "llama_tp2": [*LLAMA, "--parallel.tensor_model_parallel_size=2"],
        "llama_pp2": [*LLAMA, "--parallel.pipeline_model_parallel_size=2"],
    }, STEPS)
    for name, result in out.items():
        assert_close_losses(_losses(result), baseline, name=name)
