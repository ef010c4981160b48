"""Hugging Face import and export against transformers itself (fp32, models built here).

- from-hf: our logits equal transformers' (max |diff| <= 1e-5) for GPT-2 (gelu_new, Conv1D,
  tied) and Llama (GQA with 2 of 8 key/value groups, untied; tied with biases) at TP=1 and TP=2,
  and the padded vocabulary rows take no probability mass (our loss equals transformers').
- round trip: from-hf then to-hf gives the original tensors exactly, with the same key set.
- to-hf of a model trained here at TP=2 loads in transformers with our logits and tokenizer.
- refusals: unsupported architecture, a tokenizer larger than the vocabulary, a shape Hugging
  Face cannot express.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from gptforge.launcher.cli.main import main
from gptforge.launcher.modelio.inference import load_checkpoint, load_hf, one_process
from gptforge.parallel.context import free_port
from tests import hf_models
from tests.conftest import ROOT, TINY

TOL = 1e-5
WORKER = ROOT / "tests" / "distributed" / "hf_logits_worker.py"


def _tokens(vocab_size: int, batch: int = 2, seq: int = hf_models.SEQ) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(7))


def _our_logits_and_loss(loaded, tokens):
    model = loaded.model.eval()
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    labels = torch.roll(tokens, -1, 1)
    with torch.no_grad():
        logits = model(tokens, positions, None, runtime_gather_output=True)
        loss = model(tokens, positions, None, labels=labels)
    return logits, loss, labels


@pytest.mark.parametrize("name", ["gpt2", "llama", "llama_tied_bias"])
def test_from_hf_logits_and_loss_equal_transformers(folders, name):
    folder = folders[name]
    ref_model = hf_models.hf_model(folder)
    vocab = ref_model.config.vocab_size
    tokens = _tokens(vocab)
    with torch.no_grad():
        ref = ref_model(tokens).logits
    with one_process():
        loaded = load_hf(folder)
        assert loaded.layout.padded_vocab_size > vocab  # padded rows exist and are tested
        logits, loss, labels = _our_logits_and_loss(loaded, tokens)
    assert (logits[..., :vocab] - ref).abs().max().item() <= TOL
    ref_loss = torch.nn.functional.cross_entropy(ref.reshape(-1, vocab), labels.reshape(-1),
                                                 reduction="none").reshape(labels.shape)
    assert (loss - ref_loss).abs().max().item() <= TOL  # no probability on padded rows


@pytest.mark.slow
def test_from_hf_checkpoint_at_tp2_gives_transformers_logits(folders, converted, tmp_path):
    """At TP=2 the row-parallel layers add partial sums in another order, so the logits move by
    fp32 rounding: on these weights transformers' own fp32 logits are ~4e-5 from the fp64 ones.
    The bar: within 1e-5 of transformers' fp32 logits, or no further from the fp64 logits than
    2x transformers' own fp32 error (a layout mistake is off by 1e-2 or more)."""
    for name in ("gpt2", "llama"):
        model = hf_models.hf_model(folders[name])
        vocab = model.config.vocab_size
        tokens = _tokens(vocab)
        torch.save(tokens, tmp_path / "tokens.pt")
        out = tmp_path / f"{name}.pt"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
               f"--master-port={free_port()}", str(WORKER), str(converted[name]),
               str(tmp_path / "tokens.pt"), str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        ours = torch.load(out)["logits"][..., :vocab].double()
        with torch.no_grad():
            ref32 = model(tokens).logits.double()
            ref64 = model.double()(tokens).logits
        own_error = (ref32 - ref64).abs().max().item()
        diff = (ours - ref32).abs().max().item()
        assert diff <= TOL or (ours - ref64).abs().max().item() <= 2 * own_error, \
            (name, diff, own_error)


@pytest.mark.parametrize("name", ["gpt2", "llama", "llama_tied_bias"])
def test_round_trip_gives_the_original_tensors(folders, converted, tmp_path, name):
    assert main(["convert", "to-hf", "--checkpoint", str(converted[name]),
                 "--out", str(tmp_path / "back")]) == 0
    original = load_file(str(folders[name] / "model.safetensors"))
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert set(back) == set(original)
    for key, tensor in original.items():
        assert torch.equal(back[key], tensor), key
    model = hf_models.hf_model(tmp_path / "back")
    tied = model.get_output_embeddings().weight.data_ptr() == \
        model.get_input_embeddings().weight.data_ptr()
    assert tied == (name != "llama")


def test_converted_checkpoint_records_the_model_and_tokenizer(folders, converted):
    from transformers import AutoTokenizer

    manifest = json.loads((converted["gpt2"] / "manifest.json").read_text())
    assert manifest["weights_only"] and manifest["config"]["model"]["activation"] == "gelu_tanh"
    tok_dir = converted["gpt2"] / "tokenizer"
    assert manifest["config"]["data"]["tokenizer_model"] == str(tok_dir.resolve())
    text = "def f(x):\n    return x  # <|endoftext|> literal"
    assert AutoTokenizer.from_pretrained(str(tok_dir)).encode(text) == \
        AutoTokenizer.from_pretrained(str(folders["gpt2"])).encode(text)
    assert "model:" in (converted["gpt2"] / "model.yaml").read_text()


