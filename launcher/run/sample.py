"""The post-training sample (the ``sample`` section): a completion of ``sample.prompt``."""

from __future__ import annotations

from pathlib import Path

from gptforge.common.log import ANY_RANK, get_logger
from gptforge.model.generate import SampleConfig

log = get_logger(__name__)
SAMPLE_FILE = "sample.txt"


def write_sample(sample: SampleConfig, model, *, tokenizer_model: str, vocab_size: int,
                 seq_length: int, seed: int, run_dir: str | Path, is_logging_rank: bool) -> None:
    """Generate from ``sample.prompt``; the logging rank prints it and writes sample.txt."""
    from gptforge.data import tokenizer
    from gptforge.model.generate import generate

    sp = tokenizer.load(tokenizer_model)
    ids = generate(model, sp.encode(sample.prompt), max_new_tokens=sample.max_new_tokens,
                   vocab_size=vocab_size, seq_length=seq_length, temperature=sample.temperature,
                   top_k=sample.top_k, seed=seed, eod_id=sp.eos_id())
    if is_logging_rank:
        text = sample.prompt + sp.decode(ids)
        (Path(run_dir) / SAMPLE_FILE).write_text(text)
        log.info(f"sample:\n{text}", extra=ANY_RANK)
