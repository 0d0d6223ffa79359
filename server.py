"""The HTTP server behind `inference.py --serve`: the OpenAI completions and chat API (with
log-probabilities, echo, token-id prompts and usage in streams) and a small web page
(server_page.html, beside this file).

One scheduler owns the model, on the main thread (`inference.py --serve`) or a thread of its
own (a server inside another program, as in the tests). Requests are parsed in their own threads
and handed to it as rows (one per prompt and choice); rows are generated together in one left-padded batch
(generation.decode_together) that new rows join after any step while it has room (continuous
batching), and each request reads its rows' tokens as they come. The standard library's
http.server does the HTTP: per request it costs well under a millisecond against tens of
milliseconds per generated token (see docs/inference.md#throughput).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import math
import os
import queue
import signal
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from generation import (
    Row,
    Token,
    complete_batch,
    context_length,
    decode_together,
    decoding_kwargs,
    end_token_ids,
    stripped,
    text_pieces,
)
from utils import UsageError, format_prompt

MAX_BODY_BYTES = 1 << 20
MAX_N = 16
MAX_TOP_LOGPROBS = 20
PAGE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "server_page.html")


def render_page(**fields: float) -> bytes:
    """The web page with its fields (`{{name}}` in server_page.html) starting at the given values."""
    with open(PAGE_FILE, encoding="utf-8") as f:
        page = f.read()
    for name, value in fields.items():
        page = page.replace("{{" + name + "}}", f"{value:g}")
    return page.encode()


class RequestError(Exception):
    """A request the server refuses, with the HTTP status to answer."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST, code: str | None = None):
        super().__init__(message)
        self.status, self.code = status, code


def get_field(
    body: dict, name: str, kind: type | tuple, default: Any, low: float | None = None, high: float | None = None
) -> Any:
    """`body[name]` checked for type and range, or `default` when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise RequestError(f"'{name}' must be {expected}, got {json.dumps(value)[:100]}")
    if isinstance(value, float) and not math.isfinite(value):  # Python's JSON parser reads NaN and Infinity
        raise RequestError(f"'{name}' must be a finite number, got {value}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise RequestError(f"'{name}' must be {bounds}, got {value}")
    return value


def message_text(content: Any) -> str:
    """The text of a chat message's content: a string, or a list of `{type: text, text}` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in content):
        return "".join(part["text"] for part in content)
    raise RequestError("a message's 'content' must be a string or a list of text parts")


