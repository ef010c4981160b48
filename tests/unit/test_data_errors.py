"""Every user mistake in the data pipeline is a one-line DataError naming the culprit, raised
early; a failed ``data prepare`` leaves no new output behind and keeps an earlier crash state."""

from __future__ import annotations

import gzip
import itertools
import json
import math
from contextlib import contextmanager
from pathlib import Path

import pytest

import gptforge.data.prepare as prepare_mod
from gptforge.data import tokenizer
from gptforge.launcher.cli import main as cli
from gptforge.data.config import DataConfig, DataSourceConfig
from gptforge.data.errors import DataError
from gptforge.data.loader import build_loader
from gptforge.data.preflight import check_data
from gptforge.data.prepare import STATE_FILE, PrepareError, PrepareSettings, prepare
from gptforge.data.shards import ShardError, read_shard
from gptforge.data.shardspec import SourceError
from gptforge.data.state import StateError
from gptforge.data.synthetic import unique_docs, write_token_dataset
from gptforge.data.text_inputs import InputError
from gptforge.data.tokenizer import TokenizerError


def settings(inputs, tok, out, **kw) -> PrepareSettings:
    base = dict(inputs=[str(p) for p in inputs], tokenizer=str(tok), out=str(out),
                valid_fraction=0.1, shard_size_mb=0.04, workers=1, docs_per_chunk=32,
                command=["test"])
    return PrepareSettings(**{**base, **kw})


@contextmanager
def raises(error: type[DataError], *culprits: object):
    """Expect a one-line ``error`` (a DataError) whose message contains every culprit."""
    assert issubclass(error, DataError)
    with pytest.raises(error) as info:
        yield info
    message = str(info.value)
    assert "\n" not in message, message
    for culprit in culprits:
        assert str(culprit) in message, (str(culprit), message)


def dir_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_every_data_error_is_a_data_error():
    for cls in (InputError, PrepareError, ShardError, SourceError, StateError, TokenizerError):
        assert issubclass(cls, DataError) and issubclass(cls, ValueError)


# ------------------------------------------------------------------ data prepare: inputs


def test_empty_input_directory(tiny_tokenizer, tmp_path):
    (tmp_path / "empty").mkdir()
    with raises(InputError, tmp_path / "empty", "no .txt"):
        prepare(settings([tmp_path / "empty"], tiny_tokenizer, tmp_path / "o"), progress=False)
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "a.csv").write_text("a,b\n")
    with raises(InputError, tmp_path / "csv", "a.csv"):
        prepare(settings([tmp_path / "csv"], tiny_tokenizer, tmp_path / "o"), progress=False)
    assert not (tmp_path / "o").exists()


