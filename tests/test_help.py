"""Every script's --help: it starts with what the script does, shows every flag's description
whole, loads none of the heavy libraries the work needs (so it answers at once), and prints
straight to a terminal instead of opening a pager."""

import inspect
import re
import subprocess
import sys

import pytest

import analyze_data
import demo
import embedded_model
import evaluate
import generate_instruction
import inference
import train
import weight_diff
from helpers import ROOT

# (command line after `python`, the function whose docstring documents its flags, modules --help must not load)
FIRE_COMMANDS = [
    (
        ["-m", "generate_instruction", "generate_instruction_following_data"],
        generate_instruction.generate_instruction_following_data,
        {"torch"},
    ),
    (["weight_diff.py", "make_diff"], weight_diff.make_diff, {"torch", "transformers", "peft", "deepspeed"}),
    (["weight_diff.py", "recover"], weight_diff.recover, {"torch", "transformers", "peft", "deepspeed"}),
    (["weight_diff.py", "verify"], weight_diff.verify, {"torch", "transformers", "peft", "deepspeed"}),
    (["inference.py"], inference.main, {"torch", "transformers", "peft", "deepspeed"}),
    (["analyze_data.py"], analyze_data.main, {"torch", "transformers"}),
    (["demo.py"], demo.main, {"torch"}),
    (["evaluate.py", "win_rate"], evaluate.win_rate, {"torch", "transformers"}),
    (["evaluate.py", "loss"], evaluate.loss, {"torch", "transformers"}),
    (["embedded_model.py"], embedded_model.main, {"torch"}),
]


def run_help(command: list[str], flag: str = "--help") -> tuple[str, set[str]]:
    """The help text of `command --help` and the modules that Python imported to print it."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", *command, flag], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    imported = set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \| +(\S+)$", result.stderr, flags=re.MULTILINE))
    help_text = "\n".join(
        line for line in (result.stdout + result.stderr).splitlines() if not line.startswith("import time:")
    )
    return help_text, imported


def documented_flags(function) -> dict[str, str]:
    """The `Args:` section of a Google-style docstring: each name with its whole description."""
    docstring = inspect.getdoc(function)
    section = docstring.split("Args:\n", 1)[1].split("\n\n", 1)[0]
    flags: dict[str, str] = {}
    for line in section.splitlines():
        match = re.match(r"^    (\w+): (.*)$", line)
        if match:
            name = match.group(1)
            flags[name] = match.group(2)
        else:
            flags[name] += " " + line.strip()
    return flags


def words(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize(
    "command, function, heavy", FIRE_COMMANDS, ids=lambda value: " ".join(value) if isinstance(value, list) else ""
)
def test_fire_help_is_whole_and_light(command, function, heavy):
    text, imported = run_help(command)
    summary = inspect.getdoc(function).splitlines()[0]
    assert words(summary) in words(text)
    for name, description in documented_flags(function).items():
        assert f"--{name}" in text or f"\n    {name.upper()}\n" in text  # a flag, or a positional argument
        assert words(description) in words(text), f"--{name}: its description is cut in --help"
    loaded = {module for module in imported if module.split(".")[0] in {h.split(".")[0] for h in heavy}}
    assert not {m for m in loaded if any(m == h or m.startswith(h + ".") for h in heavy)}


def test_train_help_lists_the_projects_flags_first_and_marks_the_required_one():
    text, imported = run_help(["train.py"])
    assert text.index("Supervised fine-tuning") < text.index("\nmodel:\n") < text.index("--help_all")
    for dataclass_type in train.PROJECT_ARGUMENTS:
        for field in dataclass_type.__dataclass_fields__.values():
            assert f"--{field.name}" in text and words(field.metadata["help"]) in words(text)
    options = text.split("\nmodel:\n", 1)[1]
    data_path_help = words(options.split("--data_path DATA_PATH", 1)[1].split("--val_set_size", 1)[0])
    assert "required" in data_path_help and "default" not in data_path_help
    assert not {"torch", "peft", "deepspeed", "transformers.trainer", "transformers.training_args"} & imported


def test_train_help_all_adds_the_trainers_flags_after_the_projects():
    text, _ = run_help(["train.py"], flag="--help_all")
    options = text.split("\nmodel:\n", 1)[1]
    assert options.index("--padding_free") < options.index("Hugging Face Trainer") < options.index("--learning_rate")
    resume_help = words(options.split("  --resume_from_checkpoint RESUME_FROM_CHECKPOINT", 1)[1][:600])
    assert "resumes from the newest complete checkpoint" in resume_help and "Not directly used" not in resume_help


def test_help_in_a_terminal_is_printed_not_paged():
    """fire opens `less` for help in a terminal; the scripts print it straight away instead (a
    pager would wait for a key press, and the command would time out here)."""
    command = f"{sys.executable} weight_diff.py recover --help"
    result = subprocess.run(
        ["script", "-qec", command, "/dev/null"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "TERM": "xterm"},
    )
    assert (
        result.returncode == 0 and "--overwrite" in result.stdout and "You can also use flags syntax" in result.stdout
    )
