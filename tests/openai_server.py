"""A local HTTP server that speaks the part of the OpenAI API the generator uses, for tests and
benchmarks: `POST /v1/completions` (one prompt or a list), `POST /v1/chat/completions` and
`GET /v1/models`, with OpenAI's JSON shapes and error bodies.

It is a real server (stdlib `http.server`, one thread per connection, on 127.0.0.1, port chosen
by the OS) so that the real `openai` client talks to it over real sockets. Behaviour:

- Completions are deterministic: the default writer continues a self-instruct prompt with
  numbered tasks made of pseudo-words seeded by the prompt text, up to task 25, and the server
  applies `stop` and `max_tokens` (whitespace tokens) as a real one would.
- `latency` seconds (plus up to `latency_jitter`, drawn at random) are added to every answer;
  `api_key` turns on bearer-key checking (401, quoting the key presented); `models` lists the known models (others get
  OpenAI's 404 `model_not_found`); `routes` can drop the completions or chat route (404, as for
  a chat-only model); `max_context` makes requests whose prompt plus `max_tokens` exceed it fail
  with a context-length 400 (`context_message`: "openai" or "vllm" wording); `accepts_prompt_list=False` refuses a list of prompts (422,
  as servers that take one prompt per request do); `prompt_list_as_array=True` answers a list of
  prompts as older llama.cpp servers did: a JSON array of completion objects, one per prompt;
  `llama_cpp=True` answers as today's llama.cpp server does: a list of prompts in one object with
  one choice per prompt whose `usage` counts only the first prompt, with llama.cpp's `timings`
  object and a `system_fingerprint` of "b" + build number.
- `logprobs(prompt, model)` gives the top logprobs ({token: logprob}) of an answer's first token
  (the whole answer is one token), sent when a request asks for logprobs, in the completions or
  the chat API's shape; `refuse_logprobs=True` refuses such a request with a 400, as
  `inference.py --serve` does.
- `inject(kind, times)` makes the next `times` requests fail in one of the ways of `FAILURES`.
- Every request is recorded in `requests` (path, JSON body, authorization header, time).

Usage:
    with OpenAIServer(latency=0.2) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="x")
"""

import hashlib
import http.server
import json
import random
import re
import threading
import time
from collections.abc import Callable

# kind -> what the next request gets
FAILURES = {
    "rate_limit": "429 with a Retry-After header (option retry_after, seconds; quota=True: OpenAI's insufficient_quota)",
    "server_error": "500 with an OpenAI error body",
    "hang": "no answer for `seconds` (default 30), then the normal answer",
    "drop": "the connection is closed without an answer",
    "malformed": "200 with a body that is not JSON",
    "missing_choices": "200 with JSON that has no choices",
    "empty": "200 with empty completion texts",
    "length": "the normal texts cut in half with finish_reason 'length'",
    "unauthorized": "401 invalid_api_key",
    "bad_request": "400 invalid_request_error",
    "none": "the normal answer (to place a failure after some good answers)",
}

_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
_VERBS = ["Describe", "Explain", "Summarize", "Classify", "Compose", "List", "Suggest", "Compare", "Rewrite", "Outline"]


def _pseudo_words(rng: random.Random, count: int) -> str:
    """Words of two or three syllables: about 250,000 possible words, so random sentences share
    almost none, and none is a real English word the generator's filters care about."""
    return " ".join("".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 3)))) for _ in range(count))


def self_instruct_writer(prompt: str, model: str) -> str:
    """Continue a self-instruct prompt (which ends with "N. Instruction:") with tasks N..25 in the
    original format, separated by "###". Every third task's output mentions "in 2020." and "$20."
    so that stop sequences which fire inside content show up. Deterministic in (prompt, model)."""
    tail = prompt.rstrip().rsplit("\n", 1)[-1]
    first = int(tail.split(".", 1)[0]) if tail.split(".", 1)[0].isdigit() else 1
    rng = random.Random(hashlib.sha256(f"{model}\n{prompt}".encode()).digest())
    blocks = []
    for number in range(first, 26):
        instruction = f"{rng.choice(_VERBS)} {_pseudo_words(rng, rng.randint(6, 12))}."
        task_input = "<noinput>" if rng.random() < 0.5 else _pseudo_words(rng, rng.randint(3, 10))
        output = _pseudo_words(rng, rng.randint(5, 15)) + "."
        if number % 3 == 0:
            output += " It cost $20. It happened in 2020."
        head = "" if number == first else f"{number}. Instruction:"
        blocks.append(f"{head} {instruction}\n{number}. Input:\n{task_input}\n{number}. Output:\n{output}\n")
    return "###\n".join(blocks)


