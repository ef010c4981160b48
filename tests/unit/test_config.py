"""Config: defaults in dataclasses, YAML deltas compose left to right, overrides, loud errors."""

from __future__ import annotations

import pytest
import yaml

from gptforge.launcher.config import dump_config, layout_notes, load_config, validate
from gptforge.common.errors import ConfigError
from tests.conftest import TINY


def test_yaml_deltas_compose_left_to_right_then_overrides(tmp_path):
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text("model: {hidden_size: 96, num_layers: 6}\noptim: {lr: 1.0e-3}\n")
    b.write_text("model: {num_layers: 8}\n")
    cfg = load_config([a, b], ["--optim.lr=3e-4", "--parallel.sequence_parallel=true"])
    assert cfg.model.hidden_size == 96 and cfg.model.num_layers == 8
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.parallel.sequence_parallel is True
    assert cfg.model.num_attention_heads == 4  # untouched default


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config([TINY], ["--train.seed=7"])
    dump_config(cfg, tmp_path / "config.yaml")
    again = load_config([tmp_path / "config.yaml"])
    assert again == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["seed"] == 7


@pytest.mark.parametrize("overrides, key", [
    (["--model.hidden_sise=3"], "model.hidden_sise"),
    (["--modle.hidden_size=3"], "modle"),
    (["--model.hidden_size=big"], "model.hidden_size"),
    (["--model.tie_embeddings=3"], "model.tie_embeddings"),
    (["--optim.lr=[1]"], "optim.lr"),
    (["--model.normalization=BatchNorm"], "model.normalization"),
    (["--parallel.recompute=some"], "parallel.recompute"),
    (["--data.sources=[{path: x, wieght: 1}]"], "data.sources[0].wieght"),
])
def test_unknown_keys_and_wrong_types_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config([TINY], overrides)
    assert err.value.key == key and str(err.value).startswith(key)


def test_unknown_key_in_a_file_names_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {train_itres: 3}\n")
    with pytest.raises(ConfigError, match=r"^train\.train_itres: unknown key"):
        load_config([bad])


def test_missing_config_file_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config([tmp_path / "nope.yaml"])


@pytest.mark.parametrize("overrides, world, key", [
    (["--model.num_attention_heads=6", "--model.hidden_size=96",
      "--parallel.tensor_model_parallel_size=4"], 4, "model.num_attention_heads"),
    (["--parallel.tensor_model_parallel_size=2"], 3, "parallel"),
    (["--parallel.pipeline_model_parallel_size=3"], 3, "model.num_layers"),
    (["--parallel.pipeline_model_parallel_size=2",
      "--parallel.virtual_pipeline_model_parallel_size=4"], 2, "model.num_layers"),
    (["--train.global_batch_size=6"], 2, "train.global_batch_size"),
    (["--model.num_query_groups=3"], 1, "model.num_query_groups"),
    (["--model.num_query_groups=2", "--parallel.tensor_model_parallel_size=4"], 4,
     "model.num_query_groups"),
    (["--parallel.sequence_parallel=true"], 1, "parallel.sequence_parallel"),
    (["--optim.min_lr=1.0"], 1, "optim.min_lr"),
    (["--data.source=webdataset"], 1, "data.sources"),
])
def test_inconsistent_values_name_the_key(overrides, world, key):
    cfg = load_config([TINY], overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg, world)
    assert err.value.key == key, str(err.value)


def test_vocab_is_padded_for_tp_and_the_padding_is_reported():
    cfg = load_config([TINY], ["--model.vocab_size=1000",
                               "--parallel.tensor_model_parallel_size=2"])
    layout = validate(cfg, 2)
    assert layout.padded_vocab_size == 1024
    assert any(n.startswith("model.vocab_size: padded 1000 -> 1024")
               for n in layout_notes(cfg, layout))
    # Same padded size whatever TP is: the softmax (and so the loss) does not change with layout.
    assert validate(load_config([TINY], ["--model.vocab_size=1000"]), 1).padded_vocab_size == 1024
    odd = load_config([TINY], ["--model.vocab_size=1000", "--model.make_vocab_size_divisible_by=1",
                               "--parallel.tensor_model_parallel_size=4"])
    assert validate(odd, 4).padded_vocab_size == 1000


def test_derived_sizes():
    cfg = load_config([TINY], ["--parallel.tensor_model_parallel_size=2"])
    layout = validate(cfg, 4)
    assert layout.data_parallel_size == 2 and layout.num_microbatches == 2


def test_string_keys_take_the_text_as_it_is_and_bad_yaml_names_the_key():
    from gptforge.launcher.overrides import parse_train_args

    hostile = "a\nb: c $(touch x) 'q' \"d\""
    files, overrides = parse_train_args(
        ["--config", str(TINY), f"--run.name={hostile}", "--run.dir", "x y",
         "--data.sources=[{path: p, weight: 2}]"], prog="gptforge train")
    assert files == [str(TINY)]  # an override holding a space is not taken for a file
    cfg = load_config(files, overrides)
    assert cfg.run.name == hostile and cfg.run.dir == "x y"
    assert cfg.data.sources[0].path == "p" and cfg.data.sources[0].weight == 2
    with pytest.raises(ConfigError, match="model.num_layers.*not valid YAML"):
        load_config([], ["--model.num_layers=[1"])


def test_a_lone_process_takes_back_the_master_port_it_chose(monkeypatch):
    import os

    from gptforge.parallel.config import ParallelConfig
    from gptforge.parallel.context import destroy_parallel, init_parallel

    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    init_parallel(ParallelConfig())
    assert os.environ["MASTER_PORT"]
    destroy_parallel()
    assert "MASTER_PORT" not in os.environ and "MASTER_ADDR" not in os.environ


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "inf", "nan", "1e400"])
def test_a_non_finite_number_is_refused_naming_the_key(value):
    with pytest.raises(ConfigError, match=r"^optim\.lr: must be a finite number"):
        load_config([], [f"--optim.lr={value}"])


def test_gptforge_train_iters_shortens_every_training_and_a_bad_value_is_named(monkeypatch):
    from gptforge.launcher.overrides import parse_train_args

    monkeypatch.setenv("GPTFORGE_TRAIN_ITERS", "3")
    files, overrides = parse_train_args(["--config", str(TINY), "--train.train_iters=500"],
                                        prog="gptforge train")
    cfg = load_config(files, overrides)
    assert cfg.train.train_iters == 3 and cfg.optim.lr_warmup_iters == 1  # the env var comes last
    validate(cfg, 1)  # the shortened schedule is a valid one
    monkeypatch.setenv("GPTFORGE_TRAIN_ITERS", "0")
    with pytest.raises(ConfigError, match="GPTFORGE_TRAIN_ITERS.*got '0'"):
        parse_train_args([], prog="gptforge train")


def test_the_collective_timeout_takes_fractions_of_a_minute_but_not_zero():
    cfg = load_config([TINY], ["--parallel.distributed_timeout_minutes=0.25"])
    assert cfg.parallel.distributed_timeout_minutes == 0.25
    validate(cfg, 1)
    for bad in ("0", "-1"):
        cfg = load_config([TINY], [f"--parallel.distributed_timeout_minutes={bad}"])
        with pytest.raises(ConfigError, match=r"^parallel.distributed_timeout_minutes: must be "
                                              r"> 0 \(fractions allowed"):
            validate(cfg, 1)
