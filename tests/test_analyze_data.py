"""Tests of analyze_data.py: problems found with record and field, format detection, word and
token statistics, the verb/object extraction and the chart. Budget: under 1 minute on 2 cores
(the spaCy model is loaded once per session; no test parses more than a few dozen sentences)."""

import collections
import json
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest
from transformers import AutoTokenizer

import analyze_data
import utils
from helpers import ROOT, shared_file

# A training file with one known problem per record (index 0 is clean).
BAD_TRAINING_RECORDS = [
    {"instruction": "Name the largest planet in the solar system.", "input": "", "output": "Jupiter."},
    {"instruction": "Add the two numbers.", "input": "2 and 3", "output": ""},
    {"input": "a sentence", "output": "A sentence."},
    {"instruction": "  ", "input": "", "output": "Something."},
    {"instruction": "Repeat the word.", "input": "echo", "output": "echo"},
    {"instruction": "name the LARGEST planet in the  solar system.", "input": "", "output": "Jupiter."},
    {"instruction": "Sort the list.", "input": ["b", "a"], "output": "a, b"},
    {"instruction": "Count to three.", "output": 3},
    "not an object",
]
EXPECTED_PROBLEMS = [
    (1, "output", "empty"),
    (2, "instruction", "missing"),
    (3, "instruction", "empty"),
    (4, "input", "equal to the output"),
    (5, "instruction", "duplicate of record 0"),
    (6, "input", "not a string (list)"),
    (7, "output", "not a string (int)"),
    (8, None, "not a JSON object (str)"),
]


@pytest.fixture(scope="session")
def nlp():
    """The default model name, which resolves to the PyPI re-upload installed for the tests."""
    return analyze_data.load_spacy_model(analyze_data.DEFAULT_SPACY_MODEL)


def run_script(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "analyze_data.py"), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


def test_every_problem_is_found_with_record_and_field():
    records = BAD_TRAINING_RECORDS
    assert analyze_data.detect_format(records) == "train"
    assert analyze_data.find_problems(records, "train") == EXPECTED_PROBLEMS
    # Malformed records stay out of the statistics; well-formed ones with content problems count.
    assert len(analyze_data.training_examples(records, "train")) == 5


def test_command_line_reports_problems_and_exits_non_zero(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(BAD_TRAINING_RECORDS))
    result = run_script("--data_path", path)
    assert result.returncode == 1, result.stderr
    assert f'{path}: record 1, field "output": empty' in result.stdout
    assert f'{path}: record 5, field "instruction": duplicate of record 0' in result.stdout
    assert f"{path}: record 8: not a JSON object (str)" in result.stdout
    assert "8 problems found" in result.stdout
    assert "9 records, 5 well-formed examples, 2 with an input (40.0%)" in result.stdout

    assert run_script("--data_path", path, "--warn_only").returncode == 0


def test_clean_json_lines_file_passes_and_unreadable_file_is_named(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps(record) for record in BAD_TRAINING_RECORDS[:1]) + "\n")
    result = run_script("--data_path", good)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "training format, 1 records" in result.stdout and "0 problems found" in result.stdout

    broken = tmp_path / "broken.json"
    broken.write_text('{"instruction": "x", "output": "y"}\n{"instruction": ')
    result = run_script("--data_path", broken)
    assert result.returncode == 2
    assert str(broken) in result.stderr and "line 2" in result.stderr


def test_help_explains_every_flag():
    result = run_script("--help")
    assert result.returncode == 0
    text = result.stdout + result.stderr  # fire writes its help to stderr
    for flag in (
        "DATA_PATH",
        "--tokenizer",
        "--max_length",
        "--output_dir",
        "--spacy_model",
        "--top_verbs",
        "--top_objects",
        "--batch_size",
        "--warn_only",
        "exit status is 1",
    ):
        assert flag in text
    assert "(the Alpaca prompt, output and EOS)" in text


