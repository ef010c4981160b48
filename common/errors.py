"""The one base of every error the user can fix, and the config error that names its key.

Every part raises a subclass of ``UserError`` for a problem in what the user gave (a config key,
a file, a directory, a checkpoint, a rank's environment, an installed library version). Its
message starts with the culprit and fits one line; the command line prints it alone as
``gptforge: error: <message>`` and exits with code 2 (``launcher/errors.py``). Anything else that
escapes is a bug: exit code 1, and the traceback behind ``--debug``.
"""

from __future__ import annotations


class UserError(ValueError):
    """Something the user can fix; the message names the key, file, directory or rank at fault.
    ``consequence``: it follows from another rank's failure (a lost connection), which is the
    one to report when that rank's own failure is known."""

    consequence = False


class ConfigError(UserError):
    """A configuration problem; ``key`` names the setting at fault and starts the message."""

    def __init__(self, key: str, message: str):
        self.key, self.detail = key, message
        super().__init__(f"{key}: {message}")
