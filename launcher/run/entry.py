"""Per-rank entry: config → checks → process groups → model → engine → batches → loop → metrics.

Run directly (one process, or one rank under torchrun/srun/deepspeed):
    python -m gptforge.launcher.run --config configs/tiny.yaml --train.train_iters=5

Everything that can be checked without a model (config, run dir, data, tokenizer) is checked
first, by ``preflight``, which the local launcher also runs before any rank starts.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from gptforge.common.log import ANY_RANK, get_logger, set_rank
from gptforge.launcher.config import (Config, dump_config, layout_notes, load_config, to_dict,
                                      validate)
from gptforge.data.config import with_tokenizer_resolved
from gptforge.launcher.errors import (EACH_NODE, EVERY_RANK, EXIT_CHECKPOINTED, EXIT_OK,
                                      alike_on, report)
from gptforge.launcher.overrides import parse_train_args
from gptforge.launcher.run.build import build_batches, build_engine, build_throughput, check_data
from gptforge.launcher.run.checkpoint.checkpointer import no_point
from gptforge.launcher.run.distill import build_distiller
from gptforge.launcher.rundir import check_run_dir, refuse_previous_run, replace_previous_run
from gptforge.parallel.layout import Layout

log = get_logger(__name__)
# What the LR schedule is computed from (parallel/optim.py learning_rate; megatron's scheduler)
SCHEDULE_KEYS = ("optim.lr", "optim.min_lr", "optim.lr_warmup_iters", "optim.lr_decay_iters",
                 "optim.lr_decay_style", "optim.weight_decay", "train.train_iters")
STOPPED_MARK = "stopped.json"  # this attempt stopped on a signal with a checkpoint: restart me


@dataclass
class RunResult:
    records: list[dict] = field(default_factory=list)  # logged records (logging rank only)
    last_step: int = 0
    stopped_by: str = ""  # the signal that stopped the run early, if any
    checkpointed: bool = False  # a checkpoint of last_step exists


@dataclass
class Start:
    """Where this run starts: a checkpoint (its own, when restarting, or checkpoint.load)."""

    checkpoint: Path | None = None
    resuming: bool = False  # this run continues itself (same run dir, restart record)

    def load_optim(self, cfg: Config) -> bool:
        """Whether the start restores the optimizer (a restart always does)."""
        return cfg.checkpoint.load_optim or self.resuming


def find_start(cfg: Config) -> Start:
    """The checkpoint to start from; a checkpoint of another model shape, or of the other
    engine, is refused here (before any model: the front door, and each rank)."""
    from gptforge.launcher.run.checkpoint import format as ck
    from gptforge.launcher.run.checkpoint import ownership

    if cfg.run.overwrite:  # the previous run, checkpoints included, is being replaced
        if cfg.checkpoint.enabled:  # (only this run's own checkpoints)
            ownership.check_owner(ck.save_dir(cfg.checkpoint, cfg.run.dir), cfg.run.dir)
        own = None if not cfg.checkpoint.load else ck.resolve(cfg.checkpoint.load)
        start = Start(own, False)
    else:
        start = Start(*ownership.find_start(cfg.checkpoint, cfg.run.dir))
    if start.checkpoint is not None:
        manifest = ck.read_manifest(start.checkpoint)
        ck.check_compatible(manifest, to_dict(cfg.model), start.checkpoint)
        ck.check_engine(manifest, cfg.parallel.engine, start.checkpoint,
                        load_optim=start.load_optim(cfg), own=start.resuming)
    return start


def load_args(argv: list[str], prog: str) -> Config:
    """The config of ``[--config FILE ...] [--section.key=value ...]``. Every rank reads the
    same arguments and files: an error is one every rank finds alike (each node's ranks, when
    a file is missing on one: it may be there on another), and a usage error is printed by
    rank 0 alone."""
    import contextlib
    import io
    import time

    from gptforge.common.log import debug_enabled
    from gptforge.launcher.errors import QUIET_RANK_LINGER_S
    from gptforge.parallel.context import env_rank_info

    rank, world_size, _ = env_rank_info()
    quiet = rank != 0 and world_size > 1 and not debug_enabled()
    try:
        with alike_on(EVERY_RANK), (contextlib.redirect_stderr(io.StringIO()) if quiet
                                    else nullcontext()):  # argparse's usage and message
            files, overrides = parse_train_args(argv, prog=prog)
    except SystemExit:
        if quiet:  # rank 0 says it (see launcher/errors.py: report)
            time.sleep(QUIET_RANK_LINGER_S)
        raise
    with alike_on(EVERY_RANK if all(Path(f).is_file() for f in files) else EACH_NODE):
        return load_config(files, overrides)


def _validate(cfg: Config, world_size: int) -> Layout:
    with alike_on(EVERY_RANK):  # the config: the same on every rank
        return validate(cfg, world_size)


def _find_start(cfg: Config, is_rank0: bool) -> Start:
    """``find_start``; an error is one the ranks of a node find alike (the checkpoints they
    see), unless rank 0 may be replacing them meanwhile (run.overwrite)."""
    with alike_on(EACH_NODE) if is_rank0 or not cfg.run.overwrite else nullcontext():
        return find_start(cfg)


def preflight(cfg: Config, world_size: int, *, is_run_dir_owner: bool) -> Layout:
    """Config, run dir, data and tokenizer checks: cheap, no model, no process group. Also: no
    other run holds the run dir or the checkpoint directory, and every place the run writes is
    writable with room to spare (``launcher/run/places.py``)."""
    from gptforge.launcher.run.checkpoint.format import save_dir
    from gptforge.launcher.run.checkpoint.ownership import probe_lock
    from gptforge.launcher.run.places import check_places

    layout = _validate(cfg, world_size)
    start = _find_start(cfg, is_run_dir_owner)
    if is_run_dir_owner:
        own = save_dir(cfg.checkpoint, cfg.run.dir) if cfg.checkpoint.enabled else None
        probe_lock(check_run_dir(cfg.run.dir), "run.dir")
        if own is not None:
            probe_lock(own, "checkpoint.save")
        refuse_previous_run(Path(cfg.run.dir), overwrite=cfg.run.overwrite,
                            resuming=start.resuming, checkpoint_dir=own)
        check_places(cfg, layout.padded_vocab_size)
    with alike_on(EACH_NODE):
        check_data(cfg)
    return layout


def _start_run_dir(cfg: Config, start: Start, layout: Layout) -> list:
    """Rank 0, before the model: take the run dir (and checkpoint dir) for this run, refuse or
    replace a previous run, check the places it writes, write config.yaml. Returns the locks,
    held until the run ends."""
    from gptforge.launcher.run.checkpoint import ownership
    from gptforge.launcher.run.checkpoint.format import save_dir
    from gptforge.launcher.run.places import check_places

    path = check_run_dir(cfg.run.dir)
    locks = [ownership.lock_dir(path, "run.dir")]
    try:
        own = save_dir(cfg.checkpoint, cfg.run.dir)
        if refuse_previous_run(path, overwrite=cfg.run.overwrite, resuming=start.resuming,
                               checkpoint_dir=own if cfg.checkpoint.enabled else None):
            keep = start.checkpoint is not None and own in start.checkpoint.parents
            replace_previous_run(path, None if keep else own)
        check_places(cfg, layout.padded_vocab_size)
        if cfg.checkpoint.enabled:
            locks.append(ownership.lock_dir(own, "checkpoint.save"))
            ownership.claim(own, cfg.run.dir, None if start.resuming else cfg.checkpoint.load)
        dump_config(cfg, path / "config.yaml")
        (path / STOPPED_MARK).unlink(missing_ok=True)
    except BaseException:
        for lock in locks:
            lock.close()
        raise
    return locks


def run_record(cfg: Config):
    """What this run's checkpoints record about it (the Checkpointer's view of the config)."""
    from gptforge.launcher.run.checkpoint.checkpointer import RunRecord

    sha = None
    if cfg.data.tokenizer_model:
        from gptforge.data import tokenizer

        sha = tokenizer.info(cfg.data.tokenizer_model).sha256
    return RunRecord(config=to_dict(cfg), model=to_dict(cfg.model), engine=cfg.parallel.engine,
                     use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
                     global_batch_size=cfg.train.global_batch_size,
                     seq_length=cfg.model.seq_length, seed=cfg.train.seed,
                     data_source=cfg.data.source, tokenizer_sha256=sha)


def _resume(cfg: Config, start: Start, ckpt, sink, layout: Layout, is_logging_rank: bool) -> int:
    """Load ``start.checkpoint`` (if any), mark it in metrics.jsonl (a restart: with the steps
    it redoes; at another world size: a ``resized`` event too); the step to continue after."""
    from gptforge.launcher.run import resize
    from gptforge.launcher.run.checkpoint.format import read_manifest

    if start.checkpoint is None:
        return 0
    load_optim = start.load_optim(cfg)
    step = ckpt.load(start.checkpoint, load_optim=load_optim)
    event = "restart" if start.resuming else "loaded"
    changes = ckpt.config_changes(start.checkpoint)
    lost = resize.lost_work(cfg.run.dir, step).fields() \
        if start.resuming and is_logging_rank else {}
    sink.log({"event": event, "step": step, "checkpoint": str(start.checkpoint),
              "load_optim": load_optim, "config_changes": changes, **lost})
    log.info(f"{event} from {start.checkpoint} at step {step}")
    resized = resize.resize_record(read_manifest(start.checkpoint), layout, step) \
        if start.resuming else None
    if resized is not None and is_logging_rank:
        sink.log({**resized, **lost})
        log.warning(resize.describe({**resized, **lost}), extra=ANY_RANK)
    elif lost.get("lost_steps"):
        log.info(f"{lost['lost_steps']} steps after the checkpoint are done again "
                 f"({lost['lost_seconds']:.1f} s of training lost)", extra=ANY_RANK)
    schedule = {k: v for k, v in changes.items() if k in SCHEDULE_KEYS}
    if load_optim and schedule:
        log.warning("the LR schedule changed since the checkpoint ("
                    + ", ".join(f"{k} {old} -> {new}" for k, (old, new) in schedule.items())
                    + f"): this config's schedule applies, from step {step}")
    return step


def _stop_check(cfg: Config, ctx, ckpt, stop, at_point: Callable[[str, int], None]):
    """After every step, on every rank: commit an async save, agree on a stop (every step, or
    every K: ``launcher/run/stopping.py``), save at the interval. True: the run should stop."""
    from gptforge.launcher.run.stopping import StopAgreement

    interval = cfg.checkpoint.save_interval if cfg.checkpoint.enabled else 0
    agreement = StopAgreement(ctx, stop)

    def should_stop(step: int) -> bool:
        at_point("after_step", step)
        ckpt.poll()
        agreed = agreement.agree(step)
        if agreed:  # a rank the signal has not reached (yet) stops for the same one
            stop.adopt(agreed)
            return True
        if interval and step % interval == 0:
            ckpt.save(step, "interval", sync=False)
        return False

    return should_stop


def _finish(cfg: Config, result: RunResult, ckpt, sink, ctx, engine, layout: Layout) -> None:
    """The last checkpoint (final or on a signal), the stop record, the sample."""
    from gptforge.launcher.run.sample import write_sample

    if cfg.checkpoint.enabled and result.last_step > 0:
        result.checkpointed = ckpt.save(result.last_step, "signal" if result.stopped_by
                                        else "final", sync=True)
    ckpt.drain()
    if result.stopped_by:
        sink.log({"event": "stopped", "step": result.last_step, "signal": result.stopped_by})
        log.info(f"stopped by {result.stopped_by} after step {result.last_step}"
                 + ("; the same command resumes" if result.checkpointed else ""))
    elif cfg.sample.prompt:  # every rank generates (in step); the logging rank writes it
        from gptforge.parallel.pipeline_generate import runner
        from gptforge.parallel.weights import unwrapped

        model = runner(ctx, [unwrapped(c) for c in engine.model_chunks], cfg.model.hidden_size,
                       layout.padded_vocab_size)
        write_sample(cfg.sample, model, tokenizer_model=cfg.data.tokenizer_model,
                     vocab_size=cfg.model.vocab_size, seq_length=cfg.model.seq_length,
                     seed=cfg.train.seed, run_dir=cfg.run.dir,
                     is_logging_rank=ctx.is_logging_rank)


def _mark_stopped(cfg: Config, result: RunResult) -> None:
    """For a job script whose launcher (torchrun, deepspeed) does not pass on exit code 75."""
    import json
    import time

    from gptforge.common.durable import Durability, write_atomic

    write_atomic(Path(cfg.run.dir) / STOPPED_MARK,
                 json.dumps({"step": result.last_step, "signal": result.stopped_by,
                             "time": time.time()}) + "\n", Durability.FILE)


def run(cfg: Config, *, at_point: Callable[[str, int], None] = no_point) -> RunResult:
    """Train on this rank: resume if there is a checkpoint, save at the configured steps, stop
    at one step on every rank (and checkpoint) after SIGTERM/SIGINT/SIGUSR1. The MLflow run
    ends FINISHED, KILLED (stopped by a signal: a resumed run continues it) or FAILED.
    ``at_point(name, step)`` is called after each step ("after_step") and inside each commit
    ("before_manifest", "before_rename"): where the crash tests kill a rank."""
    from gptforge.launcher.run import mlflow_info
    from gptforge.launcher.run.checkpoint.checkpointer import Checkpointer
    from gptforge.launcher.run.loop import train
    from gptforge.launcher.run.metrics import build_sink
    from gptforge.launcher.slurm_rank import stop_request
    from gptforge.parallel.context import (barrier, check_launch_env, collective_timeout,
                                           destroy_model_parallel, env_rank_info, init_parallel)
    from gptforge.parallel.seeding import set_seed

    rank, world_size, _ = env_rank_info()
    set_rank(rank, world_size)
    with alike_on(EACH_NODE):
        check_launch_env(rank, world_size)
    layout = _validate(cfg, world_size)
    cfg = replace(cfg, data=with_tokenizer_resolved(cfg.data))
    start = _find_start(cfg, rank == 0)
    locks = _start_run_dir(cfg, start, layout) if rank == 0 else []
    stop = sink = None
    try:
        with alike_on(EACH_NODE):
            notes = check_data(cfg)
        stop = stop_request().install()
        ctx = init_parallel(cfg.parallel)
        for note in [*layout_notes(cfg, layout), *notes]:
            log.info(note)
        set_seed(cfg.train.seed, ctx.pp_rank)
        log.info(f"building the model ({cfg.parallel.engine} engine)")
        engine = build_engine(cfg, layout, ctx)
        if cfg.distill.teacher:
            log.info(f"loading the teacher {cfg.distill.teacher} (distill.alpha "
                     f"{cfg.distill.alpha}, temperature {cfg.distill.temperature})")
            engine.distiller = build_distiller(cfg.distill, cfg, layout, ctx)
        batches = build_batches(cfg, layout, ctx, "train")
        ckpt = Checkpointer(cfg.checkpoint, run_record(cfg), run_dir=cfg.run.dir, ctx=ctx,
                            engine=engine, batches=batches, layout=layout, stop=stop,
                            at_point=at_point)
        sink = build_sink(cfg.run.dir, cfg.logging, ctx.is_logging_rank,
                          **mlflow_info.mlflow_run(cfg, layout, ctx, resuming=start.resuming))
        sink.log_params(mlflow_info.params(cfg, layout))
        throughput = build_throughput(cfg, layout, ctx)  # before a load: it draws random numbers
        # restores the RNG: nothing after
        start_step = _resume(cfg, start, ckpt, sink, layout, ctx.is_logging_rank)
        loop = train(engine, iter(batches), cfg.train, num_microbatches=layout.num_microbatches,
                     throughput=throughput, sink=sink, start_step=start_step,
                     make_valid_iter=lambda: iter(build_batches(cfg, layout, ctx, "valid")),
                     should_stop=_stop_check(cfg, ctx, ckpt, stop, at_point))
        result = RunResult(records=loop.records if ctx.is_logging_rank else [],
                           last_step=loop.last_step,
                           stopped_by=stop.signal_name if loop.stopped_early else "")
        _finish(cfg, result, ckpt, sink, ctx, engine, layout)
        sink.close("KILLED" if result.stopped_by else "FINISHED",
                   artifacts=mlflow_info.artifacts(cfg))
        if ctx.rank == 0 and result.stopped_by and result.checkpointed:
            _mark_stopped(cfg, result)
        barrier(ctx)  # every rank leaves together (srun ends a step at its first exit)
        return result
    except BaseException as exc:
        if sink is not None:
            sink.close("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED",
                       report=False)
        timeout = collective_timeout(exc, cfg.parallel.distributed_timeout_minutes)
        if timeout is not None:
            raise timeout from exc
        raise
    finally:
        if stop is not None:
            stop.uninstall()
        destroy_model_parallel()
        for lock in locks:
            lock.close()


def exit_code(result: RunResult) -> int:
    import signal

    if not result.stopped_by:
        return EXIT_OK
    return EXIT_CHECKPOINTED if result.checkpointed else 128 + signal.Signals[result.stopped_by]


def main(argv: list[str] | None = None, *,
         at_point: Callable[[str, int], None] = no_point) -> int:
    """One rank: parse the config arguments, train, report a failure in one line."""
    from gptforge.parallel.context import destroy_parallel, env_rank_info

    rank, world_size, local_rank = env_rank_info()
    try:
        cfg = load_args(sys.argv[1:] if argv is None else argv, prog="gptforge.launcher.run")
        return exit_code(run(cfg, at_point=at_point))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 (every failure ends in one line, see errors.py)
        return report(exc, rank, world_size, local_rank)
    finally:
        destroy_parallel()