def test_seed_format_problems_name_the_instance():
    seeds = [
        {
            "id": "seed_task_0",
            "name": "capital",
            "instruction": "Name the capital of Peru.",
            "instances": [{"input": "", "output": "Lima."}],
            "is_classification": False,
        },
        {
            "id": "seed_task_1",
            "name": "sentiment",
            "instruction": "Is this review positive?",
            "instances": [{"input": "Great phone.", "output": "Yes."}, {"input": "Same.", "output": "Same."}],
            "is_classification": "yes",
        },
        {
            "id": 2,
            "name": "capital_again",
            "instruction": "Name the capital of Peru.",
            "instances": [{"input": ""}],
            "is_classification": False,
        },
        {
            "id": "seed_task_3",
            "name": "nothing",
            "instruction": "Say nothing.",
            "instances": [],
            "is_classification": False,
        },
    ]
    assert analyze_data.detect_format(seeds) == "seed"
    assert analyze_data.find_problems(seeds, "seed") == [
        (1, "is_classification", "not a boolean (str)"),
        (1, "instances[1].input", "equal to the output"),
        (2, "id", "not a string (int)"),
        (2, "instances[0].output", "missing"),
        (2, "instruction", "duplicate of record 0"),
        (3, "instances", "not a non-empty list"),
    ]
    assert len(analyze_data.training_examples(seeds, "seed")) == 3


def test_original_seed_tasks_are_detected_and_clean():
    path = shared_file("seed_tasks.jsonl")
    records = utils.load_records(str(path))
    assert analyze_data.detect_format(records) == "seed"
    assert analyze_data.find_problems(records, "seed") == []
    words = analyze_data.word_statistics(analyze_data.training_examples(records, "seed"))
    assert words["examples"] == 175
    assert 0 < words["with_input"] < 175
    assert words["instruction_words"]["min"] >= 1


def test_original_52k_problems_are_found():
    """The 52K loads unchanged; its known flaws are empty outputs and inputs copied to the output."""
    path = shared_file("alpaca_data.json")
    records = utils.load_records(str(path))
    assert analyze_data.detect_format(records) == "train"
    problems = analyze_data.find_problems(records, "train")
    kinds = collections.Counter((field, message) for _, field, message in problems)
    assert kinds == {("output", "empty"): 28, ("input", "equal to the output"): 55}
    for index, field, _ in problems:
        record = records[index]
        assert record["output"].strip() == "" if field == "output" else record["input"] == record["output"]


def test_word_statistics():
    examples = [
        {"instruction": "Add them.", "input": "1 2 3", "output": "6"},
        {"instruction": "Say hello to the world.", "input": "", "output": "Hello, world!"},
    ]
    words = analyze_data.word_statistics(examples)
    assert words["examples"] == 2 and words["with_input"] == 1
    assert words["instruction_words"] == {"min": 2, "mean": 3.5, "median": 3.5, "p90": 4.7, "p99": 5.0, "max": 5}
    assert words["input_words"]["max"] == 3 and words["output_words"]["max"] == 2


def test_token_statistics_follow_the_alpaca_prompt(tiny_llama_dir):
    examples = [
        {"instruction": "Give three tips for staying healthy.", "input": "", "output": "Eat, sleep, walk."},
        {
            "instruction": "Summarize the following article.",
            "input": "It rained all day in the city. " * 20,
            "output": "It rained.",
        },
    ]
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompts = [utils.format_prompt(example["instruction"], example["input"]) for example in examples]
    totals = [
        len(tokenizer(prompt + example["output"] + tokenizer.eos_token)["input_ids"])
        for prompt, example in zip(prompts, examples)
    ]
    prompt_lengths = [len(tokenizer(prompt)["input_ids"]) for prompt in prompts]
    assert totals[0] < totals[1]

    tokens = analyze_data.token_statistics(examples, str(tiny_llama_dir), max_length=totals[0])
    assert tokens["total_tokens"]["min"] == totals[0] and tokens["total_tokens"]["max"] == totals[1]
    assert tokens["prompt_tokens"]["max"] == prompt_lengths[1]
    assert tokens["over_max_length"] == 1
    assert tokens["prompt_over_max_length"] == int(prompt_lengths[1] >= totals[0])
    assert analyze_data.token_statistics(examples, str(tiny_llama_dir), max_length=totals[1])["over_max_length"] == 0


