"""The one log path: every message gptforge prints goes through ``logging`` and is shaped here.

- What gptforge says about a run (notes, checkpoints, stop signals, MLflow) reads
  ``[gptforge] <message>``; a rank other than 0 of a multi-rank run says ``[gptforge rank N]``.
  A record made with ``extra=PLAIN`` prints as it is: a step's metrics line, a command's
  ``gptforge: error: ...`` line.
- INFO goes to stdout, WARNING and above to stderr (the streams as they are when the record is
  made, so a redirected ``sys.stdout`` or a test's capture gets it).
- Rank filtering, in this one place: only rank 0 prints INFO and WARNING (the rank comes from
  the launcher's environment, or ``set_rank``). ERROR prints on every rank; a record made with
  ``extra=ANY_RANK`` too, and under the run's own ``[gptforge]`` prefix: what the logging rank
  (the last pipeline stage, which holds the loss) reports for the run -- metrics, the sample.
- Records also propagate to the root logger (pytest's ``caplog``; nothing prints there unless an
  application configures it).

Modules take their logger with ``get_logger(__name__)``; data/'s ``logging.getLogger(__name__)``
loggers are under ``gptforge`` as well and print the same way.
"""

from __future__ import annotations

import logging
import os
import sys

ROOT = "gptforge"
PLAIN = {"plain": True}  # extra=: the message is the whole line
ANY_RANK = {"any_rank": True}  # extra=: print on whichever rank makes the record
PLAIN_ANY_RANK = {**PLAIN, **ANY_RANK}
DEBUG_ENV = "GPTFORGE_DEBUG"  # --debug: tracebacks, and the libraries' own chatter


# megatron-core warns at import, on every rank, of the optional fused kernels (Apex, Transformer
# Engine) it falls back from: "Transformer Engine and Apex are not installed", "Apex is not
# installed". Only these are silenced (``quiet_fallback_warnings``).
FALLBACK_WARNINGS = r".*(Apex|Transformer Engine).*not installed.*"


def quiet_fallback_warnings() -> None:
    """Before megatron is imported: drop its fallback-kernel warnings (the CLI, each rank)."""
    import warnings

    warnings.filterwarnings("ignore", message=FALLBACK_WARNINGS, category=UserWarning)


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


class _Rank:
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0)
    world_size = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")) or 1)


def set_rank(rank: int, world_size: int) -> None:
    """Which rank this process is (the per-rank entry calls it once it knows)."""
    _Rank.rank, _Rank.world_size = rank, world_size


def prefix(any_rank: bool = False) -> str:
    """``[gptforge] `` or, on a rank other than 0 speaking for itself, ``[gptforge rank N] ``."""
    if _Rank.world_size > 1 and _Rank.rank != 0 and not any_rank:
        return f"[{ROOT} rank {_Rank.rank}] "
    return f"[{ROOT}] "


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if getattr(record, "plain", False):
            return text
        return prefix(getattr(record, "any_rank", False)) + text


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return (_Rank.rank == 0 or record.levelno >= logging.ERROR
                or getattr(record, "any_rank", False))


class _Console(logging.Handler):
    """stdout below WARNING, stderr from WARNING on; flushed after every line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stdout if record.levelno < logging.WARNING else sys.stderr
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 (logging's own contract: never raise from emit)
            self.handleError(record)


def _install() -> logging.Logger:
    root = logging.getLogger(ROOT)
    if not any(isinstance(h, _Console) for h in root.handlers):
        handler = _Console()
        handler.setFormatter(_Format())
        handler.addFilter(_RankFilter())
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    return root


def get_logger(name: str) -> logging.Logger:
    """The logger of module ``name`` (``gptforge.…``), printing through the one handler."""
    _install()
    return logging.getLogger(name if name.startswith(ROOT + ".") or name == ROOT
                             else f"{ROOT}.{name}")


_install()
