"""The planner held to the record: published runs' speed, DeepSpeed's own memory estimators,
and the answers of ``gptforge plan`` (pins, --json, --cluster, refusals).

Speed: Narayanan et al. 2021 ("Efficient Large-Scale Language Model Training on GPU Clusters
Using Megatron-LM", Table 1; micro-batch and interleaving from Megatron-LM's
examples/sc21/run_table_1.sh) is what the A100's one fitted constant (gemm_efficiency) was fitted
on; Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
Tables 3 and 5) was not used in the fit. Both ran on DGX A100 80GB (8 x 200 Gb/s HDR per node),
sequence 2048, vocabulary 51200, megatron's unfused softmax, no overlap of DP communication.
"""

from __future__ import annotations

import json

import pytest

from gptforge.launcher.cli.main import main
from gptforge.model.config import ModelConfig
from gptforge.parallel.plan.clusters import CLUSTERS, load_cluster
from gptforge.parallel.plan.planner import PlanRequest, Pins, largest_layer_params, plan

# name, heads, hidden, layers, TP, PP, GPUs, batch, micro-batch, VPP, TFLOP/s per GPU
# (hardware FLOPs: the paper counts the recompute's extra forward)
NARAYANAN = [
    ("1.7B", 24, 2304, 24, 1, 1, 32, 512, 16, 1, 137),
    ("3.6B", 32, 3072, 30, 2, 1, 64, 512, 16, 1, 138),
    ("7.5B", 32, 4096, 36, 4, 1, 128, 512, 16, 1, 142),
    ("18.4B", 48, 6144, 40, 8, 1, 256, 1024, 8, 1, 135),
    ("39.1B", 64, 8192, 48, 8, 2, 512, 1536, 4, 1, 138),
    ("76.1B", 80, 10240, 60, 8, 4, 1024, 1792, 2, 3, 140),
    ("145.6B", 96, 12288, 80, 8, 8, 1536, 2304, 2, 2, 148),
    ("310.1B", 128, 16384, 96, 8, 16, 1920, 2160, 1, 2, 155),
    ("529.6B", 128, 20480, 105, 8, 35, 2520, 2520, 1, 3, 163),
    ("1008B", 160, 25600, 128, 8, 64, 3072, 3072, 1, 1, 163),
]
# name, heads, hidden, layers, TP, PP, GPUs, batch, micro-batch, VPP, MFU (sequence parallel +
# selective recompute, "present work"), seconds per iteration with full recompute
KORTHIKANTI = [
    ("22B", 64, 6144, 48, 8, 1, 8, 4, 4, 1, 0.415, 1.42),
    ("175B", 96, 12288, 96, 8, 8, 64, 64, 1, 3, 0.514, 18.13),
    ("530B", 128, 20480, 105, 8, 35, 280, 280, 1, 3, 0.560, 49.05),
    ("1T", 160, 25600, 128, 8, 64, 512, 512, 1, 1, 0.563, 94.42),
]