def test_binary_file(tiny_tokenizer, tmp_path):
    (tmp_path / "data.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with raises(InputError, f"{tmp_path / 'data.txt'}: binary file"):
        prepare(settings([tmp_path / "data.txt"], tiny_tokenizer, tmp_path / "o"), progress=False)
    (tmp_path / "late.txt").write_bytes(b"fine text\n" * 2000 + b"a NUL \x00 here\n")
    with raises(InputError, f"{tmp_path / 'late.txt'}:2001: NUL byte"):
        prepare(settings([tmp_path / "late.txt"], tiny_tokenizer, tmp_path / "o"), progress=False)


@pytest.mark.parametrize("name", ["latin1.txt", "latin1.jsonl", "latin1.txt.gz"])
def test_invalid_utf8_names_file_and_line(tiny_tokenizer, tmp_path, name):
    data = '{"text": "ok"}\n{"text": "caf\xe9"}\n'.encode("latin-1")
    path = tmp_path / name
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    with raises(InputError, f"{path}:2: not valid UTF-8"):
        prepare(settings([path], tiny_tokenizer, tmp_path / "o"), progress=False)


@pytest.mark.parametrize("line,what", [
    ("{not json", "not valid JSON"),
    ('{"body": "no text key"}', "JSON record has no 'text' field"),
    ('{"text": 12}', "field 'text' is a JSON number, not a string"),
    ('["text"]', "a JSON array"),
])
def test_bad_jsonl_line_names_file_and_line(tiny_tokenizer, tmp_path, line, what):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two"}\n' + line + "\n")
    with raises(InputError, f"{path}:4: {what}"):
        prepare(settings([path], tiny_tokenizer, tmp_path / "o"), progress=False)


def test_corrupt_gzip(tiny_tokenizer, tmp_path):
    (tmp_path / "a.jsonl.gz").write_bytes(b"plain, not gzip")
    with raises(InputError, tmp_path / "a.jsonl.gz", "gzip"):
        prepare(settings([tmp_path / "a.jsonl.gz"], tiny_tokenizer, tmp_path / "o"), progress=False)


# ------------------------------------------------------------------ data prepare: settings


@pytest.mark.parametrize("model", ["missing.model", "dir.model", "text.model", "empty.model"])
def test_bad_tokenizer_file(text_corpus, tmp_path, model):
    (tmp_path / "dir.model").mkdir()
    (tmp_path / "text.model").write_text("not a model\n")
    (tmp_path / "empty.model").write_bytes(b"")
    with raises(TokenizerError, tmp_path / model):
        prepare(settings([text_corpus], tmp_path / model, tmp_path / "o"), progress=False)
    assert not (tmp_path / "o").exists()


def test_out_that_is_a_file(text_corpus, tiny_tokenizer, tmp_path):
    (tmp_path / "file").write_text("keep me")
    for out in [tmp_path / "file", tmp_path / "file" / "sub"]:
        with raises(PrepareError, tmp_path / "file", "not a directory", "--out"):
            prepare(settings([text_corpus], tiny_tokenizer, out), progress=False)
    assert (tmp_path / "file").read_text() == "keep me"


@pytest.mark.parametrize("key,value", [
    ("valid_fraction", 1.0), ("valid_fraction", -0.1), ("valid_fraction", math.nan),
    ("shard_size_mb", 0), ("shard_size_mb", -2.0), ("shard_size_mb", math.inf),
    ("workers", 0), ("workers", -1), ("txt_unit", "sentence")])
def test_bad_numbers(text_corpus, tiny_tokenizer, tmp_path, key, value):
    flag = "--" + key.replace("_", "-")
    with raises(PrepareError, f"{flag}: must"):
        prepare(settings([text_corpus], tiny_tokenizer, tmp_path / "o", **{key: value}),
                progress=False)
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ worker processes and the CLI


def no_check(path_and_key):
    """Stands in for ``prepare.check_file`` so that a bad record reaches the tokenizing workers."""


@pytest.mark.parametrize("precheck", [True, False])
def test_worker_errors_come_back_as_the_same_data_error(tiny_tokenizer, tmp_path, monkeypatch,
                                                        precheck):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(300))
                    + '{"txt": "typo"}\n')
    if not precheck:
        monkeypatch.setattr(prepare_mod, "check_file", no_check)
    messages = []
    for workers in (1, 2):
        with raises(InputError, f"{path}:301: JSON record has no 'text' field") as info:
            prepare(settings([path], tiny_tokenizer, tmp_path / "o", workers=workers),
                    progress=False)
        assert info.value.__cause__ is None
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    assert not (tmp_path / "o").exists()


