"""``data prepare``: deterministic bytes, the hash split, resume after a crash, bad input."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gptforge.data import tokenizer
from gptforge.data.prepare import PrepareError, PrepareSettings, prepare
from gptforge.data.shards import iter_shard_members
from gptforge.data.text_inputs import InputError
from tests.conftest import ROOT



def settings(corpus, tok, out, **kw) -> PrepareSettings:
    base = dict(inputs=[str(corpus)], tokenizer=str(tok), out=str(out), valid_fraction=0.1,
                shard_size_mb=0.04, workers=1, command=["test"])
    return PrepareSettings(**{**base, **kw})


def dir_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_prepare_is_byte_identical_for_any_worker_count(text_corpus, tiny_tokenizer, tmp_path):
    one = prepare(settings(text_corpus, tiny_tokenizer, tmp_path / "a"), progress=False)
    prepare(settings(text_corpus, tiny_tokenizer, tmp_path / "b", workers=2), progress=False)
    assert len(one["splits"]["train"]["shards"]) > 3 and one["splits"]["valid"]["docs"] > 0
    assert dir_bytes(tmp_path / "a") == dir_bytes(tmp_path / "b")


def test_index_and_shards_agree(text_corpus, tiny_tokenizer, tmp_path):
    index = prepare(settings(text_corpus, tiny_tokenizer, tmp_path / "o"), progress=False)
    assert index["dtype"] == "uint16" and index["vocab_size"] == 600 and index["eod_id"] == 2
    assert index["tokenizer"]["sha256"] == tokenizer.file_sha256(tiny_tokenizer)
    assert index["command"] == ["test"]
    proc = tokenizer.load(tiny_tokenizer)
    for split in ("train", "valid"):
        for shard in index["splits"][split]["shards"]:
            members = list(iter_shard_members(tmp_path / "o" / shard["file"]))
            assert len(members) == shard["docs"]
            tokens = [np.frombuffer(data, "<u2") for _, data in members]
            assert sum(map(len, tokens)) == shard["tokens"]
            assert all(name.endswith(".u16") for name, _ in members)
    text = tokenizer.decode(proc, tokens[0].tolist())
    assert text and text in "".join(p.read_text() for p in text_corpus.iterdir())


def test_valid_split_is_a_stable_hash_of_the_document(text_corpus, tiny_tokenizer, tmp_path):
    small = prepare(settings(text_corpus, tiny_tokenizer, tmp_path / "s", valid_fraction=0.1,
                             shard_size_mb=100), progress=False)
    large = prepare(settings(text_corpus, tiny_tokenizer, tmp_path / "l", valid_fraction=0.3,
                             shard_size_mb=100), progress=False)
    docs = small["splits"]["train"]["docs"] + small["splits"]["valid"]["docs"]
    assert 0.05 < small["splits"]["valid"]["docs"] / docs < 0.15
    valid_small = {d for _, d in iter_shard_members(tmp_path / "s" / "valid-000000.tar")}
    valid_large = {d for _, d in iter_shard_members(tmp_path / "l" / "valid-000000.tar")}
    assert valid_small < valid_large
    assert 0.2 < large["splits"]["valid"]["docs"] / docs < 0.4


@pytest.fixture(scope="module")
def clean_run(text_corpus, tiny_tokenizer, tmp_path_factory):
    clean = tmp_path_factory.mktemp("clean") / "out"
    prepare(settings(text_corpus, tiny_tokenizer, clean), progress=False)
    return clean


@pytest.mark.parametrize("crash_after_docs,workers", [(7, 1), (150, 2), (400, 1)])
def test_crash_then_rerun_equals_one_clean_run(text_corpus, tiny_tokenizer, tmp_path, clean_run,
                                               crash_after_docs, workers):
    clean = clean_run
    out = tmp_path / "crashed"
    args = ["--input", str(text_corpus), "--tokenizer", str(tiny_tokenizer), "--out", str(out),
            "--valid-fraction", "0.1", "--shard-size-mb", "0.04", "--workers", str(workers),
            "--no-progress", "--command", "test"]
    crashing = [sys.executable, "-m", "tests.unit.prepare_crash", str(crash_after_docs), *args]
    assert subprocess.run(crashing, capture_output=True, cwd=ROOT).returncode == 3
    assert list(out.glob("*.tmp")) and not (out / "index.json").exists()
    finished_before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert finished_before or crash_after_docs < 100
    args = [sys.executable, "-m", "gptforge.launcher.cli.main", "data", "prepare", *args]
    assert subprocess.run(args, capture_output=True).returncode == 0
    assert dir_bytes(out) == dir_bytes(clean)
    kept = {n for n, t in finished_before.items() if (out / n).stat().st_mtime_ns == t}
    assert kept == set(finished_before)  # finished shards were not rewritten


def test_rerun_after_completion_is_a_no_op_and_settings_change_is_refused(
        text_corpus, tiny_tokenizer, tmp_path):
    prepare(settings(text_corpus, tiny_tokenizer, tmp_path / "o"), progress=False)
    before = dir_bytes(tmp_path / "o")
    prepare(settings(text_corpus, tiny_tokenizer, tmp_path / "o", workers=2), progress=False)
    assert dir_bytes(tmp_path / "o") == before
    with pytest.raises(PrepareError, match="index.json"):
        prepare(settings(text_corpus, tiny_tokenizer, tmp_path / "o", valid_fraction=0.5),
                progress=False)


def test_jsonl_and_gzip_inputs(tiny_tokenizer, tmp_path):
    docs = [{"text": f"document {i} " * (i + 1), "id": i} for i in range(50)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs[:25]))
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as handle:
        handle.write("".join(json.dumps(d) + "\n" for d in docs[25:]))
    index = prepare(settings(f"{tmp_path}/*.jsonl*", tiny_tokenizer, tmp_path / "o",
                             valid_fraction=0.0), progress=False)
    assert index["splits"]["train"]["docs"] == 50 and not index["splits"]["valid"]["shards"]


def test_bad_inputs_name_the_file(tiny_tokenizer, tmp_path):
    with pytest.raises(InputError, match="missing.txt"):
        prepare(settings(tmp_path / "missing.txt", tiny_tokenizer, tmp_path / "o"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty"):
        prepare(settings(tmp_path / "empty", tiny_tokenizer, tmp_path / "o"))
    (tmp_path / "blank.txt").write_text("\n\n   \n")
    with pytest.raises(PrepareError, match="blank.txt.*no documents"):
        prepare(settings(tmp_path / "blank.txt", tiny_tokenizer, tmp_path / "o2"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text key"}\n')
    with pytest.raises(InputError, match="bad.jsonl:2"):
        prepare(settings(tmp_path / "bad.jsonl", tiny_tokenizer, tmp_path / "o3"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(InputError, match="latin1.txt"):
        prepare(settings(tmp_path / "latin1.txt", tiny_tokenizer, tmp_path / "o4"))
    with pytest.raises(tokenizer.TokenizerError, match="nope.model"):
        prepare(settings(tmp_path / "bad.jsonl", tmp_path / "nope.model", tmp_path / "o5"))
