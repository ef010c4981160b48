"""A checkpoint saved at one layout resumes at another (the whole path: manifest, optimizer,
LR schedule, data position), matching the uninterrupted one-process run (mock data, fp32)."""

from __future__ import annotations

import pytest

from tests.conftest import assert_close_losses, run_layouts

pytestmark = pytest.mark.slow  # several real processes

COMMON = ["--train.train_iters=6", "--train.eval_interval=0", "--checkpoint.save_interval=3"]
TP2 = "--parallel.tensor_model_parallel_size=2"
PP2 = "--parallel.pipeline_model_parallel_size=2"
DISTOPT = "--parallel.use_distributed_optimizer=true"


def _load(name: str) -> str:
    return f"--checkpoint.load={{dir}}/{name}/checkpoints/step-0000003"


def _losses(result) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in result["records"] if "loss" in r}


def test_resume_onto_other_layouts(tmp_path):
    base = _losses(run_layouts(1, tmp_path, {"single": []}, COMMON)["single"])
    assert sorted(base) == [1, 2, 3, 4, 5, 6]
    two = run_layouts(2, tmp_path, {
        "tp2": [TP2],
        "dp2_distopt_from_tp2": [DISTOPT, _load("tp2")],
        "pp2": [PP2],
        "tp2_from_pp2": [TP2, _load("pp2")],
        "dp2": [],
    }, COMMON)
    one = run_layouts(1, tmp_path, {"dp1_from_dp2": [_load("dp2")]}, COMMON)
    for name in ("tp2", "pp2", "dp2"):  # the saving runs themselves match, all 6 steps
        got = _losses(two[name])
        assert_close_losses([got[s] for s in range(1, 7)], [base[s] for s in range(1, 7)],
                            name=name)
    for name, result in [*two.items(), *one.items()]:
        if "_from_" not in name:
            continue
        got = _losses(result)
        assert sorted(got) == [4, 5, 6], (name, sorted(got))  # it continued after step 3
        assert_close_losses([got[s] for s in (4, 5, 6)], [base[s] for s in (4, 5, 6)],
                            name=name)
