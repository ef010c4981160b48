"""Fixtures of the integration tests: small Hugging Face models and their conversions, built
once per session (``tests/hf_models.py``)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from gptforge.launcher.cli.main import main
from tests import hf_models
from tests.conftest import TINY


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return hf_models.corpus(tmp_path_factory.mktemp("corpus") / "text")


@pytest.fixture(scope="session")
def sp_model(corpus) -> Path:
    return hf_models.sentencepiece(corpus, corpus.parent / "sp")


@pytest.fixture(scope="session")
def folders(corpus, sp_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {"gpt2": hf_models.gpt2_folder(root / "gpt2", corpus),
            "llama": hf_models.llama_folder(root / "llama", sp_model, groups=2),
            "llama_tied_bias": hf_models.llama_folder(root / "llama_tb", sp_model, groups=4,
                                                      tied=True, bias=True)}


@pytest.fixture(scope="session")
def converted(folders, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ours")
    for name, folder in folders.items():
        assert main(["convert", "from-hf", "--hf", str(folder), "--out", str(root / name)]) == 0
    return {name: root / name for name in folders}


@pytest.fixture(scope="session")
def relative_tokenizer_run(sp_model, tmp_path_factory) -> Path:
    """The project directory of a tiny run (``runs/x``, in this process) started there with
    ``--data.tokenizer_model=sp.model``; its checkpoint records the path relative, as older runs
    did."""
    project = tmp_path_factory.mktemp("project")
    shutil.copyfile(sp_model, project / "sp.model")
    cwd = os.getcwd()
    os.chdir(project)
    try:
        assert main(["train", "--config", str(TINY), "--run.dir", "runs/x",
                     "--data.tokenizer_model=sp.model", "--model.vocab_size=512",
                     "--train.train_iters=3", "--train.eval_interval=0"]) == 0
    finally:
        os.chdir(cwd)
    for manifest in (project / "runs" / "x" / "checkpoints").glob("step-*/manifest.json"):
        record = json.loads(manifest.read_text())
        record["config"]["data"]["tokenizer_model"] = "sp.model"
        manifest.write_text(json.dumps(record, indent=1))
    return project


@pytest.fixture
def tokenizer_gone(relative_tokenizer_run, tmp_path) -> Path:
    """A copy of that run's checkpoint whose recorded tokenizer (``gone.model``) is nowhere."""
    step = next((relative_tokenizer_run / "runs" / "x" / "checkpoints").glob("step-*"))
    copy = tmp_path / "copy" / step.name
    shutil.copytree(step, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["config"]["data"]["tokenizer_model"] = "gone.model"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy
