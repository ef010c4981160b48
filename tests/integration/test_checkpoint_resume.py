"""Checkpoints end to end: kill and resume bitwise, a signal, atomic commits, bad checkpoints.

Runs the installed ``gptforge`` command on WebDataset shards with dropout, CPU fp32.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gptforge.data.synthetic import write_token_dataset
from gptforge.launcher.run.checkpoint import format as ck
from tests.conftest import ROOT, TINY, metrics

GPTFORGE = str(Path(sys.executable).parent / "gptforge")


def gptforge(*args, env=None, timeout=300):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([GPTFORGE, *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt-shards")
    rng = np.random.default_rng(3)
    docs = [[(np.arange(rng.integers(30, 300)) * rng.integers(1, 7) + rng.integers(0, 250)) % 250
             for _ in range(60)] for _ in range(3)]
    write_token_dataset(root, {"train": docs}, vocab_size=256, eod_id=255)
    return root


def train_args(shards, run_dir, iters=8, *extra):
    return ["train", "--config", str(TINY), "--run.dir", str(run_dir),
            f"--train.train_iters={iters}", "--train.eval_interval=0",
            "--checkpoint.save_interval=2", "--model.hidden_dropout=0.1",
            "--model.attention_dropout=0.1", "--data.source=webdataset",
            f"--data.sources=[{{path: {shards}}}]", *extra]


def losses_after_last_restart(run_dir: Path) -> dict[int, float]:
    records = metrics(run_dir)
    restarts = [i for i, r in enumerate(records) if r.get("event") == "restart"]
    assert restarts, "the run did not restart from a checkpoint"
    return {r["step"]: r["loss"] for r in records[restarts[-1]:] if "loss" in r}


@pytest.fixture(scope="module")
def uninterrupted(shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("whole") / "run"
    proc = gptforge(*train_args(shards, run_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


@pytest.mark.parametrize("crash, resumes_at, extra", [
    ("after_step:5", 4, []),       # SIGKILLed after its step-4 checkpoint, mid-way to the next
    ("before_rename:6", 4, []),    # SIGKILLed while saving step 6: files written, not committed
    # async: step 4's save is committed at a later step boundary, so step 2 is the latest
    ("after_step:5", 2, ["--checkpoint.async_save=true"]),
])
@pytest.mark.slow
def test_killed_run_resumes_bitwise(shards, uninterrupted, tmp_path, crash, resumes_at, extra):
    run_dir = tmp_path / "run"
    killed = subprocess.run([sys.executable, "-m", "tests.integration.crash_rank", crash,
                             *train_args(shards, run_dir, 8, *extra)[1:]], capture_output=True,
                            text=True, cwd=ROOT, timeout=300,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert killed.returncode == -signal.SIGKILL
    save = run_dir / "checkpoints"
    assert ck.read_latest(save).name == ck.step_name(resumes_at)
    assert (save / ck.LATEST).read_text().split()[0] == ck.step_name(resumes_at)
    if crash.startswith("before_"):
        assert [p.name for p in ck.partial_checkpoints(save)] == ["step-0000006.partial"]
    again = gptforge(*train_args(shards, run_dir, 8, *extra))  # the same command
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = losses_after_last_restart(run_dir)
    assert sorted(resumed) == list(range(resumes_at + 1, 9))
    for step, loss in resumed.items():
        assert loss == uninterrupted[step], (step, loss, uninterrupted[step])  # bitwise
    assert ck.partial_checkpoints(save) == []  # the leftover was cleaned by the next save
    assert [p.name for p in ck.complete_checkpoints(save)][-2:] == [
        "step-0000006", "step-0000008"]
    assert len(ck.complete_checkpoints(save)) <= 3 + (resumes_at == 2)  # keep_last, + loaded


@pytest.mark.slow
def test_sigusr1_checkpoints_both_ranks_at_one_step_and_the_restart_is_bitwise(shards,
                                                                               tmp_path):
    whole = gptforge(*train_args(shards, tmp_path / "whole", 30), "--nproc-per-node", "2")
    assert whole.returncode == 0, whole.stderr[-3000:]
    want = {r["step"]: r["loss"] for r in metrics(tmp_path / "whole") if "loss" in r}
    run_dir = tmp_path / "run"
    cmd = [GPTFORGE, *train_args(shards, run_dir, 30), "--nproc-per-node", "2",
           "--checkpoint.save_interval=0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").exists() and \
                len((run_dir / "metrics.jsonl").read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]  # checkpointed: restart me
    assert "Traceback" not in out + err
    stop = [r for r in metrics(run_dir) if r.get("event") == "stopped"]
    assert len(stop) == 1 and stop[0]["signal"] == "SIGUSR1"
    step = stop[0]["step"]
    assert 3 <= step < 30
    latest = ck.read_latest(run_dir / "checkpoints")
    assert latest.name == ck.step_name(step)
    manifest = ck.read_manifest(latest)
    assert manifest["reason"] == "signal" and manifest["step"] == step
    assert sorted(p.name for p in (latest / "rng").iterdir()) == ["rank-00000.json",
                                                                  "rank-00001.json"]
    again = gptforge(*cmd[1:])
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = losses_after_last_restart(run_dir)
    assert sorted(resumed) == list(range(step + 1, 31))
    assert all(resumed[s] == want[s] for s in resumed), [(s, resumed[s], want[s])
                                                         for s in resumed]


@pytest.mark.slow
def test_rerunning_a_finished_run_continues_it_without_mixing(shards, tmp_path):
    run_dir = tmp_path / "run"
    assert gptforge(*train_args(shards, run_dir, 4)).returncode == 0
    again = gptforge(*train_args(shards, run_dir, 6))  # same dir, two more steps
    assert again.returncode == 0, again.stderr[-3000:]
    records = metrics(run_dir)
    events = [(r["event"], r["step"]) for r in records if "event" in r]
    assert events == [("restart", 4)]
    restart = next(r for r in records if "event" in r)
    assert restart["config_changes"] == {"train.train_iters": [4, 6]}
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_load_optim_false_loads_the_weights_and_starts_a_new_schedule(shards, saved, tmp_path):
    fresh = gptforge(*train_args(shards, tmp_path / "fresh", 4))
    tuned = gptforge(*train_args(shards, tmp_path / "tuned", 4),
                     f"--checkpoint.load={saved}", "--checkpoint.load_optim=false")
    assert fresh.returncode == 0 and tuned.returncode == 0, tuned.stderr[-3000:]
    f, t = metrics(tmp_path / "fresh"), metrics(tmp_path / "tuned")
    assert [r["step"] for r in t if "loss" in r] == [1, 2, 3, 4]  # a new schedule from step 0
    assert [r["lr"] for r in t if "loss" in r] == [r["lr"] for r in f if "loss" in r]
    loaded = [r for r in t if r.get("event") == "loaded"]
    assert loaded and loaded[0]["load_optim"] is False and loaded[0]["step"] == 0
    # the weights are the saved run's: its first loss is already below a fresh model's
    first_tuned = next(r["loss"] for r in t if "loss" in r)
    first_fresh = next(r["loss"] for r in f if "loss" in r)
    assert first_tuned < first_fresh - 0.01, (first_tuned, first_fresh)


# ------------------------------------------------------------------ bad checkpoints


@pytest.fixture(scope="module")
def saved(shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("saved") / "run"
    proc = gptforge(*train_args(shards, run_dir, 3))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir / "checkpoints" / ck.step_name(2)


def _copy(saved, tmp_path) -> Path:
    target = tmp_path / "ckpt" / saved.name
    shutil.copytree(saved, target)
    return target


def _load(shards, tmp_path, checkpoint, *extra):
    return gptforge(*train_args(shards, tmp_path / "new", 4), f"--checkpoint.load={checkpoint}",
                    *extra)


def _assert_refused(proc, *culprits):
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out
    line = [line for line in proc.stderr.splitlines() if "error:" in line][0]
    for culprit in culprits:
        assert str(culprit) in line, line
    assert "step      1" not in proc.stdout  # before any step runs


@pytest.mark.slow
def test_a_checkpoint_of_another_shape_is_refused_naming_the_key(shards, saved, tmp_path):
    proc = _load(shards, tmp_path, saved, "--model.hidden_size=96", "--model.num_attention_heads=4")
    _assert_refused(proc, "model.hidden_size", saved)
    assert "[gptforge] building the model" not in proc.stdout


@pytest.mark.slow
def test_a_run_dir_of_the_other_engine_is_refused_before_any_model(tmp_path):
    """A run dir whose checkpoints the megatron engine wrote, restarted with the deepspeed
    engine: refused at once (the front door, and the rank entry of torchrun/srun) in one line
    naming both engines, the checkpoint and the ways out; no model is built. The first run, a
    bare rank entry without PYTHONWARNINGS, prints none of megatron's Apex/TE fallback notes."""
    run_dir = tmp_path / "run"
    args = ["--config", str(TINY), "--run.dir", str(run_dir), "--train.train_iters=1",
            "--optim.lr_warmup_iters=0", "--train.eval_interval=0"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "GPTFORGE_DEBUG")}
    rank = [sys.executable, "-m", "gptforge.launcher.run"]
    first = subprocess.run([*rank, *args], capture_output=True, text=True, cwd=ROOT,
                           timeout=300, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Apex" not in first.stderr and "Transformer Engine" not in first.stderr, first.stderr
    step = run_dir / "checkpoints" / ck.step_name(1)
    for launch in ([GPTFORGE, "train"], rank):
        started = time.monotonic()
        proc = subprocess.run([*launch, *args, "--parallel.engine=deepspeed"], capture_output=True,
                              text=True, cwd=ROOT, timeout=300, env=env)
        took = time.monotonic() - started
        _assert_refused(proc, step, "saved by the megatron engine", "parallel.engine=deepspeed",
                        "--parallel.engine=megatron", "--run.dir", "--run.overwrite=true")
        assert len([line for line in proc.stderr.splitlines() if "error:" in line]) == 1
        assert "building the model" not in proc.stdout and took < 10, (took, proc.stdout)
    assert [r["step"] for r in metrics(run_dir) if "loss" in r] == [1]  # nothing was appended


@pytest.mark.slow
def test_a_missing_shard_is_named(shards, saved, tmp_path):
    ckpt = _copy(saved, tmp_path)
    shard = next((ckpt / "state").glob("*.distcp"))
    shard.unlink()
    _assert_refused(_load(shards, tmp_path, ckpt), shard.name, "missing")


@pytest.mark.slow
def test_a_corrupted_file_is_named(shards, saved, tmp_path):
    ckpt = _copy(saved, tmp_path)
    shard = next((ckpt / "state").glob("*.distcp"))
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    _assert_refused(_load(shards, tmp_path, ckpt), shard.name, "checksum")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
@pytest.mark.parametrize("victim", [".metadata", "common.pt"])
def test_a_pickle_payload_is_refused_and_never_runs(shards, saved, tmp_path, victim):
    """Even with the manifest's checksum forged to match, the safe reader refuses it."""
    ckpt = _copy(saved, tmp_path)
    marker = tmp_path / "pwned"
    path = ckpt / "state" / victim
    if victim == "common.pt":
        import torch

        torch.save({"payload": _Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(_Payload(marker)))
    manifest = json.loads((ckpt / ck.MANIFEST).read_text())
    entry = manifest["files"][f"state/{victim}"]
    entry["bytes"], entry["crc32"] = path.stat().st_size, ck.file_crc32(path)
    (ckpt / ck.MANIFEST).write_text(json.dumps(manifest))
    _assert_refused(_load(shards, tmp_path, ckpt), victim)
    assert not marker.exists(), "the payload ran"


def test_inspect_and_list(saved, tmp_path):
    save = tmp_path / "save"
    shutil.copytree(saved.parent, save)
    (save / "step-0000009.partial").mkdir()
    proc = gptforge("checkpoint", "list", str(save))
    assert proc.returncode == 0, proc.stderr
    assert "step-0000003" in proc.stdout and "complete" in proc.stdout
    assert "step-0000009.partial" in proc.stdout and "partial" in proc.stdout
    proc = gptforge("checkpoint", "inspect", str(save))
    assert proc.returncode == 0, proc.stderr
    for text in ("step 3 (final)", "TP=1 PP=1 DP=1", "parameters  220,544", "consumed 24"):
        assert text in proc.stdout, text
    bad = gptforge("checkpoint", "inspect", str(tmp_path / "nothing"))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
