"""generate_instruction.py against a real local HTTP server speaking the OpenAI API
(tests/openai_server.py), through the real `openai` client. Budget: about a minute on 2 cores,
half of it in the tests marked slow (real subprocesses: kill -9, Ctrl-C, unreachable endpoints)."""

import collections
import email.utils
import json
import os
import pathlib
import random
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from rouge_score import rouge_scorer

import endpoint
import generate_instruction
import utils
from generate_instruction import (
    STOP_SEQUENCES,
    Completion,
    StopRun,
    candidate_tasks,
    encode_prompt,
    post_process_response,
)
from helpers import ROOT, shared_file
from openai_server import OpenAIServer, self_instruct_writer

PROMPT = "Come up with 20 varied tasks for a language model.\n\nList of 20 tasks:"
SEEDS = [
    ("Give  three\ttips for   staying healthy:", "", "Eat vegetables.\nSleep eight hours.\nWalk daily."),
    ("Translate the sentence into French.", "Good morning, my friend.", "Bonjour, mon ami."),
    ("Classify the review as positive or negative.", "The soup was cold and bland.", "Negative"),
    ("Suggest a name for a small coffee shop near a library.", "", "Chapter & Bean"),
    ("Convert 72 degrees Fahrenheit to Celsius.", "", "About 22.2 degrees Celsius."),
    ("Find the odd one out in the list.", "apple, banana, carrot, cherry", "Carrot, the only vegetable."),
    ("Explain why the sky looks blue during the day.", "", "Air scatters blue light more than red light."),
    ("Rewrite the sentence in the passive voice.", "The chef cooked the meal.", "The meal was cooked by the chef."),
]


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


@pytest.fixture
def files(tmp_path):
    """A prompt.txt and a seed_tasks.jsonl of our own, in a temporary folder."""
    prompt_path = tmp_path / "prompt.txt"
    prompt_path.write_text(PROMPT)
    seed_path = tmp_path / "seed_tasks.jsonl"
    with open(seed_path, "w") as f:
        for number, (instruction, task_input, output) in enumerate(SEEDS):
            record = {
                "id": f"seed_task_{number}",
                "name": f"task_{number}",
                "instruction": instruction,
                "instances": [{"input": task_input, "output": output}],
                "is_classification": False,
            }
            f.write(json.dumps(record) + "\n")
    return {"prompt_path": str(prompt_path), "seed_tasks_path": str(seed_path)}


@pytest.fixture
def server():
    with OpenAIServer() as running:
        yield running


def generate(server, files, output_dir, **overrides):
    """Run the generator in-process against `server` with small, fast settings."""
    arguments = dict(
        output_dir=str(output_dir), num_instructions_to_generate=40, model_name="test-model", request_batch_size=2,
        api_base=server.base_url if server else None, seed=0, retry_base_delay=0.01, request_timeout=5.0, num_cpus=1, **files,
    )  # fmt: skip
    arguments.update(overrides)
    return generate_instruction.generate_instruction_following_data(**arguments)


def summary_of(output_dir) -> dict:
    return json.loads((output_dir / "regen_summary.json").read_text())


# ----------------------------------------------------------------------------- prompt and parsing


def test_encode_prompt_layout(files):
    tasks = [{"instruction": i, "input": x, "output": o} for i, x, o in SEEDS[:2]]
    expected = (
        PROMPT + "\n"
        "###\n1. Instruction: Give three tips for staying healthy\n1. Input:\n<noinput>\n1. Output:\n"
        "Eat vegetables.\nSleep eight hours.\nWalk daily.\n"
        "###\n2. Instruction: Translate the sentence into French.\n2. Input:\nGood morning, my friend.\n2. Output:\n"
        "Bonjour, mon ami.\n"
        "###\n3. Instruction:"
    )
    assert encode_prompt(tasks, files["prompt_path"]) == expected


def test_encode_prompt_on_original_seed_tasks(files):
    seeds = generate_instruction.load_seed_tasks(str(shared_file("seed_tasks.jsonl")))
    assert len(seeds) == 175
    with_colon = next(task for task in seeds if task["instruction"].endswith(":"))
    with_input = next(task for task in seeds if task["input"])
    prompt = encode_prompt([with_colon, with_input], files["prompt_path"])
    collapsed = re.sub(r"\s+", " ", with_colon["instruction"]).strip().rstrip(":")
    assert f"###\n1. Instruction: {collapsed}\n1. Input:\n" in prompt
    assert f"2. Input:\n{with_input['input']}\n2. Output:\n{with_input['output']}\n###\n3. Instruction:" in prompt
    assert prompt.endswith("###\n3. Instruction:")


