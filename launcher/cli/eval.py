"""``gptforge eval``: loss, perplexity and token count of a model on token shards.

    gptforge eval --checkpoint PATH --data SHARDS [--split valid|train] [--eval-iters N]
        [--micro-batch-size B] [--output-json F]

PATH is our checkpoint (saved at any layout; evaluated at TP=1 in this process) or a Hugging Face
GPT-2/Llama folder. SHARDS is a shard spec as in ``data.sources`` (a directory with index.json,
a glob, a brace pattern). The batches are the training loader's (packed windows of
``model.seq_length``, the shards' loss mask for SFT data), read in a fixed order (seed 0), and
the loss is the engine's own evaluation step, so the number equals the ``val_loss`` a training
run reports on the same data. ``--eval-iters`` defaults to one pass over the split's tokens.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from gptforge.common.log import get_logger

log = get_logger(__name__)


def _one_pass(src, tokens_per_iter: int) -> int | None:
    """Micro-batches in one pass over the split (None: its token count is not known)."""
    known = [t for t in src.expected_tokens if t is not None]
    if len(known) < len(src.expected_tokens):
        return None
    return max(1, sum(known) // tokens_per_iter)


def _iterations(src, eval_iters: int | None, micro_batch_size: int, seq: int, split: str) -> int:
    """One pass by default; more than one pass is capped (the loader would repeat the split,
    counting tokens twice), with a notice."""
    one_pass = _one_pass(src, micro_batch_size * seq)
    iters = eval_iters or one_pass or 10
    if one_pass is not None and iters > one_pass:
        log.warning(f"--eval-iters {iters} is more than one pass over the {split} split "
                    f"({one_pass} iterations of {micro_batch_size} x {seq}): capped at {one_pass}")
        iters = one_pass
    return iters


def evaluate_model(loaded, shards: str, *, split: str, eval_iters: int | None,
                   micro_batch_size: int, tokenizer: str | None = None) -> dict:
    """The loss on ``shards``; ``tokenizer`` (default: the model's) must be the one that made
    them."""
    from gptforge.launcher.config import config_from_dict, merge_dicts, to_dict
    from gptforge.data.preflight import check_data
    from gptforge.data.shardspec import resolve
    from gptforge.launcher.run.build import build_batches
    from gptforge.launcher.run.loop import evaluate
    from gptforge.launcher.modelio.inference import weights_bytes
    from gptforge.parallel.context import all_gather_objects

    src = resolve(shards, split)
    data = {"source": "webdataset", "sources": [{"path": shards}], "valid_sources": [],
            "format": "sft" if src.sft else "pretrain", "num_workers": 0,
            "tokenizer_model": tokenizer or loaded.tokenizer_path}
    train = {"micro_batch_size": micro_batch_size, "global_batch_size": micro_batch_size,
             "seed": 0}
    cfg = config_from_dict(merge_dicts(to_dict(loaded.cfg), {"data": data, "train": train}))
    seq = cfg.model.seq_length
    check_data(cfg.data, splits=(split,), seq_length=seq, vocab_size=cfg.model.vocab_size)
    iters = _iterations(src, eval_iters, micro_batch_size, seq, split)
    counted = _CountTokens(build_batches(cfg, loaded.layout, loaded.ctx, split))
    loss = evaluate(loaded.engine, iter(counted), 1, iters)  # (on the last stage)
    loss = next(x for x in all_gather_objects(loaded.ctx, loss) if x is not None)
    return {"checkpoint": str(loaded.path), "data": shards, "split": split, "loss": loss,
            "perplexity": math.exp(min(loss, 700.0)), "tokens": counted.tokens,
            "eval_iters": iters, "micro_batch_size": micro_batch_size, "seq_length": seq,
            "quantize": loaded.quantize, "weights_bytes": weights_bytes(loaded)}


class _CountTokens:
    """The batches, counting the tokens that carry loss."""

    def __init__(self, batches):
        self.batches, self.tokens = batches, 0

    def __iter__(self):
        for batch in self.batches:
            self.tokens += int(batch["loss_mask"].sum())
            yield batch


def _eval(args) -> int:
    from gptforge.launcher.cli.ranks import launch, loaded_model

    code = launch(args, args.checkpoint)
    if code is not None:
        return code
    with loaded_model(args, args.checkpoint) as loaded:
        result = evaluate_model(loaded, args.data, split=args.split, eval_iters=args.eval_iters,
                                micro_batch_size=args.micro_batch_size, tokenizer=args.tokenizer)
        output = loaded.is_output_rank
    if not output:
        return 0
    print(f"loss {result['loss']:.6f} | perplexity {result['perplexity']:.4f} | "
          f"tokens {result['tokens']} | {result['eval_iters']} iterations of "
          f"{result['micro_batch_size']} x {result['seq_length']} | weights "
          f"{result['weights_bytes'] / 2**20:.1f} MiB ({result['quantize']}, rank 0)")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def register(verbs) -> None:
    from gptforge.launcher.cli.main import positive_int
    from gptforge.launcher.cli.ranks import add_layout_args

    p = verbs.add_parser("eval", help="loss and perplexity of a checkpoint or Hugging Face "
                         "folder on token shards", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="our checkpoint (any layout) or a Hugging Face GPT-2/Llama folder")
    p.add_argument("--data", required=True, metavar="SHARDS",
                   help="shard spec: a directory with index.json, a glob or a brace pattern")
    p.add_argument("--split", choices=("valid", "train"), default="valid",
                   help="the split of an index.json directory (default: valid)")
    p.add_argument("--eval-iters", type=positive_int, metavar="N",
                   help="micro-batches to evaluate (default: one pass over the split)")
    p.add_argument("--micro-batch-size", type=positive_int, default=4, metavar="B")
    p.add_argument("--tokenizer", metavar="T", help="tokenizer to use instead of the model's")
    p.add_argument("--output-json", metavar="F", help="write the result as JSON")
    add_layout_args(p)
    p.set_defaults(func=_eval)
