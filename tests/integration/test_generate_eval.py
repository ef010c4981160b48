"""``gptforge generate`` against transformers' greedy ``generate``, sampling controls, and
``gptforge eval`` on a Hugging Face folder and on its conversion."""

from __future__ import annotations

import json
import math

import pytest

from gptforge.data import tokenizer
from gptforge.launcher.cli.main import main
from tests import hf_models

PROMPTS = ["def main(", "import os\nimport sys\n\nclass Config", "x"]
NEW = 20


def _generate(tmp_path, checkpoint, *args, prompts=PROMPTS) -> list[dict]:
    out = tmp_path / "out.json"
    file = tmp_path / "prompts.jsonl"
    file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompts-file", str(file),
                 "--max-new-tokens", str(NEW), "--output-json", str(out), "--quiet",
                 *args]) == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_greedy_equals_transformers_with_and_without_kv_cache(folders, converted, tmp_path,
                                                              name):
    tok = tokenizer.load(folders[name])
    want = [hf_models.hf_greedy(folders[name], tok.encode(p), NEW) for p in PROMPTS]
    cached = _generate(tmp_path, folders[name], "--greedy")  # batched, different lengths
    assert [r["token_ids"] for r in cached] == want
    assert [r["prompt"] for r in cached] == PROMPTS
    assert cached[0]["completion"] == tok.decode(want[0])
    plain = _generate(tmp_path, folders[name], "--greedy", "--no-kv-cache")
    assert [r["token_ids"] for r in plain] == want
    ours = _generate(tmp_path, converted[name])  # default: greedy, our checkpoint
    assert [r["token_ids"] for r in ours] == want


def test_each_row_stops_at_its_own_limit_and_is_reported_done_once(folders):
    from gptforge.launcher.modelio.inference import load_hf, one_process
    from gptforge.model.generate import generate_batch

    tok = tokenizer.load(folders["llama"])
    prompts = [tok.encode(p) for p in PROMPTS]
    with one_process():
        loaded = load_hf(folders["llama"])
        kwargs = dict(vocab_size=loaded.cfg.model.vocab_size, context=hf_models.SEQ)
        full = generate_batch(loaded.model, prompts, max_new_tokens=NEW, **kwargs)
        done, seen = [], [0, 0, 0]
        short = generate_batch(loaded.model, prompts, max_new_tokens=[3, NEW, 0],
                               on_done=done.append,
                               on_token=lambda row, _: seen.__setitem__(row, seen[row] + 1),
                               **kwargs)
    assert short == [full[0][:3], full[1], []]
    assert sorted(done) == [0, 1, 2] and done[:2] == [2, 0]  # the limit-0 row first, then row 0
    assert seen == [3, NEW, 0]


def test_top_k_one_equals_greedy_and_a_seed_reproduces(folders, tmp_path):
    llama = folders["llama"]
    greedy = _generate(tmp_path, llama, "--greedy")
    top1 = _generate(tmp_path, llama, "--temperature", "0.7", "--top-k", "1")
    assert [r["token_ids"] for r in top1] == [r["token_ids"] for r in greedy]
    sampled = ("--temperature", "1.0", "--top-p", "0.95", "--repetition-penalty", "1.1")
    first = _generate(tmp_path, llama, *sampled, "--seed", "3")
    again = _generate(tmp_path, llama, *sampled, "--seed", "3")
    other = _generate(tmp_path, llama, *sampled, "--seed", "4")
    assert first == again
    assert first != other
    assert first != greedy


def test_single_prompt_streams_the_completion(folders, capsys):
    assert main(["generate", "--checkpoint", str(folders["gpt2"]), "--prompt", "def f(",
                 "--max-new-tokens", "8"]) == 0
    tok = tokenizer.load(folders["gpt2"])
    want = tok.decode(hf_models.hf_greedy(folders["gpt2"], tok.encode("def f("), 8))
    assert capsys.readouterr().out == "def f(" + want + "\n"