def test_cli_prints_one_line(tiny_tokenizer, tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{oops\n')
    rc = cli.main(["data", "prepare", "--input", str(tmp_path / "bad.jsonl"), "--tokenizer",
                   str(tiny_tokenizer), "--out", str(tmp_path / "o"), "--workers", "2",
                   "--no-progress"])
    err = capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    assert rc == 2 and err.startswith(f"gptforge: error: {bad}:2: not valid JSON")
    assert err.count("\n") == 1 and not (tmp_path / "o").exists()


# ------------------------------------------------------------------ nothing half-made is left


def fail_after_chunks(monkeypatch, chunks: int, error: BaseException, seen: list | None = None):
    """Make the tokenizing step raise ``error`` after ``chunks`` chunks (one worker)."""
    real, calls = prepare_mod.encode_chunk, itertools.count(1)

    def encode(chunk):
        if next(calls) > chunks:
            if seen is not None:
                seen.append(sorted(p.name for p in Path(seen[0]).glob("*.tar")))
            raise error
        return real(chunk)

    monkeypatch.setattr(prepare_mod, "encode_chunk", encode)


def test_failure_while_writing_removes_the_directories_it_made(text_corpus, tiny_tokenizer,
                                                              tmp_path, monkeypatch):
    out = tmp_path / "new" / "deeper" / "out"
    seen = [out]
    fail_after_chunks(monkeypatch, 30, InputError("x.jsonl:9: simulated"), seen)
    with raises(InputError, "x.jsonl:9"):
        prepare(settings([text_corpus], tiny_tokenizer, out), progress=False)
    assert seen[1], "no shard was written before the failure"
    assert not (tmp_path / "new").exists()


def test_empty_documents_leave_nothing(tiny_tokenizer, tmp_path):
    (tmp_path / "blank.txt").write_text("\n\n   \n")
    with raises(PrepareError, tmp_path / "blank.txt", "no documents"):
        prepare(settings([tmp_path / "blank.txt"], tiny_tokenizer, tmp_path / "o"), progress=False)
    assert not (tmp_path / "o").exists()


@pytest.fixture
def crash_state(text_corpus, tiny_tokenizer, tmp_path, monkeypatch):
    """An ``--out`` directory interrupted mid-run (finished shards, state file, a .tmp shard);
    its inputs are the corpus plus a jsonl whose last line is bad (checks were skipped)."""
    bad = tmp_path / "late.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": null}\n')
    out = tmp_path / "crashed"
    monkeypatch.setattr(prepare_mod, "check_file", no_check)
    fail_after_chunks(monkeypatch, 20, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        prepare(settings([text_corpus, bad], tiny_tokenizer, out), progress=False)
    monkeypatch.undo()
    assert (out / STATE_FILE).is_file() and list(out.glob("*.tar")) and list(out.glob("*.tmp"))
    return out, bad


def test_failed_prepare_leaves_an_earlier_crash_state_unchanged(text_corpus, tiny_tokenizer,
                                                                crash_state):
    out, bad = crash_state
    before = dir_bytes(out)
    with raises(InputError, f"{bad}:2: field 'text' is a JSON null"):
        prepare(settings([text_corpus, bad], tiny_tokenizer, out), progress=False)
    with raises(PrepareError, out / STATE_FILE, "different inputs or settings"):
        prepare(settings([text_corpus, bad], tiny_tokenizer, out, valid_fraction=0.2),
                progress=False)
    with raises(PrepareError, "--workers"):
        prepare(settings([text_corpus, bad], tiny_tokenizer, out, workers=0), progress=False)
    assert dir_bytes(out) == before


def test_failure_while_resuming_keeps_the_earlier_state(text_corpus, tiny_tokenizer, tmp_path,
                                                       crash_state, monkeypatch):
    out, bad = crash_state
    state_before = (out / STATE_FILE).read_bytes()
    shards_before = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    bad.write_text('{"text": "fine"}\n{"text": "no"}\n')  # same size: same fingerprint
    monkeypatch.setattr(prepare_mod, "check_file", no_check)
    seen = [out]
    fail_after_chunks(monkeypatch, 40, InputError("x.jsonl:9: simulated"), seen)
    with raises(InputError, "x.jsonl:9"):
        prepare(settings([text_corpus, bad], tiny_tokenizer, out), progress=False)
    assert len(seen[1]) > len(shards_before), "no shard was added before the failure"
    assert (out / STATE_FILE).read_bytes() == state_before
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == shards_before
    monkeypatch.undo()
    prepare(settings([text_corpus, bad], tiny_tokenizer, out), progress=False)
    prepare(settings([text_corpus, bad], tiny_tokenizer, tmp_path / "clean"), progress=False)
    assert dir_bytes(out) == dir_bytes(tmp_path / "clean")


# ------------------------------------------------------------------ tokenizer


@pytest.mark.parametrize("name", ["missing.model", "a_dir", "garbage.model"])
def test_tokenizer_load_and_info_name_the_file(tmp_path, name):
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "garbage.model").write_bytes(bytes(range(256)) * 4)
    for call in (tokenizer.load, tokenizer.info):
        with raises(TokenizerError, tmp_path / name):
            call(tmp_path / name)


def test_tokenizer_train_on_empty_input(tmp_path):
    (tmp_path / "blank.txt").write_text("\n \n")
    prefix = tmp_path / "made" / "tok"
    with raises(InputError, tmp_path / "blank.txt", "no text"):
        tokenizer.train([str(tmp_path / "blank.txt")], str(prefix), 300)
    (tmp_path / "none").mkdir()
    with raises(InputError, tmp_path / "none"):
        tokenizer.train([str(tmp_path / "none")], str(prefix), 300)
    assert not (tmp_path / "made").exists()


def test_tokenizer_train_with_too_small_a_vocabulary(text_corpus, tmp_path):
    with raises(TokenizerError, "--vocab-size 10"):
        tokenizer.train([str(text_corpus / "this.py.txt")], str(tmp_path / "made" / "t"), 10)
    assert not (tmp_path / "made").exists()


# ------------------------------------------------------------------ preflight


@pytest.fixture
def shards(tmp_path, tiny_tokenizer) -> Path:
    write_token_dataset(tmp_path / "shards", {"train": unique_docs(3, 5, 20, first_token=4),
                                              "valid": unique_docs(1, 5, 20, first_token=4)},
                        vocab_size=600, eod_id=2,
                        tokenizer_sha256=tokenizer.file_sha256(tiny_tokenizer))
    return tmp_path / "shards"


def data_cfg(*paths, tok="", **kw) -> DataConfig:
    return DataConfig(source="webdataset", sources=[DataSourceConfig(path=str(p)) for p in paths],
                      tokenizer_model=str(tok), **kw)


def test_preflight_notes_on_good_data(shards, tiny_tokenizer):
    notes = check_data(data_cfg(shards, tok=tiny_tokenizer), seq_length=32, vocab_size=600)
    assert notes == [f"data.tokenizer_model: {tiny_tokenizer} (vocabulary 600)",
                     "data.sources[0]: 3 train shards, 300 tokens",
                     "data.sources[0]: 1 valid shard, 100 tokens"]
    glob_notes = check_data(data_cfg(f"{shards}/train-*.tar"), splits=("train",), seq_length=512,
                            vocab_size=600)
    assert glob_notes == ["data.sources[0]: 3 train shards, 300 tokens, fewer than one sequence "
                          "of 512: they repeat within a batch"]


def test_preflight_reads_no_shard_contents(shards):
    shard = shards / "train-000001.tar"
    shard.write_bytes(b"\xff" * shard.stat().st_size)  # same size, garbage inside
    assert check_data(data_cfg(shards), seq_length=8, vocab_size=600)
    with raises(ShardError, shard):  # reading it during training names it
        read_shard(str(shard))


def test_preflight_missing_directory_or_empty_glob(tmp_path):
    with raises(SourceError, "data.sources[0]", tmp_path / "nowhere", "no such"):
        check_data(data_cfg(tmp_path / "nowhere"), seq_length=8, vocab_size=600)
    with raises(SourceError, "data.sources[0]", f"{tmp_path}/*.tar", "matches no shards"):
        check_data(data_cfg(f"{tmp_path}/*.tar"), seq_length=8, vocab_size=600)


def test_preflight_missing_shard(shards):
    (shards / "train-000002.tar").unlink()
    with raises(SourceError, "data.sources[0]", shards / "train-000002.tar", "not found"):
        check_data(data_cfg(shards), seq_length=8, vocab_size=600)


def test_preflight_truncated_shard(shards):
    shard = shards / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:1536])
    with raises(ShardError, shard, "1536 bytes", shards / "index.json"):
        check_data(data_cfg(shards), seq_length=8, vocab_size=600)
    for spec in (shards, f"{shards}/train-*.tar"):  # the loader refuses it too
        with raises(ShardError, shard):
            build_loader(data_cfg(spec), split="train", seq_length=8, micro_batch_size=1,
                         dp_rank=0, dp_size=1, seed=0, vocab_size=600)
    notes = check_data(data_cfg(shards, skip_corrupt=True), seq_length=8, vocab_size=600)
    assert any("will skip" in n and str(shard) in n for n in notes)


