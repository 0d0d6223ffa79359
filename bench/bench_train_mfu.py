"""Training throughput and model FLOPs utilisation (MFU) on the embedded SmolLM2-135M, on the
real length distribution of the project's alpaca_data.json: padded batches (the original's),
--padding_free (each batch flattened into one row) and --packing (rows of --model_max_length
tokens, best-fit decreasing, --batch_size rows a step as train.py batches them, so that this mode
also takes fewer optimizer steps for the same examples). As in train.py, both padding-free modes
run sdpa once per example (tokens.per_example_sdpa_attention).

MFU is model FLOPs per second over this machine's dense matmul peak for the training dtype,
measured in the same run: 6 x N x tokens (N: the parameters that multiply each token, the tied
output head included) plus the causal attention of each example, 6 x layers x width x n^2 for n
tokens (see `attention_flops`). Only the examples' own tokens count, so padding lowers MFU.

The three modes train copies of the same model on the same examples. They run in interleaved
chunks (padded, padding-free, packing, then the next chunk of each), so that load from other
processes on a shared machine falls on all three alike. Before timing, the per-example losses
of one packed row are checked against the padded batch of the same examples."""

import argparse
import json
import random
import time

import torch
import transformers

import tokens
import utils
from bench.common import ROOT

MODES = ("padded", "padding_free", "packing")


def matmul_peak_flops(dtype: torch.dtype, size: int = 2048, repeats: int = 5, device: str = "cpu") -> float:
    """The best dense matmul rate of this machine in `dtype`, FLOP/s (square `size` matrices)."""
    a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
    sync = torch.cuda.synchronize if device.startswith("cuda") else lambda: None
    torch.mm(a, b)  # warm-up
    sync()
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def matmul_parameters(model: transformers.PreTrainedModel) -> int:
    """Parameters that take part in a matmul for every token: all but the input embedding
    table, which is a lookup, plus the output head once (it may be tied to that table)."""
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(p.numel() for p in model.parameters())
    return total - embedding.numel() + (head.numel() if head is embedding else 0)


def attention_flops(config: transformers.PretrainedConfig, lengths: list[int]) -> float:
    """Training FLOPs of causal attention (scores and weighted sum; forward and backward, 3x the
    forward) for examples of `lengths` tokens, each attending only to itself."""
    width = config.num_attention_heads * (config.head_dim or config.hidden_size // config.num_attention_heads)
    # forward: two matmuls of n x n x width, half of it under the causal mask: 2 * 2 * n^2 * width / 2
    return 3 * config.num_hidden_layers * sum(2 * n * n * width for n in lengths)


def model_flops(model: transformers.PreTrainedModel, lengths: list[int]) -> float:
    return 6 * matmul_parameters(model) * sum(lengths) + attention_flops(model.config, lengths)


def make_batches(examples: list[dict], batch_size: int, max_length: int, pad_token_id: int) -> dict[str, list]:
    """Each mode's batches over the same examples: (collated batch, example lengths) pairs."""
    padded = tokens.DataCollatorForSupervisedDataset(pad_token_id=pad_token_id)
    # As train.py batches them for sdpa: with the cumulative lengths that per-example attention takes.
    flat = transformers.DataCollatorWithFlattening(separator_id=tokens.IGNORE_INDEX, return_flash_attn_kwargs=True)
    packed = tokens.DataCollatorForPackedRows(pad_token_id=pad_token_id, flash_attn_kwargs=True)
    groups = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]
    rows = tokens.pack_examples(examples, max_length)
    # train.py --packing batches per_device_train_batch_size rows, as the other modes batch examples.
    row_groups = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    return {
        "padded": [(padded(g), [len(e["input_ids"]) for e in g]) for g in groups],
        "padding_free": [(flat(g), [len(e["input_ids"]) for e in g]) for g in groups],
        "packing": [
            (packed(g), [n for r in g for n in tokens.sequence_lengths(r["position_ids"])]) for g in row_groups
        ],
    }


