"""The deepspeed engine's config checks, its generated DeepSpeed JSON and the hostfile rules:
single process, no ranks (quick)."""

from __future__ import annotations

import pytest

from gptforge.launcher.config import load_config, validate
from gptforge.common.errors import ConfigError
from gptforge.launcher.cli.launch import LaunchConfigError, read_hostfile, trim
from gptforge.parallel.deepspeed.config import bucket_elements, deepspeed_config
from tests.conftest import TINY

DS = ["--parallel.engine=deepspeed"]


def _validate(*overrides, world=2):
    cfg = load_config([TINY], list(overrides))
    return cfg, validate(cfg, world)


@pytest.mark.parametrize("overrides, key", [
    ([*DS, "--parallel.zero_stage=4"], "parallel.zero_stage"),
    ([*DS, "--parallel.zero_stage=-1"], "parallel.zero_stage"),
    ([*DS, "--parallel.pipeline_model_parallel_size=2"], "parallel.pipeline_model_parallel_size"),
    ([*DS, "--parallel.zero_stage=2", "--parallel.offload_param=cpu"], "parallel.offload_param"),
    ([*DS, "--parallel.offload_optimizer=cpu"], "parallel.offload_optimizer"),
    ([*DS, "--parallel.use_distributed_optimizer=true"], "parallel.use_distributed_optimizer"),
    ([*DS, "--precision.dtype=fp16", "--precision.initial_loss_scale=1000"],
     "precision.initial_loss_scale"),
    (["--parallel.zero_stage=1"], "parallel.zero_stage"),  # megatron engine
    (["--parallel.offload_optimizer=cpu"], "parallel.offload_optimizer"),
    ([*DS, "--parallel.offload_param=nvme"], "parallel.offload_param"),
])
def test_bad_settings_are_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        _validate(*overrides)
    assert err.value.key == key and str(err.value).startswith(key)


def test_generated_config_follows_our_sections():
    cfg, layout = _validate(*DS, "--parallel.zero_stage=3", "--parallel.offload_optimizer=cpu",
                            "--parallel.offload_param=cpu", "--precision.dtype=bf16",
                            "--optim.clip_grad=0.5", world=4)
    config = deepspeed_config(cfg.parallel, cfg.precision, cfg.optim,
                              micro_batch_size=layout.micro_batch_size,
                              num_microbatches=layout.num_microbatches,
                              data_parallel_size=layout.data_parallel_size,
                              num_parameters=10_000_000)
    assert config["train_batch_size"] == cfg.train.global_batch_size == 8
    assert config["gradient_accumulation_steps"] == 1 and config["gradient_clipping"] == 0.5
    assert config["bf16"] == {"enabled": True, "check_grad_overflow": True}
    assert not config["fp16"]["enabled"]
    zero = config["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"
    assert config["zero_force_ds_cpu_optimizer"] is False  # torch AdamW offloaded: no CPUAdam
    assert "optimizer" not in config and "scheduler" not in config  # passed in as objects


def test_fp16_loss_scaling_comes_from_the_precision_section():
    cfg, layout = _validate(*DS, "--parallel.zero_stage=1", "--precision.dtype=fp16",
                            "--precision.initial_loss_scale=4096",
                            "--precision.loss_scale_window=500")
    fp16 = deepspeed_config(cfg.parallel, cfg.precision, cfg.optim, micro_batch_size=2,
                            num_microbatches=2, data_parallel_size=2,
                            num_parameters=1000)["fp16"]
    assert fp16 == {"enabled": True, "loss_scale": 0, "initial_scale_power": 12,
                    "loss_scale_window": 500, "hysteresis": 2, "min_loss_scale": 1.0}


def test_buckets_scale_with_the_model_and_stay_aligned():
    assert bucket_elements(7_000_000_000)["bucket"] == 499_999_744  # DeepSpeed's 5e8, aligned
    small = bucket_elements(5_000_000)["bucket"]
    assert small == 499_712 and small % 1024 == 0
    assert bucket_elements(10)["bucket"] == 1 << 18


def test_hostfile_rules(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("# comment\nnode1 slots=4\n\nnode2 slots=2\n")
    slots = read_hostfile(path)
    assert slots == {"node1": 4, "node2": 2}
    assert trim(slots, path, 1, None) == {"node1": 4}
    assert trim(slots, path, None, 2) == {"node1": 2, "node2": 2}
    for text, where in (("node1 slots=2\nnode1 slots=2\n", ":2"), ("node1 4\n", ":1"),
                        ("# nothing\n", "")):
        path.write_text(text)
        with pytest.raises(LaunchConfigError) as err:
            read_hostfile(path)
        assert err.value.key == f"hostfile {path}{where}"
    with pytest.raises(LaunchConfigError, match="--num-gpus"):
        trim({"node1": 2}, path, None, 3)
    with pytest.raises(LaunchConfigError, match="--num-nodes"):
        trim({"node1": 2}, path, 2, None)
