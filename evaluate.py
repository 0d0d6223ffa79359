"""Did fine-tuning make a better instruction follower? Two measures:

    python evaluate.py win_rate --model_outputs A.json --reference_outputs B.json \\
        --judge_model M [--api_base URL] --output_dir D
    python evaluate.py loss --model_name_or_path M --data_path held_out.json

`win_rate` asks a judge (any OpenAI-compatible endpoint, completions or chat) which of two
responses to the same instruction is better, once in each order so that a preference for one
slot cancels out. The verdict is read from the top logprobs of the answer token when the
endpoint sends them (a continuous preference) and from the answer's text otherwise. Results:
`annotations.json` (AlpacaEval's annotation records; preference 1: output_1 is better, 2:
output_2 is better, 1.5: a tie; output_1 is the reference) and `leaderboard.json`, also
printed. Every judgment is cached in `output_dir/judgments/`, keyed by all that determines it,
so a rerun (after a crash, or with more outputs) asks only what is new.

`loss` is the mean loss per response token and its perplexity on a held-out file, with the
tokenization and masking train.py trains with: a judge-free number that runs on one CPU.

The project root holds this file, so code run from it that does `import evaluate` gets this
script, not Hugging Face's `evaluate` package.
"""

import collections
import hashlib
import json
import math
import os
import re
import threading
import time

import numpy as np
import tqdm

import endpoint
import utils
from utils import UsageError

DEFAULT_JUDGE_PROMPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "judge_prompt.txt")
PLACEHOLDERS = ("{instruction}", "{input}", "{output_1}", "{output_2}")
# A verdict in the answer's text: the digit first, perhaps as "Answer 2", "(1)", "2." or "The
# answer is 1.", alone on its line (a small model may go on to explain; "1 or 2" is no verdict).
_VERDICT_RE = re.compile(
    r"\s*(?:the\s+(?:better\s+)?answer\s+is\s*:?\s*|(?:answer|output)\s*)?\(?\s*([12])\s*\)?\s*[.!:]?[ \t]*(?:\n|$)",
    re.IGNORECASE,
)


# ----------------------------------------------------------------------------- input files


def load_outputs(path: str) -> dict[tuple[str, str], dict]:
    """The responses of one model by (instruction, input): AlpacaEval's model_outputs.json (what
    `inference.py --output_file` writes), the AlpacaEval set, the Self-Instruct user-oriented set
    (its instance outputs) or training data. The generator is the records' `generator`, else the
    file's name."""
    default_generator = os.path.splitext(os.path.basename(path))[0]
    outputs: dict[tuple[str, str], dict] = {}
    positions: dict[tuple[str, str], int] = {}
    records = utils.load_evaluation_records(path, required=("instruction", "output"), optional=("input", "generator"))
    for index, record in enumerate(records):
        key = (record["instruction"], record.get("input") or "")
        if key in outputs:
            raise UsageError(
                f"{path}: record {index}: the same instruction and input as record {positions[key]} "
                f"({_short(key[0])}); each may appear once"
            )
        positions[key] = index
        outputs[key] = {**record, "input": key[1], "generator": record.get("generator") or default_generator}
    if not outputs:
        raise UsageError(f"{path}: no records")
    return outputs


def matched_pairs(model_path: str, reference_path: str) -> list[tuple[dict, dict]]:
    """(reference, model) record pairs in the model file's order; both files must hold the same
    instructions and inputs."""
    model, reference = load_outputs(model_path), load_outputs(reference_path)
    for path, ours, other_path, theirs in (
        (model_path, model, reference_path, reference),
        (reference_path, reference, model_path, model),
    ):
        missing = [key for key in ours if key not in theirs]
        if missing:
            raise UsageError(
                f"{path}: {len(missing)} instruction(s) that {other_path} does not have, the first "
                f"{_short(missing[0][0])}: both files must cover the same instructions and inputs"
            )
    return [(reference[key], model[key]) for key in model]


