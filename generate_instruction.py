"""Self-instruct data generation (Alpaca's recipe) against any OpenAI-compatible endpoint.

    python -m generate_instruction generate_instruction_following_data \\
        --output_dir ./ --num_instructions_to_generate 100 --model_name gpt-3.5-turbo-instruct

Each prompt is prompt.txt followed by a few seed tasks as numbered blocks; the model continues
the list, the continuation is parsed back into tasks and filtered, and a task is kept unless its
ROUGE-L F-measure against a seed or an already kept instruction is above 0.7. Kept tasks go to
`output_dir/regen.json`, rewritten atomically after every request; rerunning resumes from it
after a crash or a Ctrl-C (which stops the run at once, with every finished request saved).
Counts, token usage and cost go to `output_dir/regen_summary.json`.

The endpoint is `--api_base` (else $OPENAI_BASE_URL, else OpenAI) with the key in
$OPENAI_API_KEY: OpenAI, vLLM, llama.cpp's server and Ollama all work, through the completions
API (several prompts per request, as the original) or the chat API (one prompt per request).
"""

import collections
import contextlib
import dataclasses
import email.utils
import json
import math
import os
import random
import re
import signal
import socket
import string
import threading
import time
from concurrent.futures import Future

import numpy as np
import openai
import tqdm

import utils
from rouge_dedup import RougeLIndex
from utils import UsageError

# Whole words that point at tasks a text-only model cannot do (the original's list).
BLACKLIST = [
    "image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
    "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram",
]  # fmt: skip
_BLACKLIST_RE = re.compile(r"\b({})\b".format("|".join(BLACKLIST)), flags=re.IGNORECASE)

# The prompt format's own markers: inside an instruction they are a garbled task (the model ran
# two tasks together), not content. Case matters: "the following input:" is an ordinary phrase.
_PROMPT_MARKER_RE = re.compile(r"(?i:<noinput>)|\b(?:Instruction|Input|Output):")

# prompt.txt asks for 20 tasks: stop when the model starts the 20th. The original stopped at
# "\n20" and "20.", which also fire inside content such as "in 2020." or "$20.".
STOP_SEQUENCES = ["\n20. Instruction:", "###\n20."]


# ----------------------------------------------------------------------------- prompts


def load_seed_tasks(path: str) -> list[dict]:
    """Seed tasks (JSON Lines of {"instruction", "instances": [{"input", "output"}, ...], ...}) as
    {"instruction", "input", "output"} records, taking each task's first instance as the original."""
    tasks = []
    for index, record in enumerate(utils.load_records(path)):
        problems = utils.seed_task_problems(record, required=("instruction",))
        if problems:
            raise UsageError(utils.describe_problem(path, index, problems[0]))
        instance = record["instances"][0]
        tasks.append({"instruction": record["instruction"], "input": instance["input"], "output": instance["output"]})
    if not tasks:
        raise UsageError(f"{path}: no seed tasks")
    return tasks


def encode_prompt(prompt_instructions: list[dict], prompt_path: str = "./prompt.txt") -> str:
    """prompt.txt, then each example task as a numbered block ("N. Instruction: ...", "N. Input:"
    with "<noinput>" for an empty input, "N. Output:") after a "###" line, ending with the next
    number's "Instruction:" for the model to continue."""
    with open(prompt_path, encoding="utf-8") as f:
        prompt = f.read() + "\n"
    for number, task in enumerate(prompt_instructions, start=1):
        instruction = re.sub(r"\s+", " ", task["instruction"]).strip().rstrip(":")
        task_input = task["input"] or "<noinput>"
        prompt += "###\n"
        prompt += f"{number}. Instruction: {instruction}\n"
        prompt += f"{number}. Input:\n{task_input}\n"
        prompt += f"{number}. Output:\n{task['output']}\n"
    prompt += "###\n"
    prompt += f"{len(prompt_instructions) + 1}. Instruction:"
    return prompt


# ----------------------------------------------------------------------------- parsing


def drop_reason(instruction: str) -> str | None:
    """Why the filters reject an instruction, or None when it passes: the original's, then ours
    (a prompt marker such as "<noinput>" or "2. Input:" inside it)."""
    word_count = len(instruction.split())
    if word_count <= 3:
        return "too_short"
    if word_count > 150:
        return "too_long"
    if _BLACKLIST_RE.search(instruction):
        return "blacklisted_word"
    # The model tends to add "Write a program" to ordinary tasks; the original drops them.
    if instruction.startswith("Write a program"):
        return "write_a_program"
    if instruction[0] in string.punctuation:
        return "starts_with_punctuation"
    if not instruction[0].isascii():
        return "starts_non_ascii"
    if _PROMPT_MARKER_RE.search(instruction):
        return "prompt_marker"
    return None


