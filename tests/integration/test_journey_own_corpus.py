"""Journey 2 (../shared/JOURNEYS.md): own corpus -> tokenizer -> shards -> planner layout ->
train on 2 ranks -> eval -> generate -> Hugging Face folder, each step the command a user types
(the tiny preset and 2 CPU "devices" instead of 1.3B on 8 GPUs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from gptforge.data import tokenizer
from gptforge.data.synthetic import write_text_corpus
from gptforge.launcher.cli.main import main
from gptforge.launcher.modelio.inference import load_checkpoint, one_process
from tests import hf_models
from tests.conftest import TINY, metrics

pytestmark = pytest.mark.slow


def test_own_corpus_to_hf_folder_through_the_planners_layout(tmp_path, capsys):
    corpus = write_text_corpus(tmp_path / "corpus", ("json/*.py", "email/*.py", "textwrap.py"))
    tok = tmp_path / "tok"
    assert main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "1000",
                 "--model-prefix", str(tok), "--input-sentence-size", "20000"]) == 0
    shards = tmp_path / "shards"
    assert main(["data", "prepare", "--input", str(corpus), "--tokenizer", f"{tok}.model",
                 "--out", str(shards), "--valid-fraction", "0.05", "--shard-size-mb", "0.2",
                 "--workers", "1", "--no-progress"]) == 0
    layout = tmp_path / "layout.yaml"
    assert main(["plan", "--model", "tiny", "--nodes", "1", "--gpus-per-node", "2",
                 "--gpu", "cpu", "--emit-config", str(layout)]) == 0
    plan = capsys.readouterr().out
    emitted = yaml.safe_load(layout.read_text())
    assert "--nproc-per-node 2" in layout.read_text()  # the command it tells the user to run

    run = tmp_path / "runs" / "m1"
    proc = subprocess.run(
        [sys.executable, "-m", "gptforge.launcher.cli.main", "train", "--config", str(TINY),
         str(layout), "--nproc-per-node", "2", "--data.source=webdataset",
         f"--data.sources=[{{path: {shards}}}]", f"--data.tokenizer_model={tok}.model",
         "--model.vocab_size=1000", f"--run.dir={run}", "--train.train_iters=20",
         "--train.eval_interval=10"],
        capture_output=True, text=True, timeout=300,
        env={**{k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"},
             "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    p = emitted["parallel"]
    assert (f"layout: TP={p['tensor_model_parallel_size']} PP={p['pipeline_model_parallel_size']}"
            in proc.stdout + proc.stderr), plan
    assert "Warning" not in proc.stderr, proc.stderr[-3000:]  # a console a user can read
    records = metrics(run)
    losses = [r["loss"] for r in records if "loss" in r]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(losses) == 20 and sum(losses[-3:]) < sum(losses[:3]) and val[1] < val[0]

    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(run / "checkpoints"), "--data", str(shards),
                 "--output-json", str(out)]) == 0
    evaluated = json.loads(out.read_text())
    assert abs(evaluated["loss"] - val[-1]) < 0.3  # the whole valid split vs the run's batches
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(run / "checkpoints"), "--prompt",
                 "def main(", "--top-p", "0.9", "--max-new-tokens", "8", "--seed", "1"]) == 0
    completion = capsys.readouterr().out
    assert completion.startswith("def main(") and len(completion.strip()) > len("def main(")

    hf = tmp_path / "hf" / "m1"
    assert main(["convert", "to-hf", "--checkpoint", str(run / "checkpoints"),
                 "--out", str(hf)]) == 0
    sp = tokenizer.load(f"{tok}.model")
    text = (corpus / next(iter(os.listdir(corpus)))).read_text()[:400]
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(hf)(text)["input_ids"] == sp.encode(text)
    tokens = torch.tensor([sp.encode(text)[:64]])
    with one_process():
        loaded = load_checkpoint(run / "checkpoints")
        with torch.no_grad():
            ours = loaded.model.eval()(tokens, torch.arange(tokens.shape[1]).unsqueeze(0), None,
                                       runtime_gather_output=True)
    ref = hf_models.hf_logits(hf, tokens)
    assert (ours[..., :ref.shape[-1]] - ref).abs().max().item() <= 1e-5
