"""Training throughput on the real length distribution: --padding_free vs the original padded
batches (tiny LLaMA, batch 4, max length 512, the real LLaMA tokenizer on the original 52K).

Both train the same model from the same weights on the same batches; the first step's loss must
agree. Reports non-pad tokens per second and the share of each batch that is padding."""

import argparse
import json
import random
import time

import torch
import transformers

import tokens
from bench.common import llama_tokenizer, shared_file


def make_model(vocab_size: int) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        use_cache=False,
    )
    return transformers.LlamaForCausalLM(config)


def run(batches, collator, vocab_size):
    """Train a fresh model on `batches`; returns (non-pad tokens/s, padding share, first loss)."""
    model = make_model(vocab_size).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    real = padded = 0
    first_loss = None
    start = time.perf_counter()
    for examples in batches:
        batch = collator(examples)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        first_loss = loss.item() if first_loss is None else first_loss
        real += sum(len(e["input_ids"]) for e in examples)
        padded += batch["input_ids"].numel()
    seconds = time.perf_counter() - start
    return real / seconds, 1 - real / padded, first_loss


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40, help="training steps for each method")
    parser.add_argument("--batch_size", type=int, default=4)
    args = parser.parse_args()

    tokenizer = llama_tokenizer()
    records = json.loads(shared_file("alpaca_data.json").read_text())
    examples, _ = tokens.preprocess(random.Random(0).sample(records, args.steps * args.batch_size), tokenizer, 512)
    batches = [examples[i : i + args.batch_size] for i in range(0, len(examples), args.batch_size)]

    padded_collator = tokens.DataCollatorForSupervisedDataset(pad_token_id=tokenizer.pad_token_id)
    free_collator = transformers.DataCollatorWithFlattening(separator_id=tokens.IGNORE_INDEX)
    run(batches[:2], padded_collator, len(tokenizer))  # warm-up
    baseline, baseline_padding, baseline_loss = run(batches, padded_collator, len(tokenizer))
    ours, ours_padding, ours_loss = run(batches, free_collator, len(tokenizer))
    assert abs(baseline_loss - ours_loss) < 1e-4, (baseline_loss, ours_loss)
    print(f"{len(batches)} steps of {args.batch_size} examples; first-step loss {ours_loss:.5f} in both")
    print(f"padding share: padded {baseline_padding:.1%}, padding-free {ours_padding:.1%}")
    print(
        f"padding_free_throughput: ratio={ours / baseline:.2f} (baseline={baseline:,.0f} tok/s, ours={ours:,.0f} tok/s)"
    )


if __name__ == "__main__":
    main()
