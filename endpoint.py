"""The OpenAI-compatible endpoint machinery the generator and the judge share: one `Endpoint`
that sends prompts through the completions or the chat API of any OpenAI-compatible server
(OpenAI, vLLM, llama.cpp's server, Ollama, `inference.py --serve`), retries transient failures
with backoff and Retry-After, stops at once on a refused key (401/403), never shows the key,
counts token usage (and what it costs) and can ask for the top logprobs of each answer token;
and the helpers that keep requests in flight in daemon threads and defer a Ctrl-C.

No torch here: the generator and the judge import it cheaply."""

import contextlib
import dataclasses
import email.utils
import math
import os
import random
import re
import signal
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import openai
import tqdm


class StopRun(RuntimeError):
    """The run cannot go on: the endpoint cannot be reached, refused the key, the permission or
    the model, or too many requests in a row failed."""


class RequestFailed(RuntimeError):
    """One request failed for good (after its retries, or with a malformed answer): it is counted
    and the run goes on."""

    def __init__(self, message: str, kind: str = "failed_requests"):
        super().__init__(message)
        self.kind = kind


@dataclasses.dataclass
class Completion:
    """One request's answer: (text, finish_reason) per answered prompt, in prompt order, and
    usage. Where each prompt is its own HTTP request (chat), `failures` holds those that failed
    for good. With `Endpoint(top_logprobs=K)`, `logprobs` holds for each choice its tokens, each
    with its K most likely alternatives and their logprobs (None where the server sent none)."""

    choices: list[tuple[str, str | None]]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    failures: list["RequestFailed"] = dataclasses.field(default_factory=list)
    logprobs: list[list[tuple[str, dict[str, float]]] | None] = dataclasses.field(default_factory=list)


# An endpoint that refuses connections or whose name does not resolve gets this many retries
# (after 1 s, then 2 s: a local server may be just starting) before the run stops.
UNREACHABLE_RETRIES = 2