@pytest.mark.slow
def test_tokens_and_chart_on_the_command_line(tmp_path, tiny_llama_dir):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(BAD_TRAINING_RECORDS[:2]))
    result = run_script(
        "--data_path", path, "--tokenizer", tiny_llama_dir, "--max_length", 8, "--output_dir", tmp_path / "report"
    )
    assert result.returncode == 1
    assert "total tokens" in result.stdout
    assert "longer than max_length=8 tokens (truncated in training): 2;" in result.stdout
    counts = json.loads((tmp_path / "report" / "verb_object_counts.json").read_text())
    assert [entry["verb"] for entry in counts["top_verbs"]] == ["name", "add"]
    assert (tmp_path / "report" / "verb_object_chart.png").stat().st_size > 0


@pytest.mark.parametrize(
    "sentence, expected",
    [
        ("Generate a list of three tips for staying healthy.", ("generate", "list")),
        ("Write me a short story about a lighthouse keeper.", ("write", "story")),
        ("Describe the structures of an atom.", ("describe", "structure")),
        ("Create two poems about autumn.", ("create", "poem")),
        ("Rewrite the following sentences in the passive voice. Keep the meaning.", ("rewrite", "sentence")),
        ("Explain why the sky is blue.", ("explain", None)),
        ("Summarize this.", ("summarize", None)),
        ("What is the capital of France?", (None, None)),
        ("", (None, None)),  # an empty instruction (reported as a problem) has no sentence to parse
    ],
)
def test_root_verb_and_object(nlp, sentence, expected):
    assert analyze_data.root_verb_and_object(nlp(sentence)) == expected


def test_counts_and_chart(tmp_path):
    instructions = [
        "Generate a list of fruits.",
        "Generate a list of colors.",
        "Generate a poem about rain.",
        "Generate a list of fruits.",  # a repeat is parsed and counted once
        "Write a story about a dog.",
        "Write a letter to a friend.",
        "Explain why ice floats.",
        "What is love?",
    ]
    counts = analyze_data.diversity_chart(
        instructions, str(tmp_path), "en_core_web_sm", top_verbs=2, top_objects=1, batch_size=4, title="test"
    )
    assert counts["distinct_instructions"] == 7
    assert counts["with_root_verb"] == 6 and counts["with_root_verb_and_object"] == 5
    assert counts["top_verbs"] == [
        {"verb": "generate", "count": 3, "objects": [{"object": "list", "count": 2}]},
        {"verb": "write", "count": 2, "objects": [{"object": "story", "count": 1}]},
    ]
    assert json.loads((tmp_path / "verb_object_counts.json").read_text()) == counts

    image = matplotlib.image.imread(tmp_path / "verb_object_chart.png")
    assert image.shape[0] > 500 and image.shape[1] > 500
    # Not blank: a good share of the pixels are coloured (the rings), not white background.
    coloured = np.abs(image[..., :3] - 1.0).sum(axis=-1) > 0.1
    assert coloured.mean() > 0.1


def test_token_statistics_count_the_eos_that_training_appends(tmp_path, tiny_llama_dir):
    """Like train.py, one EOS token ends every sequence, also with a tokenizer that defines none."""
    examples = [{"instruction": "Name a colour.", "input": "", "output": "Blue."}]
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    text = utils.format_prompt(examples[0]["instruction"], "") + examples[0]["output"]
    expected = len(tokenizer(text)["input_ids"]) + 1
    assert analyze_data.token_statistics(examples, str(tiny_llama_dir), 512)["total_tokens"]["max"] == expected

    tokenizer.eos_token = None
    tokenizer.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).eos_token is None
    assert analyze_data.token_statistics(examples, str(tmp_path), 512)["total_tokens"]["max"] == expected