def test_prompt_longer_than_the_context_is_named(folders, capsys):
    long_prompt = "word " * 200  # more than the models' 128 positions
    assert main(["generate", "--checkpoint", str(folders["llama"]), "--prompt", "short",
                 "--prompt", long_prompt, "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err
    assert "prompt 1" in err and "context of 128 tokens" in err


@pytest.fixture(scope="module")
def shards(corpus, folders, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "llama"
    assert main(["data", "prepare", "--input", str(corpus), "--tokenizer",
                 str(folders["llama"]), "--out", str(out), "--valid-fraction", "0.3",
                 "--shard-size-mb", "0.05", "--no-progress"]) == 0
    return out


def test_eval_of_a_hf_folder_equals_its_conversion(folders, converted, shards, tmp_path):
    results = []
    for checkpoint in (folders["llama"], converted["llama"]):
        out = tmp_path / "eval.json"
        assert main(["eval", "--checkpoint", str(checkpoint), "--data", str(shards),
                     "--eval-iters", "3", "--micro-batch-size", "2",
                     "--output-json", str(out)]) == 0
        results.append(json.loads(out.read_text()))
    hf, ours = results
    assert hf["loss"] == pytest.approx(ours["loss"], abs=1e-6)
    assert hf["tokens"] == ours["tokens"] == 3 * 2 * 128
    assert hf["perplexity"] == pytest.approx(math.exp(hf["loss"]))
    assert 0 < hf["loss"] < 50


def test_eval_iters_past_one_pass_are_capped_with_a_notice(converted, shards, tmp_path, capsys):
    outs = []
    for extra in ([], ["--eval-iters", "100000"]):
        out = tmp_path / f"eval{len(outs)}.json"
        assert main(["eval", "--checkpoint", str(converted["llama"]), "--data", str(shards),
                     "--micro-batch-size", "2", "--output-json", str(out), *extra]) == 0
        outs.append(json.loads(out.read_text()))
    one_pass, asked_more = outs
    assert asked_more["eval_iters"] == one_pass["eval_iters"]  # one pass, not 100000
    assert asked_more["tokens"] == one_pass["tokens"] and asked_more["loss"] == one_pass["loss"]
    assert f"is more than one pass over the valid split ({one_pass['eval_iters']} iterations " \
           in capsys.readouterr().err


def test_the_same_vocabulary_in_another_format_is_the_same_tokenizer(folders, sp_model, corpus,
                                                                     tmp_path):
    """Shards made with a sentencepiece model evaluate with the Hugging Face folder whose
    tokenizer.json was exported from it (identity is the vocabulary, not the file bytes)."""
    sp_shards = tmp_path / "sp_shards"
    assert main(["data", "prepare", "--input", str(corpus), "--tokenizer", str(sp_model),
                 "--out", str(sp_shards), "--valid-fraction", "0.3", "--shard-size-mb", "0.05",
                 "--no-progress"]) == 0
    assert tokenizer.info(sp_model).sha256 != tokenizer.info(folders["llama"]).sha256
    assert tokenizer.info(sp_model).vocab_sha256 == tokenizer.info(folders["llama"]).vocab_sha256
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(folders["llama"]), "--data", str(sp_shards),
                 "--eval-iters", "2", "--micro-batch-size", "2", "--output-json", str(out)]) == 0
    assert 0 < json.loads(out.read_text())["loss"] < 50
    # another vocabulary is still refused, naming it
    assert main(["eval", "--checkpoint", str(folders["gpt2"]), "--data", str(sp_shards),
                 "--eval-iters", "2", "--micro-batch-size", "2"]) == 2


def test_default_max_new_tokens_is_what_the_context_leaves(folders, tmp_path, capsys):
    """The default (64) shrinks to what the longest prompt leaves of the context, with one
    notice (the models' context is 128)."""
    long_prompt = "word " * 25
    room = hf_models.SEQ - len(tokenizer.load(folders["llama"]).encode(long_prompt))
    assert 0 < room < 64
    out = tmp_path / "out.json"
    assert main(["generate", "--checkpoint", str(folders["llama"]), "--prompt", "x",
                 "--prompt", long_prompt, "--output-json", str(out)]) == 0
    assert all(len(r["token_ids"]) <= room for r in json.loads(out.read_text()))
    notices = [line for line in capsys.readouterr().err.splitlines() if "new tokens" in line]
    assert len(notices) == 1 and f"at most {room} new tokens, not 64: prompt 1 (" in notices[0]


def test_a_refused_long_prompt_is_named_briefly_and_not_echoed(folders, capsys):
    huge = "word " * 2000  # 10,000 characters
    for extra, why in ((["--max-new-tokens", "4"], "exceed the model's context of 128"),
                       ([], "leave no room for new tokens")):
        assert main(["generate", "--checkpoint", str(folders["llama"]), "--prompt", huge,
                     *extra]) == 2
        out, err = capsys.readouterr()
        line = next(line for line in err.splitlines() if "error" in line)
        assert len(line) < 300 and why in line, line
        assert "prompt 0 ('word word word" in line and "(10000 characters)" in line
        assert out == ""  # the prompt is not streamed before the refusal


def test_a_relative_tokenizer_path_is_looked_for_where_the_run_was(tmp_path, monkeypatch):
    """The current directory first, then the run dir, then the directory the run started in."""
    from gptforge.launcher.modelio.recorded_tokenizer import find_tokenizer

    step = tmp_path / "project" / "runs" / "x" / "checkpoints" / "step-0000003"
    step.mkdir(parents=True)
    manifest = {"config": {"data": {"tokenizer_model": "tok.model"}, "run": {"dir": "runs/x"}}}
    monkeypatch.chdir(tmp_path)
    places = [tmp_path / "project" / "tok.model", tmp_path / "project" / "runs" / "x" /
              "tok.model", tmp_path / "tok.model"]
    for place in places:  # each one found ahead of those before it
        place.write_text("")
        assert find_tokenizer(step, manifest).path == str(place)
    assert find_tokenizer(step, {"config": {"data": {"tokenizer_model": ""}}}).path == ""


def test_a_relative_recorded_tokenizer_is_found_from_another_directory(relative_tokenizer_run,
                                                                       tmp_path, monkeypatch,
                                                                       capsys):
    """A tiny model (context 64) of a run that recorded ``sp.model`` relative to where it was
    started: generate from elsewhere finds it, and the default --max-new-tokens fits."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "gen.json"
    assert main(["generate", "--checkpoint", str(relative_tokenizer_run / "runs/x/checkpoints"),
                 "--prompt", "def f(", "--output-json", str(out)]) == 0
    room = 64 - len(tokenizer.load(relative_tokenizer_run / "sp.model").encode("def f("))
    assert len(json.loads(out.read_text())[0]["token_ids"]) <= room
    assert f"generating at most {room} new tokens, not 64" in capsys.readouterr().err


def test_a_recorded_tokenizer_found_nowhere_is_named_and_tokenizer_overrides(
        relative_tokenizer_run, tokenizer_gone, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["generate", "--checkpoint", str(tokenizer_gone), "--prompt", "def f(",
            "--max-new-tokens", "4", "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{tokenizer_gone}: its tokenizer (data.tokenizer_model) 'gone.model' does not " \
           f"exist" in err
    assert str(tmp_path / "gone.model") in err and "pass --tokenizer PATH" in err
    assert main([*args, "--tokenizer", str(relative_tokenizer_run / "sp.model")]) == 0
