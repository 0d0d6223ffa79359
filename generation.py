"""Generation shared by inference.py's command line and the server (server.py): decoding
settings, text assembled from streamed tokens with stop strings, left-padded batches through
`model.generate`, and `decode_together`, the server's own decoding loop that runs a batch of
requests with one KV cache and reports each token with its log-probabilities.

torch and transformers are imported where they are used, so that importing this module is cheap.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    import transformers


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
# The server's decoding loop: several requests' sequences in one batch, tokens reported as made


@dataclass
class Row:
    """One sequence to generate. The loop puts on `out` the prompt's log-probabilities (a list,
    when `echo` asks for them), then a `Token` per new token, then None at the end (or the
    exception that ended it); setting `cancel` ends the sequence at its next token."""

    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    top_logprobs: int = 0  # alternatives to report for each token
    echo: bool = False  # report the prompt's own tokens with their log-probabilities first
    cancel: threading.Event | None = None
    out: queue.Queue | None = None

    def __post_init__(self):
        self.cancel = self.cancel or threading.Event()
        self.out = self.out or queue.Queue()


@dataclass
class Token:
    id: int
    logprob: float | None  # None for a prompt's first token, which nothing predicts
    top: list[tuple[int, float]]  # the most likely tokens at this position, best first


def decode_together(model, rows: list[Row], end_ids: set[int], stopping: threading.Event | None = None) -> None:
    """Generate every row in one left-padded batch sharing one KV cache, until each one ends
    (an end token, its max_new_tokens, its cancel event, or `stopping`). A finished row leaves
    the batch, so the rest run at the cost of the rows still going. Greedy rows get the same
    tokens as when run alone; sampled rows draw from their own seeded generator, so batching
    does not change them either. Log-probabilities are the model's own (before temperature)."""
    import torch
    import transformers

    device = model.device
    try:
        with torch.inference_mode():
            width = max(len(row.prompt_ids) for row in rows)
            ids = torch.full((len(rows), width), 0, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, row in enumerate(rows):
                ids[i, width - len(row.prompt_ids) :] = torch.tensor(row.prompt_ids)
                mask[i, width - len(row.prompt_ids) :] = 1
            ids, mask = ids.to(device), mask.to(device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            generators = [_generator(row.seed, device) for row in rows]
            history = [list(row.prompt_ids) for row in rows]  # for the repetition penalty
            cache = transformers.DynamicCache(config=model.config)
            echo = any(row.echo for row in rows)
            logits = model(
                input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, logits_to_keep=0 if echo else 1
            ).logits
            for i, row in enumerate(rows):
                if row.echo:
                    row.out.put(_prompt_logprobs(logits[i, width - len(row.prompt_ids) :], row))
            logits, positions = logits[:, -1].float(), positions[:, -1]
            live = list(range(len(rows)))  # the rows still in the batch, in batch order
            produced = [0] * len(rows)
            while True:
                logprobs = torch.log_softmax(logits, dim=-1)
                chosen, keep = [], []
                for b, i in enumerate(live):
                    row = rows[i]
                    token = _choose(logits[b], row, history[i], generators[i])
                    top = _top(logprobs[b], row.top_logprobs)
                    row.out.put(Token(token, float(logprobs[b, token]), top))
                    history[i].append(token)
                    produced[i] += 1
                    ended = token in end_ids or produced[i] >= row.max_new_tokens or row.cancel.is_set()
                    if ended or (stopping is not None and stopping.is_set()):
                        row.out.put(None)
                    else:
                        chosen.append(token)
                        keep.append(b)
                if not keep:
                    return
                if len(keep) < len(live):
                    index = torch.tensor(keep, device=device)
                    cache.batch_select_indices(index)
                    mask, positions = mask[index], positions[index]
                    live = [live[b] for b in keep]
                mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
                positions = positions + 1
                logits = (
                    model(
                        input_ids=torch.tensor(chosen, device=device)[:, None],
                        attention_mask=mask,
                        position_ids=positions[:, None],
                        cache=cache,
                    )
                    .logits[:, -1]
                    .float()
                )
    except BaseException as error:  # handed to every consumer still waiting, then raised here
        for row in rows:
            row.out.put(error)
        raise


def _generator(seed: int | None, device) -> torch.Generator:
    import torch

    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:  # any integer, as OpenAI takes
        generator.manual_seed(seed % 2**63)
    return generator


def _choose(logits: torch.Tensor, row: Row, history: list[int], generator: torch.Generator) -> int:
    """The next token: greedy at temperature 0, else sampled with top-k then top-p, as
    transformers' `generate` does; the repetition penalty first in both cases."""
    import torch

    if row.repetition_penalty != 1.0:
        seen = torch.tensor(history, device=logits.device)
        scores = logits[seen]
        logits = logits.clone()
        logits[seen] = torch.where(scores < 0, scores * row.repetition_penalty, scores / row.repetition_penalty)
    if row.temperature == 0:
        return int(logits.argmax())
    scores = logits / row.temperature
    if row.top_k > 0:
        kth = torch.topk(scores, min(row.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if row.top_p < 1.0:
        ordered, order = torch.sort(scores, descending=True)
        probabilities = torch.softmax(ordered, dim=-1)
        # Drop a token when the tokens before it already reach top_p (the best one always stays).
        drop = probabilities.cumsum(-1) - probabilities > row.top_p
        scores = scores.index_fill(0, order[drop], float("-inf"))
    return int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator))


def _top(logprobs: torch.Tensor, k: int) -> list[tuple[int, float]]:
    if k <= 0:
        return []
    values, indices = logprobs.topk(k)
    return list(zip(indices.tolist(), values.tolist()))


def _prompt_logprobs(logits: torch.Tensor, row: Row) -> list[Token]:
    """The prompt's tokens, each with its log-probability given the tokens before it."""
    import torch

    logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)
    targets = torch.tensor(row.prompt_ids[1:], device=logits.device)
    chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
    tokens = [Token(row.prompt_ids[0], None, [])]
    for position, (token, logprob) in enumerate(zip(row.prompt_ids[1:], chosen)):
        tokens.append(Token(token, logprob, _top(logprobs[position], row.top_logprobs)))
    return tokens
