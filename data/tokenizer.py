"""Tokenizers: train a sentencepiece model; load one, or a Hugging Face tokenizer; file hashes.

``load(path)`` returns a ``Tokenizer``: a sentencepiece processor for a ``.model`` file, an
``hf_tokenizer.HfTokenizer`` for a Hugging Face folder or ``tokenizer.json`` file. Both have
sentencepiece's methods ``encode(text) -> ids`` (no special tokens added), ``decode(ids)``,
``eos_id()``/``bos_id()``/``pad_id()``/``unk_id()`` (-1 when absent) and ``get_piece_size()``.
``info(path)`` gives the ``TokenizerInfo`` that shards record (the hash of the model file, or of
a Hugging Face tokenizer's ``tokenizer.json``).

Training normalises nothing (``identity`` rule, no whitespace folding, no dummy prefix) and
uses byte fallback, so decode(encode(text)) == text for any text. Newline and tab are
user-defined pieces so code keeps its layout cheaply. ``<prefix>.json`` records the hash,
vocabulary size and the bos/eos/pad/unk ids next to ``<prefix>.model``.

``load`` and ``info`` raise ``TokenizerError`` naming a missing file, a folder without tokenizer
files or a file that is not a tokenizer; ``train`` checks every input
(``text_inputs.check_input``) and refuses inputs without text before sentencepiece starts.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import sentencepiece as spm

from gptforge.data.errors import DataError
from gptforge.data.outputs import check_out_dir, missing_root
from gptforge.data.text_inputs import InputError, check_input, expand_inputs, iter_documents

ALWAYS_SYMBOLS = ("\n", "\t")
MAX_SENTENCE_BYTES = 1 << 16


class TokenizerError(DataError):
    """A problem with a tokenizer file; the message starts with the file."""


@dataclass(frozen=True)
class TokenizerInfo:
    path: str
    sha256: str  # of the file(s): provenance
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int
    vocab_sha256: str = ""  # of the id -> piece table and the special ids: identity


def vocab_sha256(tok: "Tokenizer") -> str:
    """The tokenizer's identity: its id -> piece table and special ids, whatever the file
    format (a sentencepiece model and the tokenizer.json exported from it are one tokenizer)."""
    table = {"pieces": [tok.id_to_piece(i) for i in range(tok.get_piece_size())],
             "special": [tok.bos_id(), tok.eos_id(), tok.pad_id(), tok.unk_id()]}
    return hashlib.sha256(json.dumps(table, ensure_ascii=False).encode()).hexdigest()


_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def settled_text(tok: "Tokenizer", ids: list[int]) -> str:
    """The text of ``ids`` that no later token can change, for streaming: a trailing run of
    byte-fallback pieces (``<0x..>``) is decoded together with whatever bytes follow (one
    invalid byte spoils its whole run), and a character whose bytes have not all come yet is
    not shown."""
    settled = len(ids)
    while settled and _BYTE_PIECE.match(tok.id_to_piece(ids[settled - 1]) or ""):
        settled -= 1
    return tok.decode(ids[:settled]).rstrip("\ufffd")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _spm_reason(err: Exception) -> str:
    """sentencepiece's error text without its status code and source location."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text.rpartition("] ")[2].removeprefix("INTERNAL: ").strip() or text


class Tokenizer(Protocol):
    """What ``load`` returns, whatever the kind (sentencepiece's method names)."""

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def eos_id(self) -> int: ...
    def bos_id(self) -> int: ...
    def pad_id(self) -> int: ...
    def unk_id(self) -> int: ...
    def get_piece_size(self) -> int: ...
    def id_to_piece(self, i: int) -> str: ...


def load(path: str | Path) -> Tokenizer:
    """The tokenizer at ``path``: a sentencepiece ``.model``, or a Hugging Face folder or
    ``tokenizer.json``; TokenizerError names a missing or foreign file."""
    path = Path(path)
    from gptforge.data import hf_tokenizer

    if hf_tokenizer.is_hf_path(path):
        return hf_tokenizer.load_hf(path)
    return load_sentencepiece(path)


def load_sentencepiece(path: Path) -> spm.SentencePieceProcessor:
    if not path.is_file():
        raise TokenizerError(f"{path}: tokenizer model not found")
    proc = spm.SentencePieceProcessor()
    try:
        proc.load(str(path))
    except (OSError, RuntimeError) as err:
        raise TokenizerError(f"{path}: not a sentencepiece model ({_spm_reason(err)})") from None
    return proc


