"""The token rules every script shares: which special tokens fine-tuning adds, how the embedding
matrices grow for them, which ids a model stops and pads with, how a record becomes the token
ids and labels training learns from, and how examples are batched.

train.py trains with these rules, weight_diff.py recovers the rows they create, inference.py
loads models made with them and analyze_data.py counts tokens with them, so all four agree."""

from __future__ import annotations

import bisect
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from torch.utils.data import Dataset
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import utils

IGNORE_INDEX = -100  # the label of a token the loss skips (the prompt, and padding)
DEFAULT_PAD_TOKEN = "[PAD]"
DEFAULT_EOS_TOKEN = "</s>"
DEFAULT_BOS_TOKEN = "<s>"
DEFAULT_UNK_TOKEN = "<unk>"


def missing_special_tokens(tokenizer: transformers.PreTrainedTokenizerBase) -> dict[str, str]:
    """The special tokens to add: a pad token when there is none, and EOS/BOS/UNK when missing or
    an empty string (some converted LLaMA tokenizers ship them empty, so EOS is never learned)."""
    tokens = {}
    if tokenizer.pad_token is None:
        tokens["pad_token"] = DEFAULT_PAD_TOKEN
    defaults = (("eos_token", DEFAULT_EOS_TOKEN), ("bos_token", DEFAULT_BOS_TOKEN), ("unk_token", DEFAULT_UNK_TOKEN))
    for name, default in defaults:
        if not getattr(tokenizer, name):
            tokens[name] = default
    return tokens


def grow_embeddings(model: transformers.PreTrainedModel, vocab_size: int) -> None:
    """Give the model an embedding row for each of `vocab_size` tokens. Some checkpoints pad the
    matrix beyond the vocabulary: it is never shrunk, since the new ids may already have rows."""
    if vocab_size > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(vocab_size, mean_resizing=False)


def smart_tokenizer_and_embedding_resize(
    special_tokens: dict[str, str], tokenizer: transformers.PreTrainedTokenizerBase, model: transformers.PreTrainedModel
) -> int:
    """Add special tokens and give each new token an embedding row, the mean of the old tokens'
    rows (see `init_new_token_embeddings`). Returns the number of tokens added."""
    num_new_tokens = tokenizer.add_special_tokens(special_tokens)
    init_new_token_embeddings(model, len(tokenizer), num_new_tokens)
    return num_new_tokens


def init_new_token_embeddings(model: transformers.PreTrainedModel, vocab_size: int, num_new_tokens: int) -> None:
    """For the last `num_new_tokens` of a vocabulary of `vocab_size` tokens, just added to the
    tokenizer: grow the input and output embeddings when needed and set the new tokens' rows to
    the mean of the old tokens' rows."""
    if num_new_tokens == 0:
        return
    grow_embeddings(model, vocab_size)
    weights = [model.get_input_embeddings().weight]
    if model.get_output_embeddings() is not None and model.get_output_embeddings().weight is not weights[0]:
        weights.append(model.get_output_embeddings().weight)
    with _gathered(weights), torch.no_grad():
        for weight in weights:
            init_new_rows_to_mean(weight, num_new_tokens, vocab_size)


def init_new_rows_to_mean(weight: torch.Tensor, num_new_rows: int, vocab_size: int | None = None) -> None:
    """Set the rows of the `num_new_rows` tokens just added, the last ones of a vocabulary of
    `vocab_size` (by default every row of `weight`), to the mean of the rows before them.
    weight_diff.py recovers a model's new rows with it, so they are exactly the rows training gave."""
    end = weight.shape[0] if vocab_size is None else vocab_size
    weight[end - num_new_rows : end] = weight[: end - num_new_rows].mean(dim=0, keepdim=True)