class Endpoint:
    """An OpenAI-compatible endpoint shared by the request threads. It retries transient failures
    (429, 5xx, timeouts, dropped connections) with exponential backoff and jitter, honouring
    Retry-After; shrinks max_tokens on a context-length error; and raises StopRun for
    errors that no retry can fix, among them an endpoint that cannot be reached at all. It counts
    every retry in `retries`, whether or not the request finally succeeded.

    `sampling` goes into every request as it is (temperature, top_p, stop, ...). `top_logprobs`
    asks for that many alternatives of each answer token; a server that refuses logprobs gets
    requests without them from then on (`logprobs_refused` says why)."""

    def __init__(
        self,
        model_name: str,
        api_base: str | None,
        api_style: str,
        max_tokens: int,
        sampling: dict,
        request_timeout: float,
        max_retries: int,
        retry_base_delay: float,
        stop_event: threading.Event,
        top_logprobs: int = 0,
    ):
        base_url = api_base or os.environ.get("OPENAI_BASE_URL") or None
        self._api_key = os.environ.get("OPENAI_API_KEY")  # masked in every message we show
        if not self._api_key and base_url is None:
            raise StopRun("OPENAI_API_KEY is not set (local servers accept any key; pass --api_base for one)")
        # vLLM, llama.cpp and Ollama do not check the key, but the client needs one. The client's
        # own retries are off: this class decides what to retry and how long to wait.
        self.client = openai.OpenAI(
            api_key=self._api_key or "EMPTY", base_url=base_url, timeout=request_timeout, max_retries=0
        )
        self.where = base_url or "api.openai.com"
        self.model_name = model_name
        self.style = api_style  # "auto" until the endpoint has shown which API it serves
        # Set when a completions server refuses a list of prompts or miscounts its usage;
        # `one_prompt_per_call_reason` says which, for the run's summary.
        self.one_prompt_per_call = False
        self.one_prompt_per_call_reason: str | None = None
        self.max_tokens = max_tokens
        self.sampling = sampling
        self.top_logprobs = top_logprobs
        self.logprobs_refused: str | None = None
        self.max_retries = max_retries
        self.retry_base_delay = retry_base_delay
        self.stop_event = stop_event
        self.retries = 0
        self._lock = threading.Lock()

    def complete(self, prompts: list[str]) -> Completion:
        """Completions for all prompts, retrying what can be retried. Where each prompt is its
        own request (chat), each is retried on its own so that answered prompts are not paid
        twice, and one that fails for good is recorded without losing the others."""
        if not (self.style == "chat" or self.one_prompt_per_call):
            return self._complete_with_retries(prompts)
        answered, failures = [], []
        for prompt in prompts:
            try:
                answered.append(self._complete_with_retries([prompt]))
            except RequestFailed as e:
                failures.append(e)
        completion = _concatenate(answered)
        completion.failures = failures
        return completion

    def _complete_with_retries(self, prompts: list[str]) -> Completion:
        retries = 0
        max_tokens = self.max_tokens
        while True:
            try:
                completion = self._call(prompts, max_tokens)
                self._settle_max_tokens(max_tokens)
                return completion
            except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
                raise StopRun(
                    f"{self.where} refused the request ({e.status_code}): {self._masked(_message(e))}"
                ) from None
            except openai.NotFoundError as e:
                raise StopRun(
                    f"model {self.model_name!r} is not available at {self.where}: {self._masked(_message(e))}"
                ) from None
            except openai.BadRequestError as e:
                if self.top_logprobs and "logprobs" in _message(e).lower():
                    # A server without logprobs (e.g. `inference.py --serve`): ask again without them.
                    self.logprobs_refused = self._masked(_message(e))
                    self.top_logprobs = 0
                    tqdm.tqdm.write(f"{self.where} refused logprobs ({self.logprobs_refused}): asking without them")
                    continue
                if not _is_context_length_error(e):
                    raise RequestFailed(f"bad request: {self._masked(_message(e))}") from None
                max_tokens = self._smaller_max_tokens(e, max_tokens)
                if max_tokens is None:
                    raise RequestFailed(
                        f"the prompt does not fit the model's context: {self._masked(_message(e))}"
                    ) from None
            except (openai.APIConnectionError, openai.APIStatusError) as e:
                if isinstance(e, openai.RateLimitError) and getattr(e, "code", None) == "insufficient_quota":
                    raise StopRun(f"{self.where}: quota exhausted: {self._masked(_message(e))}") from None
                unreachable = _why_never_connected(e)
                if unreachable and retries >= min(UNREACHABLE_RETRIES, self.max_retries):
                    raise StopRun(
                        f"cannot connect to {self.where}: {unreachable} ({retries + 1} attempts); "
                        "check that the server is running and that --api_base is right"
                    ) from None
                status = getattr(e, "status_code", None)
                transient = status is None or status in (408, 409, 429) or status >= 500
                if not transient or retries >= self.max_retries:
                    raise RequestFailed(f"{self._masked(_describe(e))} (after {retries} retries)") from None
                delay = self._unreachable_delay(retries) if unreachable else self._retry_delay(e, retries)
                if self.stop_event.wait(delay):
                    raise RequestFailed("the run is stopping") from None
                retries += 1
                self._count_retry()

    def _masked(self, text: str) -> str:
        """`text` with the API key replaced by ***: some servers quote it in their errors, and
        no message or file may show it."""
        return text.replace(self._api_key, "***") if self._api_key else text

    def _call(self, prompts: list[str], max_tokens: int) -> Completion:
        if self.style == "chat":
            return self._chat(prompts, max_tokens)
        try:
            completion = self._completions(prompts, max_tokens)
        except openai.NotFoundError:
            if self.style != "auto":
                raise
            # No completions route, or a chat-only model: use chat (an unknown model fails there too).
            completion = self._chat(prompts, max_tokens)
            self.style = "chat"
            tqdm.tqdm.write(f"{self.where} has no completions API for {self.model_name}: using chat completions")
            return completion
        self.style = "completions"
        return completion

    def _completions(self, prompts: list[str], max_tokens: int) -> Completion:
        if self.one_prompt_per_call and len(prompts) > 1:
            return _concatenate([self._completions([prompt], max_tokens) for prompt in prompts])
        try:
            with _malformed_is_failure():
                response = self.client.completions.create(
                    model=self.model_name,
                    prompt=prompts if len(prompts) > 1 else prompts[0],
                    max_tokens=max_tokens,
                    n=1,
                    **({"logprobs": self.top_logprobs} if self.top_logprobs else {}),
                    **self.sampling,
                )
                # Older llama.cpp servers answer a list of prompts with a JSON array of
                # completion objects, one per prompt, which the client returns as a list.
                responses = response if isinstance(response, list) else [response]
                choices = sorted((c for r in responses for c in r.choices), key=lambda choice: choice.index)
                if len(prompts) > 1 and len(responses) == 1 and is_llama_cpp(response) and choices:
                    return self._after_miscounted_usage(prompts, max_tokens, choices[0], response)
                usages = [_usage(r) for r in responses]
                completion = Completion(
                    [(c.text or "", c.finish_reason) for c in choices],
                    *map(sum, zip(*usages)),
                    logprobs=[_completion_logprobs(c) for c in choices],
                )
        except (openai.BadRequestError, openai.UnprocessableEntityError) as e:
            if len(prompts) == 1 or _is_context_length_error(e):
                raise
            completion = None
        if completion is not None and len(completion.choices) != len(prompts) and len(prompts) == 1:
            raise RequestFailed(
                f"malformed response: {len(completion.choices)} choices for 1 prompt", "malformed_responses"
            )
        if completion is None or len(completion.choices) != len(prompts):
            # Some servers (Ollama, older llama.cpp) take one prompt per request.
            self.one_prompt_per_call = True
            self.one_prompt_per_call_reason = "the server does not take a list of prompts: one prompt per request"
            tqdm.tqdm.write(f"{self.where} does not take a list of prompts: sending one prompt per request")
            return self._completions(prompts, max_tokens)
        return completion

    def _after_miscounted_usage(self, prompts: list[str], max_tokens: int, first, response) -> Completion:
        """llama.cpp's server answers a list of prompts in one object, but its usage counts only
        the first prompt: keep the first answer, whose usage is right, ask for the others one per
        request, and send one prompt per request from now on."""
        with self._lock:
            if not self.one_prompt_per_call:
                self.one_prompt_per_call = True
                self.one_prompt_per_call_reason = (
                    "llama.cpp server (its usage counts only the first prompt of a list): one prompt per request"
                )
                tqdm.tqdm.write(f"{self.where} is a llama.cpp server: sending one prompt per request")
        head = Completion(
            [(first.text or "", first.finish_reason)], *_usage(response), logprobs=[_completion_logprobs(first)]
        )
        return _concatenate([head, self._completions(prompts[1:], max_tokens)])

    def _chat(self, prompts: list[str], max_tokens: int) -> Completion:
        answers = []
        logprobs = {"logprobs": True, "top_logprobs": self.top_logprobs} if self.top_logprobs else {}
        for prompt in prompts:
            with _malformed_is_failure():
                response = self.client.chat.completions.create(
                    model=self.model_name,
                    messages=[{"role": "user", "content": prompt}],
                    max_tokens=max_tokens,
                    n=1,
                    **logprobs,
                    **self.sampling,
                )
                choice = response.choices[0]
                answers.append(
                    Completion(
                        [(choice.message.content or "", choice.finish_reason)],
                        *_usage(response),
                        logprobs=[_chat_logprobs(choice)],
                    )
                )
        return _concatenate(answers)

    def _smaller_max_tokens(self, error: openai.BadRequestError, sent_max_tokens: int) -> int | None:
        """The max_tokens to retry with after a context-length error: what the context leaves
        beside the prompt when the message says so, else 20% less. None when no max_tokens can
        help (the prompt alone fills the context) or it cannot go lower.

        The lowered value is this request's own; it becomes the run's only once a request
        succeeds with it, so that one over-long prompt does not shrink every later request."""
        if self.max_tokens < sent_max_tokens:
            return self.max_tokens  # another request already succeeded with less
        # OpenAI and older vLLM: "... (1000 in your prompt; ...)" or "(28 in the messages, ...)";
        # current vLLM: "... and your request has 28 input tokens ...".
        numbers = re.search(
            r"maximum context length is (\d+) tokens.*?(\d+) (?:in (?:your|the) (?:prompt|messages)|input tokens)",
            _message(error),
            re.S,
        )
        if numbers:
            room = int(numbers[1]) - int(numbers[2])
            if room < 1:
                return None
            if room < sent_max_tokens:
                tqdm.tqdm.write(f"context length exceeded: max_tokens {sent_max_tokens} -> {room}")
                return room
        new_max_tokens = int(sent_max_tokens * 0.8)
        if new_max_tokens < 1:
            return None
        tqdm.tqdm.write(f"context length exceeded: max_tokens {sent_max_tokens} -> {new_max_tokens}")
        return new_max_tokens

    def _count_retry(self) -> None:
        with self._lock:
            self.retries += 1

    def _settle_max_tokens(self, max_tokens: int) -> None:
        """A request succeeded with `max_tokens`: later requests start from it."""
        with self._lock:
            self.max_tokens = min(self.max_tokens, max_tokens)

    def _retry_delay(self, error: Exception, retries: int) -> float:
        """Seconds to wait before retry number `retries` + 1: what the server asks for in
        Retry-After (seconds or an HTTP date) or retry-after-ms, else exponential backoff with jitter."""
        headers = error.response.headers if isinstance(error, openai.APIStatusError) else {}
        asked = _seconds(headers.get("retry-after-ms"), 0.001)
        asked = _seconds(headers.get("retry-after"), 1.0) if asked is None else asked
        if asked is not None:
            return asked
        return min(60.0, self.retry_base_delay * 2**retries) * random.uniform(0.5, 1.0)

    def _unreachable_delay(self, retries: int) -> float:
        """Seconds to wait before retrying a connection that was never made: 1 s, then 2 s (less
        with a smaller --retry_base_delay), so that the run stops within seconds."""
        return min(self.retry_base_delay, 1.0) * 2**retries


