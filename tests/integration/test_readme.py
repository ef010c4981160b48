"""The README runs as written: every ```bash block (those made only of `make` commands aside)
runs in order, in one shell, in a fresh copy of the repository (the installed .venv linked in,
PATH without it until the README's own `source .venv/bin/activate`), with only the step counts
shortened (GPTFORGE_TRAIN_ITERS, which the README documents). A failing block is named by its
README line, with the output that led to it."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # trains, starts servers and a Slurm cluster
STEPS = 2
FENCE = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)


def shell_blocks(readme: str) -> list[tuple[int, str]]:
    """(line number, text) of each ```bash block that is not only `make` commands."""
    blocks = []
    for match in FENCE.finditer(readme):
        text = match.group(1)
        commands = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
        if all(ln.startswith("make ") for ln in commands):
            continue
        blocks.append((readme.count("\n", 0, match.start()) + 2, text))
    return blocks


def test_shell_blocks_are_found_and_the_make_commands_left_out():
    blocks = shell_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 10
    assert blocks[0][1].startswith("source .venv/bin/activate")
    assert not any(text.lstrip().startswith("make demo") for _, text in blocks)


def script(blocks: list[tuple[int, str]]) -> str:
    lines = ["set -euo pipefail"]
    for number, (line, text) in enumerate(blocks, 1):
        lines += [f"echo '::README block {number} (line {line})::'", text]
    return "\n".join(lines) + "\n"


def fresh_copy(dest: Path) -> Path:
    """The repository's files (tracked and new, not ignored) with the installed .venv linked."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    (dest / ".venv").symlink_to(ROOT / ".venv")
    return dest


def test_the_readme_runs_as_written(tmp_path):
    repo = fresh_copy(tmp_path / "repo")
    blocks = shell_blocks((repo / "README.md").read_text())
    venv_bin = str(ROOT / ".venv" / "bin")
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != venv_bin)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.update(PATH=path, GPTFORGE_TRAIN_ITERS=str(STEPS), HOME=str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    log = tmp_path / "readme.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(["bash", "-c", script(blocks)], cwd=repo, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=1500)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # servers a failed block left behind
            except ProcessLookupError:
                pass
    text = log.read_text()
    reached = re.findall(r"::README block (\d+) \(line (\d+)\)::", text)
    where = f"block {reached[-1][0]} at README line {reached[-1][1]}" if reached else "start"
    assert code == 0, f"the README failed in {where} (exit {code}):\n{text[-6000:]}"
    assert len(reached) == len(blocks)
    check_results(repo, text)


def check_results(repo: Path, text: str) -> None:
    """What the README's commands say they make, made."""
    runs = repo / "runs"
    for run in ("tiny", "tp2", "pp2", "own", "sft", "zero2", "zero3", "from-zero3", "plan", "ft",
                "s1", "elastic", "e1", "m1", "m2"):
        steps = [json.loads(ln)["step"] for ln in (runs / run / "metrics.jsonl").open()
                 if '"loss"' in ln]
        assert steps and steps[-1] == STEPS, (run, steps)
    assert (runs / "own" / "sample.txt").read_text().strip()
    umask = os.umask(0)
    os.umask(umask)
    mode = (repo / "hf" / "own" / "model.safetensors").stat().st_mode & 0o777
    assert mode == 0o666 & ~umask, oct(mode)  # as any file the user writes
    assert len(json.loads((repo / "out.json").read_text())) == 2
    assert '"object":"text_completion"' in text.replace(" ", "")  # the served completion
    assert "state       COMPLETED" in text  # the Slurm job, waited for
