"""Knowledge distillation (``distill.teacher``, ``distill.alpha``, ``distill.temperature``):

- alpha = 0 trains exactly as without a teacher (losses and validation bitwise equal);
- a small student distilled from a trained teacher on the same corpus reaches a lower validation
  loss than the same student trained on the cross entropy alone for the same steps;
- a TP=2 student gives the TP=1 student's losses (vocabulary-parallel KL) within 1e-5;
- a teacher with another tokenizer or vocabulary, the deepspeed engine or PP=2 are refused
  naming the setting.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gptforge.launcher.cli.main import main
from tests.conftest import TINY, assert_close_losses, metrics, train_losses

pytestmark = pytest.mark.slow  # trains several models; one case launches 2 ranks
SHAPE = ["--model.vocab_size=512", "--model.seq_length=128"]


@pytest.fixture(scope="module")
def corpus_run(corpus, sp_model, tmp_path_factory) -> dict:
    """Shards of the test corpus and a teacher trained on them (4 layers, hidden 128)."""
    root = tmp_path_factory.mktemp("distill")
    shards = root / "shards"
    assert main(["data", "prepare", "--input", str(corpus), "--tokenizer", str(sp_model),
                 "--out", str(shards), "--valid-fraction", "0.1"]) == 0
    data = ["--data.source=webdataset", f"--data.sources=[{{path: {shards}}}]",
            f"--data.tokenizer_model={sp_model}", *SHAPE]
    assert main(["train", "--config", str(TINY), "--run.dir", str(root / "teacher"), *data,
                 "--model.num_layers=4", "--model.hidden_size=128", "--train.train_iters=200",
                 "--train.eval_interval=0", "--optim.lr=2e-3", "--optim.min_lr=2e-4",
                 "--optim.lr_warmup_iters=10"]) == 0
    return {"root": root, "data": data, "teacher": root / "teacher" / "checkpoints"}


def _student(run, data, *extra) -> list[dict]:
    assert main(["train", "--config", str(TINY), "--run.dir", str(run), *data,
                 "--model.num_layers=2", "--model.hidden_size=64", "--train.train_iters=80",
                 "--train.eval_interval=80", "--train.eval_iters=8", "--optim.lr=2e-3",
                 "--optim.min_lr=2e-4", "--optim.lr_warmup_iters=5", *extra]) == 0
    return metrics(run)


def _val(records) -> float:
    return [r["val_loss"] for r in records if "val_loss" in r][-1]


def test_alpha_0_is_plain_training_and_distillation_beats_cross_entropy(corpus_run):
    root, data, teacher = corpus_run["root"], corpus_run["data"], corpus_run["teacher"]
    plain = _student(root / "plain", data)
    zero = _student(root / "zero", data, f"--distill.teacher={teacher}", "--distill.alpha=0")
    assert train_losses(root / "zero") == train_losses(root / "plain")
    assert _val(zero) == _val(plain)
    distilled = _student(root / "kd", data, f"--distill.teacher={teacher}",
                         "--distill.alpha=0.5", "--distill.temperature=1")
    print(f"validation loss: cross entropy alone {_val(plain):.4f}, distilled "
          f"{_val(distilled):.4f}")
    assert _val(distilled) < _val(plain), (_val(distilled), _val(plain))


def test_tp2_student_equals_tp1(corpus_run):
    root, data, teacher = corpus_run["root"], corpus_run["data"], corpus_run["teacher"]
    args = ["--config", str(TINY), *data, "--model.num_layers=2", "--model.hidden_size=64",
            "--train.train_iters=4", "--train.eval_interval=0", "--optim.lr=1e-2",
            f"--distill.teacher={teacher}", "--distill.alpha=0.7", "--distill.temperature=3"]
    assert main(["train", "--run.dir", str(root / "tp1"), *args]) == 0
    proc = subprocess.run(
        [sys.executable, "-m", "gptforge.launcher.cli.main", "train", "--nproc-per-node", "2",
         "--run.dir", str(root / "tp2"), "--parallel.tensor_model_parallel_size=2", *args],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_close_losses(train_losses(root / "tp2"), train_losses(root / "tp1"), name="TP=2")


def test_refusals_name_the_setting(corpus_run, tmp_path, capsys):
    teacher, data = corpus_run["teacher"], corpus_run["data"]
    base = ["train", "--config", str(TINY), "--train.train_iters=3", "--train.eval_interval=0",
            f"--distill.teacher={teacher}"]
    cases = [
        ([*SHAPE], "tokenizer (none)"),  # mock data: no tokenizer on the student's side
        ([*data, "--model.vocab_size=600"], "model.vocab_size"),
        ([*data, "--parallel.engine=deepspeed"], "parallel.engine"),
        ([*data, "--distill.alpha=1.5"], "distill.alpha"),
        ([*data, "--parallel.pipeline_model_parallel_size=2"], "pipeline_model_parallel_size"),
    ]
    for i, (extra, needle) in enumerate(cases):
        capsys.readouterr()
        code = main([*base, "--run.dir", str(tmp_path / str(i)), *extra])
        err = capsys.readouterr().err
        assert code == 2 and needle in err, (extra, code, err[-1500:])
    from gptforge.common.errors import ConfigError
    from gptforge.launcher.run.distill import DistillConfig, validate_distill
    from gptforge.parallel.config import ParallelConfig

    with pytest.raises(ConfigError, match="pipeline_model_parallel_size 1"):
        validate_distill(DistillConfig(teacher=str(teacher)),
                         ParallelConfig(pipeline_model_parallel_size=2))


def test_a_hugging_face_folder_teaches(folders, tmp_path):
    """The teacher converted on the fly from a GPT-2 folder (its tokenizer is the student's)."""
    import json

    folder = folders["gpt2"]
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    run = tmp_path / "run"
    assert main(["train", "--config", str(TINY), "--run.dir", str(run),
                 f"--data.tokenizer_model={folder}", f"--model.vocab_size={vocab}",
                 "--model.activation=gelu_tanh", "--train.train_iters=3",
                 "--train.eval_interval=0", f"--distill.teacher={folder}",
                 "--distill.alpha=1"]) == 0
    losses = train_losses(run)
    assert len(losses) == 3 and all(loss > 0 for loss in losses)