def post_process_response(
    num_prompt_instructions: int, text: str, finish_reason: str | None
) -> tuple[list[dict], collections.Counter]:
    """The tasks in one completion that pass the filters, and the dropped ones counted by reason.

    `text` continues a prompt of `num_prompt_instructions` examples, i.e. it starts right after
    "N. Instruction:" with N = num_prompt_instructions + 1. Tasks are separated by "###"; when
    the completion stopped for length the last one is likely cut off and is dropped."""
    first_number = num_prompt_instructions + 1
    prefix = f"{first_number}. Instruction:"
    # A chat model's reply may restate "N. Instruction:", perhaps after a sentence of its own:
    # the first task starts after it.
    before, found, after = text.partition(prefix)
    if found and "###" not in before:
        text = after
    blocks = re.split("###", prefix + text)
    dropped = collections.Counter()
    if finish_reason == "length":
        dropped["truncated"] += 1
        blocks = blocks[:-1]
    tasks = []
    for offset, block in enumerate(blocks):
        parts = re.split(rf"{first_number + offset}\.\s+(Instruction|Input|Output):", block)
        if len(parts) != 7:
            if block.strip():
                dropped["unparseable"] += 1
            continue
        instruction, task_input, output = parts[2].strip(), parts[4].strip(), parts[6].strip()
        task_input = "" if task_input.lower() == "<noinput>" else task_input
        reason = drop_reason(instruction)
        if reason:
            dropped[reason] += 1
            continue
        tasks.append({"instruction": instruction, "input": task_input, "output": output})
    return tasks, dropped


# ----------------------------------------------------------------------------- the endpoint


class StopGeneration(RuntimeError):
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
    for good."""

    choices: list[tuple[str, str | None]]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    failures: list["RequestFailed"] = dataclasses.field(default_factory=list)


# An endpoint that refuses connections or whose name does not resolve gets this many retries
# (after 1 s, then 2 s: a local server may be just starting) before the run stops.
UNREACHABLE_RETRIES = 2


class Endpoint:
    """An OpenAI-compatible endpoint shared by the request threads. It retries transient failures
    (429, 5xx, timeouts, dropped connections) with exponential backoff and jitter, honouring
    Retry-After; shrinks max_tokens on a context-length error; and raises StopGeneration for
    errors that no retry can fix, among them an endpoint that cannot be reached at all. It counts
    every retry in `retries`, whether or not the request finally succeeded."""

    def __init__(
        self,
        model_name: str,
        api_base: str | None,
        api_style: str,
        max_tokens: int,
        temperature: float,
        top_p: float,
        request_timeout: float,
        max_retries: int,
        retry_base_delay: float,
        stop_event: threading.Event,
    ):
        base_url = api_base or os.environ.get("OPENAI_BASE_URL") or None
        self._api_key = os.environ.get("OPENAI_API_KEY")  # masked in every message we show
        if not self._api_key and base_url is None:
            raise StopGeneration("OPENAI_API_KEY is not set (local servers accept any key; pass --api_base for one)")
        # vLLM, llama.cpp and Ollama do not check the key, but the client needs one. The client's
        # own retries are off: this class decides what to retry and how long to wait.
        self.client = openai.OpenAI(
            api_key=self._api_key or "EMPTY", base_url=base_url, timeout=request_timeout, max_retries=0
        )
        self.where = base_url or "api.openai.com"
        self.model_name = model_name
        self.style = api_style  # "auto" until the endpoint has shown which API it serves
        self.one_prompt_per_call = False  # set when a completions server refuses a list of prompts
        self.max_tokens = max_tokens
        self.sampling = {"temperature": temperature, "top_p": top_p, "stop": STOP_SEQUENCES}
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
                raise StopGeneration(
                    f"{self.where} refused the request ({e.status_code}): {self._masked(_message(e))}"
                ) from None
            except openai.NotFoundError as e:
                raise StopGeneration(
                    f"model {self.model_name!r} is not available at {self.where}: {self._masked(_message(e))}"
                ) from None
            except openai.BadRequestError as e:
                if not _is_context_length_error(e):
                    raise RequestFailed(f"bad request: {self._masked(_message(e))}") from None
                max_tokens = self._smaller_max_tokens(e, max_tokens)
                if max_tokens is None:
                    raise RequestFailed(
                        f"the prompt does not fit the model's context: {self._masked(_message(e))}"
                    ) from None
            except (openai.APIConnectionError, openai.APIStatusError) as e:
                if isinstance(e, openai.RateLimitError) and getattr(e, "code", None) == "insufficient_quota":
                    raise StopGeneration(f"{self.where}: quota exhausted: {self._masked(_message(e))}") from None
                unreachable = _why_never_connected(e)
                if unreachable and retries >= min(UNREACHABLE_RETRIES, self.max_retries):
                    raise StopGeneration(
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
                    **self.sampling,
                )
                # llama.cpp's llama-server answers a list of prompts with a JSON array of
                # completion objects, one per prompt, which the client returns as a list.
                responses = response if isinstance(response, list) else [response]
                choices = sorted((c for r in responses for c in r.choices), key=lambda choice: choice.index)
                usages = [_usage(r) for r in responses]
                completion = Completion([(c.text or "", c.finish_reason) for c in choices], *map(sum, zip(*usages)))
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
            tqdm.tqdm.write(f"{self.where} does not take a list of prompts: sending one prompt per request")
            return self._completions(prompts, max_tokens)
        return completion

    def _chat(self, prompts: list[str], max_tokens: int) -> Completion:
        answers = []
        for prompt in prompts:
            with _malformed_is_failure():
                response = self.client.chat.completions.create(
                    model=self.model_name,
                    messages=[{"role": "user", "content": prompt}],
                    max_tokens=max_tokens,
                    n=1,
                    **self.sampling,
                )
                choice = response.choices[0]
                answers.append(Completion([(choice.message.content or "", choice.finish_reason)], *_usage(response)))
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


def send_in_background(endpoint: Endpoint, prompts: list[str]) -> Future:
    """Run endpoint.complete(prompts) in a daemon thread. A thread pool's threads would be joined
    at exit, keeping the process alive until every abandoned request had answered."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(endpoint.complete(prompts))
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
    )


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