def check_packed_losses(model, examples: list[dict], max_length: int, pad_token_id: int) -> None:
    """Per-example losses of the first packed row equal those of the same examples padded."""
    [row, *_] = tokens.pack_best_fit_decreasing([len(e["input_ids"]) for e in examples], max_length)
    group = [examples[i] for i in row]
    padded = tokens.DataCollatorForSupervisedDataset(pad_token_id=pad_token_id)(group)
    packed = tokens.DataCollatorForPackedRows(pad_token_id=pad_token_id, flash_attn_kwargs=True)(
        tokens.pack_examples(group, max_length)
    )
    with torch.no_grad():
        padded_logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        packed_logits = model(**{k: v for k, v in packed.items() if k != "labels"}).logits[0]
    start = 0
    for i, example in enumerate(group):
        n = len(example["input_ids"])
        labels = torch.tensor(example["labels"][1:])
        a = torch.nn.functional.cross_entropy(padded_logits[i, : n - 1], labels, ignore_index=tokens.IGNORE_INDEX)
        b = torch.nn.functional.cross_entropy(
            packed_logits[start : start + n - 1], labels, ignore_index=tokens.IGNORE_INDEX
        )
        assert abs(a.item() - b.item()) < 1e-4, (i, a.item(), b.item())
        start += n
    print(f"check: per-example losses of a packed row of {len(group)} examples equal the padded ones (1e-4)")


def train_steps(model, optimizer, batches) -> float:
    """Seconds to train on `batches` (forward, backward, AdamW step)."""
    start = time.perf_counter()
    for batch, _ in batches:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=64, help="records of alpaca_data.json to train on")
    parser.add_argument(
        "--batch_size",
        type=int,
        default=4,
        help="examples per padded / padding-free batch; packed rows per packing batch",
    )
    parser.add_argument("--model_max_length", type=int, default=512, help="row length of the packing mode")
    parser.add_argument("--chunks", type=int, default=4, help="interleaved chunks per mode")
    parser.add_argument("--model_dir", default=None, help="a checkpoint instead of the embedded SmolLM2-135M")
    args = parser.parse_args()

    from embedded_model import embedded_model_path

    utils.use_huge_pages_for_cpu_tensors()  # as train.py does on CPU
    torch.manual_seed(0)
    model_dir = args.model_dir or embedded_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, padding_side="right")
    added = tokenizer.add_special_tokens(tokens.missing_special_tokens(tokenizer))
    records = json.loads((ROOT / "alpaca_data.json").read_text())
    sample = random.Random(0).sample(records, min(args.records, len(records)))
    examples, _ = tokens.preprocess(sample, tokenizer, args.model_max_length)
    batches = make_batches(examples, args.batch_size, args.model_max_length, tokenizer.pad_token_id)

    def fresh_model():
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        tokens.init_new_token_embeddings(model, len(tokenizer), added)
        model.config.use_cache = False
        return model.train()

    models = {mode: fresh_model() for mode in MODES}
    for mode in MODES[1:]:  # as train.py does for padding-free batches under sdpa
        models[mode].set_attn_implementation(tokens.PER_EXAMPLE_SDPA)
    check_packed_losses(models["packing"], examples, args.model_max_length, tokenizer.pad_token_id)
    optimizers = {mode: torch.optim.AdamW(models[mode].parameters(), lr=1e-5) for mode in MODES}
    for mode in MODES:  # warm-up: one step each, not timed
        train_steps(models[mode], optimizers[mode], batches[mode][:1])

    peak = matmul_peak_flops(torch.float32)
    seconds = dict.fromkeys(MODES, 0.0)
    for chunk in range(args.chunks):
        for mode in MODES[chunk % len(MODES) :] + MODES[: chunk % len(MODES)]:  # rotate who goes first
            part = batches[mode][chunk :: args.chunks]
            seconds[mode] += train_steps(models[mode], optimizers[mode], part)
    peak = max(peak, matmul_peak_flops(torch.float32))

    lengths = [n for _, ls in batches["padded"] for n in ls]
    flops = model_flops(models["padded"], lengths)
    rate = {mode: sum(lengths) / seconds[mode] for mode in MODES}
    print(
        f"{len(lengths)} examples ({sum(lengths):,} tokens, mean {sum(lengths) / len(lengths):.0f}) of "
        f"alpaca_data.json; {len(batches['padded'])} batches of {args.batch_size}, "
        f"{sum(b['input_ids'].shape[0] for b, _ in batches['packing'])} packed rows of <= {args.model_max_length} "
        f"tokens in {len(batches['packing'])} batches"
    )
    print(f"float32 dense matmul peak of this machine: {peak / 1e9:,.1f} GFLOP/s")
    for mode in MODES:
        tensor_tokens = sum(b["input_ids"].numel() for b, _ in batches[mode])
        print(
            f"{mode}: {rate[mode]:,.0f} tok/s, MFU {flops / seconds[mode] / peak:.1%}, "
            f"padding {1 - sum(lengths) / tensor_tokens:.1%}"
        )
    for mode in MODES[1:]:
        print(
            f"train_{mode}_smollm2: ratio={rate[mode] / rate['padded']:.2f} "
            f"(baseline={rate['padded']:,.0f} tok/s padded, ours={rate[mode]:,.0f} tok/s)"
        )


if __name__ == "__main__":
    main()