def is_token_list(value: Any) -> bool:
    return (
        isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


# ---------------------------------------------------------------------------------------------
# The scheduler: one thread, one model, requests that wait generated together


NOTHING = object()  # the scheduler holds no job back


class Scheduler:
    """The one thread that runs the model (its own thread, or the caller's with `run`). It
    generates submitted rows in one batch of at most `batch_size` rows, from several requests
    (one request's rows always go together): rows waiting when a batch starts go in it, and
    later ones join it after any step while there is room (continuous batching). Work that needs
    the model to itself (beam search) is a job of its own, run between batches in the order it
    came. Once `stopping` is set, the rows still waiting end at once and `run` returns."""

    def __init__(
        self,
        model,
        tokenizer,
        batch_size: int,
        stopping: threading.Event,
        thread: bool = True,
        step: Callable | None = None,
    ):
        self.model, self.batch_size, self.stopping, self.step = model, batch_size, stopping, step
        self.end_ids = end_token_ids(model, tokenizer)[0]
        # Jobs: a list of rows, a (work, future) pair for run_alone, or None to stop.
        self.jobs: queue.Queue = queue.Queue()
        self.held: Any = NOTHING  # a job taken from the queue that cannot join the running batch
        self.thread = threading.Thread(target=self.run, daemon=True, name="scheduler") if thread else None
        if self.thread is not None:
            self.thread.start()

    def submit(self, rows: list[Row]) -> None:
        self.jobs.put(rows)

    def run_alone(self, work: Callable[[], Any]) -> Any:
        """`work()` run on the scheduler's thread with the model to itself, once the batch before
        it has ended (the jobs after it wait); its result, or its exception raised here."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.jobs.put((work, future))
        return future.result()

    def close(self) -> None:
        """End the scheduler's thread, if it has one."""
        if self.thread is not None:
            self.jobs.put(None)
            self.thread.join()

    def next_job(self) -> Any:
        """The next job (the one held back first), waiting for one; None once `stopping` is set
        and none waits. It polls rather than wait for a job to stop it, because a signal
        handler cannot safely put one on the queue."""
        if self.held is not NOTHING:
            job, self.held = self.held, NOTHING
            return job
        while True:
            try:
                return self.jobs.get(timeout=0.1)
            except queue.Empty:
                if self.stopping.is_set():
                    return None

    def admit(self, room: int) -> list[Row]:
        """The rows of the jobs already waiting that fit in `room` rows, in order: a job that does
        not fit, or is no rows, is held back, and the jobs behind it wait with it."""
        rows: list[Row] = []
        while True:
            if self.held is NOTHING:
                try:
                    self.held = self.jobs.get_nowait()
                except queue.Empty:
                    break
            if not isinstance(self.held, list) or len(rows) + len(self.held) > room:
                break
            rows += self.held
            self.held = NOTHING
        return rows

    def run(self) -> None:
        while (job := self.next_job()) is not None:
            if isinstance(job, tuple):
                work, future = job
                try:
                    future.set_result(work())
                except Exception as error:  # raised in the thread that asked
                    future.set_exception(error)
                continue
            rows = job + self.admit(self.batch_size - len(job))
            if self.stopping.is_set():
                for row in rows:
                    row.out.put(None)
                continue
            try:
                decode_together(self.model, rows, self.end_ids, self.stopping, self.admit, self.batch_size, self.step)
            except Exception:  # the rows' requests report it; the scheduler goes on
                traceback.print_exc()


class InferenceServer(ThreadingHTTPServer):
    """The model, its tokenizer and its scheduler, behind an HTTP server."""

    daemon_threads = True
    # socketserver's default backlog of 5 makes the kernel reset connections when many clients
    # connect at once (the generator and evaluate.py keep 8 or more in flight).
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        model,
        tokenizer,
        model_id: str,
        max_new_tokens: int,
        batch_size: int,
        defaults: dict,
        scheduler_thread: bool = True,
        step: Callable | None = None,
    ):
        """With `scheduler_thread` False, the model runs on the thread that calls
        `serve_until_stopped`, and the HTTP on another. With `step` (onnx_decode.DecodeStep), the
        tokens after the prompts go through it instead of the model."""
        super().__init__(address, RequestHandler)
        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.max_new_tokens, self.batch_size, self.defaults = max_new_tokens, batch_size, defaults
        self.vocab_size = model.get_input_embeddings().num_embeddings
        # The page's fields start at the defaults of the API, this server's flags.
        self.page = render_page(temperature=defaults["temperature"], top_p=defaults["top_p"], max_tokens=max_new_tokens)
        self.stopping = threading.Event()
        self.scheduler = Scheduler(model, tokenizer, batch_size, self.stopping, scheduler_thread, step)
        self.busy = threading.Condition()
        self.requests_in_flight = 0

    def serve_until_stopped(self) -> None:
        """Serve HTTP on a thread of its own and run the model on this one until `stopping` is
        set, then finish the requests in flight. The model belongs on the main thread: PyTorch's
        OpenMP workers then spin between operations, as they do for the one team of threads
        that a process starts with. A second thread's team makes more threads than cores here,
        and OpenMP then puts them to sleep between operations, which made each token about 30%
        slower on the 2-core sandbox (docs/inference.md#throughput)."""
        assert self.scheduler.thread is None, "the scheduler runs on a thread of its own already"
        http = threading.Thread(target=self.serve_forever, daemon=True, name="http")
        http.start()
        try:
            self.scheduler.run()
        finally:
            self.shutdown()
            http.join()
            self.stop_generating()

    def stop_generating(self) -> None:
        """Stop the generations in flight at their next token and wait until their requests have
        answered, for a thread that frees tensors while Python exits aborts the process."""
        self.stopping.set()
        self.scheduler.close()
        deadline = time.monotonic() + 30
        while True:
            with self.busy:
                if self.requests_in_flight == 0 or time.monotonic() > deadline:
                    return
            self.scheduler.run()  # the rows of requests still in flight end at once


