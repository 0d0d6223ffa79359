"""The server behind `inference.py --serve` (server.py) on a tiny random LLaMA, through the real
openai client, raw HTTP and a real headless browser: the OpenAI API with log-probabilities,
echo, token-id prompts and usage in streams, requests generated together (and joining a
running batch) with the results they get alone, the chat template, and bounded load and malformed-input runs on 127.0.0.1.

Budget: about 2 minutes on 2 CPU cores (three server subprocesses, one generator run, a
headless Chromium)."""

import contextlib
import html.parser
import http.client
import json
import os
import queue
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from generation import complete_batch
from helpers import INSTRUCTIONS, ROOT, drain_stderr, reference_response
from inference import load_model_and_tokenizer


@pytest.fixture(scope="module")
def tiny(served_dir):
    return load_model_and_tokenizer(str(served_dir))


def start_server(model_dir, *flags, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """inference.py --serve on a free port, in a subprocess, and its base URL once it serves."""
    command = [sys.executable, str(ROOT / "inference.py"), "--model_name_or_path", model_dir, "--serve", "--port", 0]
    process = subprocess.Popen(list(map(str, command + list(flags))), stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    for line in process.stderr:
        lines.append(line)
        if line.startswith("serving "):
            return process, line.split(" on ")[1].split()[0].rstrip("/")
    pytest.fail("the server did not start:\n" + "".join(lines)[-3000:])


@pytest.fixture(scope="module")
def server(served_dir):
    """inference.py --serve on a free port, in a subprocess; yields its base URL. Its decoding
    flags are the web page's initial values."""
    process, url = start_server(served_dir, "--max_new_tokens", 16, "--temperature", 0, "--top_p", 0.95)
    drain_stderr(process)
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_completions_several_prompts_n_stop_and_usage(client, tiny):
    model, tokenizer = tiny
    prompts = ["The quick brown fox", "Write a response that", "def add(a, b):"]
    expected = [complete_batch(model, tokenizer, [p], 8)[0] for p in prompts]
    response = client.completions.create(model="tiny", prompt=prompts, max_tokens=8, n=2, temperature=0)
    assert [c.index for c in response.choices] == list(range(6))
    assert [c.text for c in response.choices] == [e.text for e in expected for _ in range(2)]
    assert [c.finish_reason for c in response.choices] == [e.finish_reason for e in expected for _ in range(2)]
    assert response.usage.prompt_tokens == sum(len(tokenizer(p)["input_ids"]) for p in prompts)
    assert response.usage.completion_tokens == 2 * sum(e.completion_tokens for e in expected)

    stop = expected[0].text[3:6]
    response = client.completions.create(model="tiny", prompt=prompts[0], max_tokens=8, stop=[stop])
    assert response.choices[0].text == expected[0].text[: expected[0].text.find(stop)]
    assert response.choices[0].finish_reason == "stop"


def test_completions_streaming_and_seeded_sampling(client, tiny):
    model, tokenizer = tiny
    expected = complete_batch(model, tokenizer, ["The quick brown fox"], 12)[0]
    chunks = list(client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=12, stream=True))
    assert len(chunks) > 2
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == expected.finish_reason

    def sample(seed):
        return (
            client.completions.create(
                model="tiny", prompt="The cat", max_tokens=12, temperature=1.0, top_p=0.9, seed=seed
            )
            .choices[0]
            .text
        )

    assert sample(7) == sample(7) and sample(-1) == sample(-1)  # any integer is a seed, as with OpenAI
    assert len({sample(seed) for seed in range(4)}) > 1


def test_chat_completions_use_the_alpaca_template(client, served_dir):
    instruction, input = INSTRUCTIONS[1]
    expected = reference_response(served_dir, instruction, input, 16)
    messages = [{"role": "system", "content": "ignored"}, {"role": "user", "content": instruction}]
    response = client.chat.completions.create(model="tiny", messages=messages, extra_body={"input": input})
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == expected
    assert response.choices[0].finish_reason in ("stop", "length") and response.usage.total_tokens > 0

    stream = client.chat.completions.create(model="tiny", messages=messages, extra_body={"input": input}, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == response.choices[0].finish_reason
    assert [m.id for m in client.models.list().data] == [served_dir.name]


@pytest.mark.slow
def test_the_onnxruntime_backend_serves_what_the_model_answers(served_dir, tmp_path):
    import openai

    env = dict(os.environ, ALPACA_CACHE=str(tmp_path))
    process, url = start_server(served_dir, "--max_new_tokens", 16, "--backend", "onnxruntime", env=env)
    drain_stderr(process)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        for instruction, input in INSTRUCTIONS[:3]:
            messages = [{"role": "user", "content": instruction}]
            response = client.chat.completions.create(model="tiny", messages=messages, extra_body={"input": input})
            assert response.choices[0].message.content == reference_response(served_dir, instruction, input, 16)
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert len(list((tmp_path / "onnx").iterdir())) == 1, "the step was exported into $ALPACA_CACHE/onnx"


@contextlib.contextmanager
def in_process_httpd(model, tokenizer, batch_size: int = 8, num_beams: int = 1, step=None):
    """server.InferenceServer on a free port in a thread (no model loading subprocess); yields it."""
    import server as server_module

    defaults = dict(temperature=0.0, top_p=1.0, top_k=0, num_beams=num_beams, repetition_penalty=1.0)
    httpd = server_module.InferenceServer(
        ("127.0.0.1", 0), model, tokenizer, "tiny", 24, batch_size, defaults, step=step
    )
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.stop_generating()
        httpd.server_close()


@contextlib.contextmanager
def in_process_server(model, tokenizer, batch_size: int = 8, num_beams: int = 1, step=None):
    """`in_process_httpd`, yielding an openai client for it."""
    import openai

    with in_process_httpd(model, tokenizer, batch_size, num_beams, step) as httpd:
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{httpd.server_port}/v1", api_key="unused", max_retries=0)


def skip_without_packing_kernel(dtype: str) -> None:
    import torch

    if dtype == "float32" and not torch.backends.mkldnn.is_available():
        pytest.skip("oneDNN, which packs float32 linear layers, is not built into this torch")
    if dtype == "float16" and "fbgemm" not in torch.backends.quantized.supported_engines:
        pytest.skip("fbgemm, which multiplies float16 weights in float32, does not run on this CPU")


@pytest.mark.parametrize("serving", ["float32", "float16", "onnxruntime"])
def test_concurrent_requests_are_generated_together_with_the_results_they_get_alone(tmp_path, onnx_cache, serving):
    # Weights larger than by default give peaked next-token scores: the near-ties of a random
    # model, which float sums in a batch of another shape may flip, would blur the comparison.
    from generation import pack_linear_layers
    from helpers import build_tiny_llama

    dtype = "float16" if serving == "float16" else "float32"
    skip_without_packing_kernel(dtype)
    build_tiny_llama(tmp_path / "model", initializer_range=0.3)
    model, tokenizer = load_model_and_tokenizer(str(tmp_path / "model"), dtype=dtype)
    step = None
    if serving == "onnxruntime":  # test_onnx_decode.py's model too: the same weights, exported once
        import onnx_decode

        step = onnx_decode.load_decode_step(model, onnx_cache)
    assert pack_linear_layers(model) > 0  # as inference.py serves it
    prompts = [f"The fox number {i}" for i in range(6)] + ["Write a response that", "def add(a, b):"]
    with in_process_server(model, tokenizer, step=step) as client:

        def complete(prompt):
            return client.completions.create(model="tiny", prompt=prompt, max_tokens=24, logprobs=1).choices[0]

        with ThreadPoolExecutor(len(prompts)) as pool:
            together = list(pool.map(complete, prompts))
        alone = [complete(prompt) for prompt in prompts]
    assert [c.text for c in together] == [c.text for c in alone]
    assert len({len(c.logprobs.tokens) for c in alone}) > 1, "rows should leave the batch at different steps"
    for a, b in zip(together, alone):
        assert a.logprobs.token_logprobs == pytest.approx(b.logprobs.token_logprobs, abs=1e-4)


def test_beam_search_completes_the_prompt_tokens_it_was_given(tmp_path):
    """With --num_beams the server hands generate the prompt's own token ids: a prompt given as
    ids (or as text, whose ids start with BOS) is not decoded to text and encoded again, which
    would add a second BOS or merge tokens the client chose to split."""
    from generation import complete_batch, decoding_kwargs
    from helpers import build_tiny_llama

    build_tiny_llama(tmp_path, initializer_range=0.3)
    model, tokenizer = load_model_and_tokenizer(str(tmp_path))
    text = "The fox number 1"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id, "the tiny tokenizer starts a prompt with BOS"
    split = ids[:1] + [t for c in text for t in tokenizer(c, add_special_tokens=False)["input_ids"]]
    assert split != ids, "one token per character: ids that encoding the text would not give"
    beams = decoding_kwargs(num_beams=3)
    with in_process_server(model, tokenizer, num_beams=3) as client:
        for prompt in (text, ids, split):
            completion = client.completions.create(model="tiny", prompt=prompt, max_tokens=12).choices[0]
            expected = complete_batch(model, tokenizer, [ids if prompt is text else prompt], 12, **beams)[0]
            assert completion.text == expected.text


class Recorded(queue.Queue):
    """A row's output queue that also notes, in one shared list, the order of everything put."""

    def __init__(self, name: str, events: list):
        super().__init__()
        self.name, self.events = name, events

    def put(self, item, *args, **kwargs):
        self.events.append((self.name, item))
        super().put(item, *args, **kwargs)


def test_rows_that_arrive_mid_batch_join_it_with_the_tokens_they_get_alone(tmp_path):
    from generation import Row, Token, decode_together
    from helpers import build_tiny_llama

    build_tiny_llama(tmp_path, initializer_range=0.3)
    model, tokenizer = load_model_and_tokenizer(str(tmp_path))
    prompts = {"first": "The fox number 1", "late": "def add(a, b):", "later": "Write a response that"}

    def rows(events):
        return {
            name: Row(tokenizer(text)["input_ids"], 12, out=Recorded(name, events)) for name, text in prompts.items()
        }

    def tokens_of(events, name):
        return [item for who, item in events if who == name and isinstance(item, Token)]

    alone = []
    for row in rows(alone).values():
        decode_together(model, [row], end_ids=set())  # no end token: every row runs its 12 tokens
    together, rooms = [], []
    batch = rows(together)

    def admit(room):
        rooms.append(room)
        return [batch["late"], batch["later"]] if len(rooms) == 3 else []

    decode_together(model, [batch["first"]], end_ids=set(), admit=admit, max_rows=4)
    assert rooms[:3] == [3, 3, 3] and rooms[3] == 1, "asked after every step for the room left"
    first_done = together.index(("first", None))
    assert any(who == "late" for who, _ in together[:first_done]), "the late rows joined before the first ended"
    for name in prompts:
        joined, single = tokens_of(together, name), tokens_of(alone, name)
        assert [t.id for t in joined] == [t.id for t in single] and len(joined) == 12
        assert [t.logprob for t in joined] == pytest.approx([t.logprob for t in single], abs=1e-4)


@pytest.mark.parametrize("dtype, tied", [("float32", False), ("float16", False), ("float16", True)])
def test_prepacked_linear_layers_keep_the_models_outputs_and_make_rows_independent_of_their_batch(
    tmp_path, dtype, tied
):
    import torch

    from generation import pack_linear_layers
    from helpers import build_tiny_llama

    skip_without_packing_kernel(dtype)
    build_tiny_llama(tmp_path, initializer_range=0.3, tie_word_embeddings=tied)
    model, tokenizer = load_model_and_tokenizer(str(tmp_path), dtype=dtype)
    # float16 weights are multiplied in float32: compare with the same weights in a float32 model.
    reference = model if dtype == "float32" else load_model_and_tokenizer(str(tmp_path), dtype=dtype)[0].float()
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    ids = torch.tensor([tokenizer("The fox number 1 jumps over")["input_ids"]] * 8)
    ids[1:, 2:] = torch.randint(5, 100, (7, ids.shape[1] - 2))
    with torch.inference_mode():
        plain = reference(input_ids=ids).logits
        plain_text = complete_batch(reference, tokenizer, ["The fox number 1"], 16, do_sample=False)[0].text
        linears = sum(type(m) is torch.nn.Linear for m in model.modules())
        assert pack_linear_layers(model) == linears > 0
        packed = model(input_ids=ids).logits
        assert packed.dtype == torch.float32 and (packed - plain).abs().max() < 1e-4
        assert torch.equal(model(input_ids=ids[:1]).logits[0], packed[0]), "a row alone equals the row in a batch"
        for layer in (model.model.layers[0].self_attn.q_proj, model.lm_head):
            x = torch.randn(20, layer.in_features)
            whole = layer(x)  # fbgemm's kernels take a few rows at a time, and the last ones otherwise
            for rows in range(1, 20):
                assert torch.equal(layer(x[:rows]), whole[:rows]), f"{rows} rows"
        assert complete_batch(model, tokenizer, ["The fox number 1"], 16, do_sample=False)[0].text == plain_text
    assert model.state_dict().keys() == state.keys()
    for name, tensor in model.state_dict().items():  # in float16, all but the linear layers become float32
        assert torch.equal(tensor, state[name].to(tensor.dtype)), name
    layers = model.model.layers.modules()  # (a tied output layer's weight is the embedding's, now float32)
    assert {m.weight.dtype for m in layers if type(m) is torch.nn.Linear} == {getattr(torch, dtype)}


def test_a_client_that_goes_away_stops_its_generation(server, client):
    host, port = server.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    body = json.dumps({"prompt": "The fox", "max_tokens": 4000, "stream": True})
    connection.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    reply = connection.getresponse()
    assert reply.status == 200 and reply.readline().startswith(b"data: ")
    reply.close()
    connection.close()
    # 4,000 tokens take several seconds; the model is free again long before that.
    started = time.perf_counter()
    client.completions.create(model="tiny", prompt="next", max_tokens=1)
    assert time.perf_counter() - started < 2.0


@pytest.mark.slow
def test_ctrl_c_stops_the_server_while_it_generates(tiny_llama_dir):
    process, url = start_server(tiny_llama_dir)
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    body = json.dumps({"prompt": "The fox", "max_tokens": 4000, "stream": True})
    connection.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    reply = connection.getresponse()
    assert reply.status == 200 and reply.readline().startswith(b"data: ")
    process.send_signal(signal.SIGINT)
    # The generation stops at its next token, and its stream ends properly before the server exits.
    assert reply.read().endswith(b"data: [DONE]\n\n")
    stderr = process.communicate(timeout=60)[1]
    assert process.returncode == 0 and "Traceback" not in stderr and "terminate" not in stderr, stderr[-3000:]


@pytest.mark.slow
def test_ctrl_c_stops_an_idle_server(tiny_llama_dir):
    process, url = start_server(tiny_llama_dir)
    urllib.request.urlopen(url + "/v1/models", timeout=10).read()
    started = time.perf_counter()
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=60)[1]
    assert process.returncode == 0 and "Traceback" not in stderr and "terminate" not in stderr, stderr[-3000:]
    assert time.perf_counter() - started < 15, "it waited for requests that were not there"


def test_a_stopping_server_ends_its_streams_and_refuses_new_requests(tiny_llama_dir):
    model, tokenizer = load_model_and_tokenizer(str(tiny_llama_dir))
    with in_process_httpd(model, tokenizer) as httpd:
        connection = http.client.HTTPConnection("127.0.0.1", httpd.server_port, timeout=60)
        body = json.dumps({"prompt": "The fox", "max_tokens": 4000, "stream": True})
        connection.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        reply = connection.getresponse()
        assert reply.status == 200 and reply.readline().startswith(b"data: ")
        httpd.stopping.set()
        assert reply.read().endswith(b"data: [DONE]\n\n")
        late = http.client.HTTPConnection("127.0.0.1", httpd.server_port, timeout=60)
        late.request("POST", "/v1/completions", body=json.dumps({"prompt": "The fox"}))
        answer = late.getresponse()
        assert answer.status == 503 and "shutting down" in json.loads(answer.read())["error"]["message"]


def test_the_page_starts_at_the_servers_defaults(server):
    fields = {}

    class Inputs(html.parser.HTMLParser):
        def handle_starttag(self, tag, attrs):
            if tag == "input":
                fields[dict(attrs)["id"]] = dict(attrs).get("value")

    with urllib.request.urlopen(server + "/", timeout=60) as reply:
        Inputs().feed(reply.read().decode())
    # The server's --temperature, --top_p and --max_new_tokens, the API's defaults too.
    assert fields == {"temperature": "0", "top_p": "0.95", "max_tokens": "16"}


def test_generate_instruction_runs_against_the_server(server, tmp_path):
    # The tiny random model writes no usable tasks, so the filters drop everything; the run ends
    # after --max_requests: the point is that every request went through (several prompts per
    # completions request) and the files are valid.
    command = [
        sys.executable,
        "-m",
        "generate_instruction",
        "generate_instruction_following_data",
        "--output_dir",
        tmp_path,
        "--seed_tasks_path",
        ROOT / "seed_tasks.jsonl",
        "--prompt_path",
        ROOT / "prompt.txt",
        "--api_base",
        server + "/v1",
        "--model_name",
        "tiny",
        "--num_instructions_to_generate",
        2,
        "--request_batch_size",
        2,
        "--max_tokens",
        48,
        "--seed",
        0,
        "--max_requests",
        2,
        "--num_cpus",
        1,
    ]
    result = subprocess.run(
        list(map(str, command)),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, OPENAI_API_KEY="unused-by-a-local-server"),
    )
    summary = json.loads((tmp_path / "regen_summary.json").read_text())
    counts = summary["counts"]
    assert result.returncode == 0, result.stderr[-2000:]
    regen = json.loads((tmp_path / "regen.json").read_text())
    assert isinstance(regen, list) and len(regen) == summary["kept_total"]
    assert summary["api_style"] == "completions" and "does not take a list of prompts" not in result.stderr
    assert counts["requests"] == 2 and counts["prompt_tokens"] > 2 * 2 * 1000
    assert 0 < counts["completion_tokens"] <= 2 * 2 * 48
    assert not any(counts.get(kind) for kind in ("failed_requests", "malformed_responses", "retries"))


