"""Small Hugging Face models built here (random weights, local tokenizers; nothing downloaded).

Weights are drawn with std 0.3 (norm weights around 1): on small weights an erf-vs-tanh GELU
mix-up moves logits by only ~3e-6, below the tests' 1e-5 tolerance.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gptforge.data import tokenizer
from gptforge.data.hf_tokenizer import save_hf_tokenizer
from gptforge.data.synthetic import write_text_corpus
from tests.unit.test_hf_tokenizer import write_gpt2_tokenizer

STD = 0.3
SEQ = 128


def corpus(out: Path) -> Path:
    return write_text_corpus(out)


def sentencepiece(corpus_dir: Path, prefix: Path, vocab_size: int = 400) -> Path:
    return Path(tokenizer.train([str(corpus_dir)], str(prefix), vocab_size,
                                txt_unit="file").path)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            norm = "ln_" in name or "norm" in name
            mean = 1.0 if norm and name.endswith("weight") else 0.0
            std = 0.1 if norm else STD
            param.copy_(torch.randn(param.shape, generator=gen) * std + mean)
    return model.eval()


def llama_folder(out: Path, sp_model: Path, *, groups: int = 2, tied: bool = False,
                 bias: bool = False) -> Path:
    """LlamaForCausalLM (8 heads, ``groups`` key/value heads) with our sentencepiece tokenizer
    exported next to it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    info = save_hf_tokenizer(sp_model, out, model_max_length=SEQ)
    config = LlamaConfig(
        vocab_size=info.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=groups, max_position_embeddings=SEQ,
        tie_word_embeddings=tied, rms_norm_eps=1e-5, attention_bias=bias, mlp_bias=bias,
        bos_token_id=info.bos_id, eos_token_id=info.eos_id, pad_token_id=info.pad_id)
    randomize(LlamaForCausalLM(config)).save_pretrained(str(out))
    return out


def gpt2_folder(out: Path, corpus_dir: Path) -> Path:
    """GPT2LMHeadModel (gelu_new, tied) with a byte-level BPE tokenizer trained here."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    write_gpt2_tokenizer(sorted(corpus_dir.glob("*.txt")), out, vocab_size=400)
    tok = AutoTokenizer.from_pretrained(str(out))
    config = GPT2Config(vocab_size=len(tok), n_positions=SEQ, n_embd=64, n_layer=2, n_head=4,
                        activation_function="gelu_new", bos_token_id=tok.eos_token_id,
                        eos_token_id=tok.eos_token_id)
    randomize(GPT2LMHeadModel(config)).save_pretrained(str(out))
    return out


def hf_model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def hf_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(folder)(tokens).logits


def hf_greedy(folder: Path, prompt: list[int], max_new_tokens: int) -> list[int]:
    model = hf_model(folder)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()