def test_preflight_foreign_tokenizer(shards, tiny_tokenizer):
    index = json.loads((shards / "index.json").read_text())
    index["tokenizer"] = {"sha256": "0" * 64, "path": "/elsewhere/made.model"}
    (shards / "index.json").write_text(json.dumps(index))
    with raises(SourceError, shards / "index.json", "/elsewhere/made.model", tiny_tokenizer):
        check_data(data_cfg(shards, tok=tiny_tokenizer), seq_length=8, vocab_size=600)


@pytest.mark.parametrize("name", ["missing.model", "garbage.model"])
def test_preflight_bad_tokenizer_model(shards, tmp_path, name):
    (tmp_path / "garbage.model").write_text("hello")
    for cfg in (data_cfg(shards, tok=tmp_path / name),
                DataConfig(source="mock", tokenizer_model=str(tmp_path / name))):
        with raises(TokenizerError, "data.tokenizer_model", tmp_path / name):
            check_data(cfg, seq_length=8, vocab_size=600)


def test_preflight_model_vocabulary_too_small(shards, tiny_tokenizer):
    with raises(TokenizerError, "model.vocab_size 500", tiny_tokenizer):
        check_data(data_cfg(shards, tok=tiny_tokenizer), seq_length=8, vocab_size=500)
    with raises(SourceError, "model.vocab_size 500", shards / "index.json"):
        check_data(data_cfg(shards), seq_length=8, vocab_size=500)


def test_preflight_mock_checks_only_the_tokenizer(tiny_tokenizer, tmp_path):
    cfg = DataConfig(source="mock", sources=[DataSourceConfig(path=str(tmp_path / "nowhere"))])
    assert check_data(cfg, seq_length=8, vocab_size=600) == []
    cfg.tokenizer_model = str(tiny_tokenizer)
    assert check_data(cfg, seq_length=8, vocab_size=600) == [
        f"data.tokenizer_model: {tiny_tokenizer} (vocabulary 600)"]
