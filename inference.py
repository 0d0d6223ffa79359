"""Talk to a fine-tuned Alpaca model: one instruction, an interactive loop, a batch over a file,
or an HTTP server that speaks the OpenAI completions and chat API and serves a small web page.

    python inference.py --model_name_or_path OUT --instruction "Give three tips for staying healthy."
    python inference.py --model_name_or_path OUT                      # interactive, until EOF
    python inference.py --model_name_or_path OUT --input_file eval.json --output_file outputs.json
    python inference.py --model_name_or_path OUT --serve --port 8000  # http://127.0.0.1:8000/

Prompts use the Alpaca template from utils.py, the one training used.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import queue
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import fire
from tqdm import tqdm

import utils
from utils import UsageError, format_prompt, jdump

# torch and transformers take seconds to import, so they are imported where they are used: a
# mistyped command line or model path is then reported at once.
if TYPE_CHECKING:
    import torch
    import transformers

# ---------------------------------------------------------------------------------------------
# Loading


def load_model_and_tokenizer(
    model_name_or_path: str, lora_weights: str | None = None, dtype: str = "auto"
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    """The model (with its LoRA adapter merged when `lora_weights` is given) and its tokenizer,
    ready for left-padded batched generation."""
    import torch
    import transformers

    import tokens

    # train.py saves the tokenizer beside the adapter, with the pad token it may have added.
    tokenizer_dir = lora_weights if lora_weights and _has_tokenizer(lora_weights) else model_name_or_path
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir, padding_side="left")
    if tokenizer.pad_token is None:
        # Only padded positions use it, and the attention mask hides them.
        tokenizer.pad_token = tokenizer.eos_token
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=torch_dtype)
    if lora_weights:
        import peft

        tokens.grow_embeddings(model, len(tokenizer))
        model = peft.PeftModel.from_pretrained(model, lora_weights).merge_and_unload()
    # Generation stops at every end-of-sequence token (see end_token_ids), and pads with ours.
    model.generation_config.eos_token_id = sorted(end_token_ids(model, tokenizer)[1])
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), tokenizer


def _has_tokenizer(directory: str) -> bool:
    return any(os.path.exists(os.path.join(directory, name)) for name in utils.TOKENIZER_FILES)


def check_sources(model_name_or_path: str, lora_weights: str | None) -> None:
    """Fail at once, in one line, for a model or adapter that cannot be loaded (see
    utils.check_model_source), rather than with a long traceback after the slow loading began."""
    if _is_adapter(model_name_or_path) and not os.path.exists(os.path.join(model_name_or_path, "config.json")):
        raise UsageError(
            f"--model_name_or_path {model_name_or_path} holds a LoRA adapter: pass it as --lora_weights, "
            "and the model it was trained from as --model_name_or_path"
        )
    # train.py saves the tokenizer beside the adapter; the base model then needs none.
    adapter_has_tokenizer = lora_weights is not None and _has_tokenizer(lora_weights)
    utils.check_model_source(model_name_or_path, "--model_name_or_path", tokenizer=not adapter_has_tokenizer)
    if lora_weights is None:
        return
    if not os.path.isdir(lora_weights):  # no such directory, or a hub name
        utils.check_model_source(lora_weights, "--lora_weights", tokenizer=False)
    elif not _is_adapter(lora_weights):
        raise UsageError(
            f"--lora_weights {lora_weights}: the directory has no adapter_config.json, so it is no LoRA adapter "
            "(train.py --use_lora writes one)"
        )


def _is_adapter(directory: str) -> bool:
    return os.path.exists(os.path.join(directory, "adapter_config.json"))


def load_or_explain(
    model_name_or_path: str, lora_weights: str | None, dtype: str
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    """`load_model_and_tokenizer` for the command line: a model that cannot be loaded (after
    `check_sources` found nothing wrong: from the hub, mostly) is a one-line UsageError."""
    try:
        return load_model_and_tokenizer(model_name_or_path, lora_weights, dtype)
    except OSError as error:  # from the hub: a name it does not have, a gated model, a lost connection
        source = model_name_or_path + (f" with --lora_weights {lora_weights}" if lora_weights else "")
        raise UsageError(f"cannot load {source}: {' '.join(str(error).split())}") from None


def context_length(model: transformers.PreTrainedModel) -> int:
    """How many positions (prompt plus completion) the model can attend to."""
    return int(getattr(model.config, "max_position_embeddings", None) or 2048)


def decoding_kwargs(
    temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, num_beams: int = 1, repetition_penalty: float = 1.0
) -> dict:
    """Keyword arguments for `model.generate`: greedy (or beam search) when temperature is 0."""
    kwargs: dict[str, Any] = dict(num_beams=num_beams, repetition_penalty=repetition_penalty)
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)
    else:
        # Override whatever sampling defaults the checkpoint's generation_config carries.
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kwargs


# ---------------------------------------------------------------------------------------------
# Generation


@dataclass
class Generation:
    text: str
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length" (max_new_tokens)
    prompt_tokens: int
    completion_tokens: int


class TextDecoder:
    """The text of generated tokens, built one token at a time.

    A token's text can depend on its neighbours (SentencePiece drops the leading space of the
    first token decoded; a character may be split over several byte tokens), so each step
    decodes a short window of recent tokens, starting inside the prompt, and appends what the
    newest tokens add to it. Decoding the whole text again at every token would be quadratic."""

    def __init__(self, tokenizer, prompt_ids: Sequence[int]):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-4:])
        self.start, self.done = 0, len(self.ids)  # the window is ids[start:]; ids[:done] are in text
        self.text = ""

    def _added(self) -> str:
        before = self.tokenizer.decode(self.ids[self.start : self.done], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self.start :], skip_special_tokens=True)
        # `after` extends `before`, except with tokenizers whose clean-up rewrites text across
        # tokens; then what differs is appended, so that no text is lost.
        return after[len(os.path.commonprefix([before, after])) :]

    def add(self, token: int) -> None:
        self.ids.append(token)
        added = self._added()
        # U+FFFD at the end is a character whose bytes have not all arrived yet.
        if added and not added.endswith("\ufffd"):
            self.text += added
            self.start, self.done = self.done, len(self.ids)

    def flush(self) -> str:
        """The whole text, including a last incomplete character."""
        self.text += self._added()
        self.start = self.done = len(self.ids)
        return self.text


def find_stop(text: str, stop: Sequence[str]) -> int:
    """Index of the earliest stop string in `text`, or -1."""
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found) if found else -1


def text_pieces(
    tokenizer,
    prompt_ids: Sequence[int],
    token_lists: Iterable[list[int]],
    stop: Sequence[str],
    end_ids: set[int],
    eos_ids: set[int],
) -> Iterator[tuple[str, str | None]]:
    """Turn generated tokens (arriving as lists) into text, yielding `(new_text, None)` as it
    becomes final and lastly `(last_text, finish_reason)`. The text ends before the first end
    token (end of sequence, or padding) and before the first stop string."""
    decoder = TextDecoder(tokenizer, prompt_ids)
    # Text that could be the start of a stop string is held back until it is known not to be.
    hold = max((len(s) for s in stop), default=1) - 1
    sent, reason = 0, None
    for ids in token_lists:
        for token in ids:
            if token in end_ids:
                reason = "stop" if token in eos_ids else "length"
                break
            decoder.add(token)
        if reason or find_stop(decoder.text, stop) >= 0:
            break
        ready = len(decoder.text) - hold
        if ready > sent:
            yield decoder.text[sent:ready], None
            sent = ready
    text = decoder.flush()
    cut = find_stop(text, stop)
    if cut >= 0:
        text, reason = text[:cut], "stop"
    yield text[sent:], reason or "length"


def end_token_ids(model, tokenizer) -> tuple[set[int], set[int]]:
    """(tokens that end a sequence: end of sequence and padding, the end-of-sequence tokens).
    The end-of-sequence tokens are the generation config's (one or several) and the tokenizer's,
    the one train.py appends to every example, even where the config names another."""
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    eos_ids.discard(None)
    return eos_ids | {tokenizer.pad_token_id}, eos_ids


def complete_batch(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    stop: Sequence[str] = (),
    cancel: threading.Event | None = None,
    **decoding,
) -> list[Generation]:
    """Complete several raw prompts at once, left-padded so that every prompt ends at the same
    position and the new tokens line up. Setting `cancel` stops the generation at its next token."""
    encoded = [tokenizer(prompt)["input_ids"] for prompt in prompts]
    batch = tokenizer.pad({"input_ids": encoded}, padding=True, return_tensors="pt").to(model.device)
    if stop:  # let generate stop each sequence at its stop string
        decoding.update(stop_strings=list(stop), tokenizer=tokenizer)
    if cancel is not None:
        import transformers

        decoding.update(stopping_criteria=transformers.StoppingCriteriaList([WhenCancelled(cancel)]))
    output = model.generate(**batch, max_new_tokens=max_new_tokens, **decoding)
    end_ids, eos_ids = end_token_ids(model, tokenizer)
    completions = []
    for prompt_ids, new_ids in zip(encoded, output[:, batch["input_ids"].shape[1] :].tolist()):
        pieces = list(text_pieces(tokenizer, prompt_ids, [new_ids], stop, end_ids, eos_ids))
        generated = next((i for i, token in enumerate(new_ids) if token in end_ids), len(new_ids))
        completions.append(Generation("".join(p for p, _ in pieces), pieces[-1][1], len(prompt_ids), generated))
    return completions


class TokenQueue:
    """Receives the new tokens from `generate` (running in another thread) and hands them to
    the consumer through a queue. (A streamer needs only `put` and `end`; leaving out the
    BaseStreamer base keeps transformers' generation code from loading when --help is asked.)"""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate first passes the prompt itself
            self.prompt_seen = True
            return
        self.queue.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self.queue.put(None)

    def __iter__(self) -> Iterator[list[int]]:
        while (ids := self.queue.get()) is not None:
            yield ids


class WhenCancelled:
    """A stopping criterion (any callable of this signature is one) that stops generation once one
    of its events is set: the consumer has what it needs (a stop string, a closed connection, a
    Ctrl-C), or the server is stopping."""

    def __init__(self, *events: threading.Event):
        self.events = events

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        import torch

        cancelled = any(event.is_set() for event in self.events)
        return torch.full((input_ids.shape[0],), cancelled, dtype=torch.bool, device=input_ids.device)


def stream_completion(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int,
    stop: Sequence[str] = (),
    cancel: threading.Event | None = None,
    **decoding,
) -> Iterator[tuple[str, str | None]]:
    """Complete one raw prompt, yielding `(new_text, None)` as tokens arrive and finally
    `(last_text, finish_reason)`: the pieces add up to `complete_batch`'s text for the same
    prompt. Closing the iterator early, or setting `cancel`, stops the generation. Beam search
    knows its best beam only at the end, so with `num_beams` above 1 the text comes in one piece."""
    if decoding.get("num_beams", 1) > 1:
        completion = complete_batch(model, tokenizer, [prompt], max_new_tokens, stop, cancel, **decoding)[0]
        yield completion.text, completion.finish_reason
        return
    import torch
    import transformers

    prompt_ids = tokenizer(prompt)["input_ids"]
    streamer, cancelled, errors = TokenQueue(), threading.Event(), []
    cancel_events = [cancelled] if cancel is None else [cancelled, cancel]

    def run() -> None:
        try:
            model.generate(
                input_ids=torch.tensor([prompt_ids], device=model.device),
                attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long, device=model.device),
                max_new_tokens=max_new_tokens,
                streamer=streamer,
                stopping_criteria=transformers.StoppingCriteriaList([WhenCancelled(*cancel_events)]),
                **decoding,
            )
        except BaseException as error:  # re-raised in the consumer's thread
            errors.append(error)
        finally:
            streamer.end()

    def new_tokens() -> Iterator[list[int]]:
        yield from streamer
        thread.join()
        if errors:
            raise errors[0]

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield from text_pieces(tokenizer, prompt_ids, new_tokens(), stop, *end_token_ids(model, tokenizer))
    finally:
        cancelled.set()
        thread.join()


