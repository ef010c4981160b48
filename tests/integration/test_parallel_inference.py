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
