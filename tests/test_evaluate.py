"""evaluate.py: the win rate against a scripted judge (the project's OpenAI-compatible test server,
with verdicts and logprobs chosen here so every figure is known exactly), through the real
openai client; crash safety; bad input; and the held-out loss against the Trainer's."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import endpoint
import evaluate
from helpers import ROOT, drain_stderr
from openai_server import OpenAIServer, judged_pair
from utils import UsageError


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "test-secret-key")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


def write_outputs(path, generator: str, outputs: dict[str, str]) -> str:
    records = [{"instruction": i, "input": "", "output": o, "generator": generator} for i, o in outputs.items()]
    path.write_text(json.dumps(records))
    return str(path)


# Five instructions; the judge's behaviour for each (the model is "tuned", the reference "base"):
# the model wins both orders, loses both, the judge always takes the first slot (a tie, and
# inconsistent), the model wins both, and an answer the judge cannot give in the first order.
MODEL = {
    "wins": "tuned a long good answer",
    "loses": "tuned bad",
    "first": "tuned x",
    "wins2": "tuned good",
    "mute": "tuned m",
}
REFERENCE = {
    "wins": "base ok",
    "loses": "base a long better answer",
    "first": "base xy",
    "wins2": "base much longer text",
    "mute": "base m",
}


def scripted_verdict(prompt: str, model: str) -> str:
    instruction, first, second = judged_pair(prompt)
    if instruction == "first":
        return "1"
    if instruction == "mute":
        return "I cannot decide." if first.startswith("base") else "Answer 2"
    model_first = first.startswith("tuned")
    model_better = instruction != "loses"
    return "1" if model_first == model_better else "2"


@pytest.fixture
def pair_files(tmp_path):
    return (
        write_outputs(tmp_path / "tuned.json", "tuned", MODEL),
        write_outputs(tmp_path / "base.json", "base", REFERENCE),
    )


def judge(server, pair_files, output_dir, **overrides) -> dict:
    model_outputs, reference_outputs = pair_files
    arguments = dict(
        model_outputs=model_outputs, reference_outputs=reference_outputs, judge_model="test-model",
        api_base=server.base_url, output_dir=str(output_dir), retry_base_delay=0.01, request_timeout=10.0,
    )  # fmt: skip
    arguments.update(overrides)
    return evaluate.win_rate(**arguments)


def sklearn_length_controlled(preferences, differences) -> float:
    """The same regression fitted by scikit-learn (soft labels as two weighted rows each)."""
    from sklearn.linear_model import LogisticRegression

    y = np.asarray(preferences) - 1
    x = (np.asarray(differences, dtype=float) / np.std(differences))[:, None]
    fit = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10_000)
    fit.fit(np.vstack([x, x]), np.r_[np.ones(len(y)), np.zeros(len(y))], sample_weight=np.r_[y, 1 - y])
    return 100 / (1 + math.exp(-fit.intercept_[0]))


@pytest.mark.parametrize("api_style", ["completions", "chat"])
def test_win_rate_from_text_verdicts_is_exact(pair_files, tmp_path, api_style):
    with OpenAIServer(writer=scripted_verdict, chat_repeats_prefix=False) as server:
        board = judge(server, pair_files, tmp_path / "out", api_style=api_style)
        requests = server.completions_requests()
    # Preferences (2: the model is better): wins 2, loses 1, first 1.5, wins2 2; mute is unscored.
    scores = [1.0, 0.0, 0.5, 1.0]
    assert board["win_rate"] == pytest.approx(62.5)
    assert board["standard_error"] == pytest.approx(np.std(scores, ddof=1) / 2 * 100)
    assert board["ci95"] == pytest.approx([62.5 - 1.96 * board["standard_error"], 100.0])
    assert (board["wins"], board["ties"], board["losses"], board["n"], board["unscored_pairs"]) == (2, 1, 1, 4, 1)
    assert board["position_consistency"] == pytest.approx(3 / 4)
    # Slot 1 was chosen in 5 of the 9 judgments that gave a verdict.
    assert board["first_slot_preference"] == pytest.approx(5 / 9)
    scored = [k for k in MODEL if k != "mute"]
    assert board["length_controlled_win_rate"] == pytest.approx(
        sklearn_length_controlled([2, 1, 1.5, 2], [len(MODEL[k]) - len(REFERENCE[k]) for k in scored]), abs=1e-6
    )
    assert board["avg_length"]["model"] == pytest.approx(np.mean([len(v) for v in MODEL.values()]))
    # Both orders of every pair, and the unparseable answer asked once more.
    assert len(requests) == 11 and board["judge_run"]["requests_this_run"] == 11
    prompts = [r["body"].get("prompt") or r["body"]["messages"][-1]["content"] for r in requests]
    for key in MODEL:
        orders = {judged_pair(p)[1] for p in prompts if judged_pair(p)[0] == key}
        assert orders == {MODEL[key], REFERENCE[key]}
    annotations = json.loads((tmp_path / "out" / "annotations.json").read_text())
    assert [a["preference"] for a in annotations] == [2.0, 1.0, 1.5, 2.0, None]
    assert annotations[0]["output_1"] == REFERENCE["wins"] and annotations[0]["generator_2"] == "tuned"
    assert json.loads((tmp_path / "out" / "leaderboard.json").read_text())["win_rate"] == pytest.approx(62.5)
    usage = board["judge_run"]
    assert usage["prompt_tokens"] == sum(len(p.split()) for p in prompts) and usage["completion_tokens"] > 0


def forward_and_swapped(prompt: str, model: str) -> dict[str, float]:
    """P(2) = 0.8 with the reference first, P(2) = 0.3 with the model first."""
    _, first, _ = judged_pair(prompt)
    p2 = 0.8 if first.startswith("base") else 0.3
    return {"1": math.log(1 - p2), "2": math.log(p2), " maybe": math.log(1e-3)}


@pytest.mark.parametrize("api_style", ["completions", "chat"])
def test_logprob_verdicts_give_a_continuous_preference(pair_files, tmp_path, api_style):
    with OpenAIServer(writer=lambda p, m: "2", logprobs=forward_and_swapped, chat_repeats_prefix=False) as server:
        board = judge(server, pair_files, tmp_path / "out", api_style=api_style)
        bodies = [r["body"] for r in server.completions_requests()]
    # Forward 1.8; swapped 1.3, i.e. 1.7 for the model: 1.75 for every pair.
    annotations = json.loads((tmp_path / "out" / "annotations.json").read_text())
    assert [a["preference"] for a in annotations] == pytest.approx([1.75] * 5)
    assert board["win_rate"] == pytest.approx(75.0) and board["standard_error"] == pytest.approx(0.0, abs=1e-9)
    assert board["judge_run"]["verdicts_from_logprobs"] == 10 and board["position_consistency"] == 1.0
    assert board["first_slot_preference"] == pytest.approx((0.2 + 0.7) / 2)
    assert all(b.get("logprobs") for b in bodies) and len(bodies) == 10


def test_a_server_that_refuses_logprobs_is_judged_by_text(pair_files, tmp_path):
    with OpenAIServer(writer=scripted_verdict, refuse_logprobs=True) as server:
        board = judge(server, pair_files, tmp_path / "out", api_style="completions", max_concurrency=1)
        asked_for_logprobs = [bool(r["body"].get("logprobs")) for r in server.completions_requests()]
    assert board["win_rate"] == pytest.approx(62.5) and "not supported" in board["judge_run"]["logprobs_refused"]
    assert asked_for_logprobs.count(True) == 1 and len(asked_for_logprobs) == 12


def test_same_result_at_any_concurrency_and_a_rerun_asks_nothing(pair_files, tmp_path):
    many = {f"task {n}": f"tuned {'good ' * (n % 4)}answer {n}" for n in range(24)}
    few = {f"task {n}": f"base answer {'x' * (n % 3)}" for n in range(24)}
    files = (write_outputs(tmp_path / "m.json", "tuned", many), write_outputs(tmp_path / "r.json", "base", few))

    def verdict(prompt, model):
        _, first, second = judged_pair(prompt)
        return "1" if first.count("good") + len(first) % 3 > second.count("good") + len(second) % 3 else "2"

    outputs = []
    with OpenAIServer(writer=verdict, latency=0.005, latency_jitter=0.03) as server:
        for concurrency in (1, 8):
            judge(server, files, tmp_path / f"k{concurrency}", max_concurrency=concurrency)
            outputs.append((tmp_path / f"k{concurrency}" / "annotations.json").read_bytes())
        asked = len(server.requests)
        board = judge(server, files, tmp_path / "k8", max_concurrency=8)
        assert len(server.requests) == asked and board["judge_run"]["judgments_cached"] == 48
    assert outputs[0] == outputs[1] and (tmp_path / "k8" / "annotations.json").read_bytes() == outputs[1]


def test_kill_9_then_rerun_repeats_no_finished_judgment(tmp_path):
    model = {f"task {n}": f"tuned answer {n}" for n in range(20)}
    reference = {f"task {n}": f"base answer {n}" for n in range(20)}
    files = (write_outputs(tmp_path / "m.json", "tuned", model), write_outputs(tmp_path / "r.json", "base", reference))
    cache = tmp_path / "out" / "judgments"
    command = [
        sys.executable, str(ROOT / "evaluate.py"), "win_rate", "--model_outputs", files[0], "--reference_outputs",
        files[1], "--judge_model", "test-model", "--output_dir", str(tmp_path / "out"), "--max_concurrency", "2",
    ]  # fmt: skip

    def cached() -> set[str]:
        return {path.stem for path in cache.glob("*/*.json")}

    with OpenAIServer(writer=lambda p, m: "2", latency=0.1) as server:
        process = subprocess.Popen(
            [*command, "--api_base", server.base_url], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 120
        while len(cached()) < 8 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        finished = cached()
        assert 8 <= len(finished) < 40 and not (tmp_path / "out" / "annotations.json").exists()
        first_run = len(server.requests)
        rerun = subprocess.run([*command, "--api_base", server.base_url], cwd=ROOT, capture_output=True, text=True)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        second_run = server.requests[first_run:]
    settings = {"judge_model": "test-model", "prompt": evaluate.load_judge_prompt(evaluate.DEFAULT_JUDGE_PROMPT)}
    settings.update(temperature=0.0, max_tokens=8)
    asked_again = {
        evaluate.judgment_key(settings, *_judgment_fields(r["body"]["prompt"]))
        for r in second_run
        if r["path"].endswith("completions")
    }
    assert len(second_run) == 40 - len(finished) and not asked_again & finished
    board = json.loads((tmp_path / "out" / "leaderboard.json").read_text())
    assert board["n"] == 20 and board["win_rate"] == 50.0 and board["judge_run"]["judgments_cached"] == len(finished)


def _judgment_fields(prompt: str) -> tuple[str, str, str, str]:
    instruction, first, second = judged_pair(prompt)
    return instruction, "", first, second


def test_401_stops_at_once_and_never_shows_the_key(pair_files, tmp_path):
    with OpenAIServer(writer=lambda p, m: "1", api_key="the-right-key") as server:
        result = subprocess.run(
            [
                sys.executable, str(ROOT / "evaluate.py"), "win_rate", "--model_outputs", pair_files[0],
                "--reference_outputs", pair_files[1], "--judge_model", "test-model", "--api_base", server.base_url,
                "--output_dir", str(tmp_path / "out"), "--max_concurrency", "1",
            ],  # fmt: skip
            cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "OPENAI_API_KEY": "test-secret-key"},
        )  # fmt: skip
        requests = len(server.requests)
    assert result.returncode == 1 and "refused the request (401)" in result.stderr
    assert "test-secret-key" not in result.stderr + result.stdout and requests == 1


def test_a_judge_model_the_endpoint_does_not_serve_stops_the_run(pair_files, tmp_path):
    with OpenAIServer(writer=lambda p, m: "1") as server:
        with pytest.raises(endpoint.StopRun, match="model 'gpt-judge' is not available"):
            judge(server, pair_files, tmp_path / "out", judge_model="gpt-judge")


@pytest.mark.parametrize(
    "reference, message",
    [
        ([{"instruction": "wins", "output": "a"}], r"tuned.json: 4 instruction\(s\) that .*base.json does not have"),
        (
            [{"instruction": k, "output": v} for k, v in REFERENCE.items()] + [{"instruction": "extra", "output": "b"}],
            r'base.json: 1 instruction\(s\) that .*tuned.json does not have, the first "extra"',
        ),
        (
            [{"instruction": "wins", "output": "a"}, {"instruction": "wins", "input": "", "output": "b"}],
            r'base.json: record 1: the same instruction and input as record 0 \("wins"\)',
        ),
        ([{"instruction": "wins"}], r'base.json: record 0, field "output": missing'),
        ([{"instruction": "wins", "output": 3}], r'base.json: record 0, field "output": not a string \(int\)'),
    ],
)
def test_bad_outputs_are_named(pair_files, tmp_path, reference, message):
    (tmp_path / "base.json").write_text(json.dumps(reference))
    with pytest.raises(UsageError, match=message):
        evaluate.matched_pairs(pair_files[0], str(tmp_path / "base.json"))


def test_the_self_instruct_set_is_read_as_published(tmp_path):
    tasks = [
        {"id": "user_oriented_task_0", "motivation_app": "Grammarly", "instruction": "Fix it.",
         "instances": [{"input": "i has a cat", "output": "I have a cat."}, {"input": "he go", "output": "He goes."}]},
        {"id": "user_oriented_task_1", "motivation_app": "Yelp", "instruction": "Rate it.",
         "instances": [{"input": "", "output": "4 stars"}]},
    ]  # fmt: skip
    path = tmp_path / "user_oriented_instructions.jsonl"
    path.write_text("\n".join(json.dumps(t) for t in tasks))
    outputs = evaluate.load_outputs(str(path))
    assert list(outputs) == [("Fix it.", "i has a cat"), ("Fix it.", "he go"), ("Rate it.", "")]
    assert outputs[("Fix it.", "he go")]["output"] == "He goes."
    assert outputs[("Rate it.", "")]["generator"] == "user_oriented_instructions"
    path.write_text(json.dumps([{"id": "t", "instruction": "Fix it.", "instances": [{"input": "x"}]}]))
    with pytest.raises(UsageError, match=r'record 0, field "instances\[0\].output": missing'):
        evaluate.load_outputs(str(path))


def test_verdict_parsing():
    answers = ["2", " 1.", "Answer 2", "(1)", "Output 2\n", "1\nBecause it is right.", "\nThe answer is 1.\n"]
    assert [evaluate.verdict_from_text(t) for t in answers] == [2, 1, 2, 1, 2, 1, 1]
    assert [evaluate.verdict_from_text(t) for t in ["12", "both", "1 or 2", ""]] == [None] * 4
    # The first token that is not blank decides; logprobs of other tokens are summed per digit.
    logprobs = [("\n", {"\n": -0.1}), ("2", {"2": math.log(0.6), " 2": math.log(0.2), "1": math.log(0.2)})]
    assert evaluate.verdict_from_logprobs(logprobs) == pytest.approx(1.8)
    assert evaluate.verdict_from_logprobs([("Sure", {"Sure": -0.1})]) is None


def test_loss_equals_the_trainers_at_learning_rate_0(tiny_llama_dir, tmp_path):
    records = [
        {"instruction": "Give three tips for staying healthy.", "input": "", "output": "Eat, sleep and walk."},
        {"instruction": "Translate the sentence into French.", "input": "Good morning.", "output": "Bonjour."},
        {"instruction": "Summarize the article.", "input": "It rained all day in the city.", "output": "Rain."},
    ]
    data = tmp_path / "held_out.json"
    data.write_text(json.dumps(records))
    train = subprocess.run(
        [
            sys.executable, str(ROOT / "train.py"), "--model_name_or_path", str(tiny_llama_dir), "--data_path", str(data),
            "--output_dir", str(tmp_path / "trained"), "--learning_rate", "0", "--max_steps", "1",
            "--per_device_train_batch_size", "3", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
        ],  # fmt: skip
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    state = json.loads((tmp_path / "trained" / "trainer_state.json").read_text())
    trainer_loss = next(entry["loss"] for entry in state["log_history"] if "loss" in entry)
    ours = evaluate.loss(str(tiny_llama_dir), str(data), batch_size=2)
    assert ours["loss"] == pytest.approx(trainer_loss, rel=1e-4) and ours["examples"] == 3
    assert ours["perplexity"] == pytest.approx(math.exp(ours["loss"]))
    # The model train.py saved at learning rate 0 gives the same loss.
    assert evaluate.loss(str(tmp_path / "trained"), str(data))["loss"] == pytest.approx(ours["loss"], rel=1e-6)


@pytest.mark.slow
def test_end_to_end_with_inference_serve_as_the_judge(tiny_llama_dir, pair_files, tmp_path):
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "inference.py"), "--model_name_or_path", str(tiny_llama_dir), "--serve",
         "--port", "0", "--max_new_tokens", "4", "--temperature", "0"],
        cwd=ROOT, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        url = None
        for line in process.stderr:
            if line.startswith("serving "):
                url = line.split(" on ")[1].split()[0].rstrip("/")
                break
        assert url, "the server did not start"
        drain_stderr(process)
        result = subprocess.run(
            [
                sys.executable, str(ROOT / "evaluate.py"), "win_rate", "--model_outputs", pair_files[0],
                "--reference_outputs", pair_files[1], "--judge_model", "tiny", "--api_base", url + "/v1",
                "--output_dir", str(tmp_path / "out"), "--api_style", "completions",
            ],  # fmt: skip
            cwd=ROOT, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert result.returncode == 0, result.stderr[-3000:]
    board = json.loads((tmp_path / "out" / "leaderboard.json").read_text())
    assert board["n_pairs"] == 5 and board["n"] + board["unscored_pairs"] == 5
    run = board["judge_run"]
    # A random tiny model rarely answers with a digit: those answers were asked twice and counted.
    assert run["requests_this_run"] >= 10 and run["judgments_cached"] == 0
    assert run["logprobs_refused"] is None or "logprobs" in run["logprobs_refused"]
    assert "judged by tiny" in result.stdout


def test_the_alpaca_eval_set_is_read_as_published(tmp_path):
    records = [
        {"instruction": "What are the names of some famous actors?", "output": "Tom Hanks.", "generator": "text_davinci_003", "dataset": "helpful_base"},
        {"instruction": "Write a haiku about rain.", "output": "Soft rain.", "generator": "text_davinci_003", "dataset": "koala"},
    ]  # fmt: skip
    path = tmp_path / "alpaca_eval.json"
    path.write_text(json.dumps(records))
    outputs = evaluate.load_outputs(str(path))
    assert list(outputs) == [(r["instruction"], "") for r in records]
    assert outputs[("Write a haiku about rain.", "")]["generator"] == "text_davinci_003"
    assert outputs[("Write a haiku about rain.", "")]["dataset"] == "koala"
