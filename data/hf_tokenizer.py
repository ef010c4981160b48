"""Hugging Face tokenizers behind our tokenizer interface, and export as Hugging Face files.

A Hugging Face tokenizer is a folder (``tokenizer.json``, or GPT-2's ``vocab.json`` +
``merges.txt``) or a ``tokenizer.json`` file. ``HfTokenizer`` gives it sentencepiece's method
names (see ``tokenizer.Tokenizer``): ``encode`` adds no special tokens and treats a literal
special token in the text ("<|endoftext|>") as ordinary text, as sentencepiece does; ``decode``
skips nothing and cleans up no spaces. Its provenance hash is the sha256 of ``tokenizer.json``
(else of ``vocab.json`` and ``merges.txt`` concatenated).

``save_hf_tokenizer`` writes any of our tokenizers as files ``AutoTokenizer.from_pretrained``
reads back with identical ids and decoding. A sentencepiece BPE model is rebuilt as a
``tokenizers`` BPE (docs: ../shared/anchors/hf-conversion.md §7): vocabulary in piece order,
merges ranked by the merged piece's id, " " → "▁" as the only normaliser, no pre-tokenizer, byte
fallback; control pieces are special tokens, user-defined pieces ("\\n", "\\t") plain added
tokens. ``transformers`` is imported only here, and only when needed (it costs seconds).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from gptforge.data.tokenizer import TokenizerError, TokenizerInfo, vocab_sha256

TOKENIZER_JSON = "tokenizer.json"
GPT2_FILES = ("vocab.json", "merges.txt")
EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")  # for a bare tokenizer.json
NO_LIMIT = 1 << 60  # model_max_length while tokenizing documents: no length warning
CONTROL, USER_DEFINED = 3, 4  # sentencepiece piece types


def is_hf_path(path: Path) -> bool:
    """A folder or a ``.json`` file: read as a Hugging Face tokenizer."""
    return path.is_dir() or path.suffix == ".json"


def hashed_files(path: Path) -> list[Path]:
    """The files whose bytes identify the tokenizer at ``path``; names a folder without any."""
    if not path.is_dir():
        if not path.is_file():
            raise TokenizerError(f"{path}: tokenizer file not found")
        return [path]
    if (path / TOKENIZER_JSON).is_file():
        return [path / TOKENIZER_JSON]
    if all((path / name).is_file() for name in GPT2_FILES):
        return [path / name for name in GPT2_FILES]
    raise TokenizerError(f"{path}: folder holds no tokenizer ({TOKENIZER_JSON}, or "
                         f"{' + '.join(GPT2_FILES)}, or a sentencepiece .model given as a file)")


def files_sha256(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for file in files:
        try:
            digest.update(file.read_bytes())
        except OSError as err:
            raise TokenizerError(f"{file}: cannot read: {err.strerror or err}") from None
    return digest.hexdigest()


class HfTokenizer:
    """A ``transformers`` tokenizer with sentencepiece's method names; ids absent are -1."""

    def __init__(self, backend, path: Path):
        self.backend, self.path = backend, path
        backend.model_max_length = NO_LIMIT

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False, split_special_tokens=True)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.backend(texts, add_special_tokens=False,
                            split_special_tokens=True)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)

    def _id(self, value) -> int:
        return -1 if value is None else int(value)

    def eos_id(self) -> int:
        return self._id(self.backend.eos_token_id)

    def bos_id(self) -> int:
        return self._id(self.backend.bos_token_id)

    def pad_id(self) -> int:
        return self._id(self.backend.pad_token_id)

    def unk_id(self) -> int:
        return self._id(self.backend.unk_token_id)

    def get_piece_size(self) -> int:
        return len(self.backend)

    def id_to_piece(self, i: int) -> str:
        return self.backend.convert_ids_to_tokens(i)


def load_hf(path: Path) -> HfTokenizer:
    """The Hugging Face tokenizer at ``path``; TokenizerError names a folder or file it
    cannot read."""
    hashed_files(path)
    _quiet_transformers()
    try:
        if path.is_dir() or (path.parent / "tokenizer_config.json").is_file() \
                and path.name == TOKENIZER_JSON:
            backend = _from_folder(path if path.is_dir() else path.parent)
        else:
            backend = _from_file(path)
    except TokenizerError:
        raise
    except Exception as err:  # transformers and tokenizers raise many kinds
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TokenizerError(f"{path}: not a readable Hugging Face tokenizer ({reason})") from None
    return HfTokenizer(backend, path)


