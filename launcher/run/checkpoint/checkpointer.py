"""The trainer's side of checkpoints: collective save (sync or async), commit, resume.

Every method is collective (all ranks call it at the same step boundary). The format and the
file-level helpers are in ``launcher/run/checkpoint/format.py``; the engine writes and reads its own
tensors (``engine.save`` / ``engine.load``).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from gptforge.launcher.run.checkpoint import format as ck
from gptforge.launcher.run.checkpoint.ownership import move_aside
from gptforge.parallel import context as pc
from gptforge.common.durable import Durability, fsync_path, write_atomic
from gptforge.common.log import get_logger
from gptforge.parallel.engine import CheckpointError


log = get_logger(__name__)


@dataclass
class _Pending:
    step: int
    reason: str
    handle: object  # the engine's save handle (wait(), files)
    partial: Path
    final: Path
    loader_state: dict
    started: float
    extra_files: list = field(default_factory=list)  # (relative path) written by this rank


def global_loader_state(states_by_dp_rank: list[dict]) -> dict:
    """One layout-free data position from every DP rank's ``state_dict()`` (mock batches are
    global already; WebDataset streams are merged so that any DP size can take them over)."""
    first = states_by_dp_rank[0]
    if "streams" in first:
        from gptforge.data.state import merge_states

        return merge_states(states_by_dp_rank)
    return first


@dataclass(frozen=True)
class RunRecord:
    """What a checkpoint records about its run beyond the ``checkpoint`` section; the per-rank
    entry fills it from the config, so that the Checkpointer reads no other section."""

    config: dict  # the resolved config, written into every manifest as it is
    model: dict  # the model section: a checkpoint of another shape is refused on load
    engine: str
    use_distributed_optimizer: bool
    global_batch_size: int
    seq_length: int
    seed: int
    data_source: str
    tokenizer_sha256: str | None


class NotWritten(CheckpointError):
    """A save failed; the message says what is kept."""


def no_point(name: str, step: int) -> None:
    """The default ``at_point``: nothing happens at the named points of a save."""


class Checkpointer:
    """``at_point(name, step)`` is called at the named points of a commit ("before_manifest",
    "before_rename"): the seam where the crash tests kill a rank."""

    def __init__(self, cfg: ck.CheckpointConfig, run: RunRecord, *, run_dir: str, ctx, engine,
                 batches, layout, stop, at_point: Callable[[str, int], None] = no_point):
        self.cfg, self.run, self.ctx, self.engine, self.batches = cfg, run, ctx, engine, batches
        self.dir = ck.save_dir(cfg, run_dir)
        self.layout, self.stop, self.at_point = layout, stop, at_point
        self._pending: _Pending | None = None
        self.loaded_from: Path | None = None
        self.last_saved_step: int | None = None

    # ---------------------------------------------------------------- saving

    def save(self, step: int, reason: str, *, sync: bool) -> bool:
        """Start a checkpoint of ``step`` (async only if configured and not ``sync``); False
        when none is written (non-finite weights)."""
        self.drain()
        final = self.dir / ck.step_name(step)
        if self.last_saved_step == step or (final / ck.MANIFEST).is_file():
            return True
        if not self._finite(step):
            return False
        with self._kept_on_failure(step):
            self._start(step, reason, final, sync)
        return True

    @contextlib.contextmanager
    def _kept_on_failure(self, step: int):
        """A save that fails (a full disk, a dead writer) says, in one line, what is kept."""
        try:
            yield
        except NotWritten:
            raise
        except (CheckpointError, OSError) as err:
            latest = ck.read_latest(self.dir)
            detail = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            raise NotWritten(f"checkpoint of step {step} in {self.dir} not written "
                                  f"({detail}); latest stays "
                                  f"{latest.name if latest else '(none)'}") from err

    def _start(self, step: int, reason: str, final: Path, sync: bool) -> None:
        partial = final.with_name(final.name + ck.PARTIAL_SUFFIX)
        if self.ctx.rank == 0:
            ck.remove_partials(self.dir)  # leftovers of a save that was cut off
            if final.is_dir():  # without a manifest: never taken for this checkpoint
                move_aside(final)
            partial.mkdir(parents=True)
        pc.barrier(self.ctx)
        started = time.perf_counter()
        with self.stop.saving():
            handle = self.engine.save(partial / ck.STATE_DIR,
                                      async_save=self.cfg.async_save and not sync)
            rng_rel = self._write_rng(partial)
            loader_state = self._global_loader_state()
        self._pending = _Pending(step, reason, handle, partial, final, loader_state, started,
                                 [rng_rel])
        if sync or not self.cfg.async_save:
            self.drain()

    def _finite(self, step: int) -> bool:
        """A checkpoint is never written from non-finite weights, so ``latest`` (and what
        retention keeps) always holds finite ones; the run goes on, and the non-finite guard of
        the loop stops it. Every rank looks at its own shard; the ranks agree."""
        import torch

        bad = any(not bool(torch.isfinite(param).all())
                  for chunk in self.engine.model_chunks for param in chunk.parameters())
        if not pc.max_over_ranks(self.ctx, int(bad)):
            return True
        latest = ck.read_latest(self.dir)
        log.warning(f"checkpoint of step {step} not written: the weights hold non-finite "
                    f"values; latest stays {latest.name if latest else '(none)'} in {self.dir}")
        return False

    def poll(self) -> None:
        """At a step boundary: commit the async save in flight if every rank has written it."""
        if self._pending is not None and self._pending.handle.poll():
            self._commit(self._pending)

    def drain(self) -> None:
        """Finish and commit the save in flight, if any."""
        if self._pending is not None:
            self._commit(self._pending)

    def _write_rng(self, partial: Path) -> str:
        from gptforge.parallel.seeding import rng_state

        rel = f"{ck.RNG_DIR}/rank-{self.ctx.rank:05d}.json"
        path = partial / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        coords = {"tp_rank": self.ctx.tp_rank, "pp_rank": self.ctx.pp_rank,
                  "dp_rank": self.ctx.dp_rank}
        write_atomic(path, json.dumps({"coords": coords, "state": rng_state()}),
                     Durability.DIRECTORY)
        return rel

    def _global_loader_state(self) -> dict:
        state = self.batches.state_dict()
        ranks = pc.all_gather_objects(self.ctx, (self.ctx.tp_rank, self.ctx.pp_rank,
                                                 self.ctx.dp_rank, state))
        per_dp = sorted((dp, st) for tp, pp, dp, st in ranks if tp == 0 and pp == 0)
        return global_loader_state([st for _, st in per_dp])

    def _my_files(self, p: _Pending) -> list[tuple[str, int, int]]:
        rels = [f"{ck.STATE_DIR}/{f.path}" for f in p.handle.wait().files] + p.extra_files
        return [(rel, (p.partial / rel).stat().st_size, ck.file_crc32(p.partial / rel))
                for rel in rels]

    def _commit(self, p: _Pending) -> None:
        self._pending = None
        with self.stop.saving(), self._kept_on_failure(p.step):
            mine = self._my_files(p)
            everyone = pc.all_gather_objects(self.ctx, (self.ctx.rank, mine))
            self.at_point("before_manifest", p.step)
            if self.ctx.rank == 0:
                files = {rel: {"bytes": size, "crc32": crc, "rank": rank}
                         for rank, entries in everyone for rel, size, crc in entries}
                write_atomic(p.partial / ck.MANIFEST,
                             json.dumps(self._manifest(p, files), indent=1), Durability.DIRECTORY)
                self.at_point("before_rename", p.step)
                p.partial.rename(p.final)
                fsync_path(self.dir)
                write_atomic(self.dir / ck.LATEST,
                             f"{p.final.name} {ck._sha256(p.final / ck.MANIFEST)}\n",
                             Durability.DIRECTORY)
                protect = {p.final.resolve()}
                if self.loaded_from is not None:
                    protect.add(self.loaded_from.resolve())
                ck.apply_retention(self.dir, self.cfg.keep_last, protect)
            pc.barrier(self.ctx)
        self.last_saved_step = p.step
        log.info(f"checkpoint {p.final} ({p.reason}, {time.perf_counter() - p.started:.2f}s)")

    def _manifest(self, p: _Pending, files: dict) -> dict:
        lay, run = self.layout, self.run
        gbs, seq = run.global_batch_size, run.seq_length
        return {
            "format": ck.FORMAT, "step": p.step, "reason": p.reason,
            "consumed_samples": p.step * gbs, "consumed_tokens": p.step * gbs * seq,
            "config": run.config,
            "layout": {"world_size": lay.world_size,
                       "tensor_model_parallel_size": lay.tensor_model_parallel_size,
                       "pipeline_model_parallel_size": lay.pipeline_model_parallel_size,
                       "virtual_pipeline_model_parallel_size":
                           lay.virtual_pipeline_model_parallel_size,
                       "data_parallel_size": lay.data_parallel_size,
                       "engine": run.engine,
                       "use_distributed_optimizer": run.use_distributed_optimizer},
            "data": {"source": run.data_source, "loader_state": p.loader_state},
            "tokenizer_sha256": run.tokenizer_sha256, "versions": ck.versions(),
            "saved_at": ck.now(), "async": self.cfg.async_save and p.reason == "interval",
            "resumed_from": str(self.loaded_from) if self.loaded_from else None,
            "files": files,
        }

    # ---------------------------------------------------------------- loading

    def config_changes(self, step_dir: Path) -> dict:
        """{dotted key: [saved value, current value]} for settings that differ."""
        saved = ck.read_manifest(step_dir)["config"]
        return {f"{section}.{key}": [saved.get(section, {}).get(key), value]
                for section, values in self.run.config.items() for key, value in values.items()
                if saved.get(section, {}).get(key) != value}

    def load(self, step_dir: Path, *, load_optim: bool) -> int:
        """Restore from ``step_dir``; returns the step to continue after (0 without optim)."""
        manifest = ck.read_manifest(step_dir)
        ck.check_compatible(manifest, self.run.model, step_dir)
        ck.check_engine(manifest, self.run.engine, step_dir, load_optim=load_optim)
        problems = pc.all_gather_objects(
            self.ctx, ck.verify_files(step_dir, manifest, self.ctx.rank, self.ctx.world_size))
        for problem in problems:
            if problem:
                raise CheckpointError(problem)
        self.engine.load(step_dir / ck.STATE_DIR, load_optim=load_optim)
        self.loaded_from = step_dir
        if not load_optim:
            return 0
        self.batches.load_state_dict(manifest["data"]["loader_state"])
        self._restore_rng(step_dir, manifest)
        self.last_saved_step = manifest["step"]
        return manifest["step"]

    def _restore_rng(self, step_dir: Path, manifest: dict) -> None:
        """The same layout continues every generator exactly; another one re-seeds them from
        (seed, step) so that no dropout mask of the first steps repeats."""
        from gptforge.parallel.seeding import set_rng_state, set_seed

        lay = manifest["layout"]
        same = (lay["world_size"], lay["tensor_model_parallel_size"],
                lay["pipeline_model_parallel_size"]) == (
            self.layout.world_size, self.layout.tensor_model_parallel_size,
            self.layout.pipeline_model_parallel_size)
        if same:
            path = step_dir / ck.RNG_DIR / f"rank-{self.ctx.rank:05d}.json"
            set_rng_state(json.loads(path.read_text())["state"])
        else:
            set_seed(self.run.seed + 1_000_003 * manifest["step"],
                     self.ctx.pp_rank)
