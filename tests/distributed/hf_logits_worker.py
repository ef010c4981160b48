"""One rank: load a converted checkpoint at TP = world size, write the gathered logits.

argv: checkpoint dir, tokens .pt file, output .pt file (rank 0 writes it).
"""

from __future__ import annotations

import sys

import torch

from gptforge.common.shutdown import collect_nothing_at_exit
from gptforge.launcher.run.checkpoint import format as ck
from gptforge.launcher.config import config_from_dict, merge_dicts, validate
from gptforge.launcher.run.build import build_engine
from gptforge.parallel.context import destroy_parallel, init_parallel, world_size_from_env
from gptforge.parallel.weights import unwrapped


def main(checkpoint: str, tokens_file: str, out_file: str) -> None:
    step_dir = ck.resolve(checkpoint)
    tp = world_size_from_env()
    cfg = config_from_dict(merge_dicts(ck.read_manifest(step_dir)["config"], {
        "parallel": {"tensor_model_parallel_size": tp}, "precision": {"dtype": "fp32"}}))
    layout = validate(cfg, tp)
    ctx = init_parallel(cfg.parallel)
    try:
        engine = build_engine(cfg, layout, ctx)
        engine.load(step_dir / ck.STATE_DIR, load_optim=False)
        tokens = torch.load(tokens_file)
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        model = unwrapped(engine.model_chunks[0]).eval()
        with torch.no_grad():
            logits = model(tokens, positions, None, runtime_gather_output=True)
        if ctx.rank == 0:
            torch.save({"logits": logits, "padded_vocab_size": layout.padded_vocab_size},
                       out_file)
    finally:
        destroy_parallel()


if __name__ == "__main__":
    collect_nothing_at_exit()  # as a rank ends (common/shutdown.py)
    main(*sys.argv[1:4])
