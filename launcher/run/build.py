"""What a rank builds from the config: the data checks, its batches, its engine, its throughput.

Each function composes components from their own sections (``build_loader(cfg.data, ...)``,
the engine from ``parallel``/``precision``/``optim``); inference, conversion and the benchmarks
build through the same functions as training.
"""

from __future__ import annotations

from gptforge.launcher.config import Config
from gptforge.parallel.layout import Layout


def check_data(cfg: Config) -> list[str]:
    """The data and tokenizer checks (cheap: index files and sizes); returns notes. Shards
    without the valid split that ``train.eval_interval`` evaluates on are refused, with the
    ways to make one or to go without."""
    from gptforge.data.preflight import check_data as check
    from gptforge.data.shardspec import NoValidShards

    splits = ("train", "valid") if cfg.train.eval_interval else ("train",)
    try:
        return check(cfg.data, splits=splits, seq_length=cfg.model.seq_length,
                     vocab_size=cfg.model.vocab_size)
    except NoValidShards as err:
        sft = " --format sft" if cfg.data.format == "sft" else ""
        raise NoValidShards(
            f"{err}, which train.eval_interval={cfg.train.eval_interval} evaluates on: make "
            f"them with `gptforge data prepare{sft} ... --valid-fraction 0.05` (a share of the "
            f"documents), name shards of their own in data.valid_sources, or train without "
            f"validation: --train.eval_interval=0") from None


def build_batches(cfg: Config, layout: Layout, ctx, split: str):
    """This DP rank's micro-batch iterator for ``split`` (mock or WebDataset shards)."""
    kwargs = dict(split=split, seq_length=cfg.model.seq_length,
                  micro_batch_size=cfg.train.micro_batch_size, dp_rank=ctx.dp_rank,
                  dp_size=ctx.dp_size, seed=cfg.train.seed, vocab_size=cfg.model.vocab_size)
    if cfg.data.source == "mock":
        from gptforge.data.mock import MockBatches

        return MockBatches(global_batch_size=cfg.train.global_batch_size,
                           sft=cfg.data.format == "sft", **kwargs)
    from gptforge.data.loader import build_loader

    return build_loader(cfg.data, **kwargs)


def build_engine(cfg: Config, layout: Layout, ctx):
    """This rank's model chunks inside the engine ``parallel.engine`` names. The installed
    library versions are checked first (one line, before any model is built)."""
    from gptforge.model.config import transformer_config
    from gptforge.model.gpt import build_gpt
    from gptforge.parallel.engine import engine_class, engine_options
    from gptforge.parallel.layout import transformer_layout_fields
    from gptforge.parallel.versions import check_versions

    check_versions(cfg.parallel.engine, cfg.parallel.allow_untested_versions)
    tcfg = transformer_config(
        cfg.model, params_dtype=cfg.precision.torch_dtype,
        layout_fields=transformer_layout_fields(cfg.parallel, on_cpu=ctx.device.type == "cpu"))
    chunks = build_gpt(cfg.model, tcfg, padded_vocab_size=layout.padded_vocab_size,
                       pp_rank=ctx.pp_rank, pp_size=ctx.pp_size, vpp_size=ctx.vpp_size,
                       seed=cfg.train.seed)
    return engine_class(cfg.parallel.engine)(
        chunks, tcfg, ctx, parallel=cfg.parallel, precision=cfg.precision, optim=cfg.optim,
        train_iters=cfg.train.train_iters, seq_length=cfg.model.seq_length,
        **engine_options(cfg.parallel.engine, micro_batch_size=cfg.train.micro_batch_size,
                         num_microbatches=layout.num_microbatches, run_dir=cfg.run.dir))


def build_throughput(cfg: Config, layout: Layout, ctx):
    """tokens/s, TFLOP/s and MFU of a step (``launcher/run/throughput.py``)."""
    from gptforge.launcher.run.loop import Throughput
    from gptforge.launcher.run.throughput import flops_per_token, peak_tflops_per_device

    return Throughput(tokens_per_step=cfg.train.global_batch_size * cfg.model.seq_length,
                      flops_per_token=flops_per_token(cfg.model, layout.padded_vocab_size),
                      world_size=ctx.world_size,
                      peak_tflops_per_device=peak_tflops_per_device(cfg.precision.dtype))
