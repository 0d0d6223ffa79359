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
from collections.abc import Callable, Iterable, Iterator, Sequence
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
# Faster linear layers for generation on CPU


PACKED_BATCH_HINT = 8  # oneDNN lays the weights out for batches of about this many rows


class PackedLinear:
    """A float32 linear layer whose weight oneDNN has laid out once for its matmul kernel
    (what torch.compile's CPU freezing does), instead of at every call. It is a plain callable
    put in place of the module's forward, so the module, its weight and the model's state dict
    stay as they were. Inference only: it has no gradient."""

    def __init__(self, linear: torch.nn.Linear):
        import torch

        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), PACKED_BATCH_HINT)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


class HalfLinear:
    """A linear layer whose weight fbgemm keeps in float16 and multiplies into float32 inputs:
    half the bytes to read per token, with float32 arithmetic (CPUs without AVX512-FP16 have no
    float16 arithmetic of their own). Each call is padded with zero rows to a multiple of `rows`, the
    multiple for which fbgemm's kernels give a row the same result whatever rows share the
    call (`batch_invariant_rows`). Inference only: it has no gradient."""

    def __init__(self, linear: torch.nn.Linear, rows: int):
        import torch

        bias = None if linear.bias is None else linear.bias.detach().float()
        self.packed = torch.ops.quantized.linear_prepack_fp16(linear.weight.detach().float(), bias)
        self.rows = rows

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        flat = x.reshape(-1, x.shape[-1])
        rows = flat.shape[0]
        if missing := -rows % self.rows:
            flat = torch.nn.functional.pad(flat, (0, 0, 0, missing))
        out = torch.ops.quantized.linear_dynamic_fp16(flat, self.packed)
        return out[:rows].reshape(*x.shape[:-1], out.shape[-1])


def batch_invariant_rows(most: int = 8, largest_call: int = 300) -> int | None:
    """The smallest row count (up to `most`) whose multiples, up to `largest_call` rows, all give
    each row the same result in fbgemm's float16 product; None if there is none. Its kernels
    take the rows a few at a time, and those for a remainder of one or two rows sum in another
    order: on this project's AVX2 sandbox, calls of a multiple of 3 rows agree row for row."""
    import torch

    generator = torch.Generator().manual_seed(0)
    packed = torch.ops.quantized.linear_prepack_fp16(torch.randn(256, 256, generator=generator), None)
    x = torch.randn(largest_call, 256, generator=generator)
    for multiple in range(1, most + 1):
        counts = range(multiple, largest_call + 1, multiple)
        whole = torch.ops.quantized.linear_dynamic_fp16(x[: counts[-1]], packed)
        if all(torch.equal(torch.ops.quantized.linear_dynamic_fp16(x[:n], packed), whole[:n]) for n in counts):
            return multiple
    return None


def pack_linear_layers(model) -> int:
    """Give every linear layer of a model on the CPU a forward with prepacked weights, and return
    how many: `PackedLinear` for a float32 model; `HalfLinear` for a float16 one (where fbgemm
    runs: x86 with AVX2), whose other weights then become float32. On this project's 2-core
    AVX2 sandbox the float32 matmuls then take about half the time for a batch of 8 and the same
    for one row; the float16 ones less than half the float32 time for one row. Either way a
    row's result no longer depends on the rows batched with it. Where no kernel can pack
    (another CPU, another dtype), or a packed layer disagrees with the plain one, nothing
    changes and 0 is returned. The packed copy costs the weights' memory once more."""
    import torch

    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    if model.device.type != "cpu" or not linears:
        return 0
    try:
        pack = _packer({linear.weight.dtype for linear in linears})
        if pack is None:
            return 0
        probe = torch.randn(3, linears[0].in_features)
        with torch.no_grad():
            bias = None if linears[0].bias is None else linears[0].bias.float()
            plain = torch.nn.functional.linear(probe, linears[0].weight.float(), bias)
            if not torch.allclose(pack(linears[0])(probe), plain, rtol=1e-4, atol=1e-4):
                return 0
    except RuntimeError:  # no kernel for this CPU
        return 0
    for linear in linears:
        linear.forward = pack(linear)
    if linears[0].weight.dtype == torch.float16:
        _float32_outside_linear_layers(model)
    return len(linears)


