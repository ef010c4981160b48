"""Fixtures of the integration tests: small Hugging Face models and their conversions, built
once per session (``tests/hf_models.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gptforge.launcher.cli.main import main
from tests import hf_models


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