# ----------------------------------------------------------------------------- output files


def load_machine_instructions(path: str) -> list[dict]:
    """The kept tasks of an earlier run (regen.json), or [] when there is none."""
    if not os.path.exists(path):
        return []
    try:
        tasks = utils.load_records(path)
    except UsageError as e:
        raise UsageError(f"{e}; move it away to start a new run") from None
    for index, task in enumerate(tasks):
        problems = utils.record_problems(task, required=("instruction", "input", "output"), optional=())
        if problems:
            raise UsageError(utils.describe_problem(path, index, problems[0]))
    return tasks


def item_json(item: dict) -> str:
    """One kept task as it appears inside regen.json (the layout utils.jdump writes). Kept per
    item so that a save writes the file without encoding every earlier item again."""
    # JSON strings escape their newlines, so every newline here is a line of the layout.
    return "    " + json.dumps(item, indent=4, ensure_ascii=False, default=str).replace("\n", "\n    ")


def save_regen(item_texts: list[str], path: str) -> None:
    """regen.json from the items' JSON texts, atomically."""
    utils.write_text_atomically("[\n" + ",\n".join(item_texts) + "\n]" if item_texts else "[]", path)


class KeptTasks:
    """The kept tasks with regen.json, where they are saved, and the ROUGE-L index of every
    instruction a new one must not resemble (the seeds and the kept tasks)."""

    def __init__(self, path: str, seed_instructions: list[str], workers: int):
        self.path = path
        self.tasks = load_machine_instructions(path)
        self._item_texts = [item_json(task) for task in self.tasks]
        self._index = RougeLIndex(seed_instructions + [task["instruction"] for task in self.tasks], workers=workers)

    def __len__(self) -> int:
        return len(self.tasks)

    def add_novel(self, candidates: list[dict], threshold: float) -> int:
        """Keep, in order, each candidate whose ROUGE-L F-measure against the seeds, the kept
        tasks and the candidates kept before it is at most `threshold`, with its 10 most similar
        instructions and its average score, as the original. Returns how many were kept."""
        novelty = self._index.add_if_novel([task["instruction"] for task in candidates], threshold)
        kept = 0
        for task, scores in zip(candidates, novelty):
            if scores is not None:
                task["most_similar_instructions"] = self._index.most_similar(scores, 10)
                task["avg_similarity_score"] = float(np.mean(scores))
                self.tasks.append(task)
                self._item_texts.append(item_json(task))
                kept += 1
        return kept

    def save(self) -> None:
        save_regen(self._item_texts, self.path)