# ---------------------------------------------------------------------------------------------
# One request's rows: tokens in, text and log-probabilities out


class Choice:
    """Reads one row's output: the echoed prompt (when asked), then text pieces as they become
    final, keeping the log-probabilities of the tokens read."""

    def __init__(self, row: Row, tokenizer, stop: Sequence[str], end_ids: set[int], eos_ids: set[int]):
        self.row, self.tokenizer, self.stop = row, tokenizer, stop
        self.end_ids, self.eos_ids = end_ids, eos_ids
        self.prompt: list[Token] = []
        self.tokens: list[Token] = []  # generated, the end token included
        self.completion_tokens = 0
        self.first = self._next()
        if isinstance(self.first, list):
            self.prompt, self.first = self.first, self._next()

    def _next(self):
        item = self.row.out.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def _token_lists(self) -> Iterator[list[int]]:
        item = self.first
        while item is not None:
            self.tokens.append(item)
            if item.id not in self.end_ids:
                self.completion_tokens += 1
            yield [item.id]
            item = self._next()

    def pieces(self) -> Iterator[tuple[str, str | None]]:
        """(new text, None) as it becomes final, then (last text, finish reason)."""
        try:
            yield from text_pieces(
                self.tokenizer, self.row.prompt_ids, self._token_lists(), self.stop, self.end_ids, self.eos_ids
            )
        finally:
            self.row.cancel.set()  # a stop string or a closed connection: the rest is not needed


def token_text(tokenizer, token: int) -> str:
    return tokenizer.decode([token])


def completion_logprobs(tokenizer, tokens: list[Token], offset: int) -> dict:
    """The completions API's `logprobs`: tokens, their log-probabilities, the top alternatives
    (a text-to-logprob map), and each token's character offset in prompt plus completion."""
    texts = [token_text(tokenizer, t.id) for t in tokens]
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": texts,
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [
            None if t.logprob is None else {token_text(tokenizer, i): lp for i, lp in t.top} for t in tokens
        ],
        "text_offset": offsets,
    }


def chat_logprobs(tokenizer, tokens: list[Token]) -> dict:
    """The chat API's `logprobs`: one entry per token with its bytes and top alternatives."""

    def entry(token: int, logprob: float) -> dict:
        text = token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {
        "content": [{**entry(t.id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]} for t in tokens],
        "refusal": None,
    }


# ---------------------------------------------------------------------------------------------
# HTTP


