"""Per-rank entry: config → checks → process groups → model → engine → batches → loop → metrics.

Run directly (one process, or one rank under torchrun/srun/deepspeed):
    python -m gptforge.launcher.run --config configs/tiny.yaml --train.train_iters=5

Everything that can be checked without a model (config, run dir, data, tokenizer) is checked
first, by ``preflight``, which the local launcher also runs before any rank starts.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from gptforge.launcher.config import (Config, dump_config, layout_notes, load_config, to_dict,
                                      validate)
from gptforge.launcher.errors import EXIT_CHECKPOINTED, EXIT_OK, report
from gptforge.launcher.overrides import parse_train_args
from gptforge.launcher.rundir import check_run_dir, refuse_previous_run, replace_previous_run
from gptforge.launcher.run.throughput import flops_per_token, peak_tflops_per_device
from gptforge.parallel.layout import Layout


@dataclass
class RunResult:
    records: list[dict] = field(default_factory=list)  # logged records (logging rank only)
    last_step: int = 0
    stopped_by: str = ""  # the signal that stopped the run early, if any
    checkpointed: bool = False  # a checkpoint of last_step exists


def preflight(cfg: Config, world_size: int, *, is_run_dir_owner: bool) -> Layout:
    """Config, run dir, data and tokenizer checks: cheap, no model, no process group."""
    from gptforge.launcher.run.checkpoint.format import save_dir

    layout = validate(cfg, world_size)
    start = find_start(cfg)
    if is_run_dir_owner:
        own = save_dir(cfg.checkpoint, cfg.run.dir) if cfg.checkpoint.enabled else None
        refuse_previous_run(check_run_dir(cfg.run.dir), overwrite=cfg.run.overwrite,
                            resuming=start.resuming, checkpoint_dir=own)
    check_data(cfg)
    return layout


def check_data(cfg: Config) -> list[str]:
    """The data and tokenizer checks (cheap: index files and sizes); returns notes."""
    from gptforge.data.preflight import check_data as check

    splits = ("train", "valid") if cfg.train.eval_interval else ("train",)
    return check(cfg.data, splits=splits, seq_length=cfg.model.seq_length,
                 vocab_size=cfg.model.vocab_size)


def build_batches(cfg: Config, layout: Layout, ctx, split: str):
    """This DP rank's micro-batch iterator for ``split`` (mock or WebDataset shards)."""
    kwargs = dict(split=split, seq_length=cfg.model.seq_length,
                  micro_batch_size=cfg.train.micro_batch_size, dp_rank=ctx.dp_rank,
                  dp_size=ctx.dp_size, seed=cfg.train.seed, vocab_size=cfg.model.vocab_size)
    if cfg.data.source == "mock":
        from gptforge.data.mock import MockBatches

        return MockBatches(global_batch_size=cfg.train.global_batch_size, **kwargs)
    from gptforge.data.loader import build_loader

    return build_loader(cfg.data, **kwargs)


def build_engine(cfg: Config, layout: Layout, ctx):
    """This rank's model chunks inside the engine ``parallel.engine`` names."""
    from gptforge.model.config import transformer_config
    from gptforge.model.gpt import build_gpt
    from gptforge.parallel.engine import engine_class, engine_options
    from gptforge.parallel.layout import transformer_layout_fields

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


def write_sample(cfg: Config, model, is_logging_rank: bool) -> None:
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


@dataclass
class Start:
    """Where this run starts: a checkpoint (its own, when restarting, or checkpoint.load)."""

    checkpoint: Path | None = None
    resuming: bool = False  # this run continues itself (same run dir, restart record)


def find_start(cfg: Config) -> Start:
    """The checkpoint to start from; a checkpoint of another model shape is refused here."""
    from gptforge.launcher.run.checkpoint import format as ck

    if cfg.run.overwrite:  # the previous run, checkpoints included, is being replaced
        own = None if not cfg.checkpoint.load else ck.resolve(cfg.checkpoint.load)
        start = Start(own, False)
    else:
        start = Start(*ck.find_start(cfg.checkpoint, cfg.run.dir))
    if start.checkpoint is not None:
        manifest = ck.read_manifest(start.checkpoint)
        ck.check_compatible(manifest, to_dict(cfg.model), start.checkpoint)
    return start


def _start_run_dir(cfg: Config, start: Start) -> None:
    """Rank 0, before the model: refuse or replace a previous run, write config.yaml."""
    from gptforge.launcher.run.checkpoint.format import save_dir

    path = check_run_dir(cfg.run.dir)
    own = save_dir(cfg.checkpoint, cfg.run.dir)
    if refuse_previous_run(path, overwrite=cfg.run.overwrite, resuming=start.resuming,
                           checkpoint_dir=own if cfg.checkpoint.enabled else None):
        keep = start.checkpoint is not None and own in start.checkpoint.parents
        replace_previous_run(path, None if keep else own)
    dump_config(cfg, path / "config.yaml")


def _tokenizer_sha256(cfg: Config) -> str | None:
    if not cfg.data.tokenizer_model:
        return None
    from gptforge.data import tokenizer

    return tokenizer.info(cfg.data.tokenizer_model).sha256