HAND_WRITTEN = (
    " Suggest a name for a bakery that sells only bread.\n4. Input:\n<noinput>\n4. Output:\nThe Daily Loaf.\n###\n"
    "5. Instruction: Summarize the paragraph in one sentence.\n5. Input:\n"
    "The shop opened in 2020. A loaf costs $20. Everyone came.\n5. Output:\nAn expensive bakery opened in 2020.\n###\n"
    "6. Instruction: Name a colour.\n6. Input:\n<noinput>\n6. Output:\nRed.\n###\n"
    "7. Instruction: Describe the graph below in two sentences.\n7. Input:\nA line rising.\n7. Output:\nIt rises.\n###\n"
    "8. Instruction: Explain how to GO TO the nearest station by bus.\n8. Input:\n<noinput>\n8. Output:\nTake bus 4.\n###\n"
    "9. Instruction: Write a program that adds two numbers.\n9. Input:\n<noinput>\n9. Output:\nprint(1 + 2)\n###\n"
    '10. Instruction: "Quote" this sentence correctly for a newspaper.\n10. Input:\nhe said hi\n10. Output:\n"Hi," he said.\n###\n'
    "11. Instruction: Écrivez une phrase sur la pluie.\n11. Input:\n<noinput>\n11. Output:\nIl pleut.\n###\n"
    "12. Instruction: " + "Count " * 151 + "\n12. Input:\n<noinput>\n12. Output:\n151\n###\n"
    "13. Input:\nno instruction here\n13. Output:\nnothing\n###\n"
    "14. Instruction: Rewrite this paragraph in the passive voice.\n14. Input:\nThe dog chased the ball.\n"
    "14. Output:\nThe ball was chased by the dog.\n###\n"
    "15. Instruction: List three uses for a paper clip.\n15. Input:\n<noinput>\n15. Output:\nHolding pages, reset"
)


def test_post_process_applies_every_filter():
    tasks, dropped = post_process_response(3, HAND_WRITTEN, "stop")
    assert [t["instruction"] for t in tasks] == [
        "Suggest a name for a bakery that sells only bread.",
        "Summarize the paragraph in one sentence.",
        "Rewrite this paragraph in the passive voice.",  # "paragraph" is not the blacklisted word "graph"
        "List three uses for a paper clip.",
    ]
    assert tasks[0] == {"instruction": tasks[0]["instruction"], "input": "", "output": "The Daily Loaf."}
    assert tasks[1]["input"] == "The shop opened in 2020. A loaf costs $20. Everyone came."
    assert dropped == collections.Counter(
        too_short=1, blacklisted_word=2, write_a_program=1, starts_with_punctuation=1, starts_non_ascii=1,
        too_long=1, unparseable=1,
    )  # fmt: skip


def test_prompt_markers_inside_an_instruction_are_dropped_with_their_own_reason():
    def task(number, instruction):
        return f"{number}. Instruction: {instruction}\n{number}. Input:\n<noinput>\n{number}. Output:\nok\n###\n"

    instructions = [
        "Teach me how to make a logi<noinput> of a bat and ball.",  # seen in the demo's output
        "Describe the weather in the city. 2. Input: Paris in May",
        "Explain what input validation means for a web form.",
        "Classify the following input: a sentence about cats.",  # a lowercase phrase, not the marker
    ]
    text = "".join(task(4 + i, instruction) for i, instruction in enumerate(instructions))
    counts = collections.Counter()
    kept = candidate_tasks(Completion([(text.removeprefix("4. Instruction:"), "stop")]), 3, counts)
    assert [t["instruction"] for t in kept] == instructions[2:]
    assert counts["dropped_prompt_marker"] == 2 and not any(
        k.startswith("dropped_") and k != "dropped_prompt_marker" for k in counts
    )


def test_post_process_word_count_bounds():
    def task(number, instruction):
        return f"{number}. Instruction: {instruction}\n{number}. Input:\n<noinput>\n{number}. Output:\nok\n###\n"

    counts = [3, 4, 150, 151]
    text = "".join(task(4 + i, " ".join(["Count"] * n)) for i, n in enumerate(counts))
    tasks, dropped = post_process_response(3, text.removeprefix("4. Instruction:"), "stop")
    assert [len(t["instruction"].split()) for t in tasks] == [4, 150]
    assert dropped == collections.Counter(too_short=1, too_long=1)


def test_post_process_drops_the_cut_off_last_task_on_length():
    tasks, dropped = post_process_response(3, HAND_WRITTEN, "length")
    assert tasks[-1]["instruction"] == "Rewrite this paragraph in the passive voice."
    assert dropped["truncated"] == 1


