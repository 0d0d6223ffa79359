"""`make demo` in its reduced form (`demo.py --quick True`): the whole loop on the real embedded
model, with one generation request, one training step and short answers."""

import json
import subprocess
import sys

import pytest

from helpers import ROOT

# Downloads the embedded model on a fresh machine, and runs the whole loop on it: minutes.
pytestmark = [pytest.mark.network, pytest.mark.slow]


def test_quick_demo_runs_the_whole_loop(embedded_model_dir, tmp_path):
    demo_dir = tmp_path / "demo"
    result = subprocess.run(
        [
            sys.executable,
            "demo.py",
            "--quick",
            "True",
            "--demo_dir",
            str(demo_dir),
            "--cache_dir",
            str(embedded_model_dir.parent),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for number in range(1, 6):
        assert f"== [{number}/5]" in result.stdout and f"-- step {number} took " in result.stdout
    assert "Time per step" in result.stdout and " s  total" in result.stdout
    summary = json.loads((demo_dir / "generate" / "regen_summary.json").read_text())
    assert summary["counts"]["requests"] == 1 and summary["counts"]["completion_tokens"] > 0
    assert isinstance(json.loads((demo_dir / "generate" / "regen.json").read_text()), list)
    assert (demo_dir / "tuned" / "model.safetensors").exists()
    assert (demo_dir / "recovered" / "config.json").exists()
    assert "exact integrity check: all" in result.stdout and "naive integrity check" in result.stdout
    for name in ("base", "fine-tuned"):
        answers = json.loads((demo_dir / f"showcase_{name}.json").read_text())
        assert len(answers) == 2 and all("output" in a for a in answers)
    assert f"Everything is in {demo_dir}" in result.stdout
