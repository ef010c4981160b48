"""How a run ends when something is wrong: one line for the user, the traceback behind --debug.

A *user error* (bad config, data, run dir, checkpoint) prints
``gptforge: error: <what>, <which key/file/rank>`` and exits with EXIT_USER_ERROR; anything else
is a bug and exits with EXIT_INTERNAL_ERROR, also in one line unless debugging is on
(``--debug`` or ``GPTFORGE_DEBUG=1``). Under the local launcher each rank writes its error to
``$GPTFORGE_ERROR_DIR/rank-<N>.json`` instead of printing, and the launcher prints the first
failing rank's message once. Without it (torchrun, srun) a user error found before the process
group is up, which every rank finds alike (``alike_on``), is printed by one rank: the config's by
rank 0, a node's files' and environment's by each node's first rank; the others exit with the
same code, silently.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

from gptforge.common.errors import UserError
from gptforge.common.log import PLAIN, debug_enabled, get_logger

EXIT_OK = 0
EXIT_INTERNAL_ERROR = 1
EXIT_USER_ERROR = 2
EXIT_CHECKPOINTED = 75  # stopped by a signal after saving a checkpoint: restart me (EX_TEMPFAIL)
ERROR_DIR_ENV = "GPTFORGE_ERROR_DIR"

log = get_logger(__name__)


EVERY_RANK = "every rank"  # the config: the same arguments and files on every rank
EACH_NODE = "each node"  # what a node's ranks see alike: its files, its environment
_ALIKE_ATTR = "gptforge_alike_on"
QUIET_RANK_LINGER_S = 1.0


@contextmanager
def alike_on(scope: str):
    """A user error raised inside is one that every rank (of a node, for EACH_NODE) raises
    alike: ``report`` prints it on one rank only."""
    try:
        yield
    except UserError as exc:
        if not hasattr(exc, _ALIKE_ATTR):
            setattr(exc, _ALIKE_ATTR, scope)
        raise


def _speaks(exc: BaseException, rank: int, local_rank: int) -> bool:
    """Whether this rank prints ``exc`` (torchrun, srun: nobody collects the ranks' errors)."""
    scope = getattr(exc, _ALIKE_ATTR, None)
    if scope == EVERY_RANK:
        return rank == 0
    if scope == EACH_NODE:
        return local_rank == 0
    return True


def is_user_error(exc: BaseException) -> bool:
    """Every part's user-facing errors derive from ``common/errors.py: UserError``."""
    return isinstance(exc, UserError)


def describe(exc: BaseException) -> str:
    if is_user_error(exc):
        return str(exc)
    return f"{type(exc).__name__}: {exc} (an internal error; rerun with --debug for the traceback)"


def report(exc: BaseException, rank: int | None = None, world_size: int = 1,
           local_rank: int | None = None) -> int:
    """Tell the user about ``exc`` (or hand it to the launcher); return the exit code."""
    code = EXIT_USER_ERROR if is_user_error(exc) else EXIT_INTERNAL_ERROR
    alike = getattr(exc, _ALIKE_ATTR, None) == EVERY_RANK
    where = f" (rank {rank})" if rank is not None and world_size > 1 and not alike else ""
    line = f"gptforge: error: {describe(exc)}{where}"
    error_dir = os.environ.get(ERROR_DIR_ENV)
    if rank is not None and world_size > 1 and not error_dir and not debug_enabled() \
            and not _speaks(exc, rank, rank if local_rank is None else local_rank):
        # another rank says it; a moment for it to, before a launcher that saw this rank
        # fail stops the others (torchrun does at once)
        time.sleep(QUIET_RANK_LINGER_S)
        return code
    if error_dir and rank is not None:
        record = {"time": time.time(), "rank": rank, "line": line, "user_error": code == 2,
                  "consequence": bool(getattr(exc, "consequence", False)),
                  "traceback": traceback.format_exc()}
        try:
            Path(error_dir, f"rank-{rank}.json").write_text(json.dumps(record))
        except OSError:
            log.error(line, extra=PLAIN)
    else:
        log.error(line, extra=PLAIN)
    if debug_enabled():
        log.error("".join(traceback.format_exception(exc)).rstrip("\n"), extra=PLAIN)
    return code