def judged_pair(prompt: str) -> tuple[str, str, str]:
    """(instruction, first response, second response) of a prompt made from the project's judge
    template (configs/judge_prompt.txt), for writers that play a judge."""
    match = re.search(r"Request:\n(.*?)\n\nExtra input.*?\nAnswer 1:\n(.*?)\n\nAnswer 2:\n(.*?)\n\nWhich", prompt, re.S)
    if match is None:
        raise ValueError("not a judge prompt")
    return match[1], match[2], match[3]


class OpenAIServer:
    """A threaded OpenAI-compatible test server; see the module docstring."""

    def __init__(
        self,
        writer: Callable[[str, str], str] = self_instruct_writer,
        latency: float = 0.0,
        latency_jitter: float = 0.0,
        api_key: str | None = None,
        models: tuple[str, ...] = ("test-model",),
        routes: tuple[str, ...] = ("completions", "chat"),
        max_context: int | None = None,
        accepts_prompt_list: bool = True,
        chat_repeats_prefix: bool = True,
        prompt_list_as_array: bool = False,
        context_message: str = "openai",
        llama_cpp: bool = False,
        logprobs: Callable[[str, str], dict[str, float]] | None = None,
        refuse_logprobs: bool = False,
    ):
        self.writer = writer
        self.latency = latency
        self.latency_jitter = latency_jitter
        self.api_key = api_key
        self.models = models
        self.routes = routes
        self.max_context = max_context
        self.accepts_prompt_list = accepts_prompt_list
        # Chat models tend to restate "N. Instruction:" before continuing the list.
        self.chat_repeats_prefix = chat_repeats_prefix
        self.prompt_list_as_array = prompt_list_as_array
        self.context_message = context_message
        self.llama_cpp = llama_cpp
        self.logprobs = logprobs
        self.refuse_logprobs = refuse_logprobs
        self.requests: list[dict] = []
        self._failures: list[tuple[str, dict]] = []
        self._lock = threading.Lock()
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def start(self) -> "OpenAIServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> "OpenAIServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def inject(self, kind: str, times: int = 1, **options) -> None:
        """Make the next `times` requests fail as `kind` (a key of FAILURES)."""
        if kind not in FAILURES:
            raise ValueError(f"unknown failure {kind!r}; known: {sorted(FAILURES)}")
        with self._lock:
            self._failures.extend([(kind, options)] * times)

    def completions_requests(self) -> list[dict]:
        """Recorded requests to either generation route."""
        return [r for r in self.requests if r["path"].endswith("completions")]

    def _next_failure(self) -> tuple[str | None, dict]:
        with self._lock:
            return self._failures.pop(0) if self._failures else (None, {})

    def _handler_class(self):
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in two writes: without TCP_NODELAY, Nagle's algorithm and
            # the client's delayed ACK add about 40 ms to every answer (real servers set it too).
            disable_nagle_algorithm = True

            def log_message(self, *args):  # keep test output clean
                pass

            def handle(self):
                try:
                    super().handle()
                except ConnectionResetError:
                    pass  # the client went away between requests (a generator killed or interrupted)

            def do_GET(self):
                if self.path.rstrip("/") == "/v1/models":
                    data = [{"id": m, "object": "model", "created": 0, "owned_by": "test"} for m in server.models]
                    return self._send(200, {"object": "list", "data": data})
                self._send(404, _error("Not Found", "invalid_request_error", None))

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    request = json.loads(body)
                except json.JSONDecodeError:
                    return self._send(
                        400, _error("We could not parse the JSON body of your request.", "invalid_request_error", None)
                    )
                with server._lock:
                    server.requests.append(
                        {
                            "path": self.path,
                            "body": request,
                            "authorization": self.headers.get("Authorization"),
                            "time": time.monotonic(),
                        }
                    )
                route = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}.get(self.path)
                if route is None or route not in server.routes:
                    return self._send(
                        404,
                        _error(
                            "This is a chat model and not supported in the v1/completions endpoint.",
                            "invalid_request_error",
                            None,
                        ),
                    )
                if server.api_key is not None and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    # Some servers and proxies quote the key they were given: the client must not show it.
                    presented = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
                    return self._send(
                        401,
                        _error(f"Incorrect API key provided: {presented}.", "invalid_request_error", "invalid_api_key"),
                    )
                kind, options = server._next_failure()
                time.sleep(server.latency + random.uniform(0, server.latency_jitter))
                if kind == "hang":
                    time.sleep(options.get("seconds", 30.0))
                elif kind == "drop":
                    self.close_connection = True
                    return
                elif kind == "rate_limit":
                    retry_after = str(options.get("retry_after", 1))
                    if options.get("quota"):
                        return self._send(
                            429, _error("You exceeded your current quota.", "insufficient_quota", "insufficient_quota")
                        )
                    return self._send(
                        429,
                        _error("Rate limit reached.", "requests", "rate_limit_exceeded"),
                        {"Retry-After": retry_after},
                    )
                elif kind == "server_error":
                    return self._send(
                        500, _error("The server had an error while processing your request.", "server_error", None)
                    )
                elif kind == "unauthorized":
                    return self._send(
                        401, _error("Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
                    )
                elif kind == "bad_request":
                    return self._send(400, _error("Invalid value for 'top_p'.", "invalid_request_error", None))
                elif kind == "malformed":
                    return self._send_raw(200, b'{"id": "cmpl-1", "choices": [{"text": "1. Instr')
                elif kind == "missing_choices":
                    return self._send(
                        200, {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": request.get("model")}
                    )
                if request.get("model") not in server.models:
                    message = f"The model `{request.get('model')}` does not exist or you do not have access to it."
                    return self._send(404, _error(message, "invalid_request_error", "model_not_found"))
                if route == "completions":
                    prompts = request.get("prompt")
                    if isinstance(prompts, list) and not server.accepts_prompt_list:
                        return self._send(422, _error("prompt must be a string", "invalid_request_error", None))
                    prompts = prompts if isinstance(prompts, list) else [prompts]
                else:
                    prompts = [request["messages"][-1]["content"]]
                wants_logprobs = bool(request.get("logprobs"))
                if wants_logprobs and server.refuse_logprobs:
                    return self._send(
                        400, _error("'logprobs' is not supported by this server", "invalid_request_error", None)
                    )
                prompt_tokens = sum(len(p.split()) for p in prompts)
                max_tokens = int(request.get("max_tokens") or 16)
                if (
                    server.max_context is not None
                    and max(len(p.split()) for p in prompts) + max_tokens > server.max_context
                ):
                    message = _context_length_message(
                        server.context_message, server.max_context, max(len(p.split()) for p in prompts), max_tokens
                    )
                    return self._send(400, _error(message, "invalid_request_error", "context_length_exceeded"))
                outputs = [
                    _finish(server.writer(p, request["model"]), request.get("stop"), max_tokens) for p in prompts
                ]
                if kind == "empty":
                    outputs = [("", "stop") for _ in outputs]
                elif kind == "length":
                    outputs = [(text[: len(text) // 2], "length") for text, _ in outputs]
                completion_tokens = sum(len(text.split()) for text, _ in outputs)
                usage = {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                }
                top = [
                    server.logprobs(p, request["model"]) if wants_logprobs and server.logprobs else None
                    for p in prompts
                ]
                if server.llama_cpp and route == "completions":
                    # llama.cpp's usage counts only the first prompt of a list.
                    used, written = len(prompts[0].split()), len(outputs[0][0].split())
                    usage = {"prompt_tokens": used, "completion_tokens": written, "total_tokens": used + written}
                if route == "completions":
                    choices = [
                        {"text": t, "index": i, "logprobs": _completions_logprobs(t, alternatives), "finish_reason": f}
                        for i, ((t, f), alternatives) in enumerate(zip(outputs, top))
                    ]
                    payload = {
                        "id": "cmpl-test",
                        "object": "text_completion",
                        "created": int(time.time()),
                        "model": request["model"],
                    }
                    if server.prompt_list_as_array and isinstance(request.get("prompt"), list):
                        # llama-server: one whole completion object per prompt, usage split likewise.
                        per_prompt = []
                        for prompt, choice in zip(prompts, choices):
                            used, written = len(prompt.split()), len(choice["text"].split())
                            usage = {
                                "prompt_tokens": used,
                                "completion_tokens": written,
                                "total_tokens": used + written,
                            }
                            per_prompt.append({**payload, "choices": [choice], "usage": usage})
                        return self._send(200, per_prompt)
                else:
                    ((text, finish),) = outputs
                    if server.chat_repeats_prefix:
                        text = prompts[0].rstrip().rsplit("\n", 1)[-1] + text
                    choices = [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "logprobs": _chat_logprobs(text, top[0]),
                            "finish_reason": finish,
                        }
                    ]
                    payload = {
                        "id": "chatcmpl-test",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": request["model"],
                    }
                if server.llama_cpp:
                    payload["system_fingerprint"] = "b4567-1a2b3c4d"
                    payload["timings"] = {"prompt_n": usage["prompt_tokens"], "predicted_n": usage["completion_tokens"]}
                self._send(200, {**payload, "choices": choices, "usage": usage})

            def _send(self, status: int, payload: dict | list, headers: dict | None = None):
                self._send_raw(status, json.dumps(payload).encode(), headers)

            def _send_raw(self, status: int, body: bytes, headers: dict | None = None):
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout); nothing to answer

        return Handler


def _completions_logprobs(text: str, alternatives: dict[str, float] | None) -> dict | None:
    """The completions API's logprobs of an answer that is one token."""
    if alternatives is None:
        return None
    chosen = alternatives.get(text, min(alternatives.values(), default=0.0))
    return {"tokens": [text], "token_logprobs": [chosen], "top_logprobs": [alternatives], "text_offset": [0]}


def _chat_logprobs(text: str, alternatives: dict[str, float] | None) -> dict | None:
    """The chat API's logprobs of an answer that is one token."""
    if alternatives is None:
        return None
    top = [{"token": token, "logprob": logprob, "bytes": None} for token, logprob in alternatives.items()]
    chosen = alternatives.get(text, min(alternatives.values(), default=0.0))
    return {"content": [{"token": text, "logprob": chosen, "bytes": None, "top_logprobs": top}]}


def _error(message: str, kind: str, code: str | None) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _context_length_message(style: str, context: int, prompt_tokens: int, max_tokens: int) -> str:
    """The 400 message of OpenAI or of vLLM (current wording) for a prompt plus max_tokens that
    exceed the context."""
    if style == "vllm":
        if prompt_tokens >= context:
            return (
                f"This model's maximum context length is {context} tokens. However, your request has "
                f"{prompt_tokens} input tokens. Please reduce the length of the input messages."
            )
        return (
            f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's maximum context "
            f"length is {context} tokens and your request has {prompt_tokens} input tokens "
            f"({max_tokens} > {context} - {prompt_tokens})."
        )
    return (
        f"This model's maximum context length is {context} tokens, however you requested {prompt_tokens + max_tokens} "
        f"tokens ({prompt_tokens} in your prompt; {max_tokens} for the completion). Please reduce your prompt; or completion length."
    )


def _finish(text: str, stop: list[str] | str | None, max_tokens: int) -> tuple[str, str]:
    """Apply stop sequences (cut before the first one; finish_reason "stop") and max_tokens
    (whitespace tokens; finish_reason "length") as a real server does."""
    for sequence in [stop] if isinstance(stop, str) else stop or []:
        text = text.split(sequence, 1)[0]
    words = list(re.finditer(r"\S+", text))
    if len(words) > max_tokens:
        return (text[: words[max_tokens - 1].end()] if max_tokens > 0 else ""), "length"
    return text, "stop"
