"""megatron_checkpoint save/load and megatron_fixes, on real gloo processes (tiny model, fp32).

Two launches carry every case (imports dominate: ~6 s a process): two ranks for resume,
resharding and async; one rank for DP=2 → DP=1, the megatron fixes and hostile input. See
ckpt_worker.py for what each case does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.slow  # several real processes
WORKER = Path(__file__).resolve().parent / "ckpt_worker.py"
COMMON = ["--train.train_iters=20", "--train.eval_interval=0"]
K, N = 2, 5  # save after step K, compare steps K+1..N
DISTOPT = "--parallel.use_distributed_optimizer=true"
TP2 = "--parallel.tensor_model_parallel_size=2"
PP2 = "--parallel.pipeline_model_parallel_size=2"
VPP2 = "--parallel.virtual_pipeline_model_parallel_size=2"


def _resume(name, save, load, **extra):
    return {"name": name, "kind": "resume", "save": save, "load": load, "save_at": K,
            "steps": N, **extra}


TWO_RANKS = [
    {"name": "ref_dp2", "kind": "reference", "steps": N},
    _resume("dp2_distopt", [DISTOPT], [DISTOPT], resave=True),
    _resume("dp2", [], []),
    _resume("tp2", [TP2], [TP2]),
    _resume("dp2_distopt_async", [DISTOPT], [DISTOPT], **{"async": True}),
    _resume("tp2_to_dp2_distopt", [TP2], [DISTOPT], resave=True),
    _resume("pp2_to_tp2", [PP2], [TP2]),
    _resume("pp2_vpp2_distopt", [PP2, VPP2, DISTOPT], [PP2, VPP2, DISTOPT]),
    {"name": "pp2_vpp2_distopt_to_dp2", "kind": "resume", "from": "pp2_vpp2_distopt",
     "load": [], "save_at": K, "steps": N},
    # megatron's own (gathering) fully_reshardable save, with and without fix (e)
    _resume("pp2_vpp2_distopt_megatron", [PP2, VPP2, DISTOPT], [PP2, VPP2, DISTOPT],
            megatron_save=True),
    _resume("pp2_vpp2_distopt_without_e", [PP2, VPP2, DISTOPT], [PP2, VPP2, DISTOPT],
            disable=["e"], megatron_save=True),
    {"name": "weights_only", "kind": "resume", "from": "dp2_distopt", "load": [TP2],
     "save_at": K, "steps": N, "load_optim": False},
]
ONE_RANK = [
    {"name": "spawn", "kind": "spawn"},
    {"name": "dp2_to_dp1", "kind": "resume", "from": "dp2_distopt", "load": [DISTOPT],
     "save_at": K, "steps": N},
    {"name": "fixes", "kind": "fixes", "save_at": K, "steps": N},
    {"name": "bad", "kind": "bad_input"},
]


def _launch(nproc: int, out: Path, cases: list[dict]) -> dict:
    spec = out / f"spec_{nproc}.json"
    spec.write_text(json.dumps({"dir": str(out), "common": COMMON, "cases": cases}))
    results = out / "results.json"
    results.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", str(WORKER), str(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(results.read_text())


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ckpt")


@pytest.fixture(scope="module")
def two(out_dir) -> dict:
    return _launch(2, out_dir, TWO_RANKS)


@pytest.fixture(scope="module")
def one(out_dir, two) -> dict:  # loads checkpoints the two-rank launch wrote
    return _launch(1, out_dir, ONE_RANK)


def _close(got, want, rel=1e-5):
    assert len(got) == len(want) == N - K, (got, want)
    for g, w in zip(got, want):
        assert abs(g - w) <= rel * abs(w), f"{got} vs {want}"


# ---- resume in the same layout: bitwise --------------------------------------------------------

@pytest.mark.parametrize("case", ["dp2_distopt", "dp2", "tp2", "dp2_distopt_async",
                                  "pp2_vpp2_distopt", "pp2_vpp2_distopt_megatron"])
def test_resume_same_layout_is_bitwise(two, case):
    r = two[case]
    assert r["losses"] == r["continued"], r
    assert r["record"]["optimizer_step"] == K


@pytest.mark.parametrize("case", ["dp2_distopt", "tp2_to_dp2_distopt"])
def test_a_loaded_engine_saves_the_step_it_reached(two, case):
    assert two[case]["resaved_step"] == N


def test_saving_does_not_perturb_training(two):
    """The run that saved goes on exactly like one that never saved."""
    assert two["dp2"]["continued"] == two["ref_dp2"]["losses"][K:]
    assert two["dp2_distopt"]["continued"] == two["ref_dp2"]["losses"][K:]


def test_async_save_holds_the_step_k_state_while_training_goes_on(two):
    r = two["dp2_distopt_async"]
    assert r["losses"] == r["continued"] == two["dp2_distopt"]["continued"]


# ---- resharding: within 1e-5 ----------------------------------------------------------------

@pytest.mark.parametrize("case", ["tp2_to_dp2_distopt", "pp2_to_tp2"])
def test_resharding_matches_uninterrupted_run(two, case):
    _close(two[case]["losses"], two[case]["continued"])


def test_resharding_vpp_distopt_to_plain_dp(two):
    _close(two["pp2_vpp2_distopt_to_dp2"]["losses"], two["pp2_vpp2_distopt"]["continued"])


def test_resharding_dp2_to_dp1(one, two):
    _close(one["dp2_to_dp1"]["losses"], two["dp2_distopt"]["continued"])
    assert one["dp2_to_dp1"]["record"]["optimizer_kind"] == "distributed"


def test_load_without_optimizer_restores_weights_only(two):
    """The first step after a weights-only load matches (same weights); Adam then starts over."""
    r = two["weights_only"]
    want = two["dp2_distopt"]["continued"]
    assert abs(r["losses"][0] - want[0]) <= 1e-5 * abs(want[0])
    assert r["losses"][1:] != want[1:]


# ---- files and timings --------------------------------------------------------------------------

def test_save_lists_every_file_it_wrote_with_sizes(two, out_dir):
    files = dict(map(tuple, two["dp2_distopt"]["files"]))
    on_disk = {p.name: p.stat().st_size for p in (out_dir / "dp2_distopt").iterdir()}
    assert files == on_disk
    assert {".metadata", "common.pt", "metadata.json"} <= set(files)
    assert {n for n in files if n.endswith(".distcp")} >= {"__0_0.distcp", "__1_0.distcp"}


def test_a_save_starts_no_spawn_manager(one):
    """megatron starts a spawn Manager on a process's first save (4-5 s); the fix avoids it."""
    assert one["spawn"]["queue_type"] == "FileResultsQueue"
    assert one["spawn"]["spawn_managers_without_fix"] == 1
    assert one["spawn"]["spawn_managers"] == 0