def _packer(dtypes: set) -> Callable[[torch.nn.Linear], Callable] | None:
    import functools

    import torch

    if dtypes == {torch.float32} and torch.backends.mkldnn.is_available():
        return PackedLinear
    if dtypes == {torch.float16} and "fbgemm" in torch.backends.quantized.supported_engines:
        rows = batch_invariant_rows()
        return None if rows is None else functools.partial(HalfLinear, rows=rows)
    return None


def _float32_outside_linear_layers(model) -> None:
    """Embeddings, norms and buffers in float32, for the float32 arithmetic of `HalfLinear`.
    A tied output layer's weight is the embedding's, so it becomes float32 too (its packed
    float16 copy stays what the layer multiplies with)."""
    import torch

    for module in model.modules():
        if type(module) is not torch.nn.Linear:
            for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                if tensor.is_floating_point():
                    tensor.data = tensor.data.float()


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
    prompts: Sequence[str | Sequence[int]],
    max_new_tokens: int,
    stop: Sequence[str] = (),
    cancel: threading.Event | None = None,
    **decoding,
) -> list[Generation]:
    """Complete several raw prompts (texts, or token ids used as they are) at once, left-padded so
    that every prompt ends at the same position and the new tokens line up. Setting `cancel`
    stops the generation at its next token."""
    encoded = [tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else list(prompt) for prompt in prompts]
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


class Batch:
    """Rows being generated together: one left-padded KV cache, each row's attention mask and
    position, and the logits of each row's next token. The prompts go through the model; the
    tokens after them through `step` when one is given (onnx_decode.DecodeStep), else the model."""

    PER_ROW = ("rows", "generators", "history", "produced")  # lists with one entry per row, in batch order

    def __init__(self, model, rows: list[Row], step: Callable | None = None):
        """Run the rows' prompts through the model (reporting the prompt's log-probabilities of
        the rows that echo)."""
        import torch
        import transformers

        width = max(len(row.prompt_ids) for row in rows)
        ids = torch.full((len(rows), width), 0, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row.prompt_ids) :] = torch.tensor(row.prompt_ids)
            mask[i, width - len(row.prompt_ids) :] = 1
        self.model, self.step, device = model, step, model.device
        self.mask = mask.to(device)
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.cache = transformers.DynamicCache(config=model.config)
        echo = any(row.echo for row in rows)
        logits = model(
            input_ids=ids.to(device),
            attention_mask=self.mask,
            position_ids=positions,
            cache=self.cache,
            logits_to_keep=0 if echo else 1,
        ).logits
        for i, row in enumerate(rows):
            if row.echo:
                row.out.put(_prompt_logprobs(logits[i, width - len(row.prompt_ids) :], row))
        self.logits, self.positions = logits[:, -1].float(), positions[:, -1]
        self.rows = rows
        self.generators = [_generator(row.seed, device) for row in rows]
        self.history = [list(row.prompt_ids) for row in rows]  # for the repetition penalty
        self.produced = [0] * len(rows)

    def keep(self, kept: list[int]) -> None:
        """Keep only the rows at these batch positions (at least one)."""
        import torch

        if len(kept) == len(self.rows):
            return
        index = torch.tensor(kept, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.positions, self.logits = self.mask[index], self.positions[index], self.logits[index]
        for name in self.PER_ROW:
            setattr(self, name, [getattr(self, name)[b] for b in kept])

    def advance(self, tokens: list[int]) -> None:
        """Feed each row its chosen token: the logits become those of the token after it."""
        import torch

        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        self.positions = self.positions + 1
        if self.step is not None:
            self.logits = self.step(tokens, self.mask, self.positions, self.cache)
            return
        self.logits = (
            self.model(
                input_ids=torch.tensor(tokens, device=self.mask.device)[:, None],
                attention_mask=self.mask,
                position_ids=self.positions[:, None],
                cache=self.cache,
            )
            .logits[:, -1]
            .float()
        )

    def can_merge(self) -> bool:
        """Whether rows can join this batch: its cache layers are the plain growing kind (a
        sliding-window layer drops old positions, so padding two of them together is not safe)."""
        return grows_plainly(self.cache)

    def merge(self, other: Batch) -> None:
        """Take in another batch's rows: the shorter cache and masks are left-padded (positions
        nothing attends to), so every row keeps its own positions and sees only its own tokens."""
        import torch

        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, width, 2), _left_pad(theirs.keys, width, 2)])
            mine.values = torch.cat([_left_pad(mine.values, width, 2), _left_pad(theirs.values, width, 2)])
        self.mask = torch.cat([_left_pad(self.mask, width, 1), _left_pad(other.mask, width, 1)])
        self.positions = torch.cat([self.positions, other.positions])
        self.logits = torch.cat([self.logits, other.logits])
        for name in self.PER_ROW:
            setattr(self, name, getattr(self, name) + getattr(other, name))


