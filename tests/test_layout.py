"""The layout rules: the entry scripts share code only through the shared modules (no script
imports another), utils.py stays free of torch and openai, and each script loads only the
heavy libraries its own work needs."""

import ast
import subprocess
import sys

import pytest

from helpers import ROOT

SCRIPTS = {"generate_instruction", "train", "weight_diff", "inference", "analyze_data", "demo", "evaluate"}
SHARED_MODULES = {
    "utils",
    "tokens",
    "trainer_hooks",
    "rouge_dedup",
    "embedded_model",
    "generation",
    "server",
    "onnx_decode",
    "model_card",
    "endpoint",
}


def project_imports(module: str) -> set[str]:
    """The project's own modules that `module`.py imports, wherever in the file."""
    tree = ast.parse((ROOT / f"{module}.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & (SCRIPTS | SHARED_MODULES)


def test_every_top_level_module_is_classified():
    found = {path.stem for path in ROOT.glob("*.py")}
    assert found == SCRIPTS | SHARED_MODULES


@pytest.mark.parametrize("module", sorted(SCRIPTS | SHARED_MODULES))
def test_no_entry_script_is_imported_by_another_module(module):
    assert not project_imports(module) & SCRIPTS


def loaded_modules(statement: str) -> set[str]:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", statement], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize(
    "module, absent",
    [
        ("utils", {"torch", "openai", "transformers"}),
        ("model_card", {"torch", "openai", "transformers"}),
        ("generate_instruction", {"torch", "transformers"}),
        ("endpoint", {"torch", "transformers"}),
        ("evaluate", {"torch", "transformers", "peft"}),
        ("train", {"torch", "openai", "peft", "deepspeed"}),
        ("weight_diff", {"torch", "openai", "peft", "deepspeed"}),
        ("inference", {"torch", "openai", "peft", "deepspeed", "onnxruntime"}),
        ("server", {"torch", "openai", "transformers"}),
        ("generation", {"torch", "openai", "transformers"}),
        ("analyze_data", {"torch", "transformers", "openai"}),
    ],
)
def test_importing_a_module_loads_only_what_its_work_needs(module, absent):
    assert not loaded_modules(f"import {module}") & absent