def test_results_queue_survives_a_forked_writer_with_a_large_result(one):
    assert one["spawn"]["child_exitcode"] == 0 and one["spawn"]["round_trip"]


# ---- one test per distributed-optimizer fix: fails without it, passes with it ---------------

def test_fix_a_load_into_fresh_distributed_optimizer(one):
    assert one["fixes"]["without_a"] is not None and "AssertionError" in one["fixes"]["without_a"]
    assert one["fixes"]["all_fixes"]["losses"] == one["fixes"]["reference"]


def test_fix_b_load_does_not_copy_adam_step(one):
    f = one["fixes"]
    assert f["without_b"] is not None and "KeyError" in f["without_b"]  # fully_reshardable
    # dp_reshardable: the pre-load step (0) silently replaces the loaded one (K).
    assert f["dp_reshardable_without_b"]["step_values"] == [N - K]
    assert f["dp_reshardable_without_b"]["losses"] != f["reference"]
    assert f["dp_reshardable_all_fixes"]["step_values"] == [N]
    assert f["dp_reshardable_all_fixes"]["losses"] == f["reference"]


def test_fix_c_load_paths_run_without_grad(one):
    f = one["fixes"]
    assert f["without_c"] is not None and "leaf Variable that requires grad" in f["without_c"]
    assert f["dp_reshardable_all_fixes"]["losses"] == f["reference"]


@pytest.mark.parametrize("path", ["", "in_place_"])  # megatron's load path, and ours
def test_fix_d_every_param_owns_its_adam_step(one, path):
    f = one["fixes"]
    bad, good = f[f"{path}without_d"], f[f"{path}all_fixes"]
    assert bad["distinct_step_tensors"] == 1 < bad["param_states"]
    assert bad["step_values"] == [K + bad["param_states"] * (N - K)]  # advanced once per param
    assert bad["losses"] != f["reference"]
    assert good["distinct_step_tensors"] == good["param_states"]
    assert good["step_values"] == [N]
    assert good["losses"] == f["reference"]


def test_fix_e_fully_reshardable_with_multi_bucket_buffers(two):
    """PP=2 x VPP=2: the shared embedding gets a bucket of its own after a padded bucket, and
    megatron's gathering save reads its Adam state shifted by the padding (our own per-rank
    save does not gather, so these two cases force megatron's)."""
    bad = two["pp2_vpp2_distopt_without_e"]
    assert abs(bad["losses"][0] - bad["continued"][0]) > 1e-4 * abs(bad["continued"][0])
    good = two["pp2_vpp2_distopt_megatron"]
    assert good["losses"] == good["continued"]


# ---- bad input ------------------------------------------------------------------------------

def _error(one, name):
    err = one["bad"][name]
    assert err["type"] == "CheckpointError", err
    assert err["optimizer_state_left"] == 0  # the fresh optimizer stays fresh
    return err["message"]


@pytest.mark.parametrize("name", ["missing_shard", "truncated_shard", "flipped_shard"])
def test_broken_shard_file_is_named(one, name):
    message = _error(one, name)
    assert f"bad_{name}/{one['bad']['biggest_shard']}" in message
    assert {"missing_shard": "missing", "truncated_shard": "truncated",
            "flipped_shard": "CRC mismatch"}[name] in message


@pytest.mark.parametrize("name,file", [("truncated_common", "common.pt"),
                                       ("flipped_metadata", ".metadata")])
def test_broken_small_file_is_named(one, name, file):
    assert f"bad_{name}/{file}" in _error(one, name)


@pytest.mark.parametrize("name,file", [("payload_metadata", ".metadata"),
                                       ("payload_common", "common.pt"),
                                       ("payload_object_item", None)])
def test_pickle_payload_is_refused_and_never_runs(one, name, file):
    """``None``: the .distcp file the worker put the payload in (either rank's: the first
    sharded object in the metadata's order)."""
    file = file or one["bad"]["object_item_file"]
    message = _error(one, name)
    assert f"bad_{name}/{file}" in message and "posix.system" in message
    assert one["bad"]["marker_exists"] is False


@pytest.mark.parametrize("name,key", [
    ("fewer_layers", "decoder.layers."), ("narrower", "embedding.word_embeddings.weight"),
    ("untied_output", "output_layer.weight")])
def test_checkpoint_of_another_model_names_the_key(one, name, key):
    message = _error(one, name)
    assert key in message and ".metadata" in message
