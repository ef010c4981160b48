"""The base class of every user-facing error of the data pipeline.

A command-line front end catches ``DataError`` and prints its message alone (no traceback), so
each message is one line that starts with what is at fault: a file (``path:line`` for a bad
record), a directory, a shard, or a config key such as ``data.sources[0]`` or ``--workers``.
"""

from __future__ import annotations

from gptforge.common.errors import UserError


class DataError(UserError):
    """A user-facing data problem; the message starts with the file, directory or key at fault."""
