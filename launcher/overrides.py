"""Command-line arguments of the config verbs: ``--config a.yaml b.yaml`` and dotted overrides.

``--section.key=value`` and ``--section.key value`` are accepted; a bool key alone means true;
any other key without a value, and anything that is not an override, is refused in the words the
user typed, under the program's own name.

``GPTFORGE_TRAIN_ITERS=N`` in the environment shortens every training to N steps (the last
overrides, ``train.train_iters=N`` and ``optim.lr_warmup_iters=N // 2``): for trying commands
quickly, such as the README's (tests/integration/test_readme.py sets it).
"""

from __future__ import annotations

import argparse
import os

from gptforge.launcher.config import field_type

TRAIN_ITERS_ENV = "GPTFORGE_TRAIN_ITERS"


def env_overrides() -> list[str]:
    """The overrides ``GPTFORGE_TRAIN_ITERS`` stands for (none when it is unset)."""
    text = os.environ.get(TRAIN_ITERS_ENV, "").strip()
    if not text:
        return []
    from gptforge.common.errors import ConfigError

    if not text.isdigit() or int(text) < 1:
        raise ConfigError(TRAIN_ITERS_ENV, f"must be a whole number of steps >= 1, got {text!r}")
    steps = int(text)
    from gptforge.common.log import get_logger

    get_logger(__name__).info(f"{TRAIN_ITERS_ENV}={steps}: this training runs {steps} steps")
    return [f"--train.train_iters={steps}", f"--optim.lr_warmup_iters={steps // 2}"]


def _usage_error(prog: str, message: str):
    parser = argparse.ArgumentParser(prog=prog, add_help=False,
                                     usage=f"{prog} [--config FILE ...] [--section.key=value ...]")
    parser.error(message)  # prints the usage line and exits with code 2


def _join_values(rest: list[str], prog: str) -> list[str]:
    """``--a.b=1`` and ``--a.b 1`` → ``--a.b=1``; a bare bool key → ``--a.b=true``."""
    out, i = [], 0
    while i < len(rest):
        token = rest[i]
        key = token[2:].split("=", 1)[0]
        if not token.startswith("--") or "." not in key:
            hint = " (overrides look like --optim.lr=3e-4)" if token.startswith("--") else ""
            _usage_error(prog, f"unrecognised argument {token}{hint}")
        if "=" in token:
            out.append(token)
            i += 1
        elif i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            out.append(f"{token}={rest[i + 1]}")
            i += 2
        elif field_type(key.split(".")) is bool:
            out.append(f"{token}=true")
            i += 1
        elif field_type(key.split(".")) is None:
            out.append(f"{token}=")  # load_config names the unknown key
            i += 1
        else:
            _usage_error(prog, f"{token} needs a value ({token}=VALUE)")
    return out


def parse_train_args(argv: list[str], prog: str) -> tuple[list[str], list[str]]:
    """(config files, overrides) from ``argv``: the files are the words after ``--config`` up to
    the next ``--`` word (argparse would also take an override holding a space for a file)."""
    files, rest, i = [], [], 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if token.startswith("--config="):
            files.append(token.split("=", 1)[1])
        elif token == "--config":
            while i < len(argv) and not argv[i].startswith("--"):
                files.append(argv[i])
                i += 1
        else:
            rest.append(token)
    return files, _join_values(rest, prog) + env_overrides()
