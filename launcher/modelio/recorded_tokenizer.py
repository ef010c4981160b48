"""The tokenizer a checkpoint names (``data.tokenizer_model`` in its manifest's config), found
from wherever a verb (generate, eval, serve, convert) is started.

An older run may have recorded the path relative to the directory it was started in. Such a path
is looked for in the current directory, then in the checkpoint's run directory (the parent of its
checkpoints directory, and the one ``owner.json`` names), then in the directory the run was
started in (the run directory less its relative ``run.dir``). Found nowhere, the error names the
recorded path and every place looked in, and asks for ``--tokenizer``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gptforge.parallel.engine import CheckpointError


class TokenizerNotFound(CheckpointError):
    """A checkpoint's recorded tokenizer exists in none of the places it may be relative to."""


@dataclass(frozen=True)
class RecordedTokenizer:
    checkpoint: Path  # the step directory
    recorded: str  # data.tokenizer_model as the checkpoint has it ("": none)
    found: Path | None  # where it is (absolute)
    looked: tuple[Path, ...]  # every place tried, in order

    @property
    def path(self) -> str:
        """The tokenizer's path ("" if the checkpoint names none); raises if it is nowhere."""
        if self.found is not None or not self.recorded:
            return str(self.found or "")
        raise TokenizerNotFound(
            f"{self.checkpoint}: its tokenizer (data.tokenizer_model) {self.recorded!r} does not "
            f"exist; looked for {', '.join(str(p) for p in self.looked)}; pass --tokenizer PATH")


def find_tokenizer(step_dir: Path, manifest: dict) -> RecordedTokenizer:
    """Where the tokenizer recorded in ``manifest`` (of ``step_dir``) is, if anywhere."""
    recorded = (manifest.get("config", {}).get("data") or {}).get("tokenizer_model") or ""
    if not recorded:
        return RecordedTokenizer(step_dir, "", None, ())
    path = Path(recorded).expanduser()
    bases = [Path()] if path.is_absolute() else base_dirs(step_dir, manifest)
    looked = tuple(dict.fromkeys((base / path).absolute() for base in bases))
    found = next((p for p in looked if p.exists()), None)
    return RecordedTokenizer(step_dir, recorded, found and found.resolve(), looked)


def base_dirs(step_dir: Path, manifest: dict) -> list[Path]:
    """What a relative recorded path may be relative to, in the order they are tried."""
    from gptforge.launcher.run.checkpoint.ownership import read_owner

    save = Path(step_dir).absolute().parent
    recorded_run = Path((manifest.get("config", {}).get("run") or {}).get("dir") or "")
    run_dirs = [save.parent]
    if read_owner(save).get("run_dir"):
        run_dirs.append(Path(read_owner(save)["run_dir"]))
    if recorded_run.is_absolute():
        run_dirs.append(recorded_run)
    starts = [_started_in(run_dir, recorded_run) for run_dir in run_dirs]
    return [Path.cwd(), *run_dirs, *(s for s in starts if s is not None)]


def _started_in(run_dir: Path, recorded_run: Path) -> Path | None:
    """The directory a run was started in: ``run_dir`` less the relative ``run.dir`` it ends
    with (``/home/me/proj`` for ``/home/me/proj/runs/x`` and ``runs/x``)."""
    parts = recorded_run.parts
    if recorded_run.is_absolute() or not parts or run_dir.parts[-len(parts):] != parts:
        return None
    return Path(*run_dir.parts[:-len(parts)])
