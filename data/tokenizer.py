"""The sentencepiece tokenizer: train, load, encode/decode, and the file hash shards record.

Training normalises nothing (``identity`` rule, no whitespace folding, no dummy prefix) and
uses byte fallback, so decode(encode(text)) == text for any text. Newline and tab are
user-defined pieces so code keeps its layout cheaply. ``<prefix>.json`` records the hash,
vocabulary size and the bos/eos/pad/unk ids next to ``<prefix>.model``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import sentencepiece as spm

from gptforge.data.text_inputs import expand_inputs, iter_documents

ALWAYS_SYMBOLS = ("\n", "\t")
MAX_SENTENCE_BYTES = 1 << 16


class TokenizerError(ValueError):
    """A problem with a tokenizer file; the message starts with the file."""


@dataclass(frozen=True)
class TokenizerInfo:
    path: str
    sha256: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load(path: str | Path) -> spm.SentencePieceProcessor:
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"{path}: tokenizer model not found")
    proc = spm.SentencePieceProcessor()
    try:
        proc.load(str(path))
    except (OSError, RuntimeError) as err:
        raise TokenizerError(f"{path}: not a sentencepiece model: {err}") from err
    return proc


def info(path: str | Path) -> TokenizerInfo:
    proc = load(path)
    return TokenizerInfo(path=str(path), sha256=file_sha256(path),
                         vocab_size=proc.get_piece_size(), bos_id=proc.bos_id(),
                         eos_id=proc.eos_id(), pad_id=proc.pad_id(), unk_id=proc.unk_id())


def _sentences(files: list[Path], text_key: str, txt_unit: str) -> Iterator[str]:
    """Training sentences: the lines of every document, cut to sentencepiece's length limit."""
    for doc in iter_documents(files, text_key, txt_unit):
        for line in doc.split("\n"):
            while line:
                yield line[:MAX_SENTENCE_BYTES // 4]
                line = line[MAX_SENTENCE_BYTES // 4:]


def train(inputs: list[str], model_prefix: str, vocab_size: int, *, model_type: str = "bpe",
          user_defined_symbols: tuple[str, ...] = (), input_sentence_size: int = 2_000_000,
          text_key: str = "text", txt_unit: str = "paragraph", byte_fallback: bool = True,
          num_threads: int = 2) -> TokenizerInfo:
    """Train ``<model_prefix>.model`` from text inputs; write and return its info."""
    files = expand_inputs(inputs)
    Path(model_prefix).parent.mkdir(parents=True, exist_ok=True)
    symbols = list(dict.fromkeys([*ALWAYS_SYMBOLS, *user_defined_symbols]))
    spm.SentencePieceTrainer.train(
        sentence_iterator=_sentences(files, text_key, txt_unit), model_prefix=model_prefix,
        vocab_size=vocab_size, model_type=model_type, byte_fallback=byte_fallback,
        user_defined_symbols=symbols, input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, split_digits=True,
        allow_whitespace_only_pieces=True, max_sentence_length=MAX_SENTENCE_BYTES,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, hard_vocab_limit=False,
        num_threads=num_threads, minloglevel=2, train_extremely_large_corpus=False)
    result = info(f"{model_prefix}.model")
    Path(f"{model_prefix}.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
    return result


def encode(proc: spm.SentencePieceProcessor, text: str) -> list[int]:
    return proc.encode(text, out_type=int)


def decode(proc: spm.SentencePieceProcessor, ids: list[int]) -> str:
    return proc.decode(ids)
