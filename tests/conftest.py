"""Shared test helpers: the repo root, the tiny config, and real multi-process launches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gptforge.common.metrics_file import metrics_path, read_records
from gptforge.parallel.context import free_port

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
WORKER = ROOT / "tests" / "distributed" / "layouts_worker.py"


def run_layouts(nproc: int, out_dir: Path, layouts: dict[str, list[str]], common: list[str],
                timeout: int = 600) -> dict[str, dict]:
    """Run several layouts in one launch of ``nproc`` real processes (gloo); return each result."""
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = out_dir / "layouts.json"
    spec.write_text(json.dumps({"layouts": layouts, "common": common}))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", str(WORKER), str(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return {name: json.loads((out_dir / f"{name}.json").read_text()) for name in layouts}


def child_pids(pid: int) -> list[int]:
    """The PIDs of ``pid``'s children (the ranks under a launcher)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def metrics(run_dir: Path) -> list[dict]:
    """The run's records, through the project's one reader; every line must be a record."""
    records = read_records(run_dir)
    lines = metrics_path(run_dir).read_text().splitlines()
    assert len(records) == len(lines), f"{metrics_path(run_dir)}: a line is not a JSON record"
    return records


def train_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in metrics(run_dir) if "loss" in r]


def assert_close_losses(got: list[float], want: list[float], rel: float = 1e-5,
                        name: str = "") -> None:
    """Step-by-step relative comparison; a failure names the layout (``name``) and the step."""
    where = f"{name}: " if name else ""
    assert len(got) == len(want), f"{where}{len(got)} losses vs {len(want)}: {got} vs {want}"
    for step, (g, w) in enumerate(zip(got, want), start=1):
        assert abs(g - w) <= rel * abs(w), \
            f"{where}step {step}: {g} vs {w} (rel {abs(g - w) / abs(w):.2e})"


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests run only where CUDA is present (the lent GPU machine)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ---------------------------------------------------------------- honest tiers
# `pytest -m "not slow"` is the quick pass: a test that starts ranks (processes that train:
# gptforge train, the rank module, torchrun, deepspeed, Slurm jobs) must be marked slow. The
# guard below fails an unmarked test at the moment it starts one, naming the command.

_RANK_MODULES = ("gptforge.launcher.run", "torch.distributed.run", "tests.integration.crash_rank",
                 "tests.integration.paced_rank")
_RANK_PROGRAMS = ("torchrun", "deepspeed", "sbatch", "srun")


def starts_ranks(args) -> str | None:
    """Why the command ``args`` starts ranks, or None."""
    import shlex

    argv = [str(a) for a in args] if isinstance(args, (list, tuple)) else shlex.split(str(args))
    names = [Path(a).name for a in argv]
    for module in _RANK_MODULES:
        if module in argv:
            return f"-m {module}"
    if names[:1] and names[0] in _RANK_PROGRAMS:
        return names[0]
    cli = next((i for i, (a, n) in enumerate(zip(argv, names))
                if n == "gptforge" or a == "gptforge.launcher.cli.main"), None)
    if cli is None:
        return None
    verbs = [a for a in argv[cli + 1:] if not a.startswith("-")][:2]
    if verbs[:1] == ["train"]:
        return "gptforge train"
    if verbs == ["launch", "deepspeed"] and "--dry-run" not in argv:
        return "gptforge launch deepspeed"
    if verbs == ["launch", "slurm"] and "--submit" in argv:
        return "gptforge launch slurm --submit"
    return None


@pytest.fixture(autouse=True)
def _quick_tests_start_no_ranks(request, monkeypatch):
    if request.node.get_closest_marker("slow") is not None:
        return
    real_init = subprocess.Popen.__init__

    def guarded(self, args, *rest, **kwargs):
        why = starts_ranks(args)
        if why is not None:
            pytest.fail(f"{request.node.nodeid} starts ranks ({why}) but is not marked slow",
                        pytrace=False)
        real_init(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded)