def stripped(chunks: Iterator[tuple[str, str | None]]) -> Iterator[tuple[str, str | None]]:
    """A streamed response without leading and trailing whitespace, the same as `text.strip()`
    of the whole (trailing whitespace is held back until more text follows it)."""
    text, sent = "", 0
    for delta, reason in chunks:
        text += delta
        visible = text.strip()
        if len(visible) > sent or reason is not None:
            yield visible[sent:], reason
            sent = len(visible)


# ---------------------------------------------------------------------------------------------
# Command line: one instruction, interactive loop, batch over a file


def print_response(model, tokenizer, instruction: str, input: str | None, max_new_tokens: int, **decoding) -> None:
    """Generate the response to one instruction, printing it as it comes."""
    prompt = format_prompt(instruction, input)
    for delta, _ in stripped(stream_completion(model, tokenizer, prompt, max_new_tokens, **decoding)):
        print(delta, end="", flush=True)
    print(flush=True)


def interactive(model, tokenizer, max_new_tokens: int, **decoding) -> None:
    """Read an instruction and an optional input from stdin, respond, repeat until end of file.
    Ctrl-C during a response stops it; Ctrl-C at a prompt ends the loop, as end of file does.
    The prompts go to stderr so that stdout holds only the responses."""
    while (request := read_request()) is not None:
        try:
            print_response(model, tokenizer, *request, max_new_tokens, **decoding)
        except KeyboardInterrupt:
            print(flush=True)  # end the response's line
            sys.stderr.write("(stopped)\n")
    sys.stderr.write("\n")


