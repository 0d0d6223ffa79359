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
import json
import os
import random
import re
import string
import threading
import time
from concurrent.futures import Future

import numpy as np
import tqdm

import utils
from endpoint import Completion, Endpoint, RequestFailed, StopRun, cost, ctrl_c_deferred, in_background
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
    client = Endpoint(
        model_name,
        api_base,
        api_style,
        max_tokens,
        {"temperature": temperature, "top_p": top_p, "stop": STOP_SEQUENCES},
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
        counts["retries"] = retries_of_earlier_runs + client.retries
        report = {
            "status": status,
            "kept_total": len(kept),
            "model_name": model_name,
            "api_style": client.style,
            "one_prompt_per_request": client.one_prompt_per_call_reason,
            "max_tokens": client.max_tokens,
            "cost": cost(
                counts["prompt_tokens"],
                counts["completion_tokens"],
                price_per_1k_prompt_tokens,
                price_per_1k_completion_tokens,
            ),
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
                in_flight.append(in_background(client.complete, prompts_of_batch(next_batch)))
                next_batch += 1
            # Results are folded in request order, whatever order they arrive in.
            try:
                completion = in_flight.popleft().result()
            except RequestFailed as e:
                completion = Completion([], failures=[e])
            # A Ctrl-C waits until the batch is folded in and saved, so the files agree with each other.
            with ctrl_c_deferred():
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
                        raise StopRun(
                            f"{consecutive_failures} requests in a row failed or gave nothing usable; last: {last_error}"
                        )
                # The summary is accounting only: once a second is enough. After a crash it may lag,
                # and the resumed run repeats those requests (with a deterministic endpoint, their
                # tasks duplicate kept ones and are dropped).
                if time.monotonic() - summary_written >= 1.0:
                    write_summary("running")
                    summary_written = time.monotonic()
        status = "complete" if len(kept) >= num_instructions_to_generate else "request limit reached"
    except StopRun as e:
        status = f"stopped: {e}"
        raise
    finally:
        # Requests still in flight are abandoned (their daemon threads do not hold up the exit);
        # the stop event ends their retry waits.
        stop_event.set()
        with ctrl_c_deferred():
            progress.close()
            if not os.path.exists(regen_path):
                kept.save()  # the output exists even when nothing was kept
            write_summary(status)
    return kept.tasks


def main() -> None:
    utils.run_fire(
        {"generate_instruction_following_data": generate_instruction_following_data},
        errors=(StopRun, OSError),
        # The run saved regen.json and regen_summary.json on its way out.
        interrupted="interrupted; what was done is saved in regen.json: rerun the same command to resume",
    )


if __name__ == "__main__":
    main()
