"""The real data path under the trainer: tokenizer → shards → 2 ranks train and validate on them."""

from __future__ import annotations

import pytest

import os
import subprocess
import sys
from pathlib import Path

from gptforge.data.synthetic import write_text_corpus
from tests.conftest import ROOT, TINY, metrics

pytestmark = pytest.mark.slow  # several real processes

GPTFORGE = str(Path(sys.executable).parent / "gptforge")
CORPUS = ("json/*.py", "email/*.py", "logging/*.py", "textwrap.py")


def gptforge(*args, timeout=400):
    proc = subprocess.run([GPTFORGE, *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_two_ranks_train_on_real_shards_and_sample(tmp_path):
    corpus = write_text_corpus(tmp_path / "corpus", CORPUS)
    tok = tmp_path / "tok"
    gptforge("tokenizer", "train", "--input", str(corpus), "--vocab-size", "1000",
             "--model-prefix", str(tok), "--input-sentence-size", "20000")
    shards = tmp_path / "shards"
    gptforge("data", "prepare", "--input", str(corpus), "--tokenizer", f"{tok}.model",
             "--out", str(shards), "--valid-fraction", "0.05", "--shard-size-mb", "0.2",
             "--workers", "1", "--no-progress")
    run_dir = tmp_path / "run"
    proc = gptforge(
        "train", "--config", str(TINY), "--nproc-per-node", "2", "--run.dir", str(run_dir),
        "--data.source=webdataset", f"--data.sources=[{{path: {shards}}}]",
        f"--data.tokenizer_model={tok}.model", "--model.vocab_size=1000",
        "--model.seq_length=128", "--train.train_iters=30", "--train.eval_interval=15",
        "--sample.prompt=import", "--sample.max_new_tokens=16")
    records = metrics(run_dir)
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(val) == 2 and val[1] < val[0]
    sample = (run_dir / "sample.txt").read_text()
    assert sample.startswith("import") and len(sample) > len("import")
    assert "sample:" in proc.stdout