class RequestHandler(BaseHTTPRequestHandler):
    server: InferenceServer

    # --- plumbing

    def send_body(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_json(self, payload: dict, status: int = HTTPStatus.OK) -> None:
        self.send_body(status, "application/json", json.dumps(payload).encode())

    def send_error_json(self, status: int, message: str, code: str | None = None) -> None:
        kind = "invalid_request_error" if status < 500 else "server_error"
        self.send_json({"error": {"message": message, "type": kind, "param": None, "code": code}}, status)

    def read_json(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError("a JSON body with a Content-Length header is required", HTTPStatus.LENGTH_REQUIRED)
        if not length.isdigit():
            raise RequestError(f"invalid Content-Length: {length[:40]}")
        if int(length) > MAX_BODY_BYTES:
            raise RequestError(f"the body must be at most {MAX_BODY_BYTES} bytes", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        try:
            body = json.loads(self.rfile.read(int(length)))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:  # the last: nested too deep
            raise RequestError(f"the body is not valid JSON: {error}") from None
        if not isinstance(body, dict):
            raise RequestError("the body must be a JSON object")
        return body

    def do_GET(self) -> None:
        if self.path == "/":
            self.send_body(HTTPStatus.OK, "text/html; charset=utf-8", self.server.page)
        elif self.path == "/v1/models":
            self.send_json(
                {
                    "object": "list",
                    "data": [{"id": self.server.model_id, "object": "model", "created": 0, "owned_by": "local"}],
                }
            )
        else:
            self.send_error_json(HTTPStatus.NOT_FOUND, f"no such path: {self.path}")

    def do_POST(self) -> None:
        handlers = {"/v1/completions": self.completions, "/v1/chat/completions": self.chat_completions}
        if self.path not in handlers:
            self.send_error_json(HTTPStatus.NOT_FOUND, f"no such path: {self.path}")
            return
        with self.server.busy:
            self.server.requests_in_flight += 1
        try:
            if self.server.stopping.is_set():
                raise RequestError("the server is shutting down", HTTPStatus.SERVICE_UNAVAILABLE)
            handlers[self.path](self.read_json())
        except RequestError as error:
            self.send_error_json(error.status, str(error), error.code)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away; its generation was stopped
        except Exception as error:
            traceback.print_exc()
            self.send_error_json(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(error).__name__}: {error}")
        finally:
            with self.server.busy:
                self.server.requests_in_flight -= 1
                self.server.busy.notify_all()

    def method_not_allowed(self) -> None:
        self.send_error_json(HTTPStatus.METHOD_NOT_ALLOWED, f"{self.command} is not allowed: use GET or POST")

    do_PUT = do_DELETE = do_PATCH = method_not_allowed

    # --- the OpenAI API

    def sampling(self, body: dict, max_tokens_names: Sequence[str], low_max_tokens: int = 1) -> dict:
        """The decoding settings of a request; the server's command-line flags are the defaults."""
        if body.get("suffix") not in (None, ""):
            raise RequestError("'suffix' is not supported by this server")
        max_tokens = self.server.max_new_tokens
        for name in max_tokens_names:
            max_tokens = get_field(body, name, int, max_tokens, low=low_max_tokens)
        stop = get_field(body, "stop", (str, list), [])
        stop = [stop] if isinstance(stop, str) else stop
        if not all(isinstance(s, str) for s in stop):
            raise RequestError("'stop' must be a string or a list of strings")
        defaults = self.server.defaults
        temperature = get_field(body, "temperature", (int, float), defaults["temperature"], 0, 2)
        top_p = get_field(body, "top_p", (int, float), defaults["top_p"], 0, 1)
        if top_p == 0:
            raise RequestError("'top_p' must be above 0")
        stream_options = get_field(body, "stream_options", dict, {})
        return dict(
            max_tokens=max_tokens,
            stop=[s for s in stop if s],
            n=get_field(body, "n", int, 1, 1, MAX_N),
            seed=get_field(body, "seed", int, None),
            stream=get_field(body, "stream", bool, False),
            include_usage=get_field(stream_options, "include_usage", bool, False),
            temperature=temperature,
            top_p=top_p,
        )

    def check_length(self, prompts: list[list[int]], max_tokens: int) -> int:
        """`max_tokens` cut to what fits in the model's context after every prompt; a prompt that
        leaves no room, or has no token at all, is refused."""
        context = context_length(self.server.model)
        for number, prompt in enumerate(prompts):
            if not prompt:  # possible where the tokenizer adds no beginning-of-sequence token
                raise RequestError(f"prompt {number} is empty: there is nothing for the model to continue")
            if len(prompt) >= context:
                # OpenAI's wording and code, which clients parse to shorten their requests.
                raise RequestError(
                    f"This model's maximum context length is {context} tokens, however you requested "
                    f"{len(prompt) + 1} tokens ({len(prompt)} in your prompt; 1 for the completion). "
                    "Please reduce the length of the prompt.",
                    code="context_length_exceeded",
                )
            max_tokens = min(max_tokens, context - len(prompt))
        return max_tokens

    def encode(self, text: str) -> list[int]:
        return self.server.tokenizer(text)["input_ids"]

    def completions(self, body: dict) -> None:
        prompts = body.get("prompt")
        if isinstance(prompts, str) or is_token_list(prompts):
            prompts = [prompts]
        if (
            not isinstance(prompts, list)
            or not prompts
            or not all(isinstance(p, str) or is_token_list(p) for p in prompts)
        ):
            raise RequestError(
                "'prompt' is required: a string, a list of strings, a list of token ids or a list of such lists"
            )
        for number, prompt in enumerate(prompts):
            if isinstance(prompt, list) and not all(0 <= t < self.server.vocab_size for t in prompt):
                raise RequestError(
                    f"prompt {number} has token ids outside the vocabulary (0 to {self.server.vocab_size - 1})"
                )
        echo = get_field(body, "echo", bool, False)
        logprobs = get_field(body, "logprobs", int, None, 0, MAX_TOP_LOGPROBS)
        # With echo, no new token is a legacy way to ask for the prompt's log-probabilities alone.
        sampling = self.sampling(body, ["max_tokens"], low_max_tokens=0 if echo else 1)
        ids = [self.encode(p) if isinstance(p, str) else p for p in prompts]
        texts = [p if isinstance(p, str) else self.server.tokenizer.decode(p) for p in prompts]
        self.respond("text_completion", ids, texts, sampling, echo=echo, logprobs=logprobs)

    def chat_completions(self, body: dict) -> None:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise RequestError("'messages' is required: a non-empty list of {role, content} objects")
        if not any(m.get("role") == "user" for m in messages):
            raise RequestError("'messages' has no message with role 'user'")
        messages = [{"role": str(m.get("role")), "content": message_text(m.get("content"))} for m in messages]
        input = get_field(body, "input", str, "")
        logprobs = get_field(body, "logprobs", bool, False)
        top_logprobs = get_field(body, "top_logprobs", int, None, 0, MAX_TOP_LOGPROBS)
        if top_logprobs is not None and not logprobs:
            raise RequestError("'top_logprobs' needs 'logprobs': true")
        sampling = self.sampling(body, ["max_tokens", "max_completion_tokens"])
        prompt = self.chat_prompt(messages, input)
        self.respond("chat.completion", [prompt], [""], sampling, logprobs=(top_logprobs or 0) if logprobs else None)

    def chat_prompt(self, messages: list[dict], input: str) -> list[int]:
        """The prompt's tokens: the tokenizer's chat template over all messages when it has one
        (`input` then comes as one more user message, as the Alpaca template that train.py
        saves reads an input); else the Alpaca template, single-turn, with the last user message
        as the instruction and `input` (an extension to the OpenAI API) as its input."""
        tokenizer = self.server.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            instruction = [m for m in messages if m["role"] == "user"][-1]["content"]
            return self.encode(format_prompt(instruction, input))
        if input:
            messages = messages + [{"role": "user", "content": input}]
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as error:  # the template's own checks (roles, order) raise
            raise RequestError(f"the model's chat template refuses these messages: {error}") from None
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def rows(self, prompts: list[list[int]], sampling: dict, max_tokens: int, echo: bool, logprobs: int | None):
        """One row per prompt and choice: choice i * n + j is the j-th completion of prompt i."""
        defaults = self.server.defaults
        seed = sampling["seed"]
        return [
            Row(
                prompt,
                max(max_tokens, 1),
                temperature=sampling["temperature"],
                top_p=sampling["top_p"] if sampling["temperature"] > 0 else 1.0,
                top_k=defaults["top_k"],
                repetition_penalty=defaults["repetition_penalty"],
                seed=None if seed is None else seed + 7919 * index,  # each choice its own stream
                top_logprobs=logprobs or 0,
                echo=echo and logprobs is not None,
            )
            for index, prompt in enumerate(p for p in prompts for _ in range(sampling["n"]))
        ]

    def respond(
        self,
        kind: str,
        prompts: list[list[int]],
        texts: list[str],
        sampling: dict,
        echo: bool = False,
        logprobs: int | None = None,
    ) -> None:
        max_tokens = self.check_length(prompts, sampling["max_tokens"])
        header = {
            "id": f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": self.server.model_id,
        }
        usage_prompt = sum(len(p) for p in prompts)
        if self.server.defaults["num_beams"] > 1:
            if logprobs is not None:
                raise RequestError("log-probabilities are not available with beam search (--num_beams)")
            self.respond_with_beams(kind, header, prompts, texts, sampling, max_tokens, echo)
            return
        rows = self.rows(prompts, sampling, max_tokens, echo, logprobs)
        tokenizer = self.server.tokenizer
        end_ids, eos_ids = end_token_ids(self.server.model, tokenizer)
        self.server.scheduler.submit(rows)
        try:
            if sampling["stream"]:
                self.stream(kind, header, rows, texts, sampling, max_tokens, echo, logprobs, usage_prompt)
                return
            choices, completion_tokens = [], 0
            for index, row in enumerate(rows):
                choice = Choice(row, tokenizer, sampling["stop"], end_ids, eos_ids)
                pieces = list(choice.pieces())
                text = "".join(p for p, _ in pieces) if max_tokens > 0 else ""
                generated = choice.tokens if max_tokens > 0 else []
                completion_tokens += choice.completion_tokens if max_tokens > 0 else 0
                if kind == "chat.completion":
                    entry = {"index": index, "message": {"role": "assistant", "content": text.strip()}}
                    entry["logprobs"] = None if logprobs is None else chat_logprobs(tokenizer, generated)
                else:
                    prompt_text = texts[index // sampling["n"]] if echo else ""
                    entry = {"index": index, "text": prompt_text + text}
                    entry["logprobs"] = (
                        None
                        if logprobs is None
                        else completion_logprobs(
                            tokenizer, choice.prompt + generated, 0 if echo else len(texts[index // sampling["n"]])
                        )
                    )
                entry["finish_reason"] = pieces[-1][1] if max_tokens > 0 else "length"
                choices.append(entry)
        finally:
            for row in rows:
                row.cancel.set()
        self.send_json({**header, "object": kind, "choices": choices, "usage": usage(usage_prompt, completion_tokens)})

    def respond_with_beams(self, kind, header, prompts, texts, sampling, max_tokens, echo) -> None:
        """Beam search, which knows its best beam only at the end, through transformers' generate."""
        model, tokenizer = self.server.model, self.server.tokenizer
        defaults = self.server.defaults
        decoding = decoding_kwargs(
            sampling["temperature"],
            sampling["top_p"],
            defaults["top_k"],
            defaults["num_beams"],
            defaults["repetition_penalty"],
        )
        expanded = [p for p in prompts for _ in range(sampling["n"])]  # the ids, as given
        completions = self.server.scheduler.run_alone(
            lambda: complete_batch(
                model, tokenizer, expanded, max(max_tokens, 1), sampling["stop"], self.server.stopping, **decoding
            )
        )
        chat = kind == "chat.completion"
        choices = []
        for index, c in enumerate(completions):
            if chat:
                choice = {"index": index, "message": {"role": "assistant", "content": c.text.strip()}, "logprobs": None}
            else:
                prefix = texts[index // sampling["n"]] if echo else ""
                choice = {"index": index, "text": prefix + c.text, "logprobs": None}
            choices.append({**choice, "finish_reason": c.finish_reason})
        prompt_tokens = sum(len(p) for p in prompts)
        completion_tokens = sum(c.completion_tokens for c in completions)
        if not sampling["stream"]:
            self.send_json(
                {**header, "object": kind, "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}
            )
            return
        send = self.start_stream(kind, header, sampling["include_usage"])
        for choice in choices:
            if chat:
                send(
                    {
                        "index": choice["index"],
                        "delta": {"role": "assistant", "content": choice["message"]["content"]},
                        "logprobs": None,
                        "finish_reason": choice["finish_reason"],
                    }
                )
            else:
                send(choice)
        self.end_stream(send, sampling["include_usage"], prompt_tokens, completion_tokens)

    def start_stream(self, kind: str, header: dict, include_usage: bool):
        """Send the event stream's headers; returns the function that sends one choice's chunk."""
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else "text_completion"

        def send(choice: dict | None, usage_: dict | None = None) -> None:
            chunk = {**header, "object": chunk_kind, "choices": [] if choice is None else [choice]}
            if include_usage:  # as OpenAI: null in every chunk but the last
                chunk["usage"] = usage_
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()

        return send

    def end_stream(self, send, include_usage: bool, prompt_tokens: int, completion_tokens: int) -> None:
        if include_usage:
            send(None, usage(prompt_tokens, completion_tokens))
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def stream(self, kind, header, rows, texts, sampling, max_tokens, echo, logprobs, prompt_tokens) -> None:
        """Server-sent events: one chunk per piece of text, choices one after another (all of
        them generated together), then the usage chunk when asked, then [DONE]."""
        tokenizer = self.server.tokenizer
        end_ids, eos_ids = end_token_ids(self.server.model, tokenizer)
        chat = kind == "chat.completion"
        send = self.start_stream(kind, header, sampling["include_usage"])
        completion_tokens = 0
        try:
            for index, row in enumerate(rows):
                choice = Choice(row, tokenizer, sampling["stop"], end_ids, eos_ids)
                prompt_text = texts[index // sampling["n"]]
                offset = 0 if echo else len(prompt_text)
                with contextlib.closing(choice.pieces()) as pieces:
                    if chat:
                        send(
                            {
                                "index": index,
                                "delta": {"role": "assistant", "content": ""},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        )
                        sent = 0
                        for delta, reason in stripped(pieces):
                            new, sent = choice.tokens[sent:], len(choice.tokens)
                            send(
                                {
                                    "index": index,
                                    "delta": {"content": delta} if delta else {},
                                    "logprobs": None if logprobs is None else chat_logprobs(tokenizer, new),
                                    "finish_reason": reason,
                                }
                            )
                    else:
                        if echo:
                            lp = None if logprobs is None else completion_logprobs(tokenizer, choice.prompt, 0)
                            send({"index": index, "text": prompt_text, "logprobs": lp, "finish_reason": None})
                            offset = len(prompt_text)
                        sent = 0
                        for delta, reason in pieces:
                            if max_tokens == 0:
                                delta = ""
                            new, sent = choice.tokens[sent:], len(choice.tokens)
                            lp = None if logprobs is None else completion_logprobs(tokenizer, new, offset)
                            offset += sum(len(t) for t in (lp or {}).get("tokens", []))
                            send({"index": index, "text": delta, "logprobs": lp, "finish_reason": reason})
                completion_tokens += choice.completion_tokens if max_tokens > 0 else 0
        except (BrokenPipeError, ConnectionResetError):
            raise
        except Exception as error:  # the status line is gone already: report in the stream
            traceback.print_exc()
            self.wfile.write(
                f"data: {json.dumps({'error': {'message': str(error), 'type': 'server_error'}})}\n\n".encode()
            )
        self.end_stream(send, sampling["include_usage"], prompt_tokens, completion_tokens)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def run_server(
    model,
    tokenizer,
    model_id: str,
    host: str,
    port: int,
    max_new_tokens: int,
    batch_size: int,
    defaults: dict,
    step: Callable | None = None,
) -> None:
    """Serve until Ctrl-C; `defaults` are the decoding flags requests may override."""
    try:
        server = InferenceServer(
            (host, port),
            model,
            tokenizer,
            model_id,
            max_new_tokens,
            batch_size,
            defaults,
            scheduler_thread=False,
            step=step,
        )
    except OSError as error:
        raise UsageError(f"cannot listen on {host}:{port}: {error}") from None

    def stop(signum, frame) -> None:
        """Ctrl-C: the generations in flight end at their next token; a second one interrupts."""
        signal.signal(signal.SIGINT, signal.default_int_handler)
        server.stopping.set()

    previous = signal.signal(signal.SIGINT, stop)
    try:
        print(
            f"serving {model_id} on http://{host}:{server.server_port}/ (OpenAI API at "
            f"http://{host}:{server.server_port}/v1)",
            file=sys.stderr,
            flush=True,
        )
        server.serve_until_stopped()
    finally:
        signal.signal(signal.SIGINT, previous)
        server.server_close()
