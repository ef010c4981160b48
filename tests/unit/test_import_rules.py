"""The house rules that can be checked by reading the code (docs/ARCHITECTURE.md, "Rules")."""

from __future__ import annotations

import ast

import pytest

from tests.conftest import ROOT

PARTS = ("common", "launcher", "model", "data", "parallel", "slurm")
MAX_MODULE_LINES = 600
MAX_MODULES_PER_FOLDER = 12


def _tree(path):
    return ast.parse(path.read_text())


def _imports(path) -> set[str]:
    names = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _files(folder):
    return sorted((ROOT / folder).rglob("*.py"))


def _imports_of(folder, forbidden):
    for path in _files(folder):
        bad = sorted(m for m in _imports(path)
                     if any(m == f or m.startswith(f + ".") for f in forbidden))
        yield path, bad


@pytest.mark.parametrize("folder, forbidden", [
    # the parts: imports go one way, and common/ is below all of them
    ("common", ("gptforge.launcher", "gptforge.model", "gptforge.data", "gptforge.parallel",
                "gptforge.slurm")),
    ("model", ("gptforge.launcher", "gptforge.parallel", "gptforge.data", "gptforge.slurm")),
    ("data", ("gptforge.launcher", "gptforge.parallel", "gptforge.model", "gptforge.slurm")),
    ("parallel", ("gptforge.launcher", "gptforge.data", "gptforge.slurm")),
    ("slurm", ("gptforge.launcher", "gptforge.model", "gptforge.data", "gptforge.parallel")),
    # inside launcher/: the verbs on top, the run above tracking, model I/O beside the run
    ("launcher/run", ("gptforge.launcher.cli",)),
    ("launcher/tracking", ("gptforge.launcher.cli", "gptforge.launcher.run",
                           "gptforge.launcher.modelio")),
    ("launcher/modelio", ("gptforge.launcher.cli", "gptforge.launcher.tracking")),
    # inside parallel/: the planner builds no engine; megatron's engine knows nothing of ZeRO
    ("parallel/plan", ("gptforge.parallel.megatron", "gptforge.parallel.deepspeed",
                       "gptforge.parallel.context")),
    ("parallel/megatron", ("gptforge.parallel.deepspeed", "gptforge.parallel.plan")),
    ("parallel/deepspeed", ("gptforge.parallel.plan",)),
])
def test_imports_go_one_way(folder, forbidden):
    for path, bad in _imports_of(folder, forbidden):
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_only_the_verbs_import_the_verbs():
    for part in PARTS:
        for path in _files(part):
            if path.is_relative_to(ROOT / "launcher" / "cli"):
                continue
            bad = [m for m in _imports(path) if m.startswith("gptforge.launcher.cli")]
            assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


@pytest.mark.parametrize("module, allowed", [
    ("megatron.core.parallel_state", ("parallel/",)),
    ("deepspeed", ("parallel/",)),
    ("mlflow", ("launcher/tracking/sender.py",)),
    ("matplotlib", ("launcher/tracking/report.py",)),
    ("webdataset", ("data/",)),
    ("sentencepiece", ("data/",)),
    ("transformers", ("data/hf_tokenizer.py", "model/hf_", "launcher/modelio/")),
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


def test_no_print_outside_the_verbs():
    """Everything a run says goes through common/log.py; only the verbs print their output."""
    for part in PARTS:
        for path in _files(part):
            if path.is_relative_to(ROOT / "launcher" / "cli"):
                continue
            calls = [node.lineno for node in ast.walk(_tree(path))
                     if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                     and node.func.id == "print"]
            assert not calls, f"{path.relative_to(ROOT)}:{calls[0]} prints (use common/log.py)"


def test_modules_stay_small_and_folders_say_what_they_hold():
    for part in PARTS:
        for path in _files(part):
            lines = len(path.read_text().splitlines())
            assert lines <= MAX_MODULE_LINES, f"{path.relative_to(ROOT)}: {lines} lines"
    for folder in ("launcher", "parallel"):
        modules = sorted(p.name for p in (ROOT / folder).glob("*.py"))
        assert len(modules) <= MAX_MODULES_PER_FOLDER, f"{folder}/ holds {modules}"


def test_every_package_is_installed_and_documented():
    """Each folder with an __init__.py imports as gptforge.<folder>; ARCHITECTURE.md names it."""
    import importlib

    architecture = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    for part in PARTS:
        for init in (ROOT / part).rglob("__init__.py"):
            folder = init.parent.relative_to(ROOT)
            module = importlib.import_module("gptforge." + ".".join(folder.parts))
            assert module.__file__ == str(init)
            assert f"{folder}/" in architecture, f"docs/ARCHITECTURE.md does not name {folder}/"
