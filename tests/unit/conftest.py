"""Fixtures of the data unit tests: a stdlib text corpus and a small tokenizer, built once."""

from __future__ import annotations

from pathlib import Path

import pytest

from gptforge.data import tokenizer
from gptforge.data.synthetic import write_text_corpus


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory):
    return write_text_corpus(tmp_path_factory.mktemp("corpus") / "text")


@pytest.fixture(scope="session")
def tiny_tokenizer(text_corpus):
    return Path(tokenizer.train([str(text_corpus)], str(text_corpus.parent / "tok"), 600,
                                txt_unit="file").path)