@pytest.mark.slow
def test_export_of_a_model_trained_here(sp_model, corpus, tmp_path):
    """Trained at PP=2 (GPT-2 shape, gelu_tanh, sentencepiece), exported, loaded by transformers
    with our logits and our token ids; greedy generation from the checkpoint (loaded at TP=1,
    PP=1) gives transformers' tokens on the export."""
    from transformers import AutoTokenizer

    from gptforge.data import tokenizer

    run = tmp_path / "run"
    args = ["train", "--nproc-per-node", "2", "--config", str(TINY), "--run.dir", str(run),
            "--parallel.pipeline_model_parallel_size=2", "--model.activation=gelu_tanh",
            f"--data.tokenizer_model={sp_model}", "--model.vocab_size=512",
            "--train.train_iters=3", "--train.eval_interval=0"]
    proc = subprocess.run([sys.executable, "-m", "gptforge.launcher.cli.main", *args],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert main(["convert", "to-hf", "--checkpoint", str(run / "checkpoints"),
                 "--out", str(tmp_path / "hf")]) == 0
    tokens = _tokens(512, seq=64)
    with one_process():
        ours, _, _ = _our_logits_and_loss(load_checkpoint(run / "checkpoints"), tokens)
    ref = hf_models.hf_logits(tmp_path / "hf", tokens)
    assert ref.shape[-1] == 512
    assert (ours[..., :512] - ref).abs().max().item() <= TOL
    text = "import os\n\tx  =  'naïve 日本'  \n"
    assert AutoTokenizer.from_pretrained(str(tmp_path / "hf")).encode(text) == \
        tokenizer.load(sp_model).encode(text)
    out = tmp_path / "gen.json"
    assert main(["generate", "--checkpoint", str(run / "checkpoints"), "--prompt", text,
                 "--max-new-tokens", "12", "--output-json", str(out), "--quiet"]) == 0
    got = json.loads(out.read_text())[0]["token_ids"]
    assert got == hf_models.hf_greedy(tmp_path / "hf", tokenizer.load(sp_model).encode(text), 12)


def test_hub_style_gpt2_bin_without_prefix_imports_the_same(folders, converted, tmp_path):
    """A weights-only pytorch_model.bin as old hub files have it: no ``transformer.`` prefix,
    the attention-mask buffers, the tied lm_head saved too."""
    import shutil

    folder = tmp_path / "hub"
    shutil.copytree(folders["gpt2"], folder)
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    hub = {k.removeprefix("transformer."): v for k, v in state.items()}
    hub["lm_head.weight"] = hub["wte.weight"]
    for i in range(2):
        hub[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 128, 128))
        hub[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(hub, folder / "pytorch_model.bin")
    assert main(["convert", "from-hf", "--hf", str(folder), "--out", str(tmp_path / "o")]) == 0
    with one_process():
        a = load_checkpoint(tmp_path / "o").model.state_dict()
    with one_process():
        b = load_checkpoint(converted["gpt2"]).model.state_dict()
    for key, value in b.items():
        if not key.endswith("_extra_state"):
            assert torch.equal(a[key], value), key


def test_unsupported_architecture_is_named(tmp_path, capsys):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps(
        {"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    assert main(["convert", "from-hf", "--hf", str(tmp_path / "bert"),
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "BertForMaskedLM" in err and "config.json" in err
    assert not (tmp_path / "out").exists()


def test_tokenizer_larger_than_the_vocabulary_is_refused(folders, tmp_path, capsys):
    import shutil

    bad = tmp_path / "small_vocab"
    shutil.copytree(folders["llama"], bad)
    config = json.loads((bad / "config.json").read_text())
    config["vocab_size"] = 100
    (bad / "config.json").write_text(json.dumps(config))
    assert main(["convert", "from-hf", "--hf", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "vocab_size" in err


def test_export_refuses_a_shape_without_hf_equivalent(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--config", str(TINY), "--run.dir", str(run),
                 "--model.normalization=RMSNorm", "--train.train_iters=3",
                 "--train.eval_interval=0"]) == 0
    capsys.readouterr()
    assert main(["convert", "to-hf", "--checkpoint", str(run / "checkpoints"),
                 "--out", str(tmp_path / "hf")]) == 2
    assert "model.normalization" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_export_has_umask_permissions_and_generates_without_warnings(converted, tmp_path, name):
    """Every exported file is 0644 under umask 022 (safetensors writes 0600), and transformers
    generates from the folder without a word about its generation_config.json."""
    import logging
    import stat
    import warnings

    old = os.umask(0o022)
    try:
        assert main(["convert", "to-hf", "--checkpoint", str(converted[name]),
                     "--out", str(tmp_path / "hf")]) == 0
    finally:
        os.umask(old)
    modes = {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in (tmp_path / "hf").iterdir()}
    assert modes["model.safetensors"] == "0o644" and set(modes.values()) == {"0o644"}, modes
    assert "max_length" not in json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    model = hf_models.hf_model(tmp_path / "hf")
    said: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4)
            model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert [str(w.message) for w in caught] == [] and said == []
    assert model.generation_config.eos_token_id == model.config.eos_token_id


def test_to_hf_finds_a_relative_recorded_tokenizer_or_takes_tokenizer(
        relative_tokenizer_run, tokenizer_gone, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["convert", "to-hf", "--checkpoint",
                 str(relative_tokenizer_run / "runs/x/checkpoints"), "--out", "hf"]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    args = ["convert", "to-hf", "--checkpoint", str(tokenizer_gone), "--out", "hf2"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "'gone.model' does not exist" in err and "pass --tokenizer PATH" in err
    assert main([*args, "--tokenizer", str(relative_tokenizer_run / "sp.model")]) == 0
    assert (tmp_path / "hf2" / "tokenizer.json").is_file()
