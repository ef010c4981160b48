"""Hugging Face tokenizers through our interface, and our tokenizers exported as HF files.

Everything is built here: a sentencepiece model trained on stdlib text (``tiny_tokenizer``) and
a GPT-2 style byte-level BPE trained with the ``tokenizers`` library; nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from gptforge.data import tokenizer
from gptforge.launcher.cli import main as cli
from gptforge.data.hf_tokenizer import HfTokenizer, save_hf_tokenizer
from gptforge.data.prepare import PrepareSettings, prepare
from gptforge.data.shards import iter_shard_members
from gptforge.data.tokenizer import TokenizerError

EOT = "<|endoftext|>"
STRESS = ["  a  b   ", "   ", " leading", "trailing  ", "\t\tx\n\ny\r\nz\r\n", "12345 6.78e9",
          "a\u00a0b \u00a0", "x\u2581y \u2581 \u2581\u2581", "日本語のテキスト 中文", "😀 🎉 👍🏽",
          "<s> </s> <pad> <unk>", "<s>x</s><pad>", "", "\n", " \n ", "def f(x):\n\treturn x",
          f"a {EOT} b", "Grüße, naïve café — ok?", "\x00\x07 control \u200b zero-width"]


def corpus_texts(text_corpus: Path) -> list[str]:
    return [p.read_text()[:4000] for p in sorted(text_corpus.glob("*.txt"))[:12]]


def write_gpt2_tokenizer(files: list[Path], out: Path, vocab_size: int = 400) -> Path:
    """A GPT-2 style tokenizer folder: byte-level BPE with "<|endoftext|>" (eos = bos = unk)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2TokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train([str(f) for f in files], trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    GPT2TokenizerFast(tokenizer_object=bpe, bos_token=EOT, eos_token=EOT,
                      unk_token=EOT).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def gpt2_dir(text_corpus, tmp_path_factory) -> Path:
    return write_gpt2_tokenizer(sorted(text_corpus.glob("*.txt")),
                                tmp_path_factory.mktemp("hf") / "gpt2tok")


@pytest.fixture(scope="module")
def exported(tiny_tokenizer, tmp_path_factory) -> tuple[Path, tokenizer.TokenizerInfo]:
    out = tmp_path_factory.mktemp("export") / "hf"
    return out, save_hf_tokenizer(tiny_tokenizer, out, model_max_length=64)


# ------------------------------------------------------------------ sentencepiece -> HF files


def test_exported_sentencepiece_encodes_and_decodes_like_sentencepiece(
        tiny_tokenizer, text_corpus, exported):
    out, info = exported
    sp = tokenizer.load(tiny_tokenizer)
    hf = AutoTokenizer.from_pretrained(str(out))
    assert len(hf) == sp.get_piece_size() == info.vocab_size == 600
    assert (info.bos_id, info.eos_id, info.pad_id, info.unk_id) == (1, 2, 3, 0)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 3)
    for text in STRESS + corpus_texts(text_corpus):
        ids = sp.encode(text)
        assert hf.encode(text) == ids, repr(text[:60])  # default: no BOS is added
        assert hf.decode(ids) == sp.decode(ids), repr(text[:60])
        assert sp.decode(ids) == text or "\u2581" in text  # sentencepiece: "▁" decodes as " "
    assert any(sp.id_to_piece(i).startswith("<0x") for i in sp.encode("日本語😀"))  # byte fallback
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == \
        "PreTrainedTokenizerFast"


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_export_loads_next_to_a_model_config(tiny_tokenizer, exported, tmp_path, model_type):
    out, _ = exported
    folder = tmp_path / model_type
    folder.mkdir()
    for file in out.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    (folder / "config.json").write_text(json.dumps({"model_type": model_type,
                                                    "vocab_size": 600}))
    hf = AutoTokenizer.from_pretrained(str(folder))
    sp = tokenizer.load(tiny_tokenizer)
    for text in STRESS:
        assert hf.encode(text) == sp.encode(text), repr(text)


def test_exported_folder_loads_through_our_interface(tiny_tokenizer, exported):
    out, _ = exported
    ours, sp = tokenizer.load(out), tokenizer.load(tiny_tokenizer)
    assert isinstance(ours, HfTokenizer)
    assert [ours.bos_id(), ours.eos_id(), ours.pad_id(), ours.unk_id()] == [1, 2, 3, 0]
    assert ours.get_piece_size() == 600
    for text in STRESS:
        assert ours.encode(text) == sp.encode(text)
        assert ours.decode(sp.encode(text)) == sp.decode(sp.encode(text))


def test_export_of_a_hf_tokenizer_is_the_same_tokenizer(gpt2_dir, tmp_path):
    info = save_hf_tokenizer(gpt2_dir, tmp_path / "out", model_max_length=32)
    a, b = AutoTokenizer.from_pretrained(str(gpt2_dir)), AutoTokenizer.from_pretrained(
        str(tmp_path / "out"))
    assert info.eos_id == b.eos_token_id == a.convert_tokens_to_ids(EOT)
    assert b.model_max_length == 32
    assert tokenizer.info(tmp_path / "out").sha256 == tokenizer.info(gpt2_dir).sha256
    for text in STRESS:
        assert a.encode(text) == b.encode(text)