def post(server: str, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    host, port = server.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    reply = connection.getresponse()
    return reply.status, json.loads(reply.read())


@pytest.mark.parametrize(
    "path, body, status, message",
    [
        ("/v1/completions", b"{not json", 400, "not valid JSON"),
        ("/v1/completions", b"[1, 2]", 400, "must be a JSON object"),
        ("/v1/completions", b'{"max_tokens": 4}', 400, "'prompt' is required"),
        ("/v1/completions", b'{"prompt": [1, "a"]}', 400, "'prompt' is required"),
        ("/v1/completions", b'{"prompt": [[1, 2], []]}', 400, "'prompt' is required"),
        ("/v1/completions", b'{"prompt": [1, 99999]}', 400, "token ids outside the vocabulary"),
        ("/v1/completions", b'{"prompt": [-1]}', 400, "token ids outside the vocabulary"),
        ("/v1/completions", b'{"prompt": "hi", "logprobs": 21}', 400, "'logprobs' must be"),
        ("/v1/completions", b'{"prompt": "hi", "echo": "yes"}', 400, "'echo' must be"),
        ("/v1/completions", b'{"prompt": "hi", "stream_options": 1}', 400, "'stream_options' must be"),
        ("/v1/completions", b"[" * 100_000, 400, "not valid JSON"),
        ("/v1/completions", b'{"prompt": ""}', 400, "prompt 0 is empty"),
        ("/v1/completions", b'{"prompt": ["hi", ""]}', 400, "prompt 1 is empty"),
        ("/v1/completions", b'{"prompt": "hi", "temperature": "hot"}', 400, "'temperature' must be"),
        (
            "/v1/completions",
            b'{"prompt": "hi", "temperature": 1, "top_p": NaN}',
            400,
            "'top_p' must be a finite number",
        ),
        ("/v1/completions", b'{"prompt": "hi", "max_tokens": 0}', 400, "'max_tokens' must be"),
        ("/v1/completions", b'{"prompt": "hi", "n": 1000}', 400, "'n' must be"),
        ("/v1/completions", b'{"prompt": "hi", "stop": [1]}', 400, "'stop' must be"),
        (
            "/v1/completions",
            json.dumps({"prompt": "fox " * 9000}).encode(),
            400,
            "maximum context length is 4096 tokens",
        ),
        ("/v1/chat/completions", b'{"model": "tiny"}', 400, "'messages' is required"),
        ("/v1/chat/completions", b'{"messages": [{"role": "system", "content": "x"}]}', 400, "no message with role"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": 5}]}', 400, "'content' must be"),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}',
            400,
            "'top_logprobs' needs 'logprobs'",
        ),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "hi"}], "logprobs": true, "top_logprobs": 21}',
            400,
            "'top_logprobs' must be",
        ),
        ("/v1/nothing", b"{}", 404, "no such path"),
    ],
)
def test_bad_requests_get_4xx_with_a_message(server, path, body, status, message):
    code, reply = post(server, path, body)
    assert code == status and message in reply["error"]["message"]


