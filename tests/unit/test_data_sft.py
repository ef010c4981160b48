"""SFT data: prompt/response JSONL → shards whose prompt tokens carry no loss, through packing,
window boundaries, DataLoader workers and resume; bad lines and format mismatches are named."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gptforge.data import tokenizer
from gptforge.data.config import DataConfig, DataSourceConfig
from gptforge.data.loader import build_loader
from gptforge.data.packing import join_documents, make_batch
from gptforge.data.preflight import check_data
from gptforge.data.prepare import PrepareSettings, prepare
from gptforge.data.shards import PROMPT_FLAG, ShardError, iter_shard_members, read_shard
from gptforge.data.shardspec import SourceError
from gptforge.data.synthetic import unique_docs, write_token_dataset
from gptforge.data.text_inputs import InputError
from tests.unit.test_data_errors import raises

VOCAB, EOD = 5000, 0
PROMPT_IDS, RESPONSE_IDS = range(1000, 3000), range(3000, 5000)  # the truth the mask must match


def sft_docs(num_shards: int, docs_per_shard: int, seed: int = 0) -> list[list[np.ndarray]]:
    """Documents of 1..9 prompt tokens (1000..2999, flagged) and 1..6 response tokens
    (3000..4999): lengths vary, so documents straddle windows at every offset."""
    rng = np.random.default_rng(seed)
    shards, p, r = [], 1000, 3000
    for _ in range(num_shards):
        docs = []
        for _ in range(docs_per_shard):
            n_p, n_r = int(rng.integers(1, 10)), int(rng.integers(1, 7))
            docs.append(np.concatenate([np.arange(p, p + n_p, dtype="<u4") | PROMPT_FLAG,
                                        np.arange(r, r + n_r, dtype="<u4")]))
            p, r = p + n_p, r + n_r
        shards.append(docs)
    return shards


@pytest.fixture
def sft_data(tmp_path):
    write_token_dataset(tmp_path / "sft", {"train": sft_docs(3, 20)}, vocab_size=VOCAB,
                        eod_id=EOD, sft=True)
    return tmp_path / "sft"


def cfg(path, **kw) -> DataConfig:
    return DataConfig(source="webdataset", sources=[DataSourceConfig(path=str(path))],
                      **{"format": "sft", **kw})


def loader(data_cfg, *, seq=8, mbs=3, dp_rank=0, dp_size=1):
    return build_loader(data_cfg, split="train", seq_length=seq, micro_batch_size=mbs,
                        dp_rank=dp_rank, dp_size=dp_size, seed=3, vocab_size=VOCAB)


def take(it, n):
    return [next(it) for _ in range(n)]


# ------------------------------------------------------------------ the mask


def test_make_batch_masks_where_the_label_is_a_prompt_token():
    f = PROMPT_FLAG
    window = np.array([[5 | f, 6 | f, 7, 8, EOD, 9 | f, 10 | f, 11, EOD]], dtype=np.int64)
    batch = make_batch(window, EOD, False, False, sft=True)
    assert batch["tokens"].tolist() == [[5, 6, 7, 8, EOD, 9, 10, 11]]
    assert batch["labels"].tolist() == [[6, 7, 8, EOD, 9, 10, 11, EOD]]
    # labels:                  6(p) 7(r) 8(r) EOD  9(p) 10(p) 11(r) EOD
    assert batch["loss_mask"].tolist() == [[0, 1, 1, 1, 0, 0, 1, 1]]
    reset = make_batch(window, EOD, True, False, sft=True)  # documents found on stripped ids
    assert reset["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2]]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_mask_matches_the_truth_across_windows_and_packing(sft_data, num_workers):
    batches = take(loader(cfg(sft_data, num_workers=num_workers)), 40)  # > one epoch
    tokens = torch.cat([b["tokens"] for b in batches]).reshape(-1)
    labels = torch.cat([b["labels"] for b in batches]).reshape(-1)
    mask = torch.cat([b["loss_mask"] for b in batches]).reshape(-1)
    assert int(tokens.max()) < VOCAB and int(labels.max()) < VOCAB  # flags stripped
    is_prompt = (labels >= PROMPT_IDS.start) & (labels < PROMPT_IDS.stop)
    assert torch.equal(mask, (~is_prompt).float())
    prev_prompt = (tokens >= PROMPT_IDS.start) & (tokens < PROMPT_IDS.stop)
    first_response = prev_prompt & (labels >= RESPONSE_IDS.start)
    assert first_response.sum() > 50 and bool(mask[first_response].all())
    assert (labels == EOD).sum() > 50 and bool(mask[labels == EOD].all())
    assert not bool(mask[(tokens == EOD) & (labels != EOD)].any())  # EOD -> next prompt
    last_label = torch.cat([b["labels"][:, -1] for b in batches])  # window boundaries
    assert bool((last_label >= PROMPT_IDS.start).any() & (last_label < PROMPT_IDS.stop).any())


def test_packing_checks_ids_without_the_flag():
    doc = np.array([4 | PROMPT_FLAG, 4999, 4998], dtype="<u4")
    assert join_documents([doc], EOD, "u", VOCAB, sft=True).tolist() == [4 | PROMPT_FLAG, 4999,
                                                                         4998, EOD]
    with raises(ShardError, "u: token id 5000"):
        join_documents([np.array([5000 | PROMPT_FLAG], dtype="<u4")], EOD, "u", VOCAB, sft=True)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_stream_gives_identical_batches(sft_data, num_workers):
    data_cfg = cfg(sft_data, num_workers=num_workers)
    for rank in range(2):
        reference = take(loader(data_cfg, dp_rank=rank, dp_size=2), 13)
        first = loader(data_cfg, dp_rank=rank, dp_size=2)
        take(first, 7)
        resumed = loader(data_cfg, dp_rank=rank, dp_size=2)
        resumed.load_state_dict(first.state_dict())
        for want, got in zip(reference[7:], take(resumed, 6)):
            for key in ("tokens", "labels", "loss_mask", "position_ids"):
                assert torch.equal(want[key], got[key]), key


# ------------------------------------------------------------------ data prepare --format sft


PAIRS = [("What is 2+2?", " 4"), ("  Say hi\n", "hi\tthere\n"), ("", "only a response"),
         ("日本語?", "はい 😀")]


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_prepare_sft_writes_flagged_prompts_then_responses(tmp_path, tiny_tokenizer):
    src = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": p, "response": r, "id": k}
                                               for k, (p, r) in enumerate(PAIRS)])
    index = prepare(PrepareSettings(inputs=[src], tokenizer=str(tiny_tokenizer),
                                    out=str(tmp_path / "out"), format="sft"), progress=False)
    assert index["sft"] is True and index["dtype"] == "uint32"
    sp = tokenizer.load(tiny_tokenizer)
    members = list(iter_shard_members(tmp_path / "out" / "train-000000.tar"))
    assert all(name.endswith(".m32") for name, _ in members)
    for (prompt, response), (_, data) in zip(PAIRS, members):
        doc = np.frombuffer(data, "<u4")
        flagged = doc >= PROMPT_FLAG
        assert (doc & (PROMPT_FLAG - 1)).tolist() == sp.encode(prompt) + sp.encode(response)
        assert flagged.tolist() == [True] * len(sp.encode(prompt)) + [False] * len(
            sp.encode(response))
    assert index["splits"]["train"]["tokens"] == sum(len(sp.encode(p) + sp.encode(r))
                                                    for p, r in PAIRS)
    batch = next(loader(cfg(tmp_path / "out", tokenizer_model=str(tiny_tokenizer)), seq=32,
                        mbs=2))  # the loader reads them, flags become the mask
    assert int(batch["tokens"].max()) < 600 and 0 < int(batch["loss_mask"].sum()) < 64


@pytest.mark.parametrize("line, reason", [
    ({"prompt": "q"}, "JSON record has no 'response' field"),
    ({"response": "a"}, "JSON record has no 'prompt' field"),
    ({"prompt": 3, "response": "a"}, "field 'prompt' is a JSON number, not a string"),
    ({"prompt": "q", "response": ["a"]}, "field 'response' is a JSON array, not a string"),
    ("not json", "not valid JSON"),
    ([1, 2], "a JSON array, not an object with 'prompt' and 'response' fields"),
])
def test_bad_jsonl_lines_are_named_before_any_shard(tmp_path, tiny_tokenizer, line, reason):
    good = [{"prompt": f"q{k}", "response": f"a{k}"} for k in range(5)]
    path = tmp_path / "sft.jsonl"
    text = "".join(json.dumps(r) + "\n" for r in good)
    path.write_text(text + (line if isinstance(line, str) else json.dumps(line)) + "\n")
    with raises(InputError, f"{path}:6: {reason}"):
        prepare(PrepareSettings(inputs=[str(path)], tokenizer=str(tiny_tokenizer),
                                out=str(tmp_path / "out"), format="sft"), progress=False)
    assert not (tmp_path / "out").exists()


def test_sft_needs_jsonl_inputs(tmp_path, tiny_tokenizer):
    (tmp_path / "plain.txt").write_text("some text\n")
    with raises(InputError, tmp_path / "plain.txt", "--format sft reads .jsonl"):
        prepare(PrepareSettings(inputs=[str(tmp_path / "plain.txt")],
                                tokenizer=str(tiny_tokenizer), out=str(tmp_path / "out"),
                                format="sft"), progress=False)


# ------------------------------------------------------------------ format mismatches


def test_sft_config_on_pretraining_shards_is_refused(tmp_path):
    write_token_dataset(tmp_path / "pre", {"train": unique_docs(2, 3, 5)}, vocab_size=VOCAB,
                        eod_id=EOD)
    with raises(SourceError, "data.sources[0]", tmp_path / "pre" / "index.json",
                "data.format=sft", "would train on prompts"):
        check_data(cfg(tmp_path / "pre"), splits=("train",), seq_length=8, vocab_size=VOCAB)
    with raises(ShardError, "train-000000.tar", "pretraining data", "data.format=sft"):
        read_shard(str(tmp_path / "pre" / "train-000000.tar"), sft=True)  # no index: members


def test_pretraining_config_on_sft_shards_is_refused(sft_data):
    pretrain = cfg(sft_data, format="pretrain")
    with raises(SourceError, "data.sources[0]", sft_data / "index.json", "SFT shards",
                "data.format=sft"):
        check_data(pretrain, splits=("train",), seq_length=8, vocab_size=VOCAB)
    with raises(SourceError, "data.format=pretrain"):
        loader(pretrain)
    with raises(ShardError, "train-000000.tar", "is SFT data", "data.format=sft"):
        read_shard(str(sft_data / "train-000000.tar"))


def test_sft_mock_data_masks_a_prefix_of_each_sample_the_same_for_any_dp_size():
    from gptforge.data.mock import MockBatches

    assert check_data(DataConfig(format="sft"), seq_length=8, vocab_size=VOCAB) == []

    def masks(dp_size: int, sft: bool = True) -> torch.Tensor:
        out = []
        for dp_rank in range(dp_size):
            batches = MockBatches(split="train", seq_length=16, micro_batch_size=8 // dp_size,
                                  global_batch_size=8, dp_rank=dp_rank, dp_size=dp_size, seed=3,
                                  vocab_size=VOCAB, sft=sft)
            out.append(next(batches)["loss_mask"])
        return torch.cat(out)

    one = masks(1)
    assert torch.equal(one, masks(2)) and torch.equal(one, masks(4))
    prompt_lengths = (one == 0).sum(1)
    assert len(set(prompt_lengths.tolist())) > 3  # very unequal responses
    assert all(row[:p].eq(0).all() and row[p:].eq(1).all()  # a prefix, then the response
               for row, p in zip(one, prompt_lengths.tolist()))
    assert torch.equal(masks(2, sft=False), torch.ones(8, 16))


# ------------------------------------------------------------------ a valid split for validation


def finetune_cfg(shards, *overrides: str):
    """configs/finetune.yaml (train.eval_interval 50) on top of the tiny model, on ``shards``."""
    from gptforge.launcher.config import load_config
    from tests.conftest import ROOT, TINY

    return load_config([TINY, ROOT / "configs" / "finetune.yaml"],
                       [f"--data.sources=[{{path: {shards}}}]", f"--model.vocab_size={VOCAB}",
                        *overrides])


def test_validation_without_valid_shards_is_refused_naming_the_fixes(sft_data, tmp_path):
    """`data prepare` writes no valid split by default; a training that validates (finetune.yaml,
    tiny.yaml) is refused before any model, naming the missing split and every way out."""
    from gptforge.launcher.run.build import check_data as check_run_data

    with raises(SourceError, "data.sources[0]", sft_data / "index.json", "no 'valid' shards",
                "train.eval_interval=50", "data prepare --format sft", "--valid-fraction",
                "data.valid_sources", "--train.eval_interval=0"):
        check_run_data(finetune_cfg(sft_data))
    assert check_run_data(finetune_cfg(sft_data, "--train.eval_interval=0"))  # the notes
    write_token_dataset(tmp_path / "pre", {"train": unique_docs(2, 3, 5)}, vocab_size=VOCAB,
                        eod_id=EOD)  # pretraining shards: the same refusal
    with raises(SourceError, "no 'valid' shards", "--valid-fraction", "--train.eval_interval=0"):
        check_run_data(finetune_cfg(tmp_path / "pre", "--data.format=pretrain"))


def test_prepare_sft_says_when_it_writes_no_valid_split(tmp_path, tiny_tokenizer, capsys):
    from gptforge.launcher.cli.main import main
    from gptforge.launcher.run.build import check_data as check_run_data

    src = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"q{k}?", "response": f" a{k}"}
                                                 for k in range(200)])
    args = ["data", "prepare", "--format", "sft", "--input", src, "--tokenizer",
            str(tiny_tokenizer), "--no-progress", "--workers", "1"]
    assert main([*args, "--out", str(tmp_path / "none")]) == 0
    assert "note: no valid split" in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "some"), "--valid-fraction", "0.1"]) == 0
    assert "note:" not in capsys.readouterr().out
    cfg = finetune_cfg(tmp_path / "some", f"--data.tokenizer_model={tiny_tokenizer}")
    assert any("valid shard" in note for note in check_run_data(cfg))