def test_export_refuses_a_unigram_model(tmp_path, text_corpus):
    uni = tokenizer.train([str(text_corpus)], str(tmp_path / "u"), 400, model_type="unigram",
                          txt_unit="file", input_sentence_size=1500)
    with pytest.raises(TokenizerError, match=f"{tmp_path / 'u.model'}: only sentencepiece BPE"):
        save_hf_tokenizer(uni.path, tmp_path / "out", model_max_length=64)


# ------------------------------------------------------------------ HF tokenizers as ours


def test_gpt2_folder_through_our_interface(gpt2_dir):
    tok = tokenizer.load(gpt2_dir)
    backend = AutoTokenizer.from_pretrained(str(gpt2_dir))
    eot = backend.convert_tokens_to_ids(EOT)
    assert tok.eos_id() == tok.bos_id() == tok.unk_id() == eot and tok.pad_id() == -1
    assert tok.get_piece_size() == len(backend) == 400
    for text in STRESS:
        assert tok.decode(tok.encode(text)) == text, repr(text)
    ids = tok.encode(f"one{EOT}two")
    assert eot not in ids and tok.decode(ids) == f"one{EOT}two"  # ordinary text, not EOS
    assert tok.decode([*tok.encode("one"), eot]) == f"one{EOT}"  # the real EOS decodes as text
    info = tokenizer.info(gpt2_dir)
    assert info.sha256 == tokenizer.file_sha256(gpt2_dir / "tokenizer.json")
    assert (info.vocab_size, info.eos_id, info.pad_id) == (400, eot, -1)


def test_tokenizer_json_file_and_vocab_merges_folder(gpt2_dir, tmp_path):
    ref = tokenizer.load(gpt2_dir)
    bare = tmp_path / "bare.json"  # a tokenizer.json with no tokenizer_config.json beside it
    bare.write_bytes((gpt2_dir / "tokenizer.json").read_bytes())
    from tokenizers import Tokenizer

    vm = tmp_path / "vm"
    vm.mkdir()
    Tokenizer.from_file(str(bare)).model.save(str(vm))
    assert sorted(p.name for p in vm.iterdir()) == ["merges.txt", "vocab.json"]
    for path in (gpt2_dir / "tokenizer.json", bare, vm):
        tok = tokenizer.load(path)
        assert tok.eos_id() == ref.eos_id(), path
        for text in STRESS:
            assert tok.encode(text) == ref.encode(text), (path, text)
    assert tokenizer.info(bare).sha256 == tokenizer.info(gpt2_dir).sha256
    both = (vm / "vocab.json").read_bytes() + (vm / "merges.txt").read_bytes()
    assert tokenizer.info(vm).sha256 == hashlib.sha256(both).hexdigest()
    save_hf_tokenizer(vm, tmp_path / "out", model_max_length=16)
    assert tokenizer.load(tmp_path / "out").encode(STRESS[-3]) == ref.encode(STRESS[-3])


def test_unusable_hf_paths_are_named(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.md").write_text("no tokenizer here")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text('{"version": "1.0", "model": {')
    cases = [(empty, "folder holds no tokenizer"), (broken, "not a readable Hugging Face"),
             (tmp_path / "missing.json", "tokenizer file not found")]
    for path, reason in cases:
        for call in (tokenizer.load, tokenizer.info):
            with pytest.raises(TokenizerError, match=f"^{path}: {reason}"):
                call(path)


def test_cli_encode_decode_with_a_hf_folder(gpt2_dir, capsys):
    text = f"hello {EOT}  world\n"
    assert cli.main(["tokenizer", "encode", "--model", str(gpt2_dir), "--text", text]) == 0
    ids = capsys.readouterr().out.split()
    assert [int(i) for i in ids] == tokenizer.load(gpt2_dir).encode(text)
    assert cli.main(["tokenizer", "decode", "--model", str(gpt2_dir), *ids]) == 0
    assert capsys.readouterr().out == text


@pytest.mark.parametrize("workers", [1, 2])
def test_prepare_with_a_hf_folder(gpt2_dir, tmp_path, workers):
    docs = [f"doc {k}: some text {EOT} inside, and ünïcödé {k * 7}" for k in range(30)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    index = prepare(PrepareSettings(inputs=[str(tmp_path / "in.jsonl")], tokenizer=str(gpt2_dir),
                                    out=str(tmp_path / "out"), workers=workers,
                                    docs_per_chunk=4), progress=False)
    tok, info = tokenizer.load(gpt2_dir), tokenizer.info(gpt2_dir)
    assert index["tokenizer"]["sha256"] == info.sha256 and index["eod_id"] == info.eos_id
    assert index["vocab_size"] == 400 and index["sft"] is False
    got = [np.frombuffer(data, "<u2").tolist()
           for _, data in iter_shard_members(tmp_path / "out" / "train-000000.tar")]
    assert got == [tok.encode(d) for d in docs]
    assert all(info.eos_id not in ids for ids in got)
