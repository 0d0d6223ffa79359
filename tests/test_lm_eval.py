"""lm-evaluation-harness (lm-eval from PyPI) against the server: a small multiple-choice task of
ours (a local YAML and JSON file, no dataset hub) run with `--model local-completions` against
`inference.py --serve` gives the same per-item log-likelihoods and accuracy as lm-eval's own
`--model hf` backend on the same model directory.

lm-eval runs in a subprocess in tmp_path without the repository on PYTHONPATH: HF's `evaluate`
package, which it imports, has the name of this project's evaluate.py.

Budget: about a minute on 2 CPU cores (two lm-eval runs, one server subprocess)."""

import json
import os
import subprocess
import sys
import threading

import pytest

from helpers import ROOT

QUESTIONS = [
    ("The quick brown", ["fox", "dog", "cat"], 0),
    ("The cat sleeps in the", ["sun", "city", "fox"], 0),
    ("Translate the sentence into", ["French", "numbers", "the lazy dog"], 0),
    ("def add(a, b):\n    return", [" a + b", " 0", " the sun"], 0),
    ("Classify the review as positive or", ["negative", "positive", "brown"], 0),
    ("It rained all day in the", ["city", "sun", "review"], 0),
    ("Write a response that appropriately completes the", ["request", "fox", "article"], 0),
    ("Give three tips for staying", ["healthy", "lazy", "French"], 0),
    ("Summarize the following article in two", ["sentences", "numbers", "dogs"], 0),
    ("numbers 0 1 2 3", ["4", "9", "fox"], 0),
]

TASK_YAML = """task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
"""


def lm_eval(tmp_path, name: str, model: str, model_args: str) -> tuple[dict, list[dict]]:
    """One lm-eval run of the task: its results and its logged samples."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), TOKENIZERS_PARALLELISM="false"
    )
    output = tmp_path / name
    command = [
        os.path.join(os.path.dirname(sys.executable), "lm_eval"), "run", "--model", model, "--model_args", model_args,
        "--tasks", "tiny_choice", "--include_path", str(tmp_path / "task"), "--output_path", str(output),
        "--log_samples", "--batch_size", "4", "--device", "cpu",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads(next(output.rglob("results_*.json")).read_text())["results"]["tiny_choice"]
    samples = [json.loads(line) for line in next(output.rglob("samples_tiny_choice_*.jsonl")).read_text().splitlines()]
    return results, sorted(samples, key=lambda s: s["doc_id"])


@pytest.mark.slow
def test_local_completions_against_the_server_equal_the_hf_backend(tiny_llama_dir, tmp_path):
    (tmp_path / "task").mkdir()
    data = tmp_path / "task" / "tiny_choice.json"
    data.write_text(json.dumps([{"question": q, "choices": c, "answer": a} for q, c, a in QUESTIONS]))
    (tmp_path / "task" / "tiny_choice.yaml").write_text(TASK_YAML.format(data=data))

    command = [sys.executable, str(ROOT / "inference.py"), "--model_name_or_path", str(tiny_llama_dir), "--serve"]
    server = subprocess.Popen(command + ["--port", "0"], stderr=subprocess.PIPE, text=True)
    try:
        for line in server.stderr:
            if line.startswith("serving "):
                url = line.split(" on ")[1].split()[0].rstrip("/")
                break
        else:
            pytest.fail("the server did not start")
        threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()
        served, served_samples = lm_eval(
            tmp_path,
            "served",
            "local-completions",
            f"model=tiny,base_url={url}/v1/completions,tokenizer_backend=huggingface,tokenizer={tiny_llama_dir},"
            # The hf backend starts with the tokenizer's beginning-of-sequence token; so must this one.
            "num_concurrent=4,max_retries=1,add_bos_token=True",
        )
    finally:
        server.terminate()
        server.wait(timeout=30)
    direct, direct_samples = lm_eval(tmp_path, "hf", "hf", f"pretrained={tiny_llama_dir},dtype=float32")

    assert len(served_samples) == len(direct_samples) == len(QUESTIONS)
    for ours, theirs in zip(served_samples, direct_samples):
        ours_ll = [float(r[0]) for r in ours["filtered_resps"]]
        theirs_ll = [float(r[0]) for r in theirs["filtered_resps"]]
        assert ours_ll == pytest.approx(theirs_ll, abs=1e-4), ours["doc"]
        assert len(set(theirs_ll)) > 1  # the choices differ: the comparison proves something
    assert served["acc,none"] == direct["acc,none"]
