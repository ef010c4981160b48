"""Journey 3 (docs: ../shared/JOURNEYS.md, README "Hugging Face, generation and fine-tuning"):
start from a GPT-2 folder, generate, import, prepare SFT data with its tokenizer, fine-tune at
TP=2 on 2 ranks through the one trainer, evaluate, generate and hand the result back to
transformers — every step the command a user types."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from gptforge.launcher.cli.main import main
from gptforge.launcher.modelio.inference import load_checkpoint, one_process
from tests import hf_models
from tests.conftest import ROOT, metrics


def _pairs(path, count: int = 120) -> None:
    gen = torch.Generator().manual_seed(0)
    with path.open("w") as f:
        for _ in range(count):
            a, b = torch.randint(0, 50, (2,), generator=gen).tolist()
            f.write(json.dumps({"prompt": f"Add {a} and {b}:", "response": f" {a + b}"}) + "\n")


@pytest.mark.slow
def test_gpt2_folder_to_finetuned_hf_folder(folders, tmp_path, capsys):
    gpt2 = folders["gpt2"]
    assert main(["generate", "--checkpoint", str(gpt2), "--prompt", "Once upon a time",
                 "--top-k", "40", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith("Once upon a time")
    ckpt = tmp_path / "ckpt" / "gpt2"
    assert main(["convert", "from-hf", "--hf", str(gpt2), "--out", str(ckpt)]) == 0
    _pairs(tmp_path / "sft.jsonl")
    assert main(["data", "prepare", "--format", "sft", "--input", str(tmp_path / "sft.jsonl"),
                 "--tokenizer", str(gpt2), "--out", str(tmp_path / "sft"),
                 "--valid-fraction", "0.2", "--no-progress"]) == 0
    run = tmp_path / "runs" / "ft"
    args = ["train", "--config", str(ckpt / "model.yaml"), str(ROOT / "configs/finetune.yaml"),
            f"--checkpoint.load={ckpt}", "--checkpoint.load_optim=false",
            f"--data.sources=[{{path: {tmp_path / 'sft'}}}]",
            "--parallel.tensor_model_parallel_size=2", "--nproc-per-node", "2",
            f"--run.dir={run}", "--train.train_iters=4", "--train.eval_interval=2",
            "--train.eval_iters=1", "--train.micro_batch_size=1", "--train.global_batch_size=2",
            "--optim.lr_warmup_iters=1", "--optim.lr=1e-3"]
    proc = subprocess.run([sys.executable, "-m", "gptforge.launcher.cli.main", *args],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = metrics(run)
    assert records[0]["event"] == "loaded"
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert any("val_loss" in r for r in records)

    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(run / "checkpoints"), "--data",
                 str(tmp_path / "sft"), "--eval-iters", "2", "--output-json", str(out)]) == 0
    assert json.loads(out.read_text())["tokens"] > 0  # response tokens only (SFT mask)
    assert main(["generate", "--checkpoint", str(run / "checkpoints"), "--prompt",
                 "Add 2 and 3:", "--top-p", "0.9", "--max-new-tokens", "4"]) == 0

    hf_out = tmp_path / "hf" / "gpt2-ft"
    assert main(["convert", "to-hf", "--checkpoint", str(run / "checkpoints"),
                 "--out", str(hf_out)]) == 0
    tokens = torch.randint(0, 400, (1, 64), generator=torch.Generator().manual_seed(1))
    with one_process():
        loaded = load_checkpoint(run / "checkpoints")
        with torch.no_grad():
            ours = loaded.model.eval()(tokens, torch.arange(64).unsqueeze(0), None,
                                       runtime_gather_output=True)
    ref = hf_models.hf_logits(hf_out, tokens)
    vocab = ref.shape[-1]
    assert (ours[..., :vocab] - ref).abs().max().item() <= 1e-5