@pytest.mark.parametrize(
    "chat_start", ["4. Instruction:", "\n4. Instruction:", "Sure! Here are 16 more tasks.\n\n4. Instruction:"]
)
def test_post_process_accepts_a_chat_reply_that_restates_the_number(chat_start):
    expected = post_process_response(3, HAND_WRITTEN, "stop")
    assert post_process_response(3, chat_start + HAND_WRITTEN, "stop") == expected
    assert len(expected[0]) == 4


def test_encode_then_parse_round_trip(files):
    tasks = [{"instruction": i, "input": x, "output": o} for i, x, o in SEEDS]
    prompt = encode_prompt(tasks, files["prompt_path"])
    body = prompt[len(PROMPT + "\n###\n1. Instruction:") :]
    parsed, dropped = post_process_response(0, body, "stop")
    expected = [dict(t, instruction=re.sub(r"\s+", " ", t["instruction"]).strip().rstrip(":")) for t in tasks]
    assert parsed == expected
    assert dropped == collections.Counter(unparseable=1)  # the trailing "9. Instruction:" with no task


def test_stop_sequences_do_not_fire_inside_content():
    content = "It cost $20. It happened in 2020. Pages 1-20.\n19. Output:\nok\n###\n"
    assert not any(stop in content for stop in STOP_SEQUENCES)
    assert any(stop in content + "20. Instruction: Next" for stop in STOP_SEQUENCES)


def test_bad_seed_file_names_the_record(files, tmp_path):
    path = tmp_path / "bad_seeds.jsonl"
    first_line = pathlib.Path(files["seed_tasks_path"]).read_text().splitlines()[0]
    path.write_text(first_line + '\n{"instruction": "No instances here."}\n')
    with pytest.raises(utils.UsageError, match=r'bad_seeds.jsonl: record 1, field "instances": missing'):
        generate_instruction.load_seed_tasks(str(path))
    path.write_bytes(first_line.encode() + b'\n{"instruction": "caf\xe9"}\n')
    with pytest.raises(utils.UsageError, match=r"bad_seeds.jsonl: not UTF-8"):
        generate_instruction.load_seed_tasks(str(path))


def test_item_layout_matches_jdump(tmp_path):
    items = [
        {
            "instruction": "Dites « bonjour ».",
            "input": "",
            "output": "x\ny",
            "most_similar_instructions": {"a": 0.5},
            "avg_similarity_score": 0.1,
        }
    ] * 2
    for chosen in (items, []):
        generate_instruction.save_regen(
            [generate_instruction.item_json(item) for item in chosen], str(tmp_path / "ours.json")
        )
        utils.jdump(chosen, str(tmp_path / "jdump.json"))
        assert (tmp_path / "ours.json").read_bytes() == (tmp_path / "jdump.json").read_bytes()


# ----------------------------------------------------------------------------- full runs


def test_full_run_keeps_novel_tasks_with_rouge_statistics(files, tmp_path):
    def writer_with_near_copies(prompt, model):
        # Task 4 repeats the prompt's first example with one more word: ROUGE-L above 0.7.
        first_example = re.search(r"1\. Instruction: (.*)\n", prompt)[1]
        return f" {first_example} please\n4. Input:" + self_instruct_writer(prompt, model).split("\n4. Input:", 1)[1]

    with OpenAIServer(writer=writer_with_near_copies) as server:
        kept = generate(
            server,
            files,
            tmp_path / "out",
            num_instructions_to_generate=40,
            price_per_1k_prompt_tokens=0.5,
            price_per_1k_completion_tokens=2.0,
        )
    regen = json.loads((tmp_path / "out" / "regen.json").read_text())
    assert regen == kept and len(regen) >= 40
    summary = summary_of(tmp_path / "out")
    counts = summary["counts"]
    assert summary["status"] == "complete" and summary["kept_total"] == len(regen)
    assert counts["requests"] == len(server.requests) == 2
    assert counts["dropped_similar"] == 4  # one near copy per prompt
    assert counts["generated"] == len(regen) + counts["dropped_similar"]
    # Tasks 4..19 of every prompt arrive: the stop sequences did not fire on "$20." or "in 2020.".
    assert counts["generated"] + counts.get("dropped_blacklisted_word", 0) == 4 * 16
    assert sum(item["output"].endswith("It cost $20. It happened in 2020.") for item in regen) >= 15
    assert summary["cost"] == pytest.approx((counts["prompt_tokens"] * 0.5 + counts["completion_tokens"] * 2.0) / 1000)
    request = server.requests[0]
    assert request["authorization"] == "Bearer test-key"
    assert request["body"]["stop"] == STOP_SEQUENCES and "logit_bias" not in request["body"]
    assert len(request["body"]["prompt"]) == 2 and request["body"]["max_tokens"] == 3072

    # Every kept task against the seeds and the tasks kept before it, with rouge_score itself.
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    earlier = [instruction for instruction, _, _ in SEEDS]
    for item in regen:
        scores = [scorer.score(item["instruction"], other)["rougeL"].fmeasure for other in earlier]
        assert max(scores) <= 0.7
        assert item["avg_similarity_score"] == float(np.mean(scores))
        assert sorted(item["most_similar_instructions"].values(), reverse=True) == sorted(scores, reverse=True)[:10]
        assert list(item["most_similar_instructions"].values()) == sorted(
            item["most_similar_instructions"].values(), reverse=True
        )
        earlier.append(item["instruction"])