def load_summary(path: str | None) -> dict:
    """The counters of earlier runs on this output_dir, so that a resumed run adds to them (fresh
    counters when `path` is None or unreadable)."""
    fresh = {"batches_done": 0, "counts": collections.Counter()}
    if path is None:
        return fresh
    try:
        summary = utils.jload(path)
        return {"batches_done": int(summary["batches_done"]), "counts": collections.Counter(summary["counts"])}
    except (OSError, ValueError, KeyError, TypeError):
        return fresh


# ----------------------------------------------------------------------------- the run


def batch_prompts(
    rng: random.Random,
    seed_tasks: list[dict],
    machine_tasks: list[dict],
    request_batch_size: int,
    num_prompt_instructions: int,
    num_machine_instructions: int,
    prompt_path: str,
) -> list[str]:
    """One request's prompts, each with `num_prompt_instructions` examples: up to
    `num_machine_instructions` sampled from the kept tasks, the rest from the seeds."""
    prompts = []
    for _ in range(request_batch_size):
        machine = rng.sample(machine_tasks, min(num_machine_instructions, len(machine_tasks)))
        examples = rng.sample(seed_tasks, num_prompt_instructions - len(machine)) + machine
        prompts.append(encode_prompt(examples, prompt_path))
    return prompts


def candidate_tasks(completion: Completion, num_prompt_instructions: int, counts: collections.Counter) -> list[dict]:
    """The tasks of one request's completions that pass the filters. Adds the request's usage,
    failed prompts, empty completions and dropped tasks (by reason) to `counts`."""
    counts["prompt_tokens"] += completion.prompt_tokens
    counts["completion_tokens"] += completion.completion_tokens
    for failure in completion.failures:
        counts[failure.kind] += 1
        tqdm.tqdm.write(f"request failed: {failure}")
    candidates = []
    for text, finish_reason in completion.choices:
        counts["empty_completions"] += not text.strip()
        tasks, dropped = post_process_response(num_prompt_instructions, text, finish_reason)
        candidates += tasks
        counts.update({f"dropped_{reason}": n for reason, n in dropped.items()})
    counts["generated"] += len(candidates)
    return candidates


def progress_counts(counts: collections.Counter) -> dict[str, int]:
    """The counts the progress bar shows: generated, kept, failed requests and each drop reason."""
    return {
        k.removeprefix("dropped_"): v
        for k, v in counts.items()
        if k.startswith("dropped_") or k in ("generated", "kept", "failed_requests")
    }


def cost(
    counts: collections.Counter, price_per_1k_prompt_tokens: float | None, price_per_1k_completion_tokens: float | None
) -> float | None:
    """What the tokens counted so far cost, or None when no price is given."""
    if price_per_1k_prompt_tokens is None and price_per_1k_completion_tokens is None:
        return None
    prompt_cost = counts["prompt_tokens"] * (price_per_1k_prompt_tokens or 0)
    return (prompt_cost + counts["completion_tokens"] * (price_per_1k_completion_tokens or 0)) / 1000


