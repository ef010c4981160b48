"""On a CUDA GPU (the lent machine): the same trainer in bf16, with the GPU path's own pieces."""

from __future__ import annotations

import pytest

from gptforge.launcher.config import load_config
from gptforge.parallel.context import destroy_parallel
from tests.conftest import TINY

pytestmark = pytest.mark.gpu


def test_bf16_training_on_one_gpu_lowers_the_loss(tmp_path):
    import torch

    from gptforge.launcher.run.entry import run

    cfg = load_config([TINY], ["--precision.dtype=bf16", "--train.train_iters=30",
                               "--train.eval_interval=0", f"--run.dir={tmp_path}"])
    try:
        result = run(cfg)
    finally:
        destroy_parallel()
    losses = [r["loss"] for r in result.records if "loss" in r]
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1
    assert torch.cuda.max_memory_allocated() > 0  # it ran on the GPU