def test_chat_only_endpoint_is_detected_in_auto_style(files, tmp_path):
    with OpenAIServer(routes=("chat",)) as server:
        kept = generate(server, files, tmp_path / "out", num_instructions_to_generate=20)
    assert len(kept) >= 20
    paths = [r["path"] for r in server.requests]
    assert paths[0] == "/v1/completions" and set(paths[1:]) == {"/v1/chat/completions"}
    assert all(len(r["body"]["messages"]) == 1 for r in server.requests[1:])
    assert summary_of(tmp_path / "out")["api_style"] == "chat"


def test_explicit_chat_style_retries_each_prompt_on_its_own(server, files, tmp_path):
    server.inject("server_error")
    kept = generate(server, files, tmp_path / "out", api_style="chat", num_instructions_to_generate=20)
    assert len(kept) >= 20 and {r["path"] for r in server.requests} == {"/v1/chat/completions"}
    # One request of two prompts: the failed first prompt is sent again, the second only once.
    first, retry, second = (r["body"]["messages"][0]["content"] for r in server.requests)
    assert first == retry != second
    assert summary_of(tmp_path / "out")["counts"]["retries"] == 1


def test_chat_prompt_failing_for_good_keeps_the_answered_ones(server, files, tmp_path):
    server.inject("none")
    server.inject("server_error")  # the second prompt of the first request, with no retries left
    generate(server, files, tmp_path / "out", api_style="chat", num_instructions_to_generate=1, max_retries=0)
    counts = summary_of(tmp_path / "out")["counts"]
    assert len(server.requests) == 2 and counts["requests"] == 1 and counts["failed_requests"] == 1
    assert counts["kept"] >= 1  # the first prompt's tasks were paid for: they are used


def test_server_taking_one_prompt_per_request(files, tmp_path):
    with OpenAIServer(accepts_prompt_list=False) as server:
        kept = generate(server, files, tmp_path / "out", num_instructions_to_generate=40)
    assert len(kept) >= 40
    assert all(isinstance(r["body"]["prompt"], str) for r in server.requests[1:])


def test_llama_server_array_answer_to_a_list_of_prompts(files, tmp_path):
    with OpenAIServer(prompt_list_as_array=True) as server:
        kept = generate(server, files, tmp_path / "array", num_instructions_to_generate=40)
    with OpenAIServer() as server:
        generate(server, files, tmp_path / "choices", num_instructions_to_generate=40)
    assert len(kept) >= 40 and all(isinstance(r["body"]["prompt"], list) for r in server.requests)
    assert (tmp_path / "array" / "regen.json").read_bytes() == (tmp_path / "choices" / "regen.json").read_bytes()
    array_counts, choices_counts = (summary_of(tmp_path / name)["counts"] for name in ("array", "choices"))
    assert array_counts == choices_counts and "malformed_responses" not in array_counts


def test_llama_cpp_server_token_counts_are_right(files, tmp_path):
    """Today's llama.cpp server answers a list of prompts in one object whose usage counts only
    the first prompt: the generator recognises it, asks one prompt per request from then on, and
    counts the same tokens as against a server that counts every prompt."""
    with OpenAIServer(llama_cpp=True) as llama:
        generate(llama, files, tmp_path / "llama", num_instructions_to_generate=40, request_batch_size=3)
    with OpenAIServer() as server:
        generate(server, files, tmp_path / "plain", num_instructions_to_generate=40, request_batch_size=3)
    llama_summary, plain_summary = summary_of(tmp_path / "llama"), summary_of(tmp_path / "plain")
    assert (tmp_path / "llama" / "regen.json").read_bytes() == (tmp_path / "plain" / "regen.json").read_bytes()
    for key in ("prompt_tokens", "completion_tokens", "kept", "generated"):
        assert llama_summary["counts"][key] == plain_summary["counts"][key], key
    assert "llama.cpp" in llama_summary["one_prompt_per_request"] and plain_summary["one_prompt_per_request"] is None
    prompts_sent = [r["body"]["prompt"] for r in llama.completions_requests()]
    assert isinstance(prompts_sent[0], list) and all(isinstance(p, str) for p in prompts_sent[1:])