def _say(ctx, text: str) -> None:
    if ctx.rank == 0:
        print(f"[gptforge] {text}", flush=True)


def _throughput(cfg: Config, layout: Layout, ctx):
    from gptforge.launcher.run.loop import Throughput

    return Throughput(tokens_per_step=cfg.train.global_batch_size * cfg.model.seq_length,
                      flops_per_token=flops_per_token(cfg.model, layout.padded_vocab_size),
                      world_size=ctx.world_size,
                      peak_tflops_per_device=peak_tflops_per_device(cfg.precision.dtype))


def _resume(cfg: Config, start: Start, ckpt, sink, ctx) -> int:
    """Load ``start.checkpoint`` (if any), mark it in metrics.jsonl; the step to continue after."""
    if start.checkpoint is None:
        return 0
    load_optim = cfg.checkpoint.load_optim or start.resuming
    step = ckpt.load(start.checkpoint, load_optim=load_optim)
    event = "restart" if start.resuming else "loaded"
    sink.log({"event": event, "step": step, "checkpoint": str(start.checkpoint),
              "load_optim": load_optim, "config_changes": ckpt.config_changes(start.checkpoint)})
    _say(ctx, f"{event} from {start.checkpoint} at step {step}")
    return step


def _stop_check(cfg: Config, ctx, ckpt, stop):
    """After every step, on every rank: commit an async save, agree on a stop, save at the
    interval. Returns True when the run should stop."""
    from gptforge.launcher.run.checkpoint.format import crash_point
    from gptforge.parallel.context import max_over_ranks

    interval = cfg.checkpoint.save_interval if cfg.checkpoint.enabled else 0

    def should_stop(step: int) -> bool:
        crash_point("after_step", step)
        ckpt.poll()
        agreed = max_over_ranks(ctx, stop.signum or 0)
        if agreed:  # a rank the signal has not reached (yet) stops for the same one
            stop.adopt(agreed)
            return True
        if interval and step % interval == 0:
            ckpt.save(step, "interval", sync=False)
        return False

    return should_stop


def _finish(cfg: Config, result: RunResult, ckpt, sink, ctx, engine) -> None:
    """The last checkpoint (final or on a signal), the stop record, the sample."""
    if cfg.checkpoint.enabled and result.last_step > 0:
        ckpt.save(result.last_step, "signal" if result.stopped_by else "final", sync=True)
        result.checkpointed = True
    ckpt.drain()
    if result.stopped_by:
        sink.log({"event": "stopped", "step": result.last_step, "signal": result.stopped_by})
        _say(ctx, f"stopped by {result.stopped_by} after step {result.last_step}"
             + ("; the same command resumes" if result.checkpointed else ""))
    elif cfg.sample.prompt:
        write_sample(cfg, engine.model_chunks[0], ctx.is_logging_rank)


def _host_count(ctx) -> int:
    import os
    import socket

    from gptforge.parallel.context import all_gather_objects

    if os.environ.get("SLURM_NNODES"):  # (two Slurm "nodes" may share a host name in tests)
        return int(os.environ["SLURM_NNODES"])
    return len(set(all_gather_objects(ctx, socket.gethostname())))


def _git_commit() -> dict[str, str]:
    import subprocess

    source = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return {}
        dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    commit = head.stdout.strip()
    return {"git.commit": commit, "mlflow.source.git.commit": commit,
            "git.dirty": str(bool(dirty)).lower()}


def _mlflow_run(cfg: Config, layout: Layout, ctx, start: Start) -> dict:
    """What the logging rank's MLflow run is called and tagged with (collective when on)."""
    if not cfg.logging.mlflow:
        return {}
    import socket

    from gptforge.launcher.slurm_rank import job_tags

    hosts = _host_count(ctx)  # every rank takes part
    if not ctx.is_logging_rank:
        return {}
    tags = {"gptforge.run_dir": str(Path(cfg.run.dir).resolve()), "layout": layout.describe(),
            "engine": cfg.parallel.engine, "world_size": str(ctx.world_size),
            "host_count": str(hosts), "host": socket.gethostname(), **_git_commit(),
            **job_tags()}
    return {"run_name": cfg.run.name or Path(cfg.run.dir).resolve().name,
            "fresh": not start.resuming, "tags": tags}


def _params(cfg: Config, layout: Layout) -> dict:
    """The flattened resolved config, and what the layout derives from it."""
    params = {f"{s}.{k}": v for s, sec in to_dict(cfg).items() for k, v in sec.items()}
    params.update({"derived.world_size": layout.world_size,
                   "derived.data_parallel_size": layout.data_parallel_size,
                   "derived.num_microbatches": layout.num_microbatches,
                   "derived.padded_vocab_size": layout.padded_vocab_size})
    return params