def info(path: str | Path) -> TokenizerInfo:
    """What shards record about the tokenizer at ``path`` (see ``load``)."""
    from gptforge.data import hf_tokenizer

    if hf_tokenizer.is_hf_path(Path(path)):
        return hf_tokenizer.hf_info(Path(path))
    proc = load_sentencepiece(Path(path))
    try:
        sha256 = file_sha256(path)
    except OSError as err:
        raise TokenizerError(f"{path}: cannot read: {err.strerror or err}") from None
    return TokenizerInfo(path=str(path), sha256=sha256,
                         vocab_size=proc.get_piece_size(), bos_id=proc.bos_id(),
                         eos_id=proc.eos_id(), pad_id=proc.pad_id(), unk_id=proc.unk_id(),
                         vocab_sha256=vocab_sha256(proc))


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
    """Train ``<model_prefix>.model`` from text inputs; write and return its info.

    Every input is checked first (``check_input``); a failed run removes the directories it
    created for ``model_prefix``."""
    if not vocab_size > 0:
        raise TokenizerError(f"--vocab-size: must be > 0, got {vocab_size}")
    check_out_dir(Path(model_prefix).parent, f"--model-prefix {model_prefix}", TokenizerError)
    files = expand_inputs(inputs)
    for path in files:
        check_input(path, text_key)
    sentences = _first_checked(_sentences(files, text_key, txt_unit), inputs)
    created = missing_root(Path(model_prefix).parent)
    try:
        return _train(sentences, model_prefix, vocab_size, model_type=model_type,
                      user_defined_symbols=user_defined_symbols,
                      input_sentence_size=input_sentence_size, byte_fallback=byte_fallback,
                      num_threads=num_threads)
    except DataError:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise


def _first_checked(sentences: Iterator[str], inputs: list[str]) -> Iterator[str]:
    """``sentences``, after making sure there is at least one."""
    first = next(sentences, None)
    if first is None:
        raise InputError(f"{', '.join(map(str, inputs))}: the inputs hold no text to train a "
                         f"tokenizer on")
    return itertools.chain([first], sentences)


class _Recorded:
    """An iterator that keeps the exception it raised: sentencepiece turns it into a
    RuntimeError, and ``train`` raises the original instead."""

    def __init__(self, iterator: Iterator[str]):
        self.iterator, self.error = iterator, None

    def __iter__(self):
        try:
            yield from self.iterator
        except Exception as err:
            self.error = err
            raise


def _train(sentences: Iterator[str], model_prefix: str, vocab_size: int, *, model_type: str,
           user_defined_symbols: tuple[str, ...], input_sentence_size: int,
           byte_fallback: bool, num_threads: int) -> TokenizerInfo:
    Path(model_prefix).parent.mkdir(parents=True, exist_ok=True)
    symbols = list(dict.fromkeys([*ALWAYS_SYMBOLS, *user_defined_symbols]))
    recorded = _Recorded(sentences)
    try:
        _run_trainer(iter(recorded), model_prefix, vocab_size, model_type=model_type,
                     symbols=symbols, input_sentence_size=input_sentence_size,
                     byte_fallback=byte_fallback, num_threads=num_threads)
    except RuntimeError as err:
        if recorded.error is not None:
            raise recorded.error from None
        raise _training_error(err, model_prefix, vocab_size) from None
    result = info(f"{model_prefix}.model")
    Path(f"{model_prefix}.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
    return result


def _training_error(err: RuntimeError, model_prefix: str, vocab_size: int) -> TokenizerError:
    reason = _spm_reason(err)
    if "vocab" in reason.lower():
        return TokenizerError(f"--vocab-size {vocab_size}: {reason}")
    return TokenizerError(f"{model_prefix}.model: sentencepiece training failed: {reason}")


def _run_trainer(sentences: Iterator[str], model_prefix: str, vocab_size: int, *,
                 model_type: str, symbols: list[str], input_sentence_size: int,
                 byte_fallback: bool, num_threads: int) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences, model_prefix=model_prefix,
        vocab_size=vocab_size, model_type=model_type, byte_fallback=byte_fallback,
        user_defined_symbols=symbols, input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, split_digits=True,
        allow_whitespace_only_pieces=True, max_sentence_length=MAX_SENTENCE_BYTES,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, hard_vocab_limit=False,
        num_threads=num_threads, minloglevel=2, train_extremely_large_corpus=False)


def encode(proc: Tokenizer, text: str) -> list[int]:
    return proc.encode(text)


def encode_batch(proc: Tokenizer, texts: list[str]) -> list[list[int]]:
    """``[proc.encode(t) for t in texts]`` in one call to the library."""
    if isinstance(proc, spm.SentencePieceProcessor):
        return proc.encode(texts, out_type=int, num_threads=1)
    return proc.encode_batch(texts)


def decode(proc: Tokenizer, ids: list[int]) -> str:
    return proc.decode(ids)