def _published(heads, hidden, layers, tp, pp, gpus, batch, mbs, vpp, *, recompute, sp, dtype):
    model = ModelConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                        seq_length=2048, vocab_size=51200, attention_backend="local")
    pins = Pins(tp=tp, pp=pp, vpp=vpp, micro_batch_size=mbs, recompute=recompute,
                sequence_parallel=sp, use_distributed_optimizer=False, overlap=False)
    request = PlanRequest(model=model, cluster=CLUSTERS["a100-80gb"], nodes=max(1, gpus // 8),
                          gpus_per_node=min(8, gpus), global_batch_size=batch, dtype=dtype,
                          pins=pins)
    result = plan(request)
    assert len(result.fitting) == 1, f"{len(result.fitting)} layouts for a fully pinned run"
    return result.fitting[0]


@pytest.mark.parametrize("row", NARAYANAN, ids=[r[0] for r in NARAYANAN])
def test_narayanan_table_1_within_15_percent(row):
    name, *shape, published = row
    entry = _published(*shape, recompute="full", sp=False, dtype="fp16")
    ratio = entry.hardware_tflops_per_gpu / published
    assert abs(ratio - 1) <= 0.15, f"{name}: {entry.hardware_tflops_per_gpu:.1f} vs {published}"


@pytest.mark.parametrize("row", KORTHIKANTI, ids=[r[0] for r in KORTHIKANTI])
def test_korthikanti_runs_within_15_percent(row):
    """Held out of the fit: both the paper's runs, selective recompute + SP and full recompute."""
    name, *shape, mfu, full_s = row
    entry = _published(*shape, recompute="selective", sp=True, dtype="bf16")
    predicted = entry.tflops_per_gpu
    assert abs(predicted / (mfu * 312) - 1) <= 0.15, f"{name}: {predicted:.1f} vs {mfu * 312:.1f}"
    full = _published(*shape, recompute="full", sp=False, dtype="bf16")
    assert abs(full.time.step_s / full_s - 1) <= 0.15, f"{name}: {full.time.step_s:.2f} s"


def test_micro_batch_size_matters_when_layers_are_small():
    """The shape-aware compute: a thin model is launch- and memory-bound at micro-batch 1."""
    model = ModelConfig(num_layers=12, hidden_size=768, num_attention_heads=12,
                        seq_length=1024, vocab_size=50257)
    request = PlanRequest(model=model, cluster=CLUSTERS["h100-80gb"], nodes=1, gpus_per_node=8,
                          global_batch_size=512, pins=Pins(tp=1, pp=1, recompute="none"))
    by_mbs = {e.layout.micro_batch_size: e.mfu for e in plan(request).fitting
              if not e.candidate.use_distributed_optimizer}
    assert by_mbs[16] > by_mbs[1] * 1.2, by_mbs


# ---------------------------------------------------------------- ZeRO as DeepSpeed counts it

GPT3 = {"1.3b": (24, 2048, 16), "2.7b": (32, 2560, 32), "6.7b": (32, 4096, 32),
        "13b": (40, 5120, 40)}


@pytest.mark.parametrize("gpus", [8, 32])
@pytest.mark.parametrize("size", list(GPT3))
def test_zero_2_and_3_model_states_within_10_percent_of_deepspeeds_estimators(size, gpus):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    layers, hidden, heads = GPT3[size]
    model = ModelConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                        seq_length=2048, vocab_size=50257)
    request = PlanRequest(model=model, cluster=CLUSTERS["a100-80gb"], nodes=gpus // 8,
                          gpus_per_node=8, global_batch_size=gpus * 4, engine="deepspeed",
                          pins=Pins(tp=1, micro_batch_size=1, recompute="full"))
    result = plan(request)
    entries = {e.candidate.optimizer_label(): e for e in result.fitting
               + ([result.closest] if result.closest else [])}
    psi = entries["zero-2"].memory.num_params
    largest = largest_layer_params(model, 1, entries["zero-2"].layout.padded_vocab_size)
    nodes = gpus // 8
    # DeepSpeed: (cpu_mem per node with its 1.5 buffer factor, gpu_mem per device)
    expected = {
        "zero-2": estimate_zero2_model_states_mem_needs(psi, 8, nodes, cpu_offload=False)[1],
        "zero-2+offload-opt": estimate_zero2_model_states_mem_needs(psi, 8, nodes)[1],
        "zero-3": estimate_zero3_model_states_mem_needs(psi, largest, 8, nodes,
                                                        cpu_offload=False)[1],
        "zero-3+offload-opt": estimate_zero3_model_states_mem_needs(
            psi, largest, 8, nodes, cpu_offload_params=False)[1],
        "zero-3+offload-opt+offload-param": estimate_zero3_model_states_mem_needs(
            psi, largest, 8, nodes)[1],
    }
    for label, gpu_mem in expected.items():
        mem = entries[label].memory
        states = mem.params + mem.grads + mem.optimizer + mem.live
        assert abs(states / gpu_mem - 1) <= 0.10, f"{label}: {states} vs DeepSpeed {gpu_mem}"
    for label, per_param in (("zero-3+offload-opt", 16), ("zero-3+offload-opt+offload-param", 18)):
        host_per_node = entries[label].memory.host * 8
        ds_host = estimate_zero3_model_states_mem_needs(
            psi, largest, 8, nodes, cpu_offload_params="param" in label,
            additional_buffer_factor=1.0)[0]  # the count, without DeepSpeed's 1.5 safety factor
        assert abs(host_per_node / ds_host - 1) <= 0.10, (label, host_per_node, ds_host)