def test_other_methods_are_not_allowed(server):
    host, port = server.removeprefix("http://").split(":")
    for method in ("PUT", "DELETE", "PATCH"):
        connection = http.client.HTTPConnection(host, int(port), timeout=60)
        connection.request(method, "/v1/completions", body=b"{}")
        reply = connection.getresponse()
        assert reply.status == 405 and "use GET or POST" in json.loads(reply.read())["error"]["message"]


def test_oversized_body_and_client_errors_through_openai(server, client):
    code, reply = post(server, "/v1/completions", b"{}", headers={"Content-Length": str(10**8)})
    assert code == 413 and "at most" in reply["error"]["message"]
    import openai

    with pytest.raises(openai.BadRequestError, match="maximum context length is 4096 tokens") as error:
        client.completions.create(model="tiny", prompt="fox " * 9000, max_tokens=4)
    assert error.value.code == "context_length_exceeded"
    assert client.completions.create(model="tiny", prompt="still alive", max_tokens=2).choices[0].text is not None


@pytest.mark.browser
def test_web_page_in_a_headless_browser(server, served_dir):
    if not (os.path.exists("/usr/bin/chromium") and os.path.exists("/usr/bin/chromedriver")):
        message = "Debian chromium and chromium-driver are not installed (/usr/bin/chromium, /usr/bin/chromedriver)"
        if os.environ.get("ALPACA_REQUIRE_SHARED") == "1":
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    for flag in [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
    ]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService("/usr/bin/chromedriver"))
    try:
        driver.get(server + "/")
        # The fields start at the server's flags, which the response below is generated with.
        fields = {
            name: driver.find_element(By.ID, name).get_attribute("value")
            for name in ("temperature", "top_p", "max_tokens")
        }
        assert fields == {"temperature": "0", "top_p": "0.95", "max_tokens": "16"}
        instruction, input = INSTRUCTIONS[3]
        driver.find_element(By.ID, "instruction").send_keys(instruction)
        driver.find_element(By.ID, "input").send_keys(input)
        driver.find_element(By.ID, "generate").click()
        response = driver.find_element(By.ID, "response")
        WebDriverWait(driver, 60).until(lambda _: response.get_attribute("data-state") in ("done", "error"))
        assert response.get_attribute("data-state") == "done", response.text
        expected = reference_response(served_dir, instruction, input, max_new_tokens=16)
        # The browser normalises the text it shows; compare what it shows with what it was sent.
        shown = driver.execute_script("return document.getElementById('response').textContent")
        assert shown and shown == expected
        assert driver.find_element(By.ID, "model").text == served_dir.name
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