def read_request() -> tuple[str, str] | None:
    """The next instruction and its input (maybe empty) from stdin, asked for on stderr; None
    at end of file or Ctrl-C."""
    try:
        instruction = ""
        while not instruction:
            instruction = ask("Instruction: ")
            if instruction is None:
                return None
        return instruction, ask("Input (optional, Enter to skip): ") or ""
    except KeyboardInterrupt:
        return None


def ask(prompt: str) -> str | None:
    """A line of stdin, stripped, after writing `prompt` to stderr; None at end of file."""
    sys.stderr.write(prompt)
    sys.stderr.flush()
    line = sys.stdin.readline()
    return line.strip() if line else None


def read_instructions(path: str, required: tuple[str, ...] = ("instruction",)) -> list[dict]:
    """The `{instruction, input?}` records of a JSON or JSON Lines file, checked."""
    records = utils.load_records(path)
    for index, record in enumerate(records):
        problems = utils.record_problems(record, required=required)
        if problems:
            raise UsageError(utils.describe_problem(path, index, problems[0]))
    return records


def record_key(record: dict) -> tuple[str, str]:
    return record["instruction"], record.get("input") or ""


def load_batch(input_file: str, output_file: str, generator: str) -> tuple[list[dict], dict[int, dict]]:
    """The records of `input_file`, and the responses `generator` already wrote to `output_file`,
    by record index (matched by instruction and input, duplicates in order)."""
    records = read_instructions(input_file)
    done: dict[int, dict] = {}
    if os.path.exists(output_file):
        positions = collections.defaultdict(collections.deque)
        for index, record in enumerate(records):
            positions[record_key(record)].append(index)
        for number, record in enumerate(read_instructions(output_file, required=("instruction", "output"))):
            if not positions[record_key(record)]:
                raise UsageError(
                    f"{output_file}: record {number} is not a response to a record of {input_file}; "
                    "choose another --output_file"
                )
            if record.get("generator") != generator:
                raise UsageError(
                    f"{output_file}: record {number} was written by generator {record.get('generator')!r}, "
                    f"not {generator!r}; choose another --output_file (or --generator)"
                )
            done[positions[record_key(record)].popleft()] = record
    return records, done