def _quiet_transformers() -> None:
    logging.getLogger("transformers").setLevel(logging.ERROR)


def _from_folder(path: Path):
    from transformers import AutoTokenizer, GPT2Tokenizer

    if not (path / TOKENIZER_JSON).is_file() and not (path / "tokenizer_config.json").is_file() \
            and not (path / "config.json").is_file():
        return GPT2Tokenizer.from_pretrained(str(path))  # a bare vocab.json + merges.txt
    return AutoTokenizer.from_pretrained(str(path))


def _from_file(path: Path):
    """A bare ``tokenizer.json``: its end-of-sequence token is a special added token with a
    well-known name (``EOS_NAMES``), or the only special added token."""
    from transformers import PreTrainedTokenizerFast

    backend = PreTrainedTokenizerFast(tokenizer_file=str(path))
    special = [t.content for t in backend.added_tokens_decoder.values() if t.special]
    named = [name for name in EOS_NAMES if name in special]
    if named or len(special) == 1:
        backend.eos_token = (named or special)[0]
    return backend


def hf_info(path: Path) -> TokenizerInfo:
    tok = load_hf(path)
    return TokenizerInfo(path=str(path), sha256=files_sha256(hashed_files(path)),
                         vocab_size=tok.get_piece_size(), bos_id=tok.bos_id(),
                         eos_id=tok.eos_id(), pad_id=tok.pad_id(), unk_id=tok.unk_id(),
                         vocab_sha256=vocab_sha256(tok))


# ------------------------------------------------------------------ export


def save_hf_tokenizer(tokenizer_path: str | Path, out_dir: str | Path, *,
                      model_max_length: int) -> TokenizerInfo:
    """Write ``tokenizer_path`` (a sentencepiece .model or a Hugging Face tokenizer) into
    ``out_dir`` as Hugging Face tokenizer files; return its info (the bos/eos/pad/unk ids for
    config.json and generation_config.json). No config.json is needed or written. A Hugging
    Face source keeps its ``tokenizer.json`` byte for byte, so its hash (shards') stays."""
    from gptforge.data import tokenizer

    path, out = Path(tokenizer_path), Path(out_dir)
    result = tokenizer.info(path)
    _quiet_transformers()
    if is_hf_path(path):
        backend = load_hf(path).backend
    else:
        backend = _spm_as_hf(path)
    backend.model_max_length = model_max_length
    out.mkdir(parents=True, exist_ok=True)
    backend.save_pretrained(str(out))
    if not is_hf_path(path):
        _set_tokenizer_class(out / "tokenizer_config.json")
    elif len(files := hashed_files(path)) == 1:  # tokenizer.json: keep the bytes shards hashed
        (out / TOKENIZER_JSON).write_bytes(files[0].read_bytes())
    return result


def _set_tokenizer_class(config_path: Path) -> None:
    """``PreTrainedTokenizerFast``: a name transformers v4 and v5 both know (v5 may write its
    alias ``TokenizersBackend``)."""
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _read_proto(path: Path):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        raise TokenizerError(f"{path}: only sentencepiece BPE models can be written as Hugging "
                             f"Face files (this one is not BPE)")
    if not proto.trainer_spec.byte_fallback:
        raise TokenizerError(f"{path}: only sentencepiece models with byte fallback can be "
                             f"written as Hugging Face files")
    return proto


def _spm_as_hf(path: Path):
    """A ``PreTrainedTokenizerFast`` equal to the sentencepiece BPE model at ``path``."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import generate_merges

    proto = _read_proto(path)
    pieces = [p.piece for p in proto.pieces]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    spec = proto.trainer_spec

    def name(i: int) -> str | None:
        return pieces[i] if 0 <= i < len(pieces) else None

    backend = Tokenizer(BPE(vocab=vocab, merges=generate_merges(vocab, None),
                            unk_token=name(spec.unk_id), fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse()])
    backend.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                                for p in proto.pieces if p.type == CONTROL])
    backend.add_tokens([AddedToken(p.piece, special=False, normalized=False)
                        for p in proto.pieces if p.type == USER_DEFINED])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token=name(spec.unk_id), bos_token=name(spec.bos_id),
        eos_token=name(spec.eos_id), pad_token=name(spec.pad_id), add_bos_token=False,
        add_eos_token=False, clean_up_tokenization_spaces=False, split_special_tokens=True)
