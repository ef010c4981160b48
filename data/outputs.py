"""Output directories of the data verbs: refuse an unusable one before writing anything, and
know which directories a run created so that a failed run can remove them."""

from __future__ import annotations

from pathlib import Path

from gptforge.data.errors import DataError


def missing_root(directory: Path) -> Path | None:
    """The outermost directory that ``directory.mkdir(parents=True)`` would create (None if
    ``directory`` exists)."""
    directory = Path(directory).absolute()
    if directory.exists():
        return None
    root = directory
    while not root.parent.exists():
        root = root.parent
    return root


def check_out_dir(directory: Path, flag: str, error: type[DataError] = DataError) -> None:
    """``directory`` is a directory or can be made one; else ``error`` naming it and ``flag``."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise error(f"{directory}: exists and is not a directory ({flag})")
    root = missing_root(directory)
    if root is not None and not root.parent.is_dir():
        raise error(f"{directory}: cannot be created, {root.parent} is not a directory ({flag})")