def write_outputs(done: dict[int, dict], output_file: str) -> None:
    jdump([done[index] for index in sorted(done)], output_file)


def run_batch(
    model,
    tokenizer,
    records: list[dict],
    done: dict[int, dict],
    output_file: str,
    generator: str,
    batch_size: int,
    max_new_tokens: int,
    **decoding,
) -> None:
    """Respond to every record not `done`, writing all responses as `{instruction, input, output,
    generator}` records (AlpacaEval's model_outputs.json shape, other fields kept) in input order
    to `output_file` after each batch. Ctrl-C exits (status 130) with what is done written."""
    todo = [index for index in range(len(records)) if index not in done]
    # Longest prompts first: similar lengths share a batch (less padding), and a batch too big
    # for memory fails at once rather than at the end.
    prompts = {index: format_prompt(records[index]["instruction"], records[index].get("input")) for index in todo}
    todo.sort(key=lambda index: -len(prompts[index]))
    try:
        with tqdm(total=len(todo), desc="generating", unit="record") as progress:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                completions = complete_batch(model, tokenizer, [prompts[i] for i in chunk], max_new_tokens, **decoding)
                for index, completion in zip(chunk, completions):
                    record = records[index]
                    done[index] = {
                        **record,
                        "input": record.get("input") or "",
                        "output": completion.text.strip(),
                        "generator": generator,
                    }
                write_outputs(done, output_file)
                progress.update(len(chunk))
    except KeyboardInterrupt:
        write_outputs(done, output_file)  # Ctrl-C may have come between a batch and its writing
        print(
            f"inference.py: interrupted; {len(done)} of {len(records)} responses are saved in {output_file}: "
            "run the same command again to generate the rest",
            file=sys.stderr,
        )
        sys.exit(130)  # as utils.run_main exits after a Ctrl-C, with this line instead of its own


