"""How a run ends when something is wrong: one line for the user, the traceback behind --debug.

A *user error* (bad config, data, run dir, checkpoint) prints
``gptforge: error: <what>, <which key/file/rank>`` and exits with EXIT_USER_ERROR; anything else
is a bug and exits with EXIT_INTERNAL_ERROR, also in one line unless debugging is on
(``--debug`` or ``GPTFORGE_DEBUG=1``). Under the local launcher each rank writes its error to
``$GPTFORGE_ERROR_DIR/rank-<N>.json`` instead of printing, and the launcher prints the first
failing rank's message once.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path

from gptforge.common.errors import UserError
from gptforge.common.log import PLAIN, debug_enabled, get_logger

EXIT_OK = 0
EXIT_INTERNAL_ERROR = 1
EXIT_USER_ERROR = 2
EXIT_CHECKPOINTED = 75  # stopped by a signal after saving a checkpoint: restart me (EX_TEMPFAIL)
ERROR_DIR_ENV = "GPTFORGE_ERROR_DIR"

log = get_logger(__name__)


def is_user_error(exc: BaseException) -> bool:
    """Every part's user-facing errors derive from ``common/errors.py: UserError``."""
    return isinstance(exc, UserError)


def describe(exc: BaseException) -> str:
    if is_user_error(exc):
        return str(exc)
    return f"{type(exc).__name__}: {exc} (an internal error; rerun with --debug for the traceback)"


def report(exc: BaseException, rank: int | None = None, world_size: int = 1) -> int:
    """Tell the user about ``exc`` (or hand it to the launcher); return the exit code."""
    code = EXIT_USER_ERROR if is_user_error(exc) else EXIT_INTERNAL_ERROR
    where = f" (rank {rank})" if rank is not None and world_size > 1 else ""
    line = f"gptforge: error: {describe(exc)}{where}"
    error_dir = os.environ.get(ERROR_DIR_ENV)
    if error_dir and rank is not None:
        record = {"time": time.time(), "rank": rank, "line": line, "user_error": code == 2,
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
