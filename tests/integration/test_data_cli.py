"""End to end through the CLI: tokenizer train → data prepare (killed, resumed) → build_loader."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import torch

from gptforge.data.loader import build_loader
from gptforge.data.synthetic import write_text_corpus
from gptforge.data.config import DataConfig, DataSourceConfig

CLI = [sys.executable, "-m", "gptforge.launcher.cli.main"]
STDLIB_BIGGER = ("json/*.py", "email/*.py", "logging/*.py", "textwrap.py")


def run(*args: str) -> None:
    subprocess.run([*CLI, *args], check=True, capture_output=True)


def test_cli_pipeline_with_sigkill_resume_feeds_the_loader(tmp_path):
    corpus = write_text_corpus(tmp_path / "corpus", STDLIB_BIGGER)
    run("tokenizer", "train", "--input", f"{corpus}/*.txt", "--vocab-size", "2000",
        "--model-prefix", str(tmp_path / "tok"), "--input-sentence-size", "20000")
    prepare = ["data", "prepare", "--input", str(corpus),
               "--tokenizer", str(tmp_path / "tok.model"),
               "--valid-fraction", "0.05", "--shard-size-mb", "0.05", "--workers", "1",
               "--no-progress", "--command", "same"]
    run(*prepare, "--out", str(tmp_path / "clean"))
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*CLI, *prepare, "--out", str(killed)], stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (killed / ".prepare-state.json").exists() and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "index.json").exists(), "prepare finished before it could be killed"
    run(*prepare, "--out", str(killed))
    clean = sorted((tmp_path / "clean").iterdir())
    assert [p.name for p in clean] == [p.name for p in sorted(killed.iterdir())]
    assert all(p.read_bytes() == (killed / p.name).read_bytes() for p in clean)

    cfg = DataConfig(source="webdataset", sources=[DataSourceConfig(path=str(killed))],
                     tokenizer_model=str(tmp_path / "tok.model"), num_workers=2)
    for split in ("train", "valid"):
        it = build_loader(cfg, split=split, seq_length=64, micro_batch_size=4, dp_rank=1,
                          dp_size=2, seed=0, vocab_size=2000)
        batch = next(it)
        assert batch["tokens"].shape == (4, 64) and int(batch["tokens"].max()) < 2000
        assert torch.equal(batch["tokens"][:, 1:], batch["labels"][:, :-1])
        it.close()


def test_sample_corpus_writes_a_corpus_the_tokenizer_trains_on(tmp_path, capsys):
    """README: `gptforge data sample-corpus corpus/` then `gptforge tokenizer train --input
    corpus/`. An existing directory keeps its other files; a file is refused in one line."""
    from gptforge.data.synthetic import SAMPLE_SIZES
    from gptforge.launcher.cli.data import SAMPLE_SIZE_NAMES
    from gptforge.launcher.cli.main import main

    assert tuple(SAMPLE_SIZES) == SAMPLE_SIZE_NAMES
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "mine.md").write_text("kept")
    assert main(["data", "sample-corpus", str(corpus)]) == 0
    files = sorted(corpus.glob("*.txt"))
    size = sum(f.stat().st_size for f in files)
    assert capsys.readouterr().out == f"{len(files)} files, {size} bytes: {corpus}\n"
    assert len(files) > 10 and size > 100_000 and (corpus / "mine.md").read_text() == "kept"
    assert main(["data", "sample-corpus", str(corpus)]) == 0  # again: the same files
    assert sorted(corpus.glob("*.txt")) == files
    capsys.readouterr()
    assert main(["tokenizer", "train", "--input", f"{corpus}/", "--vocab-size", "500",
                 "--model-prefix", str(tmp_path / "tok")]) == 0
    assert (tmp_path / "tok.model").is_file()
    capsys.readouterr()
    assert main(["data", "sample-corpus", str(corpus / "mine.md")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gptforge: error: ") and "mine.md" in err and "\n" not in err