def _artifacts(cfg: Config) -> list[tuple[Path, str | None]]:
    """What the MLflow run keeps: config, job script, sample, checkpoint manifests."""
    from gptforge.launcher.run.checkpoint.format import MANIFEST, save_dir

    run_dir = Path(cfg.run.dir)
    out: list[tuple[Path, str | None]] = [
        (run_dir / name, None) for name in ("config.yaml", "job.sbatch", "job_config.yaml",
                                           "sweep.json", "sample.txt")
        if (run_dir / name).is_file()]
    ckpt_dir = save_dir(cfg.checkpoint, cfg.run.dir)
    if cfg.checkpoint.enabled and ckpt_dir.is_dir():
        for manifest in sorted(ckpt_dir.glob(f"step-*/{MANIFEST}")):
            out.append((manifest, f"checkpoints/{manifest.parent.name}"))
    return out


STOPPED_MARK = "stopped.json"  # this attempt stopped on a signal with a checkpoint: restart me


def _mark_stopped(cfg: Config, result: RunResult) -> None:
    """For a job script whose launcher (torchrun, deepspeed) does not pass on exit code 75."""
    import json
    import time

    from gptforge.common.durable import Durability, write_atomic

    write_atomic(Path(cfg.run.dir) / STOPPED_MARK,
                 json.dumps({"step": result.last_step, "signal": result.stopped_by,
                             "time": time.time()}) + "\n", Durability.FILE)


def run(cfg: Config) -> RunResult:
    """Train on this rank: resume if there is a checkpoint, save at the configured steps, stop
    at one step on every rank (and checkpoint) after SIGTERM/SIGINT/SIGUSR1. The MLflow run
    ends FINISHED, KILLED (stopped by a signal: a resumed run continues it) or FAILED."""
    from gptforge.launcher.run.checkpoint.checkpointer import Checkpointer
    from gptforge.launcher.run.metrics import build_sink
    from gptforge.launcher.slurm_rank import stop_request
    from gptforge.launcher.run.loop import train
    from gptforge.parallel.context import (barrier, check_launch_env, destroy_model_parallel,
                                           env_rank_info, init_parallel)
    from gptforge.parallel.seeding import set_seed

    rank, world_size, _ = env_rank_info()
    check_launch_env(rank, world_size)
    layout = validate(cfg, world_size)
    start = find_start(cfg)
    if rank == 0:
        _start_run_dir(cfg, start)
        (Path(cfg.run.dir) / STOPPED_MARK).unlink(missing_ok=True)
    notes = check_data(cfg)
    stop = stop_request(announce=rank == 0).install()
    ctx = init_parallel(cfg.parallel)
    sink = None
    try:
        for note in [*layout_notes(cfg, layout), *notes]:
            _say(ctx, note)
        set_seed(cfg.train.seed, ctx.pp_rank)
        _say(ctx, f"building the model ({cfg.parallel.engine} engine)")
        engine = build_engine(cfg, layout, ctx)
        batches = build_batches(cfg, layout, ctx, "train")
        ckpt = Checkpointer(cfg.checkpoint, run_dir=cfg.run.dir, ctx=ctx, engine=engine,
                            batches=batches, config=to_dict(cfg), layout=layout,
                            tokenizer_sha256=_tokenizer_sha256(cfg), stop=stop)
        sink = build_sink(cfg.run.dir, cfg.logging, ctx.is_logging_rank,
                          **_mlflow_run(cfg, layout, ctx, start))
        sink.log_params(_params(cfg, layout))
        throughput = _throughput(cfg, layout, ctx)  # before a load: it draws random numbers
        start_step = _resume(cfg, start, ckpt, sink, ctx)  # restores the RNG: nothing after
        loop = train(engine, iter(batches), cfg.train, num_microbatches=layout.num_microbatches,
                     throughput=throughput, sink=sink, start_step=start_step,
                     make_valid_iter=lambda: iter(build_batches(cfg, layout, ctx, "valid")),
                     should_stop=_stop_check(cfg, ctx, ckpt, stop))
        result = RunResult(records=loop.records if ctx.is_logging_rank else [],
                           last_step=loop.last_step,
                           stopped_by=stop.signal_name if loop.stopped_early else "")
        _finish(cfg, result, ckpt, sink, ctx, engine)
        sink.close("KILLED" if result.stopped_by else "FINISHED", artifacts=_artifacts(cfg))
        if ctx.rank == 0 and result.stopped_by and result.checkpointed:
            _mark_stopped(cfg, result)
        barrier(ctx)  # every rank leaves together (srun ends a step at its first exit)
        return result
    except BaseException as exc:
        if sink is not None:
            sink.close("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED",
                       report=False)
        raise
    finally:
        stop.uninstall()
        destroy_model_parallel()


def exit_code(result: RunResult) -> int:
    import signal

    if not result.stopped_by:
        return EXIT_OK
    return EXIT_CHECKPOINTED if result.checkpointed else 128 + signal.Signals[result.stopped_by]


def main(argv: list[str] | None = None) -> int:
    from gptforge.parallel.context import destroy_parallel, env_rank_info

    rank, world_size, _ = env_rank_info()
    try:
        files, overrides = parse_train_args(sys.argv[1:] if argv is None else argv,
                                            prog="gptforge.launcher.run")
        return exit_code(run(load_config(files, overrides)))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 (every failure ends in one line, see errors.py)
        return report(exc, rank, world_size)
    finally:
        destroy_parallel()

