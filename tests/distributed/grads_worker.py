"""Gradients of one global batch for each recompute mode, saved for comparison (one process).

argv[1]: output .pt file. Uses the trainer's own builders; reads grads from megatron's DDP
buffers (param.main_grad) after one forward/backward, before the optimizer step.
"""

from __future__ import annotations

import sys

import torch

from gptforge.common.shutdown import collect_nothing_at_exit
from gptforge.launcher.config import load_config, validate
from gptforge.launcher.run.build import build_batches, build_engine
from gptforge.parallel.context import destroy_model_parallel, destroy_parallel, init_parallel
from gptforge.parallel.seeding import set_seed
from tests.distributed.layouts_worker import TINY


def grads_for(recompute: str) -> dict[str, torch.Tensor]:
    cfg = load_config([TINY], [f"--parallel.recompute={recompute}"])
    layout = validate(cfg, 1)
    ctx = init_parallel(cfg.parallel)
    set_seed(cfg.train.seed, ctx.pp_rank)
    engine = build_engine(cfg, layout, ctx)
    it = build_batches(cfg, layout, ctx, "train")
    engine._run([next(it) for _ in range(layout.num_microbatches)], forward_only=False)
    grads = {name: p.main_grad.detach().clone()
             for chunk in engine.model_chunks for name, p in chunk.named_parameters()}
    destroy_model_parallel()
    return grads


if __name__ == "__main__":
    collect_nothing_at_exit()  # as a rank ends (common/shutdown.py)
    try:
        torch.save({mode: grads_for(mode) for mode in ("none", "full", "selective")}, sys.argv[1])
    finally:
        destroy_parallel()