def test_llama_cpp_is_recognised_by_either_of_its_markers():
    from openai.types import Completion as CompletionResponse

    base = {"id": "x", "object": "text_completion", "created": 0, "model": "m", "choices": []}
    assert endpoint.is_llama_cpp(CompletionResponse.model_validate({**base, "timings": {"prompt_n": 3}}))
    assert endpoint.is_llama_cpp(CompletionResponse.model_validate({**base, "system_fingerprint": "b4567"}))
    for fingerprint in ("fp_44709d6fcb", "b", "build-1"):  # OpenAI's and others' fingerprints
        assert not endpoint.is_llama_cpp(CompletionResponse.model_validate({**base, "system_fingerprint": fingerprint}))


def test_same_output_for_any_concurrency(files, tmp_path):
    outputs = []
    for concurrency in (1, 8):
        # Random latency makes the concurrent answers arrive out of order.
        with OpenAIServer(latency=0.01, latency_jitter=0.05) as server:
            generate(
                server,
                files,
                tmp_path / f"k{concurrency}",
                num_instructions_to_generate=100,
                request_batch_size=1,
                max_concurrency=concurrency,
            )
        outputs.append((tmp_path / f"k{concurrency}" / "regen.json").read_bytes())
    assert outputs[0] == outputs[1]
    assert len(json.loads(outputs[0])) >= 100


def test_resume_continues_where_it_stopped(server, files, tmp_path):
    generate(server, files, tmp_path / "once", num_instructions_to_generate=80)
    sent_once = len(server.requests)
    first = generate(server, files, tmp_path / "twice", num_instructions_to_generate=40)
    second = generate(server, files, tmp_path / "twice", num_instructions_to_generate=80)
    assert second[: len(first)] == first
    assert (tmp_path / "twice" / "regen.json").read_bytes() == (tmp_path / "once" / "regen.json").read_bytes()
    counts = summary_of(tmp_path / "twice")["counts"]  # added up over both runs
    assert counts["requests"] == len(server.requests) - sent_once and counts["kept"] == len(second)


def test_new_run_ignores_an_old_summary(server, files, tmp_path):
    generate(server, files, tmp_path / "out", num_instructions_to_generate=20)
    (tmp_path / "out" / "regen.json").unlink()
    generate(server, files, tmp_path / "out", num_instructions_to_generate=20)
    assert summary_of(tmp_path / "out")["counts"]["requests"] == 1
    assert server.requests[0]["body"] == server.requests[1]["body"]  # started again from request 0


