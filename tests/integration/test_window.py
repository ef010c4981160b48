"""Sliding-window attention (``model.window_size``, ``model.window_size_every_n``):

- a window at least the sequence length gives exactly the full-attention losses;
- a window of w gives the logits and losses of a reference: the same weights without the
  window, each windowed layer's attention given an explicit band mask (j <= i, i - j < w), built
  here independently, through SDPA's masked path; with every other layer full, likewise;
- greedy generation with the KV cache equals recomputation without it, prompts longer than the
  window, and the windowed layers' caches hold the window's positions only (bounded);
- export: a windowed Llama shape is Mistral (``sliding_window``), with transformers' logits; a
  GPT-2 shape or an alternation is refused naming the setting; bad values are refused.
"""

from __future__ import annotations

import pytest
import torch

from gptforge.launcher.cli.main import main
from gptforge.launcher.modelio.inference import load_checkpoint, one_process
from gptforge.model.attention import SDPAttention
from gptforge.model.generate import generate_batch
from gptforge.model.window_cache import WindowedSelfAttention
from tests import hf_models
from tests.conftest import TINY, train_losses

pytestmark = pytest.mark.slow  # trains small models in this process
SEQ, WINDOW = 64, 8
LLAMA = ["--model.position_embedding_type=rope", "--model.normalization=RMSNorm",
         "--model.activation=swiglu", "--model.add_bias_linear=false",
         "--model.tie_embeddings=false", f"--model.seq_length={SEQ}"]


def _train(run, *extra: str) -> list[float]:
    assert main(["train", "--config", str(TINY), "--run.dir", str(run), "--train.train_iters=4",
                 "--train.eval_interval=0", *extra]) == 0
    return train_losses(run)


def _logits(model, tokens):
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    labels = torch.roll(tokens, -1, 1)
    with torch.no_grad():
        logits = model(tokens, positions, None, runtime_gather_output=True)
        loss = model(tokens, positions, None, labels=labels)
    return logits, loss


def _reference(model, tokens, windowed_layers: set[int]):
    """The model without its window, the windowed layers' attention given a band mask."""
    s = tokens.shape[1]
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    masked_out = ~((j <= i) & (i - j < WINDOW))  # megatron's convention: True = not allowed
    cores = [m for m in model.modules() if isinstance(m, SDPAttention)]
    saved = [(core, core.window_size, core.forward) for core in cores]
    try:
        for core in cores:
            core.window_size = None
            if core.layer_number in windowed_layers:
                plain = core.forward
                core.forward = (lambda q, k, v, mask, *a, _f=plain, **kw:
                                _f(q, k, v, masked_out[None, None], *a, **kw))
        return _logits(model, tokens)
    finally:
        for core, window, forward in saved:
            core.window_size, core.forward = window, forward


def test_a_window_of_the_sequence_length_changes_nothing(tmp_path):
    full = _train(tmp_path / "full", *LLAMA)
    assert _train(tmp_path / "w", *LLAMA, f"--model.window_size={SEQ}") == full
    assert _train(tmp_path / "w8", *LLAMA, f"--model.window_size={WINDOW}") != full


@pytest.mark.parametrize("every_n, windowed", [(None, {1, 2, 3, 4}), (2, {1, 3})])
def test_window_equals_a_band_masked_reference_and_kv_cache_generation(tmp_path, every_n,
                                                                       windowed):
    extra = [f"--model.window_size={WINDOW}"]
    if every_n:
        extra.append(f"--model.window_size_every_n={every_n}")
    _train(tmp_path / "run", *LLAMA, *extra)
    tokens = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(3))
    with one_process():
        loaded = load_checkpoint(tmp_path / "run" / "checkpoints")
        model = loaded.model.eval()
        assert {c.layer_number for c in model.modules()
                if isinstance(c, SDPAttention) and c.window_size == WINDOW} == windowed
        logits, loss = _logits(model, tokens)
        ref_logits, ref_loss = _reference(model, tokens, windowed)
        full_logits, _ = _reference(model, tokens, set())
        prompts = [tokens[0, :20].tolist(), tokens[1, :13].tolist()]  # longer than the window
        kw = {"max_new_tokens": 24, "vocab_size": 256, "context": SEQ}
        cached = generate_batch(loaded.runner, prompts, kv_cache=True, **kw)
        # the windowed layers' caches hold the window, not the 20 + 24 positions seen
        held = {a.layer_number: a.cached_positions() for a in model.modules()
                if isinstance(a, WindowedSelfAttention)}
        recomputed = generate_batch(loaded.runner, prompts, kv_cache=False, **kw)
    assert held == {n: (WINDOW if n in windowed else 0) for n in (1, 2, 3, 4)}, held
    assert (logits - ref_logits).abs().max().item() <= 1e-5
    assert (loss - ref_loss).abs().max().item() <= 1e-5
    assert (logits - full_logits).abs().max().item() > 1e-3  # the window is in force
    assert cached == recomputed and all(len(row) == 24 for row in cached)


def test_windowed_llama_exports_as_mistral_with_transformers_logits(tmp_path, sp_model, capsys):
    run = tmp_path / "run"
    _train(run, *LLAMA, f"--model.window_size={WINDOW}", f"--data.tokenizer_model={sp_model}",
           "--model.vocab_size=512")
    assert main(["convert", "to-hf", "--checkpoint", str(run / "checkpoints"),
                 "--out", str(tmp_path / "hf")]) == 0
    model = hf_models.hf_model(tmp_path / "hf")
    assert type(model).__name__ == "MistralForCausalLM"
    assert model.config.sliding_window == WINDOW
    tokens = torch.randint(0, 512, (2, SEQ), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(tokens).logits
    with one_process():
        ours, _ = _logits(load_checkpoint(run / "checkpoints").model.eval(), tokens)
    assert (ours[..., :512] - ref).abs().max().item() <= 1e-5
    # and back: the Mistral folder imports with its window
    assert main(["convert", "from-hf", "--hf", str(tmp_path / "hf"), "--out",
                 str(tmp_path / "back")]) == 0
    assert f"window_size: {WINDOW}" in (tmp_path / "back" / "model.yaml").read_text()


def test_refusals_name_the_setting(tmp_path, capsys):
    gpt2 = tmp_path / "gpt2"
    _train(gpt2, f"--model.window_size={WINDOW}")
    capsys.readouterr()
    assert main(["convert", "to-hf", "--checkpoint", str(gpt2 / "checkpoints"),
                 "--out", str(tmp_path / "hf")]) == 2
    assert "model.window_size" in capsys.readouterr().err
    for bad, key in (("--model.window_size=0", "model.window_size"),
                     ("--model.window_size_every_n=2", "model.window_size_every_n")):
        assert main(["train", "--config", str(TINY), "--run.dir", str(tmp_path / "x"),
                     bad]) == 2
        assert key in capsys.readouterr().err
    assert main(["train", "--config", str(TINY), "--run.dir", str(tmp_path / "y"),
                 "--model.window_size=8", "--model.attention_backend=local"]) == 2
    assert "model.window_size" in capsys.readouterr().err