def load_judge_prompt(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            template = f.read().removesuffix("\n")
    except OSError as e:
        raise UsageError(f"--judge_prompt {path}: cannot read it: {e.strerror or e}") from None
    missing = [p for p in PLACEHOLDERS if p not in template]
    if missing:
        raise UsageError(f"--judge_prompt {path}: no {', no '.join(missing)} in the template")
    return template


def judge_prompt(template: str, instruction: str, input: str, first: str, second: str) -> str:
    # Placeholders are replaced one by one, never by str.format: responses hold braces.
    values = dict(zip(PLACEHOLDERS, (instruction, input, first, second)))
    return re.sub("|".join(re.escape(p) for p in PLACEHOLDERS), lambda m: values[m[0]], template)


def _short(text: str) -> str:
    return json.dumps(text if len(text) <= 60 else text[:57] + "...", ensure_ascii=False)


# ----------------------------------------------------------------------------- verdicts


def verdict_from_logprobs(logprobs: list[tuple[str, dict[str, float]]] | None) -> float | None:
    """The preference (1: the first slot, 2: the second) as the judge's probability of "2"
    among "1" and "2" at its first answer token, or None when logprobs say nothing."""
    for token, alternatives in logprobs or []:
        mass = {"1": 0.0, "2": 0.0}
        for alternative, logprob in alternatives.items():
            if alternative.strip() in mass:
                mass[alternative.strip()] += math.exp(logprob)
        if mass["1"] + mass["2"] > 0:
            return 1 + mass["2"] / (mass["1"] + mass["2"])
        if token.strip():  # the first real token gave neither digit: look no further
            return None
    return None


def verdict_from_text(text: str) -> float | None:
    match = _VERDICT_RE.match(text)
    return float(match[1]) if match else None


def judgment_key(settings: dict, instruction: str, input: str, first: str, second: str) -> str:
    """What a judgment depends on (the judge, its prompt and sampling, the instruction, the input
    and the two responses in their order), hashed."""
    text = json.dumps([settings, instruction, input, first, second], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


class JudgmentCache:
    """Finished judgments, one small JSON file each under `directory`, written atomically, so a
    run killed at any moment keeps every judgment it finished."""

    def __init__(self, directory: str):
        self.directory = directory

    def _path(self, key: str) -> str:
        return os.path.join(self.directory, key[:2], key + ".json")

    def get(self, key: str) -> dict | None:
        try:
            with open(self._path(key), encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def put(self, key: str, judgment: dict) -> None:
        utils.write_text_atomically(json.dumps(judgment, ensure_ascii=False), self._path(key))


def ask_judge(client: endpoint.Endpoint, prompt: str) -> dict:
    """One judgment: the verdict from logprobs, else from the text; an answer that gives none is
    asked once more, and then recorded as unparseable (preference None)."""
    judgment = {"preference": None, "source": None, "answers": [], "prompt_tokens": 0, "completion_tokens": 0}
    for _ in range(2):
        completion = client.complete([prompt])
        if completion.failures:
            raise completion.failures[0]
        judgment["prompt_tokens"] += completion.prompt_tokens
        judgment["completion_tokens"] += completion.completion_tokens
        (text, _finish), logprobs = completion.choices[0], (completion.logprobs or [None])[0]
        judgment["answers"].append(text)
        for source, preference in (("logprobs", verdict_from_logprobs(logprobs)), ("text", verdict_from_text(text))):
            if preference is not None:
                judgment.update(preference=preference, source=source)
                return judgment
    return judgment


# ----------------------------------------------------------------------------- the numbers


def length_controlled_win_rate(preferences: list[float], length_differences: list[float]) -> float:
    """A logistic regression of the preference (as the probability that the model wins) on the
    standardised length difference (model minus reference), read at a zero difference: the win
    rate the judge would give if both responses were equally long. Fitted by Newton's method."""
    y = np.asarray(preferences, dtype=float) - 1
    d = np.asarray(length_differences, dtype=float)
    scale = d.std()
    x = np.column_stack([np.ones_like(d), d / scale if scale > 0 else np.zeros_like(d)])
    if scale == 0:
        x = x[:, :1]
    weights = np.zeros(x.shape[1])
    for _ in range(100):
        p = 1 / (1 + np.exp(-x @ weights))
        gradient = x.T @ (y - p)
        hessian = (x * (p * (1 - p))[:, None]).T @ x + 1e-9 * np.eye(x.shape[1])
        step = np.linalg.solve(hessian, gradient)
        weights += step
        if np.abs(step).max() < 1e-12:
            break
    return float(100 / (1 + math.exp(-weights[0])))


def leaderboard(annotations: list[dict], judgments: list[tuple[dict, dict]], judge_model: str) -> dict:
    """The win rate of output_2 (the model) over output_1 (the reference) and the judge's quality."""
    scored = [a for a in annotations if a["preference"] is not None]
    preferences = np.array([a["preference"] for a in scored], dtype=float)
    n = len(scored)
    win_rate = float((preferences - 1).mean() * 100) if n else None
    standard_error = float((preferences - 1).std(ddof=1) / math.sqrt(n) * 100) if n > 1 else None
    interval = (
        [max(0.0, win_rate - 1.96 * standard_error), min(100.0, win_rate + 1.96 * standard_error)]
        if standard_error is not None
        else None
    )
    both = [(f, s) for f, s in judgments if f["preference"] is not None and s["preference"] is not None]

    def choice(preference: float) -> int:  # 1, 2 or 0 for a tie, in the slot frame
        return 0 if preference == 1.5 else (1 if preference < 1.5 else 2)

    # The model is in slot 2 in the first order and slot 1 in the second: the orders agree when
    # they pick the same response.
    consistent = sum(choice(f["preference"]) == {0: 0, 1: 2, 2: 1}[choice(s["preference"])] for f, s in both)
    slot_preferences = [j["preference"] for pair in judgments for j in pair if j["preference"] is not None]
    lengths = {
        "model": [len(a["output_2"]) for a in annotations],
        "reference": [len(a["output_1"]) for a in annotations],
    }
    return {
        "model": annotations[0]["generator_2"],
        "reference": annotations[0]["generator_1"],
        "judge": judge_model,
        "win_rate": win_rate,
        "standard_error": standard_error,
        "ci95": interval,
        "wins": int((preferences > 1.5).sum()),
        "ties": int((preferences == 1.5).sum()),
        "losses": int((preferences < 1.5).sum()),
        "n": n,
        "n_pairs": len(annotations),
        "unscored_pairs": len(annotations) - n,
        "avg_length": {name: float(np.mean(values)) for name, values in lengths.items()},
        "length_controlled_win_rate": length_controlled_win_rate(
            list(preferences), [len(a["output_2"]) - len(a["output_1"]) for a in scored]
        )
        if n
        else None,
        "position_consistency": consistent / len(both) if both else None,
        "first_slot_preference": float(np.mean([2 - p for p in slot_preferences])) if slot_preferences else None,
    }


def print_leaderboard(board: dict) -> None:
    def number(value, digits=1):
        return "n/a" if value is None else f"{value:.{digits}f}"

    print(f"\n{board['model']} vs {board['reference']}, judged by {board['judge']}")
    interval = board["ci95"] and f"{number(board['ci95'][0])}-{number(board['ci95'][1])}"
    print(
        f"  win rate {number(board['win_rate'])}% +/- {number(board['standard_error'])} (95%: {interval or 'n/a'}), "
        f"length-controlled {number(board['length_controlled_win_rate'])}%"
    )
    print(
        f"  {board['wins']} wins, {board['ties']} ties, {board['losses']} losses of n={board['n']}"
        + (f" ({board['unscored_pairs']} pairs unscored)" if board["unscored_pairs"] else "")
    )
    lengths = board["avg_length"]
    print(f"  average length: model {lengths['model']:.0f}, reference {lengths['reference']:.0f} characters")
    print(
        f"  judge: position consistency {number(board['position_consistency'], 2)}, "
        f"first-slot preference {number(board['first_slot_preference'], 2)} (0.5: none)"
    )


# ----------------------------------------------------------------------------- commands


def win_rate(
    model_outputs: str,
    reference_outputs: str,
    judge_model: str,
    api_base: str | None = None,
    output_dir: str = "./evaluation",
    judge_prompt_path: str = DEFAULT_JUDGE_PROMPT,
    api_style: str = "auto",
    max_concurrency: int = 4,
    top_logprobs: int = 5,
    max_tokens: int = 8,
    request_timeout: float = 120.0,
    max_retries: int = 6,
    retry_base_delay: float = 1.0,
    price_per_1k_prompt_tokens: float | None = None,
    price_per_1k_completion_tokens: float | None = None,
) -> dict:
    """Pairwise win rate of one model's outputs over reference outputs, judged by an LLM.

    Args:
        model_outputs: The model's responses: a JSON list (or JSON Lines) of {instruction, input?,
            output, generator?} (what `inference.py --output_file` writes), matched to the
            reference by instruction and input.
        reference_outputs: The responses to compare against, same format; the Self-Instruct
            user-oriented set and the AlpacaEval set are read as published.
        judge_model: The judge's model name as the endpoint knows it.
        api_base: Endpoint base URL, e.g. http://localhost:8000/v1 (default: $OPENAI_BASE_URL,
            else OpenAI). The key is read from $OPENAI_API_KEY, never from a flag.
        output_dir: Where annotations.json, leaderboard.json and the judgment cache (judgments/) go.
        judge_prompt_path: The judge's prompt template, with {instruction}, {input}, {output_1}
            and {output_2}; it asks for the digit 1 or 2.
        api_style: "completions", "chat", or "auto" (completions, and chat when the endpoint has
            no completions API for the model).
        max_concurrency: Judge requests in flight at once (the result does not depend on it).
        top_logprobs: Alternatives asked for at each answer token (0: read verdicts from the text
            only). A server that refuses logprobs is asked without them.
        max_tokens: The longest answer asked for.
        request_timeout: Seconds before a request is abandoned and retried.
        max_retries: Retries of a request on 429, 5xx, timeouts and dropped connections.
        retry_base_delay: First backoff delay in seconds (doubles each retry, with jitter) when the
            endpoint does not send Retry-After.
        price_per_1k_prompt_tokens: Price of 1,000 prompt tokens, to report the cost.
        price_per_1k_completion_tokens: Price of 1,000 completion tokens, to report the cost.

    Returns:
        The leaderboard (also in output_dir/leaderboard.json).
    """
    if api_style not in ("auto", "completions", "chat"):
        raise UsageError(f"--api_style must be auto, completions or chat, not {api_style!r}")
    if max_concurrency < 1 or top_logprobs < 0 or max_tokens < 1:
        raise UsageError("--max_concurrency and --max_tokens must be at least 1, --top_logprobs at least 0")
    pairs = matched_pairs(model_outputs, reference_outputs)
    template = load_judge_prompt(judge_prompt_path)
    settings = {"judge_model": judge_model, "prompt": template, "temperature": 0.0, "max_tokens": max_tokens}
    cache = JudgmentCache(os.path.join(output_dir, "judgments"))
    # Each pair is judged twice: reference first, then model first.
    tasks = []
    for reference, model in pairs:
        for first, second in ((reference, model), (model, reference)):
            key = judgment_key(settings, model["instruction"], model["input"], first["output"], second["output"])
            prompt = judge_prompt(template, model["instruction"], model["input"], first["output"], second["output"])
            tasks.append((key, prompt))
    # Two responses that are the same give one prompt for both orders: it is asked once.
    distinct = dict(tasks)
    results: dict[str, dict] = {key: found for key in distinct if (found := cache.get(key)) is not None}
    todo = [(key, prompt) for key, prompt in distinct.items() if key not in results]
    print(f"{len(pairs)} pairs, {len(distinct)} distinct judgments: {len(results)} cached, {len(todo)} to ask")

    stop_event = threading.Event()
    client = endpoint.Endpoint(
        judge_model,
        api_base,
        api_style,
        max_tokens,
        {"temperature": 0.0},
        request_timeout,
        max_retries,
        retry_base_delay,
        stop_event,
        top_logprobs=top_logprobs,
    )
    counts = collections.Counter()
    start = time.monotonic()
    try:
        run_judgments(client, todo, cache, results, counts, max_concurrency)
    finally:
        stop_event.set()
    annotations, judgments = [], []
    for number, (reference, model) in enumerate(pairs):
        forward, swapped = (results.get(key) for key, _ in tasks[2 * number : 2 * number + 2])
        forward, swapped = forward or {"preference": None}, swapped or {"preference": None}
        judgments.append((forward, swapped))
        # In the second order the model is output 1: its preference is mirrored into the pair's frame.
        by_order = [forward["preference"], None if swapped["preference"] is None else 3 - swapped["preference"]]
        preference = None if None in by_order else (by_order[0] + by_order[1]) / 2
        annotations.append(
            {
                "instruction": model["instruction"],
                "input": model["input"],
                "output_1": reference["output"],
                "output_2": model["output"],
                "generator_1": reference["generator"],
                "generator_2": model["generator"],
                "annotator": judge_model,
                "preference": preference,
                "preference_by_order": by_order,
            }
        )
    board = leaderboard(annotations, judgments, judge_model)
    usage = collections.Counter()
    for judgment in results.values():
        usage["prompt_tokens"] += judgment.get("prompt_tokens", 0)
        usage["completion_tokens"] += judgment.get("completion_tokens", 0)
        usage[f"verdicts_from_{judgment.get('source') or 'nothing (unparseable)'}"] += 1
    board["judge_run"] = {
        "api_base": client.where,
        "api_style": client.style,
        "logprobs_refused": client.logprobs_refused,
        "requests_this_run": counts["requests"],
        "judgments_cached": len(distinct) - len(todo),
        "failed_requests_this_run": counts["failed_requests"],
        "retries_this_run": client.retries,
        "elapsed_seconds_this_run": round(time.monotonic() - start, 3),
        **dict(sorted(usage.items())),
        "cost": endpoint.cost(
            usage["prompt_tokens"],
            usage["completion_tokens"],
            price_per_1k_prompt_tokens,
            price_per_1k_completion_tokens,
        ),
    }
    utils.jdump(annotations, os.path.join(output_dir, "annotations.json"))
    utils.jdump(board, os.path.join(output_dir, "leaderboard.json"))
    print_leaderboard(board)
    if counts["failed_requests"]:
        print(f"{counts['failed_requests']} judge requests failed: rerun the same command to ask them again")
    return board


def run_judgments(
    client: endpoint.Endpoint,
    todo: list[tuple[str, str]],
    cache: JudgmentCache,
    results: dict[str, dict],
    counts: collections.Counter,
    max_concurrency: int,
) -> None:
    """Ask the judge each (key, prompt) of `todo`, `max_concurrency` at a time, saving each
    judgment as soon as it arrives. A request that fails for good is counted, not saved."""
    in_flight = collections.deque()
    pending = iter(todo)
    with tqdm.tqdm(total=len(todo), desc="judging", unit="judgment") as progress:
        while True:
            while len(in_flight) < max_concurrency and (item := next(pending, None)) is not None:
                in_flight.append((item[0], endpoint.in_background(ask_judge, client, item[1])))
            if not in_flight:
                return
            key, future = in_flight.popleft()
            try:
                judgment = future.result()
            except endpoint.RequestFailed as e:
                counts["failed_requests"] += 1
                tqdm.tqdm.write(f"judge request failed: {e}")
            else:
                counts["requests"] += len(judgment["answers"])
                with endpoint.ctrl_c_deferred():
                    cache.put(key, judgment)
                    results[key] = judgment
            progress.update(1)


def loss(
    model_name_or_path: str,
    data_path: str,
    model_max_length: int = 512,
    batch_size: int = 8,
    lora_weights: str | None = None,
    output_file: str | None = None,
) -> dict:
    """Mean loss per response token, and perplexity, on a held-out file, tokenized and masked as
    train.py trains.

    Args:
        model_name_or_path: The model directory (a base model or train.py's output).
        data_path: Held-out records: a JSON list (or JSON Lines) of {instruction, input?, output};
            the Self-Instruct user-oriented set and the AlpacaEval set are read as published.
        model_max_length: As train.py's flag: examples whose prompt alone does not fit are
            skipped, longer responses are cut.
        batch_size: Examples per forward pass (the result does not depend on it).
        lora_weights: A LoRA adapter directory to apply to the model.
        output_file: Where to write the result as JSON as well.

    Returns:
        {loss, perplexity, tokens, examples, skipped, cut}.
    """
    if batch_size < 1 or model_max_length < 2:
        raise UsageError("--batch_size must be at least 1 and --model_max_length at least 2")
    records = utils.load_evaluation_records(data_path, nonempty=("instruction", "output"))
    if not records:
        raise UsageError(f"{data_path}: no records")
    utils.check_model_source(model_name_or_path)
    if lora_weights is not None and not os.path.isfile(os.path.join(lora_weights, "adapter_config.json")):
        raise UsageError(f"--lora_weights {lora_weights}: no adapter_config.json there")

    import torch
    import transformers

    import tokens

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_name_or_path, padding_side="right")
    num_new_tokens = tokenizer.add_special_tokens(tokens.missing_special_tokens(tokenizer))
    examples, counts = tokens.preprocess(records, tokenizer, model_max_length)
    if not examples:
        raise UsageError(f"{data_path}: no example fits in --model_max_length {model_max_length}")
    model = transformers.AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=torch.float32)
    tokens.init_new_token_embeddings(model, len(tokenizer), num_new_tokens)
    if lora_weights is not None:
        import peft

        model = peft.PeftModel.from_pretrained(model, lora_weights)
    model.eval()
    collator = tokens.DataCollatorForSupervisedDataset(pad_token_id=tokenizer.pad_token_id)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = collator(examples[start : start + batch_size])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            labels = batch["labels"][:, 1:]
            total += torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                labels.reshape(-1),
                ignore_index=tokens.IGNORE_INDEX,
                reduction="sum",
            ).item()
            count += int((labels != tokens.IGNORE_INDEX).sum())
    mean = total / count
    result = {"loss": mean, "perplexity": math.exp(mean), "tokens": count, "examples": len(examples), **counts}
    if output_file is not None:
        utils.jdump(result, output_file)
    print(
        f"{model_name_or_path} on {data_path}: loss {mean:.4f} per response token, perplexity {math.exp(mean):.2f} "
        f"({count} tokens in {len(examples)} examples; skipped {counts['skipped']}, cut {counts['cut']})"
    )
    return result


def main() -> None:
    utils.run_fire(
        {"win_rate": win_rate, "loss": loss},
        errors=(endpoint.StopRun, OSError),
        interrupted="interrupted; every finished judgment is cached: rerun the same command to go on",
    )


if __name__ == "__main__":
    main()
