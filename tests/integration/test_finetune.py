"""Fine-tuning end to end: prompt/response JSONL → SFT shards (a Hugging Face tokenizer folder)
→ ``gptforge train --config configs/tiny.yaml configs/finetune.yaml``; the prompt tokens carry
no loss (on the mask and on the loss value) and the response loss falls.

The data makes a leak show in the loss: each prompt is ten random capital letters (entropy
10 ln 26 nats that no model can predict) then " =", and the response is always " ok". With the
prompts masked the loss can fall to ~0; with them in the loss it cannot go below their entropy
spread over the document's positions (about 2 nats here).
"""

from __future__ import annotations

import json
import math
import os
import random
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptforge.data import tokenizer
from gptforge.data.config import DataConfig, DataSourceConfig
from gptforge.data.loader import build_loader
from gptforge.model.loss import masked_token_loss
from tests.conftest import ROOT, TINY, metrics
from tests.unit.test_hf_tokenizer import write_gpt2_tokenizer

GPTFORGE = str(Path(sys.executable).parent / "gptforge")
FINETUNE = ROOT / "configs" / "finetune.yaml"
LETTERS, DOCS, VOCAB = 10, 600, 300


def gptforge(*args, timeout=300):
    proc = subprocess.run([GPTFORGE, *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore",
                                                "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    """(shards, tokenizer folder) of DOCS prompt/response pairs."""
    tmp = tmp_path_factory.mktemp("sft")
    rng = random.Random(0)
    pairs = [("".join(rng.choices(string.ascii_uppercase, k=LETTERS)) + " =", " ok")
             for _ in range(DOCS)]
    (tmp / "pairs.jsonl").write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n"
                                             for p, r in pairs))
    (tmp / "text.txt").write_text("".join(p + r + "\n" for p, r in pairs))
    tok = write_gpt2_tokenizer([tmp / "text.txt"], tmp / "tok", vocab_size=VOCAB)
    gptforge("data", "prepare", "--format", "sft", "--input", str(tmp / "pairs.jsonl"),
             "--tokenizer", str(tok), "--out", str(tmp / "shards"), "--valid-fraction", "0.1",
             "--workers", "1", "--no-progress")
    return tmp / "shards", tok


def is_prompt_token(tok, ids: torch.Tensor) -> torch.Tensor:
    """The truth from the text: prompt tokens hold capital letters or "="; nothing else does."""
    return torch.tensor([bool(set(tok.decode([i])) & set(string.ascii_uppercase + "="))
                         for i in ids.reshape(-1).tolist()]).reshape(ids.shape)


def test_masked_loss_is_the_response_loss(sft):
    shards, tok_dir = sft
    cfg = DataConfig(source="webdataset", sources=[DataSourceConfig(path=str(shards))],
                     tokenizer_model=str(tok_dir), format="sft")
    tok = tokenizer.load(tok_dir)
    batch = next(build_loader(cfg, split="train", seq_length=64, micro_batch_size=4, dp_rank=0,
                              dp_size=1, seed=1, vocab_size=VOCAB))
    prompt = is_prompt_token(tok, batch["labels"])
    assert torch.equal(batch["loss_mask"], (~prompt).float())  # the mask is the truth
    logits = torch.randn(4, 64, VOCAB, generator=torch.Generator().manual_seed(0)) * 3
    per_token = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB),
                                                  batch["labels"].reshape(-1), reduction="none")
    response_only = per_token[~prompt.reshape(-1)].mean()
    loss = masked_token_loss(per_token, batch["loss_mask"])
    assert torch.allclose(loss, response_only)
    assert not torch.allclose(loss, per_token.mean(), rtol=1e-2)  # the prompts would change it


@pytest.mark.slow
def test_finetune_learns_the_response_and_not_the_prompt(sft, tmp_path):
    shards, tok_dir = sft
    run_dir = tmp_path / "run"
    gptforge("train", "--config", str(TINY), str(FINETUNE), "--run.dir", str(run_dir),
             f"--data.sources=[{{path: {shards}}}]", f"--data.tokenizer_model={tok_dir}",
             f"--model.vocab_size={VOCAB}", "--optim.lr=3e-3", "--optim.min_lr=3e-4",
             "--optim.lr_warmup_iters=2", "--train.train_iters=40", "--train.eval_interval=20")
    records = metrics(run_dir)
    losses = [r["loss"] for r in records if "loss" in r]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    index = json.loads((shards / "index.json").read_text())
    positions = index["splits"]["train"]["tokens"] / index["splits"]["train"]["docs"] + 1
    leak_floor = LETTERS * math.log(26) / positions  # the least loss with prompts in it
    assert leak_floor > 1.5, leak_floor
    assert losses[0] > 4.0 and len(losses) == 40, losses  # ~ln(300) at the start
    assert sum(losses[-5:]) / 5 < leak_floor / 3, (losses, leak_floor)
    assert len(val) == 2 and val[1] < val[0] and val[1] < leak_floor / 3, (val, leak_floor)
