"""The planner's arithmetic: ZeRO / megatron state bytes, activation terms, parameter counts
(closed form vs a meta-device build of megatron's GPTModel), presets vs the GPT-3 paper, and the
answers of ``gptforge plan``."""

from __future__ import annotations

import pytest
import yaml

from gptforge.launcher.cli.main import main
from gptforge.launcher.config import load_config
from gptforge.launcher.cli.plan import CONFIGS, preset_names
from gptforge.model.config import ModelConfig
from gptforge.parallel.layout import padded_vocab_size
from gptforge.parallel.plan.planner import PlanRequest, plan
from gptforge.parallel.plan.clusters import CLUSTERS
from gptforge.parallel.plan.memory import (ActivationShape, in_flight_chunks,
                                           layer_activation_bytes)
from gptforge.parallel.plan.params import (RankShape, meta_rank_param_count, rank_param_count,
                                           stage_ranks)
from gptforge.parallel.plan.zero_memory import model_state_bytes, model_state_bytes_megatron

PSI, N = 1_000_000, 8


# ---------------------------------------------------------------- model states


@pytest.mark.parametrize("stage, total", [(0, 20 * PSI), (1, 4 * PSI + 12 * PSI // N),
                                          (2, 2 * PSI + 18 * PSI // N), (3, 18 * PSI // N)])
def test_zero_stages_count_as_deepspeed_in_mixed_precision(stage, total):
    """The paper's 16 bytes, plus DeepSpeed's fp32 gradient partition (4/N) at stage 2."""
    got = model_state_bytes(PSI, dp_size=N, zero_stage=stage, mixed_precision=True)
    assert got["total"] == total
    assert got["params"] + got["grads"] + got["optimizer"] == total and got["host"] == 0


def test_zero_fp32_master_copy_only_with_zero_and_offload_moves_terms_to_host():
    fp32 = model_state_bytes(PSI, dp_size=N, zero_stage=0, mixed_precision=False)
    assert (fp32["params"], fp32["grads"], fp32["optimizer"]) == (4 * PSI, 4 * PSI, 8 * PSI)
    assert model_state_bytes(PSI, dp_size=N, zero_stage=2, mixed_precision=False)["total"] == \
        4 * PSI + 8 * PSI // N + 12 * PSI // N
    off = model_state_bytes(PSI, dp_size=N, zero_stage=3, mixed_precision=True,
                            offload_optimizer=True, offload_param=True, largest_layer_params=1000)
    assert off["total"] == off["live"] == 4000 and off["host"] == 18 * PSI // N
    with pytest.raises(ValueError, match="offload_param"):
        model_state_bytes(PSI, dp_size=N, zero_stage=2, mixed_precision=True, offload_param=True)


@pytest.mark.parametrize("distopt, mixed, per_param", [
    (False, True, 18), (False, False, 16), (True, True, 6 + 12 / N), (True, False, 8 + 8 / N)])
def test_megatron_states_keep_an_unsharded_fp32_grad_buffer(distopt, mixed, per_param):
    got = model_state_bytes_megatron(PSI, dp_size=N, use_distributed_optimizer=distopt,
                                     mixed_precision=mixed)
    assert got["total"] == pytest.approx(per_param * PSI)
    assert got["grads"] == 4 * PSI


# ---------------------------------------------------------------- activations


def _gpt(**kw) -> ModelConfig:
    return ModelConfig(num_layers=24, hidden_size=2048, num_attention_heads=16, seq_length=2048,
                       vocab_size=50257, **kw)


@pytest.mark.parametrize("tp, sp, per_token_h", [(1, False, 34), (4, False, 10 + 24 / 4),
                                                 (4, True, 34 / 4)])
def test_layer_activations_match_korthikanti_with_dropout(tp, sp, per_token_h):
    """16-bit, flash attention, dropout masks counted: sbh·34, sbh·(10 + 24/t), sbh·34/t."""
    model = _gpt(hidden_dropout=0.1)
    shape = ActivationShape(2048, 1, tp, sp, "none", 2, "sdpa")
    assert layer_activation_bytes(model, shape) == pytest.approx(2048 * 2048 * per_token_h)


def test_pipeline_in_flight_micro_batches():
    assert in_flight_chunks(pipeline_rank=0, pp=1, vpp=None, num_microbatches=8) == 1
    assert in_flight_chunks(pipeline_rank=0, pp=4, vpp=None, num_microbatches=8) == 4
    assert in_flight_chunks(pipeline_rank=3, pp=4, vpp=None, num_microbatches=8) == 1
    assert in_flight_chunks(pipeline_rank=0, pp=4, vpp=None, num_microbatches=2) == 2
    # interleaved: rank 0 holds L·(1 + (p-1)/(p·v)) layers' worth (chunks of L/(p·v) layers)
    p, v = 4, 2
    assert in_flight_chunks(pipeline_rank=0, pp=p, vpp=v, num_microbatches=16) == \
        p * v * (1 + (p - 1) / (p * v))


# ---------------------------------------------------------------- parameter counts


def _preset(name: str) -> ModelConfig:
    return load_config([CONFIGS / "models" / f"{name}.yaml"]).model


def _full_shape(model: ModelConfig) -> RankShape:
    return RankShape(1, 1, None, 0, padded_vocab_size(model.vocab_size,
                                                      model.make_vocab_size_divisible_by, 1))


@pytest.mark.parametrize("name", preset_names())
def test_meta_device_count_equals_the_planner_for_every_preset(name):
    model = _preset(name)
    assert meta_rank_param_count(model, _full_shape(model)) == \
        rank_param_count(model, _full_shape(model))


PAPER = {"gpt3-125m": 125e6, "gpt3-350m": 350e6, "gpt3-760m": 760e6, "gpt3-1.3b": 1.3e9,
         "gpt3-2.7b": 2.7e9, "gpt3-6.7b": 6.7e9, "gpt3-13b": 13.0e9, "gpt3-175b": 175.0e9}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_gpt3_presets_are_within_2_percent_of_the_paper(name):
    model = _preset(name)
    count = meta_rank_param_count(model, _full_shape(model))
    assert abs(count / PAPER[name] - 1) <= 0.02, f"{name}: {count:,} vs {PAPER[name]:,.0f}"


def test_llama_presets_match_the_published_counts():
    published = {"llama-1b": 1.236e9, "llama-8b": 8.030e9, "llama-70b": 70.554e9}
    for name, count in published.items():
        model = _preset(name)
        assert meta_rank_param_count(model, _full_shape(model)) == pytest.approx(count, rel=1e-3)


REQUESTS = [("gpt3-175b", "h100-80gb", 128, 8, "megatron"),
            ("gpt3-13b", "a100-40gb", 4, 8, "megatron"),
            ("llama-70b", "h100-80gb", 8, 8, "megatron"),
            ("llama-8b", "a100-80gb", 1, 8, "deepspeed")]


@pytest.mark.parametrize("name, gpu, nodes, gpus, engine", REQUESTS)
def test_meta_device_counts_equal_the_planner_for_proposed_layouts(name, gpu, nodes, gpus, engine):
    model = _preset(name)
    cfg = load_config([CONFIGS / "models" / f"{name}.yaml"])
    request = PlanRequest(model=model, cluster=CLUSTERS[gpu], nodes=nodes, gpus_per_node=gpus,
                          global_batch_size=cfg.train.global_batch_size, engine=engine)
    proposed = plan(request).fitting[:5]
    assert proposed, f"{name} on {nodes} x {gpus} {gpu}: nothing fits"
    for entry in proposed:
        lay = entry.layout
        for rank in stage_ranks(lay.pipeline_model_parallel_size):
            shape = RankShape(lay.tensor_model_parallel_size, lay.pipeline_model_parallel_size,
                              lay.virtual_pipeline_model_parallel_size, rank,
                              lay.padded_vocab_size)
            assert meta_rank_param_count(model, shape) == rank_param_count(model, shape), \
                (lay.describe(), rank)


# ---------------------------------------------------------------- the command


def test_175b_fits_on_128_nodes_of_h100(capsys):
    assert main(["plan", "--model", "gpt3-175b", "--nodes", "128", "--gpus-per-node", "8",
                 "--gpu", "h100-80gb", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "layouts fit" in out and "best: TP=" in out, out


def test_175b_on_one_node_names_optimizer_states_and_the_nodes_that_fit(capsys):
    assert main(["plan", "--model", "gpt3-175b", "--nodes", "1", "--gpus-per-node", "8",
                 "--gpu", "h100-80gb"]) == 0
    out = capsys.readouterr().out
    assert "no layout fits" in out, out
    # the smallest layout (TP x PP = 8) holds 21.8B parameters: 12 bytes each of fp32 master
    # weights and moments (244 GiB) are the largest of its 406 GiB
    assert "the largest term is optimizer states (244.2 GiB)" in out, out
    nodes = int(out.split("the smallest that fits: ")[1].split(" nodes")[0])
    assert main(["plan", "--model", "gpt3-175b", "--nodes", str(nodes), "--top", "1"]) == 0
    assert "layouts fit" in capsys.readouterr().out
    assert main(["plan", "--model", "gpt3-175b", "--nodes", str(nodes - 1), "--top", "1"]) == 0
    assert "no layout fits" in capsys.readouterr().out


def test_plan_errors_name_the_option(capsys):
    assert main(["plan", "--model", "gpt3-999b"]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["plan", "--model", "tiny", "--gpu", "tpu-v9"]) == 2
    assert "--gpu" in capsys.readouterr().err
    assert main(["plan", "--model", "tiny", "--nodes", "0"]) == 2
    assert "--nodes" in capsys.readouterr().err


def test_emitted_config_is_the_preset_plus_the_best_layout(tmp_path, capsys):
    out = tmp_path / "plan.yaml"
    assert main(["plan", "--model", "gpt3-13b", "--nodes", "4", "--gpus-per-node", "8",
                 "--emit-config", str(out)]) == 0
    delta = yaml.safe_load(out.read_text())
    assert delta["model"]["hidden_size"] == 5120 and delta["precision"]["dtype"] == "bf16"
    assert delta["train"]["global_batch_size"] == 1024
    assert delta["run"]["dir"] == "runs/plan"  # its own run dir, named after the file
    best = capsys.readouterr().out.split("best: ")[1].split("\n")[0]
    p = delta["parallel"]
    assert best.startswith(f"TP={p['tensor_model_parallel_size']} "
                           f"PP={p['pipeline_model_parallel_size']}"), best
    cfg = load_config([out])  # what `gptforge train --config` does first
    assert cfg.parallel.sequence_parallel == (cfg.parallel.tensor_model_parallel_size > 1)