def in_background(function: Callable, *args) -> Future:
    """Run function(*args) in a daemon thread. A thread pool's threads would be joined at exit,
    keeping the process alive until every abandoned request had answered."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(function(*args))
        except BaseException as e:
            future.set_exception(e)

    threading.Thread(target=run, daemon=True).start()
    return future


@contextlib.contextmanager
def _malformed_is_failure():
    """An answer that is not the JSON we expect becomes a counted RequestFailed."""
    try:
        yield
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as e:
        raise RequestFailed(f"malformed response: {type(e).__name__}: {str(e)[:200]}", "malformed_responses") from None


def _seconds(value: str | None, unit: float) -> float | None:
    """A Retry-After value (a number of `unit`s, or an HTTP date) as seconds from now; None when
    absent or unreadable."""
    if value is None:
        return None
    try:
        seconds = float(value) * unit
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _why_never_connected(error: Exception) -> str | None:
    """What kept a request from reaching the server at all (connection refused, a host name that
    does not resolve), found in the exception's cause chain; None when it did connect (or for an
    error other than a connection error), since then the server may answer a retry."""
    if not isinstance(error, openai.APIConnectionError):
        return None
    cause = error.__cause__ or error.__context__
    while cause is not None:
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, socket.gaierror):
            return f"the host name does not resolve ({cause.strerror})"
        cause = cause.__cause__ or cause.__context__
    return None


def _usage(response) -> tuple[int, int]:
    usage = getattr(response, "usage", None)
    return (getattr(usage, "prompt_tokens", 0) or 0, getattr(usage, "completion_tokens", 0) or 0)


def _concatenate(parts: list[Completion]) -> Completion:
    return Completion(
        [choice for part in parts for choice in part.choices],
        sum(part.prompt_tokens for part in parts),
        sum(part.completion_tokens for part in parts),
        logprobs=[logprobs for part in parts for logprobs in part.logprobs],
    )


def is_llama_cpp(response) -> bool:
    """Whether an answer comes from llama.cpp's server: it adds a `timings` object, which no
    other server we know sends, and its `system_fingerprint` is "b" + its build number."""
    extra = getattr(response, "model_extra", None) or {}
    fingerprint = getattr(response, "system_fingerprint", None) or ""
    return isinstance(extra.get("timings"), dict) or re.fullmatch(r"b\d+(-\w+)?", fingerprint) is not None


def _completion_logprobs(choice) -> list[tuple[str, dict[str, float]]] | None:
    """The completions API's logprobs of one choice: each token with its top alternatives."""
    logprobs = getattr(choice, "logprobs", None)
    if not logprobs or not logprobs.tokens:
        return None
    top = logprobs.top_logprobs or [{} for _ in logprobs.tokens]
    return [(token, dict(alternatives or {})) for token, alternatives in zip(logprobs.tokens, top)]