def generate_instruction_following_data(
    output_dir: str = "./",
    seed_tasks_path: str = "./seed_tasks.jsonl",
    num_instructions_to_generate: int = 100,
    model_name: str = "gpt-3.5-turbo-instruct",
    num_prompt_instructions: int = 3,
    request_batch_size: int = 5,
    temperature: float = 1.0,
    top_p: float = 1.0,
    num_cpus: int = 16,
    prompt_path: str = "./prompt.txt",
    api_base: str | None = None,
    api_style: str = "auto",
    max_concurrency: int = 1,
    seed: int | None = None,
    num_machine_instructions: int = 0,
    max_tokens: int = 3072,
    similarity_threshold: float = 0.7,
    request_timeout: float = 600.0,
    max_retries: int = 6,
    retry_base_delay: float = 1.0,
    max_consecutive_failures: int = 10,
    price_per_1k_prompt_tokens: float | None = None,
    price_per_1k_completion_tokens: float | None = None,
    max_requests: int | None = None,
) -> list[dict]:
    """Generate instruction-following tasks into output_dir/regen.json (resuming from it).

    Args:
        output_dir: Where regen.json (kept tasks) and regen_summary.json (counts, usage) go.
        seed_tasks_path: Seed tasks, JSON Lines (the first instance of each is used).
        num_instructions_to_generate: Stop once this many tasks are kept (the last request's
            tasks are all kept, so a few more may be).
        model_name: Model name as the endpoint knows it.
        num_prompt_instructions: Example tasks in each prompt.
        request_batch_size: Prompts per request (completions API; the chat API sends them one
            per request).
        temperature: Sampling temperature.
        top_p: Nucleus sampling mass.
        num_cpus: Threads for the ROUGE-L dedup (capped at the machine's cores).
        prompt_path: The instruction text that starts every prompt.
        api_base: Endpoint base URL, e.g. http://localhost:8000/v1 (default: $OPENAI_BASE_URL,
            else OpenAI). The key is read from $OPENAI_API_KEY, never from a flag.
        api_style: "completions", "chat", or "auto" (completions, and chat when the endpoint
            has no completions API for the model).
        max_concurrency: Requests in flight at once. Results are used in request order, so with
            a fixed --seed and a deterministic endpoint the output does not depend on it, as long
            as --num_machine_instructions is 0 (machine examples are those kept when a request is
            sent).
        seed: Seed for sampling the prompt examples (default: random).
        num_machine_instructions: How many of the num_prompt_instructions examples to sample from
            already kept tasks, as the Self-Instruct paper does (default 0, as the original).
        max_tokens: Completion length limit; lowered automatically when the model's context is
            too small.
        similarity_threshold: Drop a task whose ROUGE-L F-measure against a seed or kept
            instruction is above this.
        request_timeout: Seconds before a request is abandoned and retried.
        max_retries: Retries of a request on 429, 5xx, timeouts and dropped connections. An
            endpoint that refuses the connection or whose name does not resolve gets at most 2
            retries, 1 s and 2 s apart, and then the run stops.
        retry_base_delay: First backoff delay in seconds (doubles each retry, with jitter) when
            the endpoint does not send Retry-After.
        max_consecutive_failures: Stop the run after this many requests in a row failed or
            returned nothing usable.
        price_per_1k_prompt_tokens: Price of 1,000 prompt tokens, to report the cost.
        price_per_1k_completion_tokens: Price of 1,000 completion tokens, to report the cost.
        max_requests: Stop after this many requests in this run even if fewer tasks were kept
            (no limit by default), e.g. to try a new endpoint or prompt cheaply.

    Returns:
        All kept tasks (earlier runs' included).
    """
    if api_style not in ("auto", "completions", "chat"):
        raise UsageError(f"--api_style must be auto, completions or chat, not {api_style!r}")
    if not 0 <= num_machine_instructions <= num_prompt_instructions:
        raise UsageError("--num_machine_instructions must be between 0 and --num_prompt_instructions")
    if max_requests is not None and max_requests < 1:
        raise UsageError("--max_requests must be at least 1")
    if min(num_prompt_instructions, request_batch_size, max_concurrency, max_consecutive_failures) < 1:
        raise UsageError(
            "--num_prompt_instructions, --request_batch_size, --max_concurrency and --max_consecutive_failures must be at least 1"
        )
    seed_instruction_data = load_seed_tasks(seed_tasks_path)
    if len(seed_instruction_data) < num_prompt_instructions:
        raise UsageError(
            f"{seed_tasks_path}: {len(seed_instruction_data)} seed tasks, fewer than --num_prompt_instructions"
        )
    encode_prompt([], prompt_path)  # fail now, not in a request thread, when prompt.txt is missing
    print(f"Loaded {len(seed_instruction_data)} human-written seed instructions")

    os.makedirs(output_dir, exist_ok=True)
    regen_path = os.path.join(output_dir, "regen.json")
    summary_path = os.path.join(output_dir, "regen_summary.json")
    workers = max(1, min(num_cpus, os.cpu_count() or 1))
    kept = KeptTasks(regen_path, [task["instruction"] for task in seed_instruction_data], workers)
    if kept.tasks:
        print(f"Loaded {len(kept)} machine-generated instructions")
    # Without regen.json this is a new run, whatever an old summary says.
    summary = load_summary(summary_path if os.path.exists(regen_path) else None)
    counts, batches_done = summary["counts"], summary["batches_done"]
    retries_of_earlier_runs = counts["retries"]
    stop_event = threading.Event()
    endpoint = Endpoint(
        model_name,
        api_base,
        api_style,
        max_tokens,
        temperature,
        top_p,
        request_timeout,
        max_retries,
        retry_base_delay,
        stop_event,
    )
    start = time.monotonic()

    def prompts_of_batch(batch_number: int) -> list[str]:
        # One generator per batch: the prompts of batch b are the same whatever ran before it.
        rng = random.Random(f"{seed}:{batch_number}") if seed is not None else random.Random()
        return batch_prompts(
            rng,
            seed_instruction_data,
            kept.tasks,
            request_batch_size,
            num_prompt_instructions,
            num_machine_instructions,
            prompt_path,
        )

    def write_summary(status: str) -> None:
        # The endpoint counts retries as they happen: those of failed and abandoned requests too.
        counts["retries"] = retries_of_earlier_runs + endpoint.retries
        report = {
            "status": status,
            "kept_total": len(kept),
            "model_name": model_name,
            "api_style": endpoint.style,
            "max_tokens": endpoint.max_tokens,
            "cost": cost(counts, price_per_1k_prompt_tokens, price_per_1k_completion_tokens),
            "elapsed_seconds_this_run": round(time.monotonic() - start, 3),
            "batches_done": batches_done,
            "counts": dict(sorted(counts.items())),
        }
        utils.write_text_atomically(json.dumps(report, indent=4) + "\n", summary_path)

    # The bar counts what ends the run: the requests when --max_requests caps them, else the kept tasks.
    if max_requests is None:
        progress = tqdm.tqdm(total=num_instructions_to_generate, initial=len(kept), desc="kept", unit="task")
    else:
        progress = tqdm.tqdm(total=max_requests, desc="requests", unit="request")
    in_flight: collections.deque[Future] = collections.deque()
    next_batch = batches_done
    request_limit = None if max_requests is None else batches_done + max_requests
    consecutive_failures = 0
    summary_written = time.monotonic()
    status = "interrupted"
    try:
        while len(kept) < num_instructions_to_generate and batches_done != request_limit:
            while len(in_flight) < max_concurrency and next_batch != request_limit:
                in_flight.append(send_in_background(endpoint, prompts_of_batch(next_batch)))
                next_batch += 1
            # Results are folded in request order, whatever order they arrive in.
            try:
                completion = in_flight.popleft().result()
            except RequestFailed as e:
                completion = Completion([], failures=[e])
            # A Ctrl-C waits until the batch is folded in and saved, so the files agree with each other.
            with _ctrl_c_deferred():
                candidates = candidate_tasks(completion, num_prompt_instructions, counts)
                newly_kept = kept.add_novel(candidates, similarity_threshold)
                counts["dropped_similar"] += len(candidates) - newly_kept
                counts["kept"] += newly_kept
                if newly_kept:
                    kept.save()
                progress.update(newly_kept if max_requests is None else 1)
                batches_done += 1
                counts["requests"] += 1
                progress.set_postfix(progress_counts(counts), refresh=False)
                if candidates:
                    consecutive_failures = 0
                else:
                    consecutive_failures += 1
                    last_error = (
                        str(completion.failures[-1]) if completion.failures else "the completions held no usable task"
                    )
                    if consecutive_failures >= max_consecutive_failures:
                        raise StopGeneration(
                            f"{consecutive_failures} requests in a row failed or gave nothing usable; last: {last_error}"
                        )
                # The summary is accounting only: once a second is enough. After a crash it may lag,
                # and the resumed run repeats those requests (with a deterministic endpoint, their
                # tasks duplicate kept ones and are dropped).
                if time.monotonic() - summary_written >= 1.0:
                    write_summary("running")
                    summary_written = time.monotonic()
        status = "complete" if len(kept) >= num_instructions_to_generate else "request limit reached"
    except StopGeneration as e:
        status = f"stopped: {e}"
        raise
    finally:
        # Requests still in flight are abandoned (their daemon threads do not hold up the exit);
        # the stop event ends their retry waits.
        stop_event.set()
        with _ctrl_c_deferred():
            progress.close()
            if not os.path.exists(regen_path):
                kept.save()  # the output exists even when nothing was kept
            write_summary(status)
    return kept.tasks


@contextlib.contextmanager
def _ctrl_c_deferred():
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


def main() -> None:
    utils.run_fire(
        {"generate_instruction_following_data": generate_instruction_following_data},
        errors=(StopGeneration, OSError),
        # The run saved regen.json and regen_summary.json on its way out.
        interrupted="interrupted; what was done is saved in regen.json: rerun the same command to resume",
    )


if __name__ == "__main__":
    main()