def test_offload_layouts_are_proposed_when_nothing_else_fits(capsys):
    """A 13B model on one 80 GB GPU: only ZeRO-3 with the optimizer (and parameters) in host
    memory fits, and the plan says so."""
    assert main(["plan", "--model", "gpt3-13b", "--gpus-per-node", "1", "--gpu", "a100-80gb",
                 "--engine", "deepspeed", "--global-batch-size", "8", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["fits"], doc.get("refusal")
    assert all(layout["offload_optimizer"] for layout in doc["layouts"])
    assert all(layout["memory_gib"]["host_per_device"] > 100 for layout in doc["layouts"])


# ---------------------------------------------------------------- the command's answers

LAYOUT_KEYS = {"tp", "pp", "vpp", "dp", "micro_batch_size", "recompute", "engine", "zero_stage",
               "fits", "memory_gib", "step_time_s", "tokens_per_s", "tflops_per_gpu", "mfu"}
MEMORY_KEYS = {"params", "grads", "optimizer", "live", "activations", "working", "allocator",
               "runtime", "total", "host_per_device"}


def test_json_lists_ranked_layouts_with_their_terms_and_time_to_train(capsys):
    assert main(["plan", "--model", "gpt3-1.3b", "--gpu", "h200-141gb", "--tp", "2",
                 "--tokens", "300B", "--json", "--top", "5"]) == 0
    doc = json.loads(capsys.readouterr().out)
    layouts = doc["layouts"]
    assert doc["fits"] and doc["cluster"] == "h200-141gb" and len(layouts) == 5
    for layout in layouts:
        assert LAYOUT_KEYS <= set(layout) and MEMORY_KEYS <= set(layout["memory_gib"])
        assert layout["tp"] == 2 and layout["fits"]
        parts = {k: v for k, v in layout["memory_gib"].items() if k != "host_per_device"}
        assert sum(v for k, v in parts.items() if k != "total") == pytest.approx(parts["total"])
        assert layout["time_to_train_s"] == pytest.approx(300e9 / layout["tokens_per_s"])
    times = [layout["step_time_s"] for layout in layouts]
    assert times == sorted(times)


def test_a_pinned_layout_that_does_not_fit_says_why(capsys):
    """ZeRO-2 keeps whole half-precision parameters (26 GB of 13B) on every GPU; its sharded
    terms shrink with more nodes, so some node count fits."""
    pinned = ["plan", "--model", "gpt3-13b", "--gpu", "a100-40gb", "--engine", "deepspeed",
              "--zero-stage", "2", "--no-offload-optimizer", "--tp", "1"]
    assert main([*pinned, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert not doc["fits"] and not doc["layouts"]
    refusal = doc["refusal"]
    assert refusal["closest"]["zero_stage"] == 2 and refusal["closest"]["tp"] == 1
    assert refusal["largest_term"] == "params" and "parameters" in refusal["reason"]
    nodes = refusal["min_nodes"]
    assert nodes and nodes > 1
    assert main([*pinned, "--nodes", str(nodes), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fits"]
    assert main([*pinned, "--nodes", str(nodes - 1), "--json"]) == 0
    assert not json.loads(capsys.readouterr().out)["fits"]
    # megatron DDP keeps the whole fp32 gradient buffer: no node count helps TP=1 PP=1
    assert main(["plan", "--model", "gpt3-13b", "--gpu", "a100-40gb", "--tp", "1", "--pp", "1",
                 "--recompute", "none"]) == 0
    assert "no node count up to 4096 fits" in capsys.readouterr().out


def test_config_is_scored_as_written(tmp_path, capsys):
    run = tmp_path / "run.yaml"
    run.write_text("model: {num_layers: 24, hidden_size: 2048, num_attention_heads: 16, "
                   "seq_length: 2048, vocab_size: 50257}\n"
                   "parallel: {tensor_model_parallel_size: 2, pipeline_model_parallel_size: 2, "
                   "sequence_parallel: true, recompute: selective}\n"
                   "precision: {dtype: bf16}\n"
                   "train: {micro_batch_size: 2, global_batch_size: 64}\n")
    assert main(["plan", "--config", str(run), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    (layout,) = doc["layouts"]
    assert (layout["tp"], layout["pp"], layout["dp"], layout["micro_batch_size"],
            layout["recompute"]) == (2, 2, 2, 2, "selective")
    assert doc["precision"] == "bf16"
    assert main(["plan", "--config", str(run), "--model", "gpt3-1.3b"]) == 2
    assert "not both" in capsys.readouterr().err


def test_own_cluster_file_and_its_errors(tmp_path, capsys):
    ok = tmp_path / "mine.yaml"
    ok.write_text("base: h100-80gb\nnics_per_node: 4\nmemory_gib: 40\n")
    shape = load_cluster(ok)
    assert shape.nics_per_node == 4 and shape.memory_bytes == 40 * 1024**3
    assert shape.name == "mine"
    assert main(["plan", "--model", "gpt3-1.3b", "--cluster", str(ok), "--top", "1"]) == 0
    assert "mine" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: h100-80gb\nnic_count: 4\n")
    assert main(["plan", "--model", "gpt3-1.3b", "--cluster", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "nic_count" in err
    bad.write_text("base: h100-80gb\nnics_per_node: four\n")
    assert main(["plan", "--model", "gpt3-1.3b", "--cluster", str(bad)]) == 2
    assert "nics_per_node" in capsys.readouterr().err
    bad.write_text("gpus_per_node: 8\n")
    assert main(["plan", "--model", "gpt3-1.3b", "--cluster", str(bad)]) == 2
    assert "missing" in capsys.readouterr().err


def test_a_ring_over_all_nics_beats_one_nic_per_gpu():
    """DP spanning nodes is priced over the node's NICs together: with the NICs halved, the
    exposed DP time of a TP=1 layout (8 GPUs per node in the group) doubles."""
    import dataclasses

    from gptforge.parallel.plan.timing import dp_bus_gbps, StepShape

    h100 = CLUSTERS["h100-80gb"]
    shape = StepShape(tp=1, pp=1, vpp=1, dp=16, micro_batch_size=1, num_microbatches=1,
                      sequence_parallel=False, recompute="none", activation_bytes=2,
                      padded_vocab_size=50304, gpus_per_node=8, optimizer="ddp", overlap=False)
    full = dp_bus_gbps(h100, shape)
    assert full == pytest.approx(min(h100.nvlink_gbps, 8 * 50 * 0.86))
    half = dp_bus_gbps(dataclasses.replace(h100, nics_per_node=4), shape)
    assert half == pytest.approx(full / 2)
    tp8 = dataclasses.replace(shape, tp=8, dp=2)  # one GPU of the group per node
    assert dp_bus_gbps(h100, tp8) == pytest.approx(50 * 0.86)


def test_overlap_hides_dp_communication():
    model = ModelConfig(num_layers=24, hidden_size=2048, num_attention_heads=16,
                        seq_length=2048, vocab_size=50257)
    times = {}
    for overlap in (True, False):
        request = PlanRequest(model=model, cluster=CLUSTERS["h100-80gb"], nodes=4,
                              gpus_per_node=8, global_batch_size=64,
                              pins=Pins(tp=1, pp=1, micro_batch_size=2, recompute="none",
                                        use_distributed_optimizer=True, overlap=overlap))
        (entry,) = plan(request).fitting
        times[overlap] = entry.time.dp_comm_s
    assert times[True] < times[False] / 2, times
