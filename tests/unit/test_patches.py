"""Patches that fail loudly, in one line, at start (common/patching.py, parallel/versions.py).

Every target of every patch gptforge applies exists in the installed libraries; a missing target
or a changed upstream body stops an engine build with one line naming it and the installed
version; an untested megatron-core is refused in one line unless opted in.
"""

from __future__ import annotations

import textwrap
import types

import pytest

from gptforge.common.errors import UserError
from gptforge.common.patching import TESTED, Patches, PatchError, installed_version
from gptforge.launcher.cli.main import main
from tests.conftest import TINY


def _registries():
    from gptforge.model import decode_linears, window_cache
    from gptforge.parallel.deepspeed import compat
    from gptforge.parallel.megatron import cpu_compat, engine, fixes, startup
    from gptforge.parallel.megatron.checkpoint import safe_read

    compat.import_deepspeed()
    return {"megatron fixes": fixes.PATCHES, "CPU layer (megatron)": cpu_compat.PATCHES,
            "CPU layer (torch)": cpu_compat.TORCH_PATCHES, "DeepSpeed compat": compat.PATCHES,
            "safe reading (megatron)": safe_read.UPSTREAM,
            "safe reading (torch)": safe_read.DCP_READER, "decode layout": decode_linears.UPSTREAM,
            "engine step": engine.STEP_BODIES, "windowed KV cache": window_cache.UPSTREAM,
            "start-up": startup.UPSTREAM}


def test_every_patch_target_exists_and_every_copied_body_is_unchanged():
    registries = _registries()
    assert sum(len(r.patches) for r in registries.values()) >= 30
    for name, registry in registries.items():
        registry.check()  # raises PatchError naming the first target that is off
    copied = [p.name for r in registries.values() for p in r.patches.values() if p.copied_sha256]
    assert sorted(copied) == ["ChainedOptimizer.step", "FP32Optimizer.step",
                              "MixedPrecisionOptimizer.step", "b", "clip",
                              "finalize_model_grads", "writer"]


def _fake_module(monkeypatch, tmp_path, source: str) -> types.ModuleType:
    """An "upstream" module from a file (so that its source can be read), as sys.modules has it."""
    import importlib.util
    import sys

    path = tmp_path / f"upstream_{len(list(tmp_path.glob('upstream_*.py')))}.py"
    path.write_text(textwrap.dedent(source))
    spec = importlib.util.spec_from_file_location("gptforge_fake_upstream", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "gptforge_fake_upstream", module)
    return module


def test_a_missing_target_assigns_nothing_and_says_so_in_one_line(monkeypatch, tmp_path):
    module = _fake_module(monkeypatch, tmp_path, "def kept(): return 'upstream'\n")
    patches = Patches("fix", "megatron-core", TESTED["megatron-core"])
    patches.add("one", "gptforge_fake_upstream:kept", lambda: "ours")
    patches.add("two", "gptforge_fake_upstream:renamed_upstream", lambda: "ours")
    with pytest.raises(PatchError) as err:
        patches.install()
    message = str(err.value)
    assert "\n" not in message and isinstance(err.value, UserError)
    assert message.startswith(f"megatron-core {installed_version('megatron-core')} (tested: ")
    assert "fix 'two'" in message and "gptforge_fake_upstream:renamed_upstream" in message
    assert module.kept() == "upstream"  # checked everything before the first assignment


def test_a_changed_upstream_body_is_refused_where_a_fix_copied_it(monkeypatch, tmp_path):
    from gptforge.common.patching import source_sha256

    module = _fake_module(monkeypatch, tmp_path, "def body(x):\n    return x + 1\n")
    written_against = source_sha256(module.body)
    patches = Patches("fix", "megatron-core", TESTED["megatron-core"])
    patches.add("copy", "gptforge_fake_upstream:body", lambda x: x + 1,
                copied_sha256=written_against)
    patches.install()
    assert patches.original("copy")(1) == 2 and module.body is patches.patches["copy"].replacement
    patches.install()  # idempotent: the installed replacement is recognised, not re-wrapped
    upgraded = _fake_module(monkeypatch, tmp_path,
                            "def body(x):\n    return x + 2  # upstream fixed it\n")
    again = Patches("fix", "megatron-core", TESTED["megatron-core"])
    again.add("copy", "gptforge_fake_upstream:body", lambda x: x + 1,
              copied_sha256=written_against)
    with pytest.raises(PatchError, match=r"has changed since the patch copied its body"):
        again.install()
    assert upgraded.body(1) == 3


def _train(tmp_path, *extra) -> list[str]:
    return ["train", "--config", str(TINY), "--run.dir", str(tmp_path / "run"),
            "--train.train_iters=3", "--train.eval_interval=0", "--checkpoint.enabled=false",
            *extra]


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("gptforge: error:")]


def test_an_engine_build_with_a_missing_fix_target_fails_in_one_line(tmp_path, monkeypatch,
                                                                     capsys):
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    monkeypatch.delattr(DistributedOptimizer, "sharded_param_state_fully_reshardable")
    assert main(_train(tmp_path)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = _error_lines(err)
    assert len(lines) == 1, err
    assert (f"megatron-core {installed_version('megatron-core')} (tested: "
            f"{TESTED['megatron-core']}): megatron fix 'e' cannot be installed: "
            "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer."
            "sharded_param_state_fully_reshardable does not exist") in lines[0]


@pytest.fixture
def megatron_core_0_20(tmp_path, monkeypatch):
    """An installed megatron-core that says it is 0.20.0 (its dist-info first on sys.path)."""
    site = tmp_path / "site"
    info = site / "megatron_core-0.20.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: megatron-core\n"
                                   "Version: 0.20.0\n")
    monkeypatch.syspath_prepend(str(site))
    assert installed_version("megatron-core") == "0.20.0"


def test_an_untested_megatron_core_is_refused_in_one_line(tmp_path, megatron_core_0_20,
                                                          capsys):
    assert main(_train(tmp_path)) == 2
    err = capsys.readouterr().err
    assert _error_lines(err) == [
        f"gptforge: error: megatron-core 0.20.0 is installed (tested: "
        f"{TESTED['megatron-core']}); install the tested version, or set "
        f"--parallel.allow_untested_versions=true to run on it anyway"], err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no step was taken


def test_the_opt_in_key_runs_an_untested_version_and_says_so(tmp_path, megatron_core_0_20,
                                                             capsys):
    assert main(_train(tmp_path, "--parallel.allow_untested_versions=true")) == 0
    err = capsys.readouterr().err
    assert (f"[gptforge] megatron-core 0.20.0 is installed (tested: {TESTED['megatron-core']});"
            f" running anyway (parallel.allow_untested_versions=true)") in err
    assert (tmp_path / "run" / "metrics.jsonl").is_file()