def grows_plainly(cache: transformers.Cache) -> bool:
    """Whether every layer of a KV cache keeps all positions, one after another (transformers'
    DynamicLayer), rather than dropping old ones (sliding windows) or keeping a state."""
    import transformers

    return all(type(layer) is transformers.cache_utils.DynamicLayer for layer in cache.layers)


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    import torch

    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def decode_together(
    model,
    rows: list[Row],
    end_ids: set[int],
    stopping: threading.Event | None = None,
    admit: Callable[[int], list[Row]] | None = None,
    max_rows: int | None = None,
    step: Callable | None = None,
) -> None:
    """Generate every row in one left-padded batch sharing one KV cache, until each one ends
    (an end token, its max_new_tokens, its cancel event, or `stopping`). A finished row leaves
    the batch, so the rest run at the cost of the rows still going; with `admit`, new rows join
    after every step (continuous batching): `admit(room)` returns up to `room` rows (room is
    `max_rows`, by default the first rows' number, less the rows still going), which are run
    through the model and merged into the batch. Greedy rows get the same tokens as when run alone; sampled rows draw from their own
    seeded generator, so batching does not change them either. Log-probabilities are the
    model's own (before temperature). With `step`, the tokens after the prompts go through it
    (`Batch`)."""
    import torch

    started = list(rows)  # every row this call took on, to hand an error to
    limit = max_rows or len(rows)
    try:
        with torch.inference_mode():
            batch: Batch | None = Batch(model, rows, step)
            while batch is not None:
                logprobs = torch.log_softmax(batch.logits, dim=-1)
                chosen, kept = [], []
                for b, row in enumerate(batch.rows):
                    token = _choose(batch.logits[b], row, batch.history[b], batch.generators[b])
                    row.out.put(Token(token, float(logprobs[b, token]), _top(logprobs[b], row.top_logprobs)))
                    batch.history[b].append(token)
                    batch.produced[b] += 1
                    ended = token in end_ids or batch.produced[b] >= row.max_new_tokens or row.cancel.is_set()
                    if ended or (stopping is not None and stopping.is_set()):
                        row.out.put(None)
                    else:
                        chosen.append(token)
                        kept.append(b)
                if kept:
                    batch.keep(kept)
                    batch.advance(chosen)
                else:
                    batch = None
                joining = []
                if admit is not None and not (stopping is not None and stopping.is_set()):
                    if batch is None or batch.can_merge():
                        room = limit - (len(batch.rows) if batch else 0)
                        joining = admit(room) if room > 0 else []
                if joining:
                    started += joining
                    newcomers = Batch(model, joining, step)
                    if batch is None:
                        batch = newcomers
                    else:
                        batch.merge(newcomers)
    except BaseException as error:  # handed to every consumer still waiting, then raised here
        for row in started:
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