# ---------------------------------------------------------------------------------------------
# HTTP server: OpenAI-compatible /v1/completions and /v1/chat/completions, and a web page at /

MAX_BODY_BYTES = 1 << 20
MAX_N = 16
UNSUPPORTED_FIELDS = ("logprobs", "top_logprobs", "echo", "suffix")

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Alpaca</title>
<style>
body { font-family: sans-serif; max-width: 46em; margin: 2em auto; padding: 0 1em; }
textarea { width: 100%; box-sizing: border-box; }
label { display: block; margin-top: .8em; }
#response { white-space: pre-wrap; border: 1px solid #ccc; padding: .8em; min-height: 3em; margin-top: 1em; }
</style></head>
<body>
<h1>Alpaca: <span id="model"></span></h1>
<label>Instruction <textarea id="instruction" rows="3"></textarea></label>
<label>Input (optional) <textarea id="input" rows="2"></textarea></label>
<label>Temperature (0 is greedy) <input id="temperature" type="number" min="0" max="2" step="0.1"
  value="{{temperature}}"></label>
<label>Top p <input id="top_p" type="number" min="0" max="1" step="0.05" value="{{top_p}}"></label>
<label>Max tokens <input id="max_tokens" type="number" min="1" step="1" value="{{max_tokens}}"></label>
<p><button id="generate">Generate</button></p>
<div id="response" data-state="idle"></div>
<script>
const $ = (id) => document.getElementById(id);
fetch("/v1/models").then((r) => r.json()).then((m) => { $("model").textContent = m.data[0].id; });
$("generate").onclick = async () => {
  const out = $("response");
  out.textContent = ""; out.dataset.state = "running"; $("generate").disabled = true;
  try {
    const reply = await fetch("/v1/chat/completions", {
      method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({
        messages: [{role: "user", content: $("instruction").value}], input: $("input").value,
        temperature: Number($("temperature").value), top_p: Number($("top_p").value),
        max_tokens: Number($("max_tokens").value), stream: true}),
    });
    if (!reply.ok) throw new Error((await reply.json()).error.message);
    const reader = reply.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      const events = buffer.split("\\n\\n"); buffer = events.pop();
      for (const event of events) {
        const data = event.replace(/^data: /, "");
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        out.textContent += chunk.choices[0].delta.content || "";
      }
    }
    out.dataset.state = "done";
  } catch (error) {
    out.textContent = "Error: " + error.message; out.dataset.state = "error";
  } finally {
    $("generate").disabled = false;
  }
};
</script>
</body></html>
"""


def render_page(**fields: float) -> bytes:
    """The web page with its fields (`{{name}}` in PAGE) starting at the given values."""
    page = PAGE
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


class InferenceServer(ThreadingHTTPServer):
    """One model behind a lock: requests are parsed concurrently, generated one at a time."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        model,
        tokenizer,
        model_id: str,
        max_new_tokens: int,
        batch_size: int,
        defaults: dict,
    ):
        super().__init__(address, RequestHandler)
        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.max_new_tokens, self.batch_size, self.defaults = max_new_tokens, batch_size, defaults
        # The page's fields start at the defaults of the API, this server's flags.
        self.page = render_page(temperature=defaults["temperature"], top_p=defaults["top_p"], max_tokens=max_new_tokens)
        self.lock = threading.Lock()
        self.lock_holder: threading.Thread | None = None  # the thread of the last request that took the lock
        self.stopping = threading.Event()

    def stop_generating(self) -> None:
        """Stop the generation in flight at its next token and wait until its request's thread has
        ended, for a thread that frees tensors while Python exits aborts the process. Requests
        waiting for the lock are not started."""
        self.stopping.set()
        self.lock.acquire()
        if self.lock_holder is not None:
            self.lock_holder.join()


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
        try:
            handlers[self.path](self.read_json())
        except RequestError as error:
            self.send_error_json(error.status, str(error), error.code)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away; its generation was stopped
        except Exception as error:
            traceback.print_exc()
            self.send_error_json(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(error).__name__}: {error}")

    def method_not_allowed(self) -> None:
        self.send_error_json(HTTPStatus.METHOD_NOT_ALLOWED, f"{self.command} is not allowed: use GET or POST")

    do_PUT = do_DELETE = do_PATCH = method_not_allowed

    # --- the OpenAI API

    def sampling(self, body: dict, max_tokens_names: Sequence[str]) -> dict:
        """The decoding settings of a request; the server's command-line flags are the defaults."""
        for name in UNSUPPORTED_FIELDS:
            # Answering without what they ask for would hand the client a reply it cannot use.
            if body.get(name) not in (None, False, ""):
                raise RequestError(f"'{name}' is not supported by this server")
        max_tokens = self.server.max_new_tokens
        for name in max_tokens_names:
            max_tokens = get_field(body, name, int, max_tokens, low=1)
        stop = get_field(body, "stop", (str, list), [])
        stop = [stop] if isinstance(stop, str) else stop
        if not all(isinstance(s, str) for s in stop):
            raise RequestError("'stop' must be a string or a list of strings")
        defaults = self.server.defaults
        temperature = get_field(body, "temperature", (int, float), defaults["temperature"], 0, 2)
        top_p = get_field(body, "top_p", (int, float), defaults["top_p"], 0, 1)
        if top_p == 0:
            raise RequestError("'top_p' must be above 0")
        decoding = decoding_kwargs(
            temperature, top_p, defaults["top_k"], defaults["num_beams"], defaults["repetition_penalty"]
        )
        return dict(
            max_tokens=max_tokens,
            stop=[s for s in stop if s],
            n=get_field(body, "n", int, 1, 1, MAX_N),
            seed=get_field(body, "seed", int, None),
            stream=get_field(body, "stream", bool, False),
            decoding=decoding,
        )

    def check_length(self, prompts: list[str], max_tokens: int) -> int:
        """`max_tokens` cut to what fits in the model's context after every prompt; a prompt that
        leaves no room, or has no token at all, is refused."""
        context = context_length(self.server.model)
        for number, prompt in enumerate(prompts):
            prompt_length = len(self.server.tokenizer(prompt)["input_ids"])
            if prompt_length == 0:  # possible where the tokenizer adds no beginning-of-sequence token
                raise RequestError(f"prompt {number} is empty: there is nothing for the model to continue")
            if prompt_length >= context:
                # OpenAI's wording and code, which clients parse to shorten their requests.
                raise RequestError(
                    f"This model's maximum context length is {context} tokens, however you requested "
                    f"{prompt_length + 1} tokens ({prompt_length} in your prompt; 1 for the completion). "
                    "Please reduce the length of the prompt.",
                    code="context_length_exceeded",
                )
            max_tokens = min(max_tokens, context - prompt_length)
        return max_tokens

    def completions(self, body: dict) -> None:
        prompts = body.get("prompt")
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise RequestError("'prompt' is required: a string or a non-empty list of strings")
        self.respond("text_completion", prompts, self.sampling(body, ["max_tokens"]))

    def chat_completions(self, body: dict) -> None:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise RequestError("'messages' is required: a non-empty list of {role, content} objects")
        users = [m for m in messages if m.get("role") == "user"]
        if not users:
            raise RequestError("'messages' has no message with role 'user'")
        # Alpaca is single-turn: the last user message is the instruction; `input` (an extension
        # to the OpenAI API) is the optional input of the Alpaca template.
        instruction = message_text(users[-1].get("content"))
        input = get_field(body, "input", str, "")
        sampling = self.sampling(body, ["max_tokens", "max_completion_tokens"])
        self.respond("chat.completion", [format_prompt(instruction, input)], sampling)

    def respond(self, kind: str, prompts: list[str], sampling: dict) -> None:
        max_tokens = self.check_length(prompts, sampling["max_tokens"])
        # Choice i * n + j is the j-th completion of prompt i, as in the OpenAI API.
        expanded = [prompt for prompt in prompts for _ in range(sampling["n"])]
        header = {
            "id": f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": self.server.model_id,
        }
        with self.server.lock:
            self.server.lock_holder = threading.current_thread()
            if sampling["seed"] is not None:  # any integer, as OpenAI takes; numpy's seeds are 32-bit
                import transformers

                transformers.set_seed(sampling["seed"] % 2**32)
            if sampling["stream"]:
                self.stream(kind, header, expanded, max_tokens, sampling)
                return
            completions = []
            for start in range(0, len(expanded), self.server.batch_size):
                completions += complete_batch(
                    self.server.model,
                    self.server.tokenizer,
                    expanded[start : start + self.server.batch_size],
                    max_tokens,
                    sampling["stop"],
                    self.server.stopping,
                    **sampling["decoding"],
                )
        if kind == "chat.completion":
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": c.text.strip()},
                    "finish_reason": c.finish_reason,
                }
                for i, c in enumerate(completions)
            ]
        else:
            choices = [
                {"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
                for i, c in enumerate(completions)
            ]
        prompt_tokens = sum(c.prompt_tokens for c in completions[:: sampling["n"]])
        completion_tokens = sum(c.completion_tokens for c in completions)
        self.send_json(
            {
                **header,
                "object": kind,
                "choices": choices,
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            }
        )

    def stream(self, kind: str, header: dict, prompts: list[str], max_tokens: int, sampling: dict) -> None:
        """Server-sent events: one chunk per piece of text, choices one after another, then [DONE]."""
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        chat = kind == "chat.completion"

        def send(choice: dict) -> None:
            chunk = {**header, "object": "chat.completion.chunk" if chat else "text_completion", "choices": [choice]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()

        try:
            for index, prompt in enumerate(prompts):
                generation = stream_completion(
                    self.server.model,
                    self.server.tokenizer,
                    prompt,
                    max_tokens,
                    sampling["stop"],
                    self.server.stopping,
                    **sampling["decoding"],
                )
                # Closing the generation stops it at once when the client has gone away.
                with contextlib.closing(generation):
                    if chat:
                        send({"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
                        for delta, reason in stripped(generation):
                            send(
                                {"index": index, "delta": {"content": delta} if delta else {}, "finish_reason": reason}
                            )
                    else:
                        for delta, reason in generation:
                            send({"index": index, "text": delta, "logprobs": None, "finish_reason": reason})
        except (BrokenPipeError, ConnectionResetError):
            raise
        except Exception as error:  # the status line is gone already: report in the stream
            traceback.print_exc()
            self.wfile.write(
                f"data: {json.dumps({'error': {'message': str(error), 'type': 'server_error'}})}\n\n".encode()
            )
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


def run_server(
    model, tokenizer, model_id: str, host: str, port: int, max_new_tokens: int, batch_size: int, defaults: dict
) -> None:
    """Serve until Ctrl-C; `defaults` are the decoding flags requests may override."""
    try:
        server = InferenceServer((host, port), model, tokenizer, model_id, max_new_tokens, batch_size, defaults)
    except OSError as error:
        raise UsageError(f"cannot listen on {host}:{port}: {error}") from None
    try:
        print(
            f"serving {model_id} on http://{host}:{server.server_port}/ (OpenAI API at "
            f"http://{host}:{server.server_port}/v1)",
            file=sys.stderr,
            flush=True,
        )
        server.serve_forever()
    except KeyboardInterrupt:
        server.stop_generating()
    finally:
        server.server_close()


# ---------------------------------------------------------------------------------------------


# fire would read text such as "1, 2" or "{a: 1}" as a tuple or a dict: these flags are text as given.
@fire.decorators.SetParseFns(
    **dict.fromkeys(
        [
            "model_name_or_path",
            "instruction",
            "input",
            "lora_weights",
            "input_file",
            "output_file",
            "host",
            "generator",
            "dtype",
        ],
        str,
    )
)
def main(
    model_name_or_path: str,
    instruction: str | None = None,
    input: str | None = None,
    lora_weights: str | None = None,
    input_file: str | None = None,
    output_file: str | None = None,
    serve: bool = False,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    num_beams: int = 1,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    batch_size: int = 8,
    generator: str | None = None,
    dtype: str = "auto",
) -> None:
    """Generate with a fine-tuned model. With --instruction: print the response (streamed). With
    --input_file/--output_file: respond to every record of a file. With --serve: run an HTTP
    server. With none of them: read instructions from stdin until end of file.

    Args:
        model_name_or_path: a checkpoint directory (train.py's --output_dir, or a recovered model),
            or a Hugging Face hub name.
        instruction: the instruction to respond to.
        input: optional input (context) for the instruction.
        lora_weights: a LoRA adapter directory (train.py --use_lora) to apply to the model.
        input_file: a JSON or JSON Lines list of {instruction, input?} records.
        output_file: where batch mode writes {instruction, input, output, generator} records;
            records the same generator already wrote there are kept and skipped (restartable).
        serve: run the HTTP server (OpenAI /v1/completions, /v1/chat/completions; a page at /).
        host: address to listen on; 127.0.0.1 keeps the server private to this machine.
        port: port to listen on (0 picks a free one).
        max_new_tokens: most tokens to generate per response (the server's default max_tokens).
        temperature: 0 is greedy decoding; above 0 samples.
        top_p: nucleus sampling mass (when sampling).
        top_k: sample among the k most likely tokens only; 0 is no limit (when sampling).
        num_beams: beam search width; above 1 the response is shown (or streamed) whole at the end.
        repetition_penalty: above 1 discourages repeating tokens.
        seed: random seed, for reproducible sampling.
        batch_size: prompts generated together in batch mode and per server request.
        generator: the name written into batch outputs (default: the model or adapter folder name).
        dtype: weights' dtype: auto (as saved), float32, bfloat16 or float16.
    """
    if serve and (instruction is not None or input_file is not None):
        raise UsageError("--serve takes no --instruction or --input_file")
    if (input_file is None) != (output_file is None):
        raise UsageError("--input_file and --output_file go together")
    if input_file is not None and instruction is not None:
        raise UsageError("use either --instruction or --input_file")
    if input is not None and instruction is None:
        raise UsageError("--input needs --instruction")
    name = os.path.basename(os.path.normpath(lora_weights or model_name_or_path))
    if input_file is not None:  # a bad file is reported, and a finished one written, before the model loads
        records, done = load_batch(input_file, output_file, generator or name)
        print(f"{len(done)} of {len(records)} records already in {output_file}", file=sys.stderr)
        if len(done) == len(records):
            write_outputs(done, output_file)
            return
    check_sources(model_name_or_path, lora_weights)
    if seed is not None:
        import transformers

        transformers.set_seed(seed)
    model, tokenizer = load_or_explain(model_name_or_path, lora_weights, dtype)
    decoding = decoding_kwargs(temperature, top_p, top_k, num_beams, repetition_penalty)
    if serve:
        defaults = dict(
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            num_beams=num_beams,
            repetition_penalty=repetition_penalty,
        )
        run_server(model, tokenizer, name, host, port, max_new_tokens, batch_size, defaults)
    elif input_file is not None:
        run_batch(
            model, tokenizer, records, done, output_file, generator or name, batch_size, max_new_tokens, **decoding
        )
    elif instruction is not None:
        print_response(model, tokenizer, instruction, input, max_new_tokens, **decoding)
    else:
        interactive(model, tokenizer, max_new_tokens, **decoding)


if __name__ == "__main__":
    utils.run_fire(main)
