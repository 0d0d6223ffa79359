"""The field's own evaluator accepts what this project writes: `alpaca_eval` (PyPI) runs end to end,
offline, on model outputs written by `inference.py --output_file`, with reference outputs and an
annotator configuration passed explicitly and a local OpenAI-compatible judge (the project's
test server); and alpaca_eval's own win-rate computation gives our numbers from our
annotations.json."""

import json
import math
import re
import subprocess
import sys
import warnings

import pytest
import yaml

import evaluate
from helpers import ROOT
from openai_server import OpenAIServer, judged_pair

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # alpaca_eval imports pkg_resources, which warns that it is deprecated
    import alpaca_eval.main
    import alpaca_eval.metrics

# A Self-Instruct-style evaluation set: its instance outputs are the reference.
TASKS = [
    {"id": f"user_oriented_task_{n}", "motivation_app": "Test", "instruction": instruction,
     "instances": [{"input": task_input, "output": output}]}
    for n, (instruction, task_input, output) in enumerate([
        ("Give three tips for staying healthy.", "", "Eat well, sleep, walk."),
        ("Translate the sentence into French.", "Good morning.", "Bonjour."),
        ("Summarize the article in one sentence.", "It rained all day in the city.", "It rained."),
        ("Classify the review as positive or negative.", "The soup was cold.", "Negative"),
    ])
]  # fmt: skip

ALPACA_EVAL_TEMPLATE = """Which response follows the instruction better? Reply "Output (a)" or "Output (b)".

Instruction: {instruction}

Output (a): {output_1}

Output (b): {output_2}

Better:"""


def alpaca_eval_judge(prompt: str, model: str) -> str:
    """Prefers the shorter response (the reference here), whatever its slot."""
    first = re.search(r"Output \(a\): (.*?)\n\nOutput \(b\)", prompt, re.S)[1]
    second = re.search(r"Output \(b\): (.*?)\n\nBetter", prompt, re.S)[1]
    return "Output (a)" if len(first) <= len(second) else "Output (b)"


def test_alpaca_eval_runs_on_inference_outputs_with_a_local_judge(tiny_llama_dir, tmp_path):
    tasks = tmp_path / "user_oriented_instructions.jsonl"
    tasks.write_text("\n".join(json.dumps(t) for t in TASKS))
    outputs = tmp_path / "model_outputs.json"
    result = subprocess.run(
        [
            sys.executable, str(ROOT / "inference.py"), "--model_name_or_path", str(tiny_llama_dir), "--input_file",
            str(tasks), "--output_file", str(outputs), "--max_new_tokens", "24", "--temperature", "0",
            "--generator", "tiny",
        ],  # fmt: skip
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    reference = [{**record, "generator": "self-instruct"} for record in evaluate.load_outputs(str(tasks)).values()]
    (tmp_path / "reference.json").write_text(json.dumps(reference))
    model_outputs = json.loads(outputs.read_text())
    assert [r["generator"] for r in model_outputs] == ["tiny"] * 4

    with OpenAIServer(writer=alpaca_eval_judge) as server:
        config_dir = tmp_path / "local_judge"
        config_dir.mkdir()
        (config_dir / "prompt.txt").write_text(ALPACA_EVAL_TEMPLATE)
        (tmp_path / "client_config.yaml").write_text(
            json.dumps({"default": [{"api_key": "unused", "base_url": server.base_url}]})
        )
        config = {
            "local_judge": {
                "prompt_template": str(config_dir / "prompt.txt"),
                "fn_completions": "openai_completions",
                "completions_kwargs": {
                    "model_name": "test-model",
                    "max_tokens": 10,
                    "temperature": 0,
                    "requires_chatml": False,
                    "client_config_path": str(tmp_path / "client_config.yaml"),
                },  # fmt: skip
                "fn_completion_parser": "regex_parser",
                "completion_parser_kwargs": {
                    "outputs_to_match": {1: r"(?:^|\n) ?Output \(a\)", 2: r"(?:^|\n) ?Output \(b\)"}
                },
                "batch_size": 1,
            }
        }
        (config_dir / "configs.yaml").write_text(yaml.safe_dump(config))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            leaderboard, annotations = alpaca_eval.main.evaluate(
                model_outputs=str(outputs), reference_outputs=str(tmp_path / "reference.json"),
                annotators_config=str(config_dir / "configs.yaml"), output_path=str(tmp_path / "alpaca_eval_out"),
                precomputed_leaderboard=None, fn_metric="get_winrate", sort_by="win_rate",
                is_return_instead_of_print=True, is_cache_leaderboard=False, name="tiny",
            )  # fmt: skip
        judged = [r for r in server.completions_requests()]
    assert len(annotations) == 4 and judged, "alpaca_eval asked the local judge nothing"
    # The judge prefers the shorter response: the reference, unless the model's is shorter.
    expected = sum(len(m["output"]) < len(r["output"]) for m, r in zip(model_outputs, reference)) / 4 * 100
    assert leaderboard.loc["tiny", "win_rate"] == pytest.approx(expected)
    assert leaderboard.loc["tiny", "n_total"] == 4
    for annotation in annotations:  # alpaca_eval shuffles the slots and puts them back for its output
        shorter_first = len(annotation["output_1"]) <= len(annotation["output_2"])
        assert annotation["preference"] == (1 if shorter_first else 2) and annotation["generator_2"] == "tiny"


def our_judge(prompt: str, model: str) -> dict[str, float]:
    """Top logprobs that prefer the response with more words, and prefer slot 1 somewhat."""
    _, first, second = judged_pair(prompt)
    p2 = 1 / (1 + math.exp(len(first.split()) - len(second.split()) + 0.4))
    return {"1": math.log(1 - p2), "2": math.log(p2)}


@pytest.mark.parametrize("logprobs", [True, False], ids=["logprobs", "text"])
def test_alpaca_eval_computes_our_win_rate_from_our_annotations(tmp_path, monkeypatch, logprobs):
    monkeypatch.setenv("OPENAI_API_KEY", "unused")
    model = [{"instruction": f"task {n}", "output": "word " * (n % 5 + 1), "generator": "tuned"} for n in range(12)]
    reference = [{"instruction": f"task {n}", "output": "word " * (n % 3 + 2), "generator": "base"} for n in range(12)]
    (tmp_path / "m.json").write_text(json.dumps(model))
    (tmp_path / "r.json").write_text(json.dumps(reference))

    def text(prompt: str, model_name: str) -> str:
        lp = our_judge(prompt, model_name)
        return "2" if lp["2"] > lp["1"] else "1"

    server = OpenAIServer(writer=text, logprobs=our_judge if logprobs else None, chat_repeats_prefix=False)
    with server:
        ours = evaluate.win_rate(
            str(tmp_path / "m.json"), str(tmp_path / "r.json"), "test-model", api_base=server.base_url,
            output_dir=str(tmp_path / "out"), top_logprobs=5 if logprobs else 0,
        )  # fmt: skip
    annotations = json.loads((tmp_path / "out" / "annotations.json").read_text())
    assert ours["ties"] < ours["n"] == 12
    theirs = alpaca_eval.metrics.get_winrate(annotations)
    assert theirs["win_rate"] == pytest.approx(ours["win_rate"], abs=1e-9)
    assert theirs["standard_error"] == pytest.approx(ours["standard_error"], abs=1e-9)
    assert theirs["n_total"] == ours["n"]
    if not logprobs:
        assert (theirs["n_wins"], theirs["n_draws"]) == (ours["wins"], ours["ties"])
