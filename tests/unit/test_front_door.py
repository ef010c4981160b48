"""Run directories, command-line arguments and the generated help (in process)."""

from __future__ import annotations

import dataclasses
import json
import typing

import pytest

from gptforge.launcher.cli import main as cli
from gptforge.launcher.config import Config, load_config
from gptforge.launcher.help import field_docs
from gptforge.launcher.overrides import parse_train_args
from gptforge.launcher.rundir import (RunDirError, check_run_dir, refuse_previous_run,
                                      replace_previous_run)
from tests.conftest import TINY


def _write_run(path, steps):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text("model: {}\n")
    (path / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in steps))


def test_a_run_dir_holding_a_run_is_refused_naming_it(tmp_path):
    _write_run(tmp_path / "r", [1, 2, 3])
    with pytest.raises(RunDirError, match=r"run.dir: .*/r already holds a run "
                                          r"\(metrics.jsonl with steps 1-3\).*--run.overwrite"):
        refuse_previous_run(tmp_path / "r", overwrite=False, resuming=False)
    assert refuse_previous_run(tmp_path / "r", overwrite=False, resuming=True) is False
    assert refuse_previous_run(tmp_path / "fresh", overwrite=False, resuming=False) is False


def test_overwrite_removes_only_the_previous_runs_files(tmp_path):
    run = tmp_path / "r"
    _write_run(run, [1, 2])
    (run / "notes.txt").write_text("mine")
    (run / "checkpoints" / "step-0000002").mkdir(parents=True)
    assert refuse_previous_run(run, overwrite=True, resuming=False,
                               checkpoint_dir=run / "checkpoints") is True
    replace_previous_run(run, run / "checkpoints")
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("make, expect", [
    (lambda t: (t / "f").write_text("x") and t / "f", "is a file, not a directory"),
    (lambda t: t / "f2" / "sub", "is not a writable directory"),
    (lambda t: "/proc/gptforge-run", "is not a writable directory"),
])
def test_unusable_run_dirs_are_named(tmp_path, make, expect):
    (tmp_path / "f2").write_text("a file where a parent dir should be")
    path = make(tmp_path)
    with pytest.raises(RunDirError, match=expect) as err:
        check_run_dir(path)
    assert str(path) in str(err.value)


def test_overrides_accept_both_spellings_and_bare_bools():
    files, overrides = parse_train_args(
        ["--config", "a.yaml", "b.yaml", "--optim.lr", "3e-4", "--run.overwrite",
         "--train.seed=3"], prog="gptforge train")
    assert files == ["a.yaml", "b.yaml"]
    assert overrides == ["--optim.lr=3e-4", "--run.overwrite=true", "--train.seed=3"]


@pytest.mark.parametrize("argv, message", [
    (["--bogus"], "gptforge train: error: unrecognised argument --bogus "),
    (["--bogus=true"], "unrecognised argument --bogus=true "),
    (["stray"], "unrecognised argument stray"),
    (["--train.train_iters"], "--train.train_iters needs a value"),
])
def test_bad_arguments_name_the_program_and_what_was_typed(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_train_args(argv, prog="gptforge train")
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    if argv == ["--bogus"]:
        assert "--bogus=true" not in err  # what the user typed, not what we made of it


def test_unknown_bare_key_is_named_by_the_config_loader():
    _, overrides = parse_train_args(["--model.hidden_sise"], prog="gptforge train")
    with pytest.raises(ValueError, match=r"^model.hidden_sise: unknown key"):
        load_config([TINY], overrides)


def test_every_config_key_has_a_docstring_and_appears_in_train_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    assert "--config" in text and "--nproc-per-node" in text
    hints = typing.get_type_hints(Config)
    for section in dataclasses.fields(Config):
        cls = hints[section.name]
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{section.name}.{f.name} has no docstring"
            assert f"--{section.name}.{f.name}  (" in text, f"{section.name}.{f.name}"
            assert docs[f.name].split()[0] in text


def test_config_help_is_the_same_text(capsys):
    with pytest.raises(SystemExit):
        cli.main(["config", "--help"])
    assert "--precision.dtype  (fp32 | bf16 | fp16, default 'fp32')" in capsys.readouterr().out


def test_config_verb_validates_like_train(capsys):
    assert cli.main(["config", "--config", str(TINY), "--model.vocab_size=0"]) == 2
    assert "gptforge: error: model.vocab_size: must be >= 1, got 0" in capsys.readouterr().err
    assert cli.main(["config", "--config", str(TINY), "--parallel.tensor_model_parallel_size=2",
                     "--nproc-per-node", "4"]) == 0
    out = capsys.readouterr().out
    assert "# layout: TP=2 PP=1 DP=2" in out


def test_too_little_room_for_a_checkpoint_is_refused_naming_the_place(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from gptforge.common.errors import ConfigError
    from gptforge.launcher.config import validate
    from gptforge.launcher.run import places

    cfg = load_config([TINY], [f"--run.dir={tmp_path / 'run'}", "--model.num_layers=24",
                               "--model.hidden_size=1024", "--model.num_attention_heads=16"])
    layout = validate(cfg, 1)
    need = places.checkpoint_bytes(cfg, layout.padded_vocab_size)
    assert 3.5e9 < need < 4.5e9  # ~300M params x 12 bytes (fp32 weights + Adam)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(2**40, 0, int(need * 0.5)))
    (tmp_path / "run").mkdir()
    with pytest.raises(ConfigError, match=r"^checkpoint.save: .*/run/checkpoints has 1\.\d+ GiB "
                                          r"free; one checkpoint of this model needs about"):
        places.check_places(cfg, layout.padded_vocab_size)
