"""Checks on the data the project ships: the schema and counts of seed_tasks.jsonl, prompt.txt
and alpaca_data.json."""
import json
import re

import pytest

from conftest import ROOT, shared_file
from utils import jload

SEED_KEYS = ["id", "name", "instruction", "instances", "is_classification"]
ALPACA_KEYS = ["instruction", "input", "output"]


def read_seed_lines(path):
    """The seed file as (line number, parsed record) pairs, failing on any unparsable line."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [(number, json.loads(line)) for number, line in enumerate(lines, start=1)]


@pytest.fixture(scope="module")
def seeds():
    return [record for _, record in read_seed_lines(ROOT / "seed_tasks.jsonl")]


@pytest.fixture(scope="module")
def prompt():
    return (ROOT / "prompt.txt").read_text(encoding="utf-8")


def normalized(text):
    return " ".join(text.lower().split())


def test_seed_file_is_json_lines_with_one_task_per_line():
    text = (ROOT / "seed_tasks.jsonl").read_text(encoding="utf-8")
    assert text.endswith("\n") and not text.endswith("\n\n")
    lines = text.splitlines()
    assert len(lines) == 175
    for number, line in enumerate(lines, start=1):
        record = json.loads(line)
        # Written exactly as json.dumps writes it, like the original file.
        assert json.dumps(record) == line, f"line {number} is not in json.dumps form"


def test_seed_records_have_the_original_schema(seeds):
    for index, record in enumerate(seeds):
        where = f"seed_tasks.jsonl record {index}"
        assert list(record) == SEED_KEYS, where
        assert record["id"] == f"seed_task_{index}", where
        assert re.fullmatch(r"[a-z0-9]+(_[a-z0-9]+)*", record["name"]), where
        assert isinstance(record["instruction"], str) and record["instruction"].strip(), where
        assert record["instruction"] == record["instruction"].strip(), where
        assert isinstance(record["is_classification"], bool), where
        instances = record["instances"]
        assert isinstance(instances, list) and len(instances) == 1, where
        assert list(instances[0]) == ["input", "output"], where
        assert isinstance(instances[0]["input"], str), where
        assert isinstance(instances[0]["output"], str) and instances[0]["output"].strip(), where


def test_seed_counts_match_the_original_mix(seeds):
    assert len(seeds) == 175
    assert sum(record["is_classification"] for record in seeds) == 26
    assert sum(record["instances"][0]["input"] == "" for record in seeds) == 50


def test_seed_names_and_instructions_are_unique(seeds):
    names = [record["name"] for record in seeds]
    assert len(set(names)) == len(names)
    instructions = [normalized(record["instruction"]) for record in seeds]
    assert len(set(instructions)) == len(instructions)


def test_seeds_follow_the_prompt_requirements(seeds):
    """What prompt.txt asks of generated tasks holds for the examples it is shown."""
    for index, record in enumerate(seeds):
        instance = record["instances"][0]
        assert len(instance["input"].split()) <= 100, f"record {index}: input over 100 words"
        assert len(instance["output"].split()) <= 100, f"record {index}: output over 100 words"
        # No placeholders: empty inputs are empty strings, and no "[text]"-style slots
        # (a bracket after a name, as in `a[i]`, is code, not a slot).
        assert "<noinput>" not in instance["input"], f"record {index}"
        slot = re.search(r"(^|\s)\[[a-z]+( [a-z]+)*\]", instance["input"])
        assert not slot, f"record {index}: placeholder {slot.group().strip() if slot else ''}"


def test_seeds_use_many_different_leading_words(seeds):
    first_words = [record["instruction"].split()[0].lower() for record in seeds]
    counts = {word: first_words.count(word) for word in set(first_words)}
    assert len(counts) >= 80
    assert max(counts.values()) <= 10
    assert counts.get("write", 0) + counts.get("generate", 0) <= 5


def test_seeds_read_like_the_original_seed_file(seeds):
    original = [record for _, record in read_seed_lines(shared_file("seed_tasks.jsonl"))]
    assert len(original) == len(seeds)
    for ours, theirs in zip(seeds, original):
        assert list(ours) == list(theirs)
        assert list(ours["instances"][0]) == list(theirs["instances"][0])
    assert sum(r["is_classification"] for r in seeds) == sum(r["is_classification"] for r in original)


def test_prompt_asks_for_20_tasks_and_ends_with_the_list_intro(prompt):
    assert "20" in prompt.split("\n", 1)[0]
    assert prompt.endswith("\nList of 20 tasks:\n")
    assert 800 <= len(prompt) <= 2000
    for phrase in ("<noinput>", "100 words", "English"):
        assert phrase in prompt


def test_prompt_requirements_are_numbered_in_order(prompt):
    numbers = [int(n) for n in re.findall(r"^(\d+)\. ", prompt, flags=re.MULTILINE)]
    assert numbers == list(range(1, len(numbers) + 1))
    assert len(numbers) >= 8


@pytest.fixture(scope="module")
def alpaca_records():
    return jload(ROOT / "alpaca_data.json")


def test_alpaca_data_has_the_training_schema(alpaca_records):
    assert isinstance(alpaca_records, list)
    assert len(alpaca_records) >= 1000
    for index, record in enumerate(alpaca_records):
        where = f"alpaca_data.json record {index}"
        assert list(record) == ALPACA_KEYS, where
        assert all(isinstance(record[key], str) for key in ALPACA_KEYS), where
        assert record["instruction"].strip() and record["output"].strip(), where
        assert record["input"] != record["output"], where
        assert "<noinput>" not in record["input"], where


def test_alpaca_data_has_about_40_percent_with_input(alpaca_records):
    share = sum(bool(record["input"].strip()) for record in alpaca_records) / len(alpaca_records)
    assert 0.35 <= share <= 0.45, f"{share:.1%} of the records have an input"