# --- log-probabilities, echo, token ids, usage in streams --------------------------------------


def direct_logprobs(tiny, ids: list[int]) -> list[float]:
    """Each token's log-probability given those before it, from one plain forward pass."""
    import torch

    model, _ = tiny
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits[:-1], dim=-1)
    return logprobs.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def test_echo_and_logprobs_of_a_token_id_prompt(client, tiny):
    model, tokenizer = tiny
    ids = tokenizer("The quick brown fox jumps over the lazy dog")["input_ids"]
    expected = direct_logprobs(tiny, ids)
    response = client.completions.create(model="tiny", prompt=ids, max_tokens=1, logprobs=3, echo=True, temperature=0)
    choice = response.choices[0]
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(ids) + 1 and logprobs.token_logprobs[0] is None
    assert logprobs.top_logprobs[0] is None and all(len(top) <= 3 for top in logprobs.top_logprobs[1:])
    assert logprobs.token_logprobs[1 : len(ids)] == pytest.approx(expected, abs=1e-4)
    assert choice.text.startswith(tokenizer.decode(ids)) and logprobs.text_offset[0] == 0
    # The generated token is the greedy one: at least as likely as each alternative (alternatives
    # are keyed by text, and byte tokens share one, so the best may be listed under another).
    assert logprobs.token_logprobs[-1] >= max(logprobs.top_logprobs[-1].values()) - 1e-6
    assert response.usage.prompt_tokens == len(ids)

    # Text and token ids are the same prompt; lists of lists are several prompts.
    by_text = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=6)
    by_ids = client.completions.create(
        model="tiny", prompt=[tokenizer("The quick brown fox")["input_ids"], ids], max_tokens=6
    )
    assert by_ids.choices[0].text == by_text.choices[0].text and len(by_ids.choices) == 2

    # Echo alone (no new token) is how the prompt's log-probabilities are asked for.
    only = client.completions.create(model="tiny", prompt=ids, max_tokens=0, logprobs=0, echo=True)
    assert only.choices[0].logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert only.usage.completion_tokens == 0


