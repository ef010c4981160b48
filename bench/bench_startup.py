"""A process's start: megatron-core's imports with and without the start-up step
(``parallel/megatron/startup.py``: on CPU, megatron's JIT fuser off before it is imported),
DeepSpeed's import as it is and as ``parallel/deepspeed/compat.py`` does it (without its
autotuner's mlflow), and a whole one-rank training run of 3 steps (``python -m
gptforge.launcher.run``) as it was and as it is now: with the start-up step and without the
interpreter's last garbage-collection passes at exit (``common/shutdown.py``).

Each row is a fresh interpreter, the two variants alternating, best and median of ``--repeats``;
both rows are measured side by side in one run.

    python bench/bench_startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPORTS = """
import megatron.core
from megatron.core.models.gpt import GPTModel
import megatron.core.distributed, megatron.core.optimizer, megatron.core.dist_checkpointing
"""
STARTUP = ("from gptforge.parallel.megatron.startup import before_megatron_import\n"
           "before_megatron_import()\n")


def _seconds(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    return time.perf_counter() - start


def _row(name: str, times: list[float]) -> None:
    print(f"{name:<46} best {min(times):6.2f} s   median {statistics.median(times):6.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    py = [sys.executable, "-W", "ignore", "-c"]
    variants = {"megatron-core imports, as it is": py + ["import torch\n" + IMPORTS],
                "megatron-core imports, start-up step first": py + [
                    "import torch\n" + STARTUP + IMPORTS]}
    variants["deepspeed import, as it is"] = py + ["import torch, deepspeed"]
    variants["deepspeed import, compat.import_deepspeed"] = py + [
        "import torch\nfrom gptforge.parallel.deepspeed import compat\n"
        "compat.import_deepspeed()"]
    with tempfile.TemporaryDirectory() as tmp:
        rank = ["-m", "gptforge.launcher.run", "--config", str(ROOT / "configs" / "tiny.yaml"),
                "--train.train_iters=3", "--checkpoint.enabled=false", "--run.overwrite=true",
                "--run.dir", f"{tmp}/run"]
        # the same rank with megatron imported first, as it is (the start-up step then finds it
        # imported and does nothing), and the interpreter's own end (no handler registered)
        as_is = ("import sys, runpy, torch, megatron.core\n"
                 "import gptforge.common.shutdown as shutdown\n"
                 "shutdown._REGISTERED = True\n"
                 f"sys.argv = ['gptforge.launcher.run'] + {rank[2:]!r}\n"
                 "runpy.run_module('gptforge.launcher.run', run_name='__main__')")
        variants["one-rank run of 3 tiny steps, as it is"] = py + [as_is]
        variants["one-rank run of 3 tiny steps, start-up and exit steps"] = [
            sys.executable, "-W", "ignore", *rank]
        times = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, cmd in variants.items():
                times[name].append(_seconds(cmd))
    print(f"python {sys.version.split()[0]}, {args.repeats} fresh processes each")
    for name, values in times.items():
        _row(name, values)
    names = list(times)
    for base, fast in zip(names[::2], names[1::2]):
        saved = statistics.median(times[base]) - statistics.median(times[fast])
        print(f"saved ({fast.split(',')[0]}): {saved:.2f} s per process, median")


if __name__ == "__main__":
    main()
