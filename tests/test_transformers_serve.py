"""A model just trained by train.py, served by a real third-party server, `transformers serve`
(the `serving` extra of transformers): it formats chat requests with the chat template train.py
saved, so its greedy answers equal `inference.py --serve`'s and the greedy completion of the
Alpaca prompt, and the generator runs to completion against it. Budget: about two minutes."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import threading
import time

import openai
import pytest
import torch
import transformers

import model_card
import utils
from helpers import ROOT

pytestmark = pytest.mark.slow

RECORDS = [
    {"instruction": "Say hello in French.", "input": "", "output": "Bonjour."},
    {"instruction": "Add the two numbers.", "input": "12 and 30", "output": "42"},
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], url: str, timeout: float = 180) -> subprocess.Popen:
    """A server in a subprocess, once it answers GET {url}/v1/models; its output is drained."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=5).models.list()
            return process
        except openai.APIConnectionError:
            time.sleep(0.5)
    process.kill()
    pytest.fail(f"{command[:3]} did not start:\n" + "".join(lines)[-3000:])


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="module")
def trained(tiny_llama_dir, tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("served")
    (root / "data.json").write_text(json.dumps(RECORDS))
    out = root / "out"
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--report_to", "none", "--model_name_or_path", str(tiny_llama_dir),
         "--data_path", str(root / "data.json"), "--output_dir", str(out), "--max_steps", "8",
         "--per_device_train_batch_size", "2", "--learning_rate", "1e-2", "--save_strategy", "no"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def transformers_serve(trained):
    url = f"http://127.0.0.1:{free_port()}"
    executable = pathlib.Path(sys.executable).parent / "transformers"
    command = [str(executable), "serve", str(trained), "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1]]
    process = start(command + ["--device", "cpu"], url)
    yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120), url
    stop(process)


@pytest.fixture(scope="module")
def inference_serve(trained):
    url = f"http://127.0.0.1:{free_port()}"
    command = [sys.executable, str(ROOT / "inference.py"), "--model_name_or_path", str(trained), "--serve"]
    process = start(command + ["--port", url.rsplit(":", 1)[1]], url)
    yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    stop(process)


def chat(client, model, messages) -> str:
    response = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=16)
    return response.choices[0].message.content


def greedy_completion(model_dir, prompt: str) -> str:
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**ids, max_new_tokens=16, do_sample=False)
    return tokenizer.decode(output[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def test_transformers_serve_answers_as_inference_py_and_as_the_alpaca_prompt(
    trained, transformers_serve, inference_serve
):
    client, _ = transformers_serve
    question = model_card.chat_messages("Say hello in French.")
    answer = chat(client, str(trained), question)
    assert answer == chat(inference_serve, "model", question)
    assert answer == greedy_completion(trained, utils.format_prompt("Say hello in French."))
    # The input as a second user message.
    with_input = model_card.chat_messages("Add the two numbers.", "12 and 30")
    answer = chat(client, str(trained), with_input)
    assert answer == greedy_completion(trained, utils.format_prompt("Add the two numbers.", "12 and 30"))


def test_the_generator_runs_to_completion_against_transformers_serve(trained, transformers_serve, tmp_path):
    _, url = transformers_serve
    result = subprocess.run(
        [sys.executable, "-m", "generate_instruction", "generate_instruction_following_data",
         "--output_dir", str(tmp_path), "--api_base", url + "/v1", "--model_name", str(trained),
         "--api_style", "chat", "--num_instructions_to_generate", "2", "--max_requests", "2",
         "--num_prompt_instructions", "2", "--max_tokens", "32", "--seed", "0", "--num_cpus", "1"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "OPENAI_API_KEY": ""},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    # A tiny model writes junk, so how many tasks are kept says nothing; the run's files do.
    assert isinstance(json.loads((tmp_path / "regen.json").read_text()), list)
    summary = json.loads((tmp_path / "regen_summary.json").read_text())
    assert summary["api_style"] == "chat"