def _chat_logprobs(choice) -> list[tuple[str, dict[str, float]]] | None:
    """The chat API's logprobs of one choice: each token with its top alternatives."""
    content = getattr(getattr(choice, "logprobs", None), "content", None)
    if not content:
        return None
    return [(item.token, {alt.token: alt.logprob for alt in item.top_logprobs or []}) for item in content]


def cost(
    prompt_tokens: int,
    completion_tokens: int,
    price_per_1k_prompt_tokens: float | None,
    price_per_1k_completion_tokens: float | None,
) -> float | None:
    """What the tokens cost, or None when no price is given."""
    if price_per_1k_prompt_tokens is None and price_per_1k_completion_tokens is None:
        return None
    prompt_cost = prompt_tokens * (price_per_1k_prompt_tokens or 0)
    return (prompt_cost + completion_tokens * (price_per_1k_completion_tokens or 0)) / 1000


def _message(error: openai.APIError) -> str:
    body = error.body if isinstance(error.body, dict) else {}
    return str(body.get("message") or error.message)


def _describe(error: Exception) -> str:
    if isinstance(error, openai.APIStatusError):
        return f"HTTP {error.status_code}: {_message(error)}"
    return f"{type(error).__name__}: {error}"


def _is_context_length_error(error: openai.APIError) -> bool:
    text = _message(error).lower()
    return (
        getattr(error, "code", None) == "context_length_exceeded" or "context length" in text or "context size" in text
    )


@contextlib.contextmanager
def ctrl_c_deferred():
    """Hold a Ctrl-C (SIGINT) that arrives inside the block and raise it as KeyboardInterrupt
    once the block is done, so that an interrupted run never leaves a batch half saved."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    if not in_main_thread or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        # Only the main thread can set a handler, and a SIGINT that is ignored or handled by the
        # caller is not ours to change.
        yield
        return
    pressed = []
    signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if pressed:
        raise KeyboardInterrupt