def test_chat_logprobs_and_usage_in_streams(client):
    messages = [{"role": "user", "content": INSTRUCTIONS[0][0]}]
    response = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=6, logprobs=True, top_logprobs=5
    )
    content = response.choices[0].logprobs.content
    assert content and all(len(entry.top_logprobs) == 5 for entry in content)
    for entry in content:  # greedy: each token is its position's best
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-6)
        assert entry.bytes == list(entry.token.encode())

    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=6, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == response.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == response.choices[0].message.content

    chunks = list(
        client.completions.create(
            model="tiny",
            prompt="The cat",
            max_tokens=5,
            stream=True,
            logprobs=2,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage.prompt_tokens > 0 and chunks[-1].usage.completion_tokens <= 5
    assert sum(len(c.choices[0].logprobs.tokens) for c in chunks[:-1]) >= chunks[-1].usage.completion_tokens


def test_the_chat_template_formats_chat_requests_when_the_tokenizer_has_one(served_dir):
    model, tokenizer = load_model_and_tokenizer(str(served_dir))
    tokenizer.chat_template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant]"
    with in_process_server(model, tokenizer) as client:
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
        chat = client.chat.completions.create(model="t", messages=messages, max_tokens=8, extra_body={"input": "there"})
    ids = tokenizer("[system] Be brief.\n[user] Hi\n[user] there\n[assistant]", add_special_tokens=False)["input_ids"]
    expected = complete_batch(model, tokenizer, [tokenizer.decode(ids)], 8)[0]
    assert chat.choices[0].message.content == expected.text.strip()
    assert chat.usage.prompt_tokens == len(ids)


# --- load and malformed input -----------------------------------------------------------------


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def one_client_session(url: str, number: int) -> list[str]:
    """A few requests of one client: plain, streamed, and streamed then dropped. Returns the
    problems seen (a 5xx, a malformed reply)."""
    host, port = url.removeprefix("http://").split(":")
    problems = []
    for turn in range(3):
        kind = (number + turn) % 3
        body = {"prompt": f"The fox {number} {turn}", "max_tokens": 4 + number % 5, "stream": kind > 0}
        connection = http.client.HTTPConnection(host, int(port), timeout=120)
        connection.request(
            "POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"}
        )
        reply = connection.getresponse()
        if reply.status != 200:
            problems.append(f"status {reply.status}")
        elif kind == 0:
            data = json.loads(reply.read())
            if not (isinstance(data["choices"][0]["text"], str) and data["usage"]["total_tokens"] > 0):
                problems.append(f"malformed {data}")
        elif kind == 1:
            events = reply.read().decode().strip().split("\n\n")
            if events[-1] != "data: [DONE]" or not all(e.startswith("data: {") for e in events[:-1]):
                problems.append(f"malformed stream {events[-2:]}")
            for event in events[:-1]:
                if "error" in json.loads(event.removeprefix("data: ")):
                    problems.append(event)
        else:
            reply.readline()  # the first event, then hang up mid-stream
        connection.close()
    return problems