def test_local_server_needs_no_key(server, files, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    generate(server, files, tmp_path / "out", num_instructions_to_generate=1)
    assert server.requests[0]["authorization"] == "Bearer EMPTY"
    with pytest.raises(StopRun, match="OPENAI_API_KEY is not set"):
        generate(server, files, tmp_path / "out", api_base=None)


def test_machine_instructions_in_prompts(server, files, tmp_path):
    kept = generate(server, files, tmp_path / "out", num_instructions_to_generate=60, num_machine_instructions=1)
    machine = {task["instruction"] for task in kept}
    later_prompts = [p for r in server.requests[1:] for p in r["body"]["prompt"]]
    for prompt in later_prompts:
        examples = re.findall(r"\d+\. Instruction: (.*)\n", prompt)
        assert len(examples) == 3 and sum(example in machine for example in examples) == 1


# ----------------------------------------------------------------------------- failures


def test_rate_limit_waits_for_retry_after(server, files, tmp_path):
    server.inject("rate_limit", retry_after=1)
    generate(server, files, tmp_path / "out", num_instructions_to_generate=20)
    first, retry = server.requests[:2]
    assert retry["body"] == first["body"] and retry["time"] - first["time"] >= 1.0
    assert summary_of(tmp_path / "out")["counts"]["retries"] == 1


def test_rate_limit_retry_after_as_an_http_date(server, files, tmp_path):
    # RFC 9110 allows a date instead of seconds; it has a resolution of one second. The retry must
    # wait until that moment (however late the first request came, on a loaded machine).
    until = int(time.time()) + 3
    server.inject("rate_limit", retry_after=email.utils.formatdate(until, usegmt=True))
    generate(server, files, tmp_path / "out", num_instructions_to_generate=20)
    first, retry = server.requests[:2]
    retried_at = time.time() - (time.monotonic() - retry["time"])  # the server stamps requests with time.monotonic()
    assert retry["body"] == first["body"] and until - 0.05 <= retried_at <= until + 5


def test_server_errors_timeouts_and_dropped_connections_are_retried(server, files, tmp_path):
    server.inject("server_error", times=2)
    server.inject("drop")
    server.inject("hang", seconds=3)
    started = time.monotonic()
    kept = generate(server, files, tmp_path / "out", num_instructions_to_generate=20, request_timeout=0.5)
    assert len(kept) >= 20 and time.monotonic() - started < 3
    counts = summary_of(tmp_path / "out")["counts"]
    assert counts["retries"] == 4 and counts.get("failed_requests", 0) == 0


def test_request_failing_after_its_retries_is_counted_and_the_run_goes_on(server, files, tmp_path):
    server.inject("server_error", times=2)
    kept = generate(server, files, tmp_path / "out", num_instructions_to_generate=20, max_retries=1)
    counts = summary_of(tmp_path / "out")["counts"]
    assert len(kept) >= 20 and counts["failed_requests"] == 1 and counts["requests"] == 2
    assert counts["retries"] == 1, "the failed request's retry is counted too"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (the OS just handed it out and took it back)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def unreachable_address(kind: str) -> tuple[str, str]:
    """An endpoint that cannot be reached, and the reason the generator gives for it."""
    if kind == "refused":
        return f"http://127.0.0.1:{free_port()}/v1", "connection refused"
    return "http://nonexistent.invalid:8000/v1", "the host name does not resolve"


@pytest.mark.parametrize("kind", ["refused", "unresolvable"])
def test_unreachable_endpoint_stops_after_two_quick_retries(files, tmp_path, kind):
    address, reason = unreachable_address(kind)
    with pytest.raises(StopRun, match=f"cannot connect to {re.escape(address)}: {reason}.* \\(3 attempts\\)"):
        generate(None, files, tmp_path / "out", api_base=address, max_retries=6)
    summary = summary_of(tmp_path / "out")
    assert summary["status"].startswith(f"stopped: cannot connect to {address}")
    assert summary["counts"]["retries"] == 2 and summary["batches_done"] == 0


def test_malformed_and_empty_answers_are_counted(server, files, tmp_path):
    server.inject("malformed")
    server.inject("missing_choices")
    server.inject("empty")
    kept = generate(server, files, tmp_path / "out", num_instructions_to_generate=20)
    counts = summary_of(tmp_path / "out")["counts"]
    assert len(kept) >= 20
    assert counts["malformed_responses"] == 2 and counts["empty_completions"] == 2 and counts["requests"] == 4


def test_request_limit_ends_the_run_and_regen_json_exists_even_when_empty(server, files, tmp_path):
    server.inject("empty", times=3)
    kept = generate(server, files, tmp_path / "out", max_requests=3, max_concurrency=2)
    summary = summary_of(tmp_path / "out")
    assert kept == [] and summary["counts"]["requests"] == 3 and len(server.requests) == 3
    assert summary["status"] == "request limit reached"
    assert json.loads((tmp_path / "out" / "regen.json").read_text()) == []
    generate(server, files, tmp_path / "out", max_requests=2)
    assert summary_of(tmp_path / "out")["counts"]["requests"] == 5, "the limit counts this run's requests"


def test_length_finish_drops_each_cut_off_task(server, files, tmp_path):
    server.inject("length")
    generate(server, files, tmp_path / "out", num_instructions_to_generate=1)
    assert summary_of(tmp_path / "out")["counts"]["dropped_truncated"] == 2


def test_context_length_error_shrinks_max_tokens(files, tmp_path):
    with OpenAIServer(max_context=1200) as server:
        kept = generate(server, files, tmp_path / "out", num_instructions_to_generate=20)
    assert len(kept) >= 20
    sent = [r["body"]["max_tokens"] for r in server.requests]
    prompt_tokens = max(len(p.split()) for p in server.requests[0]["body"]["prompt"])
    assert sent[0] == 3072 and sent[1] == 1200 - prompt_tokens
    assert summary_of(tmp_path / "out")["max_tokens"] == sent[-1] < 1200


@pytest.mark.parametrize("wording", ["openai", "vllm"])
def test_prompt_longer_than_the_context_fails_alone(files, tmp_path, wording):
    """A prompt that alone fills the context fails without retries and leaves max_tokens as
    the other prompts need it (it used to shrink max_tokens to 1 for the rest of the run)."""
    with open(files["seed_tasks_path"], "a") as f:
        long_seed = {
            "instruction": "Summarize the report in one sentence.",
            "instances": [{"input": "word " * 300, "output": "A report."}],
        }
        f.write(json.dumps(long_seed) + "\n")
    with OpenAIServer(max_context=250, context_message=wording) as server:
        kept = generate(server, files, tmp_path / "out", num_instructions_to_generate=30, request_batch_size=1)
    assert len(kept) >= 30
    summary = summary_of(tmp_path / "out")
    counts = summary["counts"]
    too_long = [r for r in server.requests if "word word word" in r["body"]["prompt"]]
    assert counts["failed_requests"] >= 1 and len(too_long) == counts["failed_requests"]
    short_prompt_tokens = max(len(r["body"]["prompt"].split()) for r in server.requests if r not in too_long)
    assert summary["max_tokens"] >= 250 - short_prompt_tokens - 10


def test_authentication_error_stops_at_once(files, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "regen.json").write_text("[]")
    with OpenAIServer(api_key="the-right-key") as server:
        with pytest.raises(StopRun, match="refused the request \\(401\\): Incorrect API key"):
            generate(server, files, out, max_retries=5)
    assert len(server.requests) == 1 and json.loads((out / "regen.json").read_text()) == []
    assert summary_of(out)["status"].startswith("stopped: ")


def test_exhausted_quota_stops_at_once(server, files, tmp_path):
    server.inject("rate_limit", quota=True)
    with pytest.raises(StopRun, match="quota exhausted: You exceeded your current quota"):
        generate(server, files, tmp_path / "out")
    assert len(server.requests) == 1


def test_unknown_model_stops_at_once(server, files, tmp_path):
    with pytest.raises(StopRun, match="model 'no-such-model' is not available"):
        generate(server, files, tmp_path / "out", model_name="no-such-model")
    assert len(server.requests) == 2  # completions, then chat (auto style), both 404


def test_consecutive_failures_stop_the_run(server, files, tmp_path):
    server.inject("server_error", times=100)
    with pytest.raises(StopRun, match="3 requests in a row failed"):
        generate(server, files, tmp_path / "out", max_retries=0, max_consecutive_failures=3)
    assert len(server.requests) == 3


@pytest.mark.parametrize(
    "corrupt", [b'[{"instruction": "half', b'[{"instruction": "caf\xe9"}]'], ids=["cut", "latin-1"]
)
def test_corrupt_output_is_reported_and_left_alone(server, files, tmp_path, corrupt):
    out = tmp_path / "out"
    out.mkdir()
    (out / "regen.json").write_bytes(corrupt)
    with pytest.raises(utils.UsageError, match="regen.json: not (valid JSON|UTF-8 text)"):
        generate(server, files, out)
    assert (out / "regen.json").read_bytes() == corrupt and not server.requests


# ----------------------------------------------------------------------------- the command line


def cli(files, output_dir, base_url, *extra) -> list[str]:
    return [
        sys.executable, "-m", "generate_instruction", "generate_instruction_following_data",
        "--output_dir", str(output_dir), "--seed_tasks_path", files["seed_tasks_path"], "--prompt_path", files["prompt_path"],
        "--model_name", "test-model", "--api_base", base_url, "--seed", "7", "--request_batch_size", "1", "--num_cpus", "1", *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume(files, tmp_path):
    """A real subprocess killed with SIGKILL mid-run, several times, then resumed to the end:
    regen.json is valid JSON after every kill, never loses what it held, and the final file is
    byte for byte the one an uninterrupted run writes."""
    target = ["--num_instructions_to_generate", "400", "--max_concurrency", "2"]
    env = dict(os.environ, OPENAI_API_KEY="test-key")
    with OpenAIServer(latency=0.1) as server:
        generate(
            server,
            files,
            tmp_path / "reference",
            num_instructions_to_generate=400,
            request_batch_size=1,
            seed=7,
            max_concurrency=4,
        )
        out = tmp_path / "killed"
        held: list = []
        rng = random.Random()
        for _ in range(3):
            requests_before = len(server.requests)
            process = subprocess.Popen(
                cli(files, out, server.base_url, *target),
                cwd=ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            # With two in flight, the third request is sent only after the first answer is saved.
            wait_for = requests_before + rng.randint(3, 5)
            while len(server.requests) < wait_for and process.poll() is None:
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.15))
            process.kill()
            process.wait()
            if (out / "regen.json").exists():
                now = json.loads((out / "regen.json").read_text())
                assert now[: len(held)] == held
                held = now
        assert 0 < len(held) < 400
        finished = subprocess.run(
            cli(files, out, server.base_url, *target), cwd=ROOT, env=env, capture_output=True, text=True
        )
    assert finished.returncode == 0, finished.stderr
    assert "Loaded 8 human-written seed instructions" in finished.stdout and '"instruction"' not in finished.stdout
    final = json.loads((out / "regen.json").read_text())
    assert final[: len(held)] == held
    assert len({item["instruction"] for item in final}) == len(final) >= 400
    assert (out / "regen.json").read_bytes() == (tmp_path / "reference" / "regen.json").read_bytes()


def test_finished_run_exits_without_waiting_for_abandoned_requests(files, tmp_path):
    with OpenAIServer() as server:
        generate(server, files, tmp_path / "first", num_instructions_to_generate=1, request_batch_size=1, seed=7)
        first_prompt = server.requests[0]["body"]["prompt"]

    def writer_hanging_after_the_first_request(prompt, model):
        if prompt != first_prompt:
            time.sleep(30)
        return self_instruct_writer(prompt, model)

    env = dict(os.environ, OPENAI_API_KEY="test-key")
    with OpenAIServer(writer=writer_hanging_after_the_first_request) as server:
        started = time.monotonic()
        command = cli(
            files, tmp_path / "out", server.base_url, "--num_instructions_to_generate", "1", "--max_concurrency", "2"
        )
        finished = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert finished.returncode == 0, finished.stderr
        assert time.monotonic() - started < 15 and len(server.requests) == 2  # the second one still hangs


def test_progress_bar_counts_requests_when_max_requests_caps_the_run(files, tmp_path):
    """A run capped at 2 requests shows a bar of 2 requests, not of 400 tasks it will never keep."""
    env = dict(os.environ, OPENAI_API_KEY="test-key")
    with OpenAIServer() as server:
        command = cli(
            files, tmp_path / "out", server.base_url, "--num_instructions_to_generate", "400", "--max_requests", "2"
        )
        finished = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    assert "requests: 100%" in finished.stderr and "2/2" in finished.stderr
    assert "/400" not in finished.stderr


def test_cli_reports_a_stopped_run_and_documents_its_flags(files, tmp_path):
    env = dict(os.environ, OPENAI_API_KEY="wrong-key")
    with OpenAIServer(api_key="right-key") as server:
        stopped = subprocess.run(
            cli(files, tmp_path / "out", server.base_url), cwd=ROOT, env=env, capture_output=True, text=True
        )
    assert stopped.returncode == 1
    assert "generate_instruction.py: error: " in stopped.stderr and "refused the request (401)" in stopped.stderr
    # The server quoted the key in its error: neither the output nor the files show it.
    assert "Incorrect API key provided: ***" in stopped.stderr
    written = "".join(path.read_text() for path in (tmp_path / "out").iterdir())
    assert "wrong-key" not in stopped.stderr + stopped.stdout + written and "***" in written
    shown = subprocess.run(
        [sys.executable, "-m", "generate_instruction", "generate_instruction_following_data", "--help"],
        cwd=ROOT, env=dict(env, PAGER="cat"), capture_output=True, text=True,
    )  # fmt: skip
    for flag in (
        "--api_base",
        "--api_style",
        "--max_concurrency",
        "--num_machine_instructions",
        "--price_per_1k_prompt_tokens",
    ):
        assert flag in shown.stdout + shown.stderr


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["refused", "unresolvable"])
def test_cli_stops_within_seconds_when_the_endpoint_cannot_be_reached(files, tmp_path, kind):
    """With the default retry settings, which used to retry a refused connection for 7 min 42 s."""
    address, reason = unreachable_address(kind)
    env = dict(os.environ, OPENAI_API_KEY="test-key")
    started = time.monotonic()
    command = cli(files, tmp_path / "out", address)
    stopped = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - started < 15  # the requirement itself, Python's start-up included
    assert stopped.returncode == 1 and "Traceback" not in stopped.stderr
    last_line = stopped.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"generate_instruction.py: error: cannot connect to {address}: {reason}")
    assert summary_of(tmp_path / "out")["counts"]["retries"] == 2


