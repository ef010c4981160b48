"""The sentencepiece tokenizer: lossless round trip, recorded ids and hash, CLI verbs."""

from __future__ import annotations

import json

import pytest


from gptforge.data import tokenizer
from gptforge.launcher.cli import main as cli

MIXED = ("Grüße, 世界! naïve café — ok?\n\tdef f(x):\n        return {'a': x ** 2}  # ∑ 😀\r\n"
         "\n\n   leading and trailing spaces   \n\x00\x07 control \u200b zero-width ")




def test_round_trip_is_lossless_on_mixed_text(tiny_tokenizer):
    proc = tokenizer.load(tiny_tokenizer)
    for text in [MIXED, " x", "  ", "\n", "日本語のテキスト", "a\tb\r\nc"]:
        assert tokenizer.decode(proc, tokenizer.encode(proc, text)) == text


def test_info_records_ids_vocab_and_hash(tiny_tokenizer):
    meta = json.loads(tiny_tokenizer.with_suffix(".json").read_text())
    assert meta["vocab_size"] == 600
    assert (meta["unk_id"], meta["bos_id"], meta["eos_id"], meta["pad_id"]) == (0, 1, 2, 3)
    assert meta["sha256"] == tokenizer.file_sha256(tiny_tokenizer)


def test_special_tokens_and_unigram(tmp_path, text_corpus):
    info = tokenizer.train([str(text_corpus)], str(tmp_path / "u"), 500, model_type="unigram",
                           user_defined_symbols=("<|user|>",), txt_unit="file",
                           input_sentence_size=1500)
    proc = tokenizer.load(info.path)
    ids = tokenizer.encode(proc, "hi <|user|> there")
    assert proc.piece_to_id("<|user|>") in ids
    assert info.sha256 != tokenizer.file_sha256(str(text_corpus.parent / "tok.model"))


def test_cli_train_encode_decode(tmp_path, text_corpus, capsys):
    prefix = tmp_path / "c" / "tok"
    assert cli.main(["tokenizer", "train", "--input", f"{text_corpus}/*.txt", "--vocab-size",
                     "400", "--model-prefix", str(prefix), "--txt-unit", "file"]) == 0
    capsys.readouterr()
    assert cli.main(["tokenizer", "encode", "--model", f"{prefix}.model", "--text", MIXED]) == 0
    ids = capsys.readouterr().out.split()
    assert cli.main(["tokenizer", "decode", "--model", f"{prefix}.model", *ids]) == 0
    assert capsys.readouterr().out == MIXED


def test_bad_tokenizer_file_is_named(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(tokenizer.TokenizerError, match="bad.model"):
        tokenizer.load(bad)
