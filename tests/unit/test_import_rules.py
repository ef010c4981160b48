"""The house rules that can be checked by reading imports (docs/ARCHITECTURE.md, "Rules")."""

from __future__ import annotations

import ast

import pytest

from tests.conftest import ROOT

PARTS = ("launcher", "model", "data", "parallel", "slurm")


def _imports(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def _files(part):
    return sorted((ROOT / part).rglob("*.py"))


@pytest.mark.parametrize("part, forbidden", [
    ("model", ("gptforge.launcher", "gptforge.parallel", "gptforge.data")),
    ("parallel", ("gptforge.launcher", "gptforge.data")),
    ("data", ("gptforge.launcher", "gptforge.parallel", "gptforge.model")),
    ("slurm", ("gptforge.launcher", "gptforge.model", "gptforge.data")),
])
def test_imports_go_one_way(part, forbidden):
    for path in _files(part):
        bad = [m for m in _imports(path) if m.startswith(forbidden)]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


@pytest.mark.parametrize("module, allowed", [
    ("megatron.core.parallel_state", ("parallel/",)),
    ("deepspeed", ("parallel/",)),
    ("mlflow", ("launcher/tracking/mlflow_run.py",)),
    ("matplotlib", ("launcher/tracking/report.py",)),
    ("webdataset", ("data/",)),
    ("sentencepiece", ("data/",)),
    ("transformers", ("data/hf_tokenizer.py", "model/hf_", "launcher/")),
])
def test_libraries_are_imported_in_one_place(module, allowed):
    for part in PARTS:
        for path in _files(part):
            rel = str(path.relative_to(ROOT))
            uses = [m for m in _imports(path) if m == module or m.startswith(module + ".")
                    or (module == "megatron.core.parallel_state" and m == "megatron.core"
                        and "parallel_state" in path.read_text())]
            if uses:
                assert rel.startswith(allowed), f"{rel} imports {module}"