@pytest.mark.slow
def test_under_load_no_5xx_no_deadlock_and_memory_flat(served_dir):
    # 216 requests from 32 clients, a third of them dropped mid-stream; all 32 may share a batch.
    process, url = start_server(served_dir, "--max_new_tokens", 16, "--batch_size", 32)
    drain_stderr(process)
    try:
        with ThreadPoolExecutor(32) as pool:
            assert sum(pool.map(lambda n: one_client_session(url, n), range(32)), []) == []
        before = rss_kib(process.pid)
        with ThreadPoolExecutor(32) as pool:
            assert sum(pool.map(lambda n: one_client_session(url, n), range(32, 72)), []) == []
        assert rss_kib(process.pid) - before < 64 * 1024  # KiB: no growth with the number of requests
        with urllib.request.urlopen(url + "/v1/models", timeout=30) as reply:
            assert reply.status == 200
    finally:
        process.terminate()
        process.wait(timeout=30)


def malformed_bodies() -> list[bytes]:
    good = {"prompt": "The fox", "max_tokens": 2}
    text = json.dumps(good).encode()
    bodies = [text[:cut] for cut in range(len(text) - 1)]  # truncated JSON
    bodies += [b"\xff\xfe" + text, text.replace(b"fox", b"\xc3\x28"), b"[" * 5000 + b"]" * 5000, b"null", b'"x"']
    bad_values = ["x", -1, 10**30, 1e308, [], {}, True, [1.5], None, "NaN"]
    for field in ("prompt", "max_tokens", "temperature", "top_p", "n", "stop", "logprobs", "echo", "seed", "stream"):
        for value in bad_values:
            body = dict(good, **{field: value}, unknown_field={"deep": [1, 2]})
            if (value is None and field != "prompt") or (value == 10**30 and field in ("max_tokens", "seed")):
                continue  # null is the default; a huge max_tokens is valid (cut to the context), but slow
            bodies.append(json.dumps(body).encode())
    bodies += [text.replace(b"2}", b"NaN}"), text.replace(b"2}", b"Infinity}"), text.replace(b"2}", b"1e999}")]
    bodies += [json.dumps(dict(good, prompt=[[1, 2], "a"])).encode(), json.dumps(dict(good, prompt=[10**9])).encode()]
    for field, value in [("messages", "hi"), ("messages", [{"role": "user"}]), ("messages", [[]]), ("top_logprobs", 3)]:
        bodies.append(json.dumps({"messages": [{"role": "user", "content": "hi"}], field: value}).encode())
    random.Random(0).shuffle(bodies)
    return bodies


def test_malformed_bodies_get_4xx_and_the_server_keeps_serving(server, client):
    host, port = server.removeprefix("http://").split(":")
    bodies = malformed_bodies()
    assert len(bodies) > 100
    paths = ["/v1/completions"] * len(bodies)
    for index, body in enumerate(bodies):
        if b"messages" in body:
            paths[index] = "/v1/chat/completions"
    refused = []
    for path, body in zip(paths, bodies):
        connection = http.client.HTTPConnection(host, int(port), timeout=60)
        connection.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        reply = connection.getresponse()
        data = reply.read()
        connection.close()
        # Some mutations are still valid requests (a huge max_tokens is cut to the context).
        if reply.status == 200:
            continue
        refused.append(body)
        assert 400 <= reply.status < 500, (reply.status, body[:200], data[:300])
        assert json.loads(data)["error"]["message"]
    assert len(refused) > 0.8 * len(bodies)
    assert client.completions.create(model="tiny", prompt="still serving", max_tokens=2).choices[0].text is not None
    with socket.create_connection((host, int(port)), timeout=30):
        pass