@pytest.mark.slow
def test_ctrl_c_saves_what_is_done_and_a_rerun_resumes(files, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OPENAI_API_KEY="test-key")
    with OpenAIServer(latency=0.3) as server:
        process = subprocess.Popen(
            cli(files, out, server.base_url, "--num_instructions_to_generate", "400"),
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        while not (out / "regen.json").exists() and process.poll() is None:
            time.sleep(0.01)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
        assert process.returncode == 130, stderr
        assert "Traceback" not in stderr and stderr.count("interrupted") == 1
        assert stderr.strip().splitlines()[-1] == (
            "generate_instruction.py: interrupted; what was done is saved in regen.json: rerun the same command to resume"
        )
        saved = json.loads((out / "regen.json").read_text())
        summary = summary_of(out)
        assert summary["status"] == "interrupted" and summary["counts"]["kept"] == len(saved) > 0
        assert summary["batches_done"] == summary["counts"]["requests"]

        resumed = subprocess.run(
            cli(files, out, server.base_url, "--num_instructions_to_generate", str(len(saved) + 1)),
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert f"Loaded {len(saved)} machine-generated instructions" in resumed.stdout
    final = json.loads((out / "regen.json").read_text())
    assert final[: len(saved)] == saved and len(final) > len(saved)
    assert summary_of(out)["batches_done"] == summary["batches_done"] + 1


def test_import_does_not_load_torch():
    code = "import sys, generate_instruction; assert 'torch' not in sys.modules, 'torch was imported'"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
