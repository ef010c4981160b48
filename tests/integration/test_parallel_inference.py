"""Inference at the layout a model trains in: ``gptforge generate`` and ``gptforge eval`` on 2
ranks at TP=2 or PP=2 give the TP=1 ids and loss (the resharding load of training, megatron's KV
cache per pipeline stage, logits passed on to every stage)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gptforge.launcher.cli.main import main
from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # starts ranks

PROMPTS = ["def main(", "import os\nimport sys\n\nclass Config", "x"]  # different lengths
LAYOUTS = {"tp2": ["--parallel.tensor_model_parallel_size=2"],
           "pp2": ["--parallel.pipeline_model_parallel_size=2"]}


def gptforge(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "gptforge.launcher.cli.main", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _prompts(tmp_path):
    file = tmp_path / "prompts.jsonl"
    file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return file


def test_generate_at_tp2_and_pp2_equals_tp1(converted, tmp_path):
    file = _prompts(tmp_path)
    want = tmp_path / "tp1.json"
    assert main(["generate", "--checkpoint", str(converted["llama"]), "--prompts-file",
                 str(file), "--max-new-tokens", "24", "--greedy", "--quiet",
                 "--output-json", str(want)]) == 0
    want_ids = [r["token_ids"] for r in json.loads(want.read_text())]
    for name, layout in LAYOUTS.items():
        out = tmp_path / f"{name}.json"
        gptforge("generate", "--checkpoint", str(converted["llama"]), "--prompts-file",
                 str(file), "--max-new-tokens", "24", "--greedy", "--quiet",
                 "--nproc-per-node", "2", *layout, "--output-json", str(out))
        assert [r["token_ids"] for r in json.loads(out.read_text())] == want_ids, name


def test_generate_from_a_hf_folder_at_tp2(folders, tmp_path):
    file = _prompts(tmp_path)
    want, got = tmp_path / "tp1.json", tmp_path / "tp2.json"
    assert main(["generate", "--checkpoint", str(folders["llama"]), "--prompts-file", str(file),
                 "--max-new-tokens", "16", "--quiet", "--output-json", str(want)]) == 0
    gptforge("generate", "--checkpoint", str(folders["llama"]), "--prompts-file", str(file),
             "--max-new-tokens", "16", "--quiet", "--nproc-per-node", "2",
             "--parallel.tensor_model_parallel_size=2", "--output-json", str(got))
    assert json.loads(got.read_text()) == json.loads(want.read_text())


@pytest.fixture(scope="module")
def llama_shards(corpus, folders, tmp_path_factory):
    out = tmp_path_factory.mktemp("pi-shards") / "llama"
    assert main(["data", "prepare", "--input", str(corpus), "--tokenizer", str(folders["llama"]),
                 "--out", str(out), "--valid-fraction", "0.3", "--shard-size-mb", "0.05",
                 "--no-progress"]) == 0
    return out


def test_eval_at_tp2_and_pp2_equals_tp1(converted, llama_shards, tmp_path):
    args = ["eval", "--checkpoint", str(converted["llama"]), "--data", str(llama_shards),
            "--eval-iters", "3", "--micro-batch-size", "2"]
    want = tmp_path / "tp1.json"
    assert main([*args, "--output-json", str(want)]) == 0
    want = json.loads(want.read_text())
    for name, layout in LAYOUTS.items():
        out = tmp_path / f"{name}.json"
        gptforge(*args, "--nproc-per-node", "2", *layout, "--output-json", str(out))
        got = json.loads(out.read_text())
        assert got["tokens"] == want["tokens"], name
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), name


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_a_sample_is_written_by_a_two_rank_training_run(folders, llama_shards, tmp_path,
                                                        layout):
    from gptforge.data import tokenizer

    vocab = tokenizer.info(folders["llama"]).vocab_size
    run_dir = tmp_path / "run"
    gptforge("train", "--config", str(ROOT / "configs" / "tiny.yaml"), "--nproc-per-node", "2",
             *LAYOUTS[layout], f"--run.dir={run_dir}", "--train.train_iters=3",
             "--train.eval_interval=0", "--checkpoint.enabled=false",
             "--data.source=webdataset", f"--data.sources=[{{path: {llama_shards}}}]",
             f"--data.tokenizer_model={folders['llama']}", f"--model.vocab_size={vocab}",
             "--sample.prompt=def main(", "--sample.max_new_tokens=8")
    sample = (run_dir / "sample.txt").read_text()
    assert sample.startswith("def main(") and len(sample) > len("def main(")
