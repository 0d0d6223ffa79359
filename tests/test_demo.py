"""`make demo` in its reduced form (`demo.py --quick True`): the whole loop on the real embedded
model, with one generation request, one training step, short answers and a held-out slice of two
records."""

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
        timeout=1800,  # minutes on a loaded 2-core machine: nine script starts, each loading the model
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for number in range(1, 7):
        assert f"== [{number}/6]" in result.stdout and f"-- step {number} took " in result.stdout
    assert "Time per step" in result.stdout and " s  total" in result.stdout
    summary = json.loads((demo_dir / "generate" / "regen_summary.json").read_text())
    assert summary["counts"]["requests"] == 1 and summary["counts"]["completion_tokens"] > 0
    assert isinstance(json.loads((demo_dir / "generate" / "regen.json").read_text()), list)
    assert (demo_dir / "tuned" / "model.safetensors").exists()
    assert (demo_dir / "recovered" / "config.json").exists()
    assert "exact integrity check: all" in result.stdout and "naive integrity check" in result.stdout
    for name in ("base", "fine-tuned"):
        answers = json.loads((demo_dir / f"answers_{name}.json").read_text())
        assert len(answers) == 4 and all(a["generator"] == name for a in answers), "showcase and held-out, one run"
        assert json.loads((demo_dir / f"showcase_{name}.json").read_text()) == answers[:2]
        assert json.loads((demo_dir / f"held_out_{name}.json").read_text()) == answers[2:]
    # Step 6: the held-out slice (after the 8 training records), its losses and the judged win rate.
    held_out = json.loads((demo_dir / "held_out.json").read_text())
    training = json.loads((demo_dir / "train_slice.json").read_text())
    assert len(held_out) == 2 and not {r["instruction"] for r in held_out} & {r["instruction"] for r in training}
    for name in ("base", "fine-tuned"):
        assert json.loads((demo_dir / f"held_out_loss_{name}.json").read_text())["examples"] == 2
    board = json.loads((demo_dir / "evaluation" / "leaderboard.json").read_text())
    assert board["n_pairs"] == 2 and board["judge_run"]["requests_this_run"] >= 4
    assert "Held-out loss per response token" in result.stdout and "small local judge" in result.stdout
    assert "position consistency" in result.stdout
    assert f"Everything is in {demo_dir}" in result.stdout
