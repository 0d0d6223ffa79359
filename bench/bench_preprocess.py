"""Preprocessing the original 52K: ours (one batched call with offsets) vs the original's method
(two tokenizer calls per example, prompt and prompt + output, then mask the prompt's length).

Both use the same tokenizer; the token ids of every example that fits must be identical."""

import copy
import json
import time

import torch

import tokens
import utils
from bench.common import llama_tokenizer, shared_file


def original_preprocess(records, tokenizer, max_length):
    """The original recipe, re-implemented from its description: tokenize each source and each
    source + target separately (one call per string, padded tensors), copy the ids as labels and
    mask as many leading labels as the source has tokens."""

    def tokenize_one_by_one(strings):
        tokenized = [
            tokenizer(s, return_tensors="pt", padding="longest", max_length=max_length, truncation=True)
            for s in strings
        ]
        input_ids = [t.input_ids[0] for t in tokenized]
        lengths = [t.input_ids.ne(tokenizer.pad_token_id).sum().item() for t in tokenized]
        return input_ids, lengths

    sources = [utils.format_prompt(r["instruction"], r.get("input")) for r in records]
    targets = [f"{r['output']}{tokenizer.eos_token}" for r in records]
    input_ids, _ = tokenize_one_by_one([s + t for s, t in zip(sources, targets)])
    _, source_lengths = tokenize_one_by_one(sources)
    labels = copy.deepcopy(input_ids)
    for label, source_length in zip(labels, source_lengths):
        label[:source_length] = tokens.IGNORE_INDEX
    return input_ids, labels


def main():
    records = json.loads(shared_file("alpaca_data.json").read_text())
    tokenizer = llama_tokenizer()

    start = time.perf_counter()
    ours, counts = tokens.preprocess(records, tokenizer, 512)
    ours_seconds = time.perf_counter() - start

    start = time.perf_counter()
    baseline_ids, _ = original_preprocess(records, tokenizer, 512)
    baseline_seconds = time.perf_counter() - start

    fits = [ids.tolist() for ids in baseline_ids]
    prompt_lengths = [
        len(x) for x in tokenizer([utils.format_prompt(r["instruction"], r.get("input")) for r in records])["input_ids"]
    ]
    fits = [ids for ids, n in zip(fits, prompt_lengths) if n < 512]
    assert [e["input_ids"] for e in ours] == fits, "token ids differ from the original recipe"
    print(
        f"{len(records)} records, {len(ours)} examples (skipped {counts['skipped']}, cut {counts['cut']}); ids identical"
    )
    print(f"ours: {ours_seconds:.1f} s, {len(records) / ours_seconds:,.0f} records/s")
    print(
        f"preprocess_52k: ratio={baseline_seconds / ours_seconds:.2f} "
        f"(baseline={baseline_seconds:.1f}s, ours={ours_seconds:.1f}s)"
    )


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
