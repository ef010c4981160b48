"""Per-rank entry: config → process groups → model → engine → batches → the loop → metrics.

Run directly (one process, or one rank under torchrun/srun/deepspeed):
    python -m gptforge.launcher.train --config configs/tiny.yaml --train.train_iters=5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gptforge.launcher.config import Config, Derived, dump_config, load_config, to_dict, validate
from gptforge.launcher.throughput import flops_per_token, peak_tflops_per_device


def build_batches(cfg: Config, derived: Derived, ctx, split: str):
    """This DP rank's micro-batch iterator for ``split`` (mock or WebDataset shards)."""
    kwargs = dict(split=split, seq_length=cfg.model.seq_length,
                  micro_batch_size=cfg.train.micro_batch_size, dp_rank=ctx.dp_rank,
                  dp_size=ctx.dp_size, seed=cfg.train.seed, vocab_size=cfg.model.vocab_size)
    if cfg.data.source == "mock":
        from gptforge.data.mock import MockBatches

        return MockBatches(global_batch_size=cfg.train.global_batch_size, **kwargs)
    from gptforge.data.loader import build_loader

    return build_loader(cfg.data, **kwargs)


def build_engine(cfg: Config, derived: Derived, ctx):
    from gptforge.model.config import transformer_config
    from gptforge.model.gpt import build_gpt
    from gptforge.parallel.megatron_engine import MegatronEngine

    if cfg.parallel.engine != "megatron":
        raise NotImplementedError("parallel.engine: only 'megatron' is implemented so far")
    tcfg = transformer_config(cfg.model, cfg.parallel, cfg.train.precision,
                              on_cpu=ctx.device.type == "cpu")
    chunks = build_gpt(cfg.model, tcfg, padded_vocab_size=derived.padded_vocab_size,
                       pp_rank=ctx.pp_rank, pp_size=ctx.pp_size, vpp_size=ctx.vpp_size,
                       seed=cfg.train.seed)
    return MegatronEngine(chunks, tcfg, ctx, cfg.optim, cfg.train,
                          cfg.parallel.use_distributed_optimizer, cfg.model.seq_length)


def write_sample(cfg: Config, model, derived: Derived, is_logging_rank: bool) -> None:
    """Generate from ``cfg.sample.prompt``; the logging rank prints it and writes sample.txt."""
    from gptforge.data import tokenizer
    from gptforge.model.generate import generate

    sp = tokenizer.load(cfg.data.tokenizer_model)
    ids = generate(model, sp.encode(cfg.sample.prompt), max_new_tokens=cfg.sample.max_new_tokens,
                   vocab_size=cfg.model.vocab_size, seq_length=cfg.model.seq_length,
                   temperature=cfg.sample.temperature, top_k=cfg.sample.top_k,
                   seed=cfg.train.seed, eod_id=sp.eos_id())
    if is_logging_rank:
        text = cfg.sample.prompt + sp.decode(ids)
        (Path(cfg.run.dir) / "sample.txt").write_text(text)
        print(f"[gptforge] sample:\n{text}", flush=True)


def run(cfg: Config) -> list[dict]:
    """Train on this rank; returns the logged records (empty except on the logging rank)."""
    from gptforge.launcher.metrics import build_sink
    from gptforge.launcher.trainer import Throughput, train
    from gptforge.parallel.context import destroy_model_parallel, init_parallel, world_size_from_env
    from gptforge.parallel.seeding import set_seed

    derived = validate(cfg, world_size_from_env())
    ctx = init_parallel(cfg.parallel)
    try:
        if ctx.rank == 0:
            dump_config(cfg, Path(cfg.run.dir) / "config.yaml")
            for note in derived.notes:
                print(f"[gptforge] {note}", flush=True)
        set_seed(cfg.train.seed, ctx.pp_rank)
        engine = build_engine(cfg, derived, ctx)
        sink = build_sink(cfg.run.dir, cfg.logging, ctx.is_logging_rank)
        sink.log_params({f"{s}.{k}": v for s, sec in to_dict(cfg).items()
                         for k, v in sec.items()})
        throughput = Throughput(
            tokens_per_step=cfg.train.global_batch_size * cfg.model.seq_length,
            flops_per_token=flops_per_token(cfg.model, derived.padded_vocab_size),
            world_size=ctx.world_size,
            peak_tflops_per_device=peak_tflops_per_device(cfg.train.precision))
        records = train(engine, iter(build_batches(cfg, derived, ctx, "train")), cfg.train,
                        num_microbatches=derived.num_microbatches, throughput=throughput,
                        sink=sink,
                        make_valid_iter=lambda: iter(build_batches(cfg, derived, ctx, "valid")))
        if cfg.sample.prompt:
            write_sample(cfg, engine.model_chunks[0], derived, ctx.is_logging_rank)
        sink.close()
        return records if ctx.is_logging_rank else []
    finally:
        destroy_model_parallel()


def parse_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """``--config a.yaml b.yaml`` plus ``--section.key=value`` overrides."""
    parser = argparse.ArgumentParser(prog="gptforge train")
    parser.add_argument("--config", nargs="*", default=[])
    args, rest = parser.parse_known_args(argv)
    overrides = _join_values(rest)
    bad = [a for a in overrides if not (a.startswith("--") and "." in a.split("=", 1)[0])]
    if bad:
        parser.error(f"unrecognised arguments: {' '.join(bad)} (overrides look like --optim.lr=3e-4)")
    return args.config, overrides


def _join_values(rest: list[str]) -> list[str]:
    """Accept ``--a.b=1`` and ``--a.b 1``."""
    out, i = [], 0
    while i < len(rest):
        if "=" in rest[i]:
            out.append(rest[i])
            i += 1
        elif i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            out.append(f"{rest[i]}={rest[i + 1]}")
            i += 2
        else:
            out.append(f"{rest[i]}=true")
            i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    from gptforge.parallel.context import destroy_parallel

    files, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(load_config(files, overrides))
    finally:
        destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