def _gathered(params: list[torch.Tensor]) -> contextlib.AbstractContextManager:
    """Under DeepSpeed ZeRO-3 parameters are partitioned: gather them (rank 0 edits) first."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    return contextlib.nullcontext()


def set_special_token_ids(model: transformers.PreTrainedModel, tokenizer: transformers.PreTrainedTokenizerBase) -> None:
    """Save the pad id with the model, and make generation stop at the EOS that training
    appends (it may be a token just added, unknown to the checkpoint's generation config)."""
    model.config.pad_token_id = tokenizer.pad_token_id
    generation = model.generation_config
    if generation is None:
        return
    generation.pad_token_id = tokenizer.pad_token_id
    eos_ids = generation.eos_token_id if isinstance(generation.eos_token_id, list) else [generation.eos_token_id]
    if tokenizer.eos_token_id not in eos_ids:
        generation.eos_token_id = [i for i in eos_ids if i is not None] + [tokenizer.eos_token_id]


def tokenize_records(
    records: Sequence[dict], tokenizer: transformers.PreTrainedTokenizerBase
) -> list[tuple[list[int], int]]:
    """Each record's prompt + output as one text, tokenized in one batched call (BOS first when
    the tokenizer adds one, no EOS yet, nothing cut), with the index of its first response token.

    A token belongs to the response when it ends after the prompt's last character, so a token
    that merges the end of the prompt with the start of the response (e.g. ":-") is trained."""
    prompts = [utils.format_prompt(r["instruction"], r.get("input")) for r in records]
    texts = [prompt + r["output"] for prompt, r in zip(prompts, records, strict=True)]
    encoded = tokenizer(texts, return_offsets_mapping=True, return_attention_mask=False, verbose=False)
    return [
        (ids, bisect.bisect_right([end for _, end in offsets], len(prompt)))
        for prompt, ids, offsets in zip(prompts, encoded["input_ids"], encoded["offset_mapping"], strict=True)
    ]


def preprocess(
    records: Sequence[dict], tokenizer: transformers.PreTrainedTokenizerBase, max_length: int
) -> tuple[list[dict], dict]:
    """The training examples: EOS appended, the prompt masked out of the labels, at most
    `max_length` tokens. Returns the examples and counts of skipped (the prompt alone does not
    fit) and cut (the response was truncated, and so has no EOS)."""
    examples, skipped, cut = [], 0, 0
    for ids, response_start in tokenize_records(records, tokenizer):
        if response_start >= max_length:
            skipped += 1
            continue
        ids = ids + [tokenizer.eos_token_id]
        if len(ids) > max_length:
            ids = ids[:max_length]
            cut += 1
        labels = [IGNORE_INDEX] * response_start + ids[response_start:]
        examples.append({"input_ids": ids, "labels": labels})
    return examples, {"skipped": skipped, "cut": cut}


# ---------------------------------------------------------------------------------------------
# Batches


def run_on_main_process(fn: Callable[[], Any]) -> Any:
    """Compute fn() once on rank 0 and send the result to the other ranks."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return fn()
    box = [fn() if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


class SupervisedDataset(Dataset):
    """Tokenized examples: each a dict of `input_ids` and `labels` lists."""

    def __init__(self, examples: list[dict]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]


@dataclass
class DataCollatorForSupervisedDataset:
    """Right-pad a batch: pad id for inputs, IGNORE_INDEX for labels, attention from the lengths."""

    pad_token_id: int

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), longest), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[row, :n] = torch.tensor(f["input_ids"])
            labels[row, :n] = torch.tensor(f["labels"])
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def pack_best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group example indices into rows of at most `capacity` tokens, longest example first, each
    into the fullest row it still fits (best-fit decreasing). No example is split: one longer
    than `capacity` is a row of its own."""
    rows: list[list[int]] = []
    # (room left, row index), kept sorted: the first entry with room >= n is the best fit.
    room: list[tuple[int, int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[index]
        slot = bisect.bisect_left(room, (n, -1))
        if slot == len(room):
            rows.append([index])
            bisect.insort(room, (capacity - n, len(rows) - 1))
        else:
            left, row = room.pop(slot)
            rows[row].append(index)
            bisect.insort(room, (left - n, row))
    return rows


def pack_examples(examples: Sequence[dict], capacity: int) -> list[dict]:
    """The examples packed into rows of at most `capacity` tokens (see `pack_best_fit_decreasing`):
    each row holds its examples' input_ids and labels one after another, and position ids that
    restart at each example (they mark where examples start: see `sequence_lengths`)."""
    rows = pack_best_fit_decreasing([len(e["input_ids"]) for e in examples], capacity)
    return [
        {
            "input_ids": [t for i in row for t in examples[i]["input_ids"]],
            "labels": [t for i in row for t in examples[i]["labels"]],
            "position_ids": [p for i in row for p in range(len(examples[i]["input_ids"]))],
        }
        for row in rows
    ]


def sequence_lengths(position_ids: Sequence[int]) -> list[int]:
    """The lengths of the examples in a packed row, from its position ids (0 starts each one)."""
    starts = [i for i, p in enumerate(position_ids) if p == 0] + [len(position_ids)]
    return [end - start for start, end in zip(starts[:-1], starts[1:])]


@dataclass
class DataCollatorForPackedRows:
    """Batch packed rows (see `pack_examples`) without a dense attention mask: position ids
    restart at every example, which sdpa and eager attention turn into a block-diagonal causal
    mask; with `flash_attn_kwargs`, also the cumulative sequence lengths of the flattened batch,
    which FlashAttention's varlen kernel (or `per_example_sdpa_attention`) takes instead of
    any mask, so a packed row costs what its examples cost. Rows are right-padded to the batch's
    longest; the padding is a sequence of its own that nothing attends to and the loss skips."""

    pad_token_id: int
    flash_attn_kwargs: bool = False

    def __call__(self, features: Sequence[dict]) -> dict[str, Any]:
        longest = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(features), longest), dtype=torch.long)
        lengths = []
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[row, :n] = torch.tensor(f["input_ids"])
            labels[row, :n] = torch.tensor(f["labels"])
            row_lengths = sequence_lengths(f["position_ids"]) + ([longest - n] if n < longest else [])
            position_ids[row] = torch.cat([torch.arange(length) for length in row_lengths])
            # The first token of each example is predicted from nothing of its own: never a target.
            starts = torch.tensor([0] + row_lengths[:-1]).cumsum(0)
            labels[row, starts] = IGNORE_INDEX
            lengths += row_lengths
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
        if self.flash_attn_kwargs:
            cumulative = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
            batch.update(cu_seq_lens_q=cumulative, cu_seq_lens_k=cumulative)
            batch.update(max_length_q=max(lengths), max_length_k=max(lengths))
        return batch


PER_EXAMPLE_SDPA = "sdpa_per_example"


def per_example_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """sdpa for padding-free batches on any device: each example that `cu_seq_lens_q` marks
    attends to itself alone, causally and without a mask, as FlashAttention's varlen kernel does
    on a GPU. Under the dense block-diagonal mask every token of a 512-token row is scored against
    all 512 positions; here an example of n tokens costs n^2/2, so a packed row costs what its
    examples cost. Plain sdpa with the model's mask instead for a batch without `cu_seq_lens_q`
    (from another collator) and for attention that plain causal sdpa cannot express (a sliding
    window, a softcap, attention sinks). Transformers' attention-function signature: (batch,
    heads, length, dim) in, (batch, length, heads, dim) out."""
    special = any(kwargs.get(name) is not None for name in ("sliding_window", "softcap", "s_aux"))
    if cu_seq_lens_q is None or special:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    rows, heads, row_length = query.shape[:3]
    groups = heads // key.shape[1]
    if groups > 1:  # PyTorch's fused CPU kernel takes no grouped-query attention
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    per_row = lengths_per_row(cu_seq_lens_q.tolist(), rows, row_length)
    out = [
        _attend_row(q, k, v, lengths, scaling, dropout)
        for q, k, v, lengths in zip(query.unbind(0), key.unbind(0), value.unbind(0), per_row, strict=True)
    ]
    return torch.stack(out).transpose(1, 2).contiguous(), None


def _attend_row(q, k, v, lengths: list[int], scaling: float | None, dropout: float) -> torch.Tensor:
    """Causal sdpa over each example of one row (heads, length, dim), the examples' outputs joined."""
    # split (and unbind, above) rather than indexing: their backward joins the pieces' gradients,
    # where indexing would add each one into a zero tensor the size of the whole.
    examples = zip(q.split(lengths, dim=1), k.split(lengths, dim=1), v.split(lengths, dim=1))
    return torch.cat(
        [
            torch.nn.functional.scaled_dot_product_attention(
                qe[None], ke[None], ve[None], is_causal=True, scale=scaling, dropout_p=dropout
            )[0]
            for qe, ke, ve in examples
        ],
        dim=1,
    )


def lengths_per_row(cumulative: Sequence[int], rows: int, row_length: int) -> list[list[int]]:
    """The example lengths in each of `rows` rows of a flattened batch, from its cumulative lengths."""
    if cumulative[-1] != rows * row_length:
        raise ValueError(f"cu_seq_lens_q: {cumulative[-1]} tokens, not the batch's {rows} rows of {row_length}")
    per_row: list[list[int]] = [[]]
    filled = 0
    for start, end in zip(cumulative[:-1], cumulative[1:]):
        if filled == row_length:
            per_row.append([])
            filled = 0
        filled += end - start
        if filled > row_length:
            raise ValueError(f"cu_seq_lens_q: the example at {start} runs past the end of its row of {row_length}")
        per_row[-1].append(end - start)
    return per_row


# Registered on import: `model.set_attn_implementation(PER_EXAMPLE_SDPA)` then switches a model to
# it. The mask function stays sdpa's: the model still builds its dense mask once a forward pass
# (cheap beside the step), so that a batch without cumulative lengths is still masked right.
transformers.AttentionInterface.register(PER_EXAMPLE_SDPA, per_example_sdpa_attention)
AttentionMaskInterface.register(PER_EXAMPLE_SDPA, sdpa_mask)
