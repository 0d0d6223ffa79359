"""Checks on the data the project ships: the schema and counts of seed_tasks.jsonl, prompt.txt
and alpaca_data.json; that they are the team's own (no seed within ROUGE-L 0.5 of an original
seed, no example within 0.7 of the original 52K, compared with the generator's own RougeLIndex);
and that the generator encodes and parses our prompt and seeds without loss."""

import json
import re

import numpy as np
import pytest

import generate_instruction
from helpers import ROOT, shared_file
from rouge_dedup import RougeLIndex
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


def test_no_seed_is_close_to_an_original_seed(seeds):
    original = [record["instruction"] for _, record in read_seed_lines(shared_file("seed_tasks.jsonl"))]
    index = RougeLIndex(original)
    # The comparison is live: an original seed scores 1 against itself.
    assert index.scores(original[0])[0] == 1.0
    scores = index.scores_many([record["instruction"] for record in seeds])
    worst = np.unravel_index(scores.argmax(), scores.shape)
    assert scores.max() <= 0.5, (
        f"seed_tasks.jsonl record {worst[0]} has ROUGE-L F {scores.max():.3f} against original seed {worst[1]}"
    )


def test_generator_encodes_and_parses_our_prompt_and_seeds_back(prompt):
    """Every seed, written by encode_prompt as the model would continue the list, comes back
    unchanged from post_process_response, and none is dropped by the generator's filters."""
    tasks = generate_instruction.load_seed_tasks(str(ROOT / "seed_tasks.jsonl"))
    prompt_path = str(ROOT / "prompt.txt")
    # Like a real request: 3 examples in the prompt, then a completion of up to 16 more tasks
    # (numbered 4..19, stopping before the 20th); each seed is in some completion once.
    for start in range(0, len(tasks), 16):
        examples = tasks[start - 3 : start] if start else tasks[-3:]
        continuation = tasks[start : start + 16]
        request = generate_instruction.encode_prompt(examples, prompt_path)
        assert request.startswith(prompt + "\n###\n1. Instruction: ")
        assert request.endswith("###\n4. Instruction:")
        written = generate_instruction.encode_prompt(examples + continuation, prompt_path)
        assert written.startswith(request)
        completion = written[len(request) : written.rindex("###")]
        parsed, dropped = generate_instruction.post_process_response(len(examples), completion, "stop")
        assert not dropped, f"seeds {start}..{start + len(continuation) - 1}: dropped {dict(dropped)}"
        assert parsed == continuation


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


def test_alpaca_instructions_are_unique_and_pairwise_below_0_7(alpaca_records):
    instructions = [record["instruction"] for record in alpaca_records]
    assert len({normalized(text) for text in instructions}) == len(instructions)
    scores = RougeLIndex(instructions).scores_many(instructions)
    np.fill_diagonal(scores, 0.0)
    first, second = np.unravel_index(scores.argmax(), scores.shape)
    assert scores.max() <= 0.7, (
        f"alpaca_data.json records {first} and {second} have ROUGE-L F {scores.max():.3f}: "
        f"{instructions[first]!r} / {instructions[second]!r}"
    )


def test_alpaca_instructions_are_not_close_to_the_original_52k(alpaca_records):
    original = [record["instruction"] for record in jload(shared_file("alpaca_data.json"))]
    index = RougeLIndex(original)
    ours = [record["instruction"] for record in alpaca_records]
    worst_score, worst_pair = 0.0, None
    for start in range(0, len(ours), 128):  # 128 x 52K scores at a time: about 50 MB
        scores = index.scores_many(ours[start : start + 128])
        row, column = np.unravel_index(scores.argmax(), scores.shape)
        if scores[row, column] > worst_score:
            worst_score, worst_pair = scores[row, column], (start + row, column)
    assert worst_pair is not None  # the comparison is live: some words are shared
    ours_index, original_index = worst_pair
    assert worst_score <= 0.7, (
        f"alpaca_data.json record {ours_index} has ROUGE-L F {worst_score:.3f} against original "
        f"record {original_index}: {ours[ours_index]!r} / {original[original_index]!r}"
    )
