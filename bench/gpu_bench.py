"""The GPU benchmark behind bench/gpu.sh: fine-tune a LLaMA-architecture model of about 1.1B
parameters (TinyLlama's shape, random weights built from a config: no hub) with train.py and
the original README's flags (--bf16 --tf32, lr 2e-5, cosine, warmup 0.03, weight decay 0), for a
fixed number of steps on the project's alpaca_data.json, in every configuration this machine
can run: padded, --padding_free and --packing batches; sdpa, and flash_attention_2 when flash-attn
is installed; without and, when liger-kernel is installed, with --use_liger_kernel. Each prints
tokens/s, peak GPU memory and MFU against the GPU's bf16 dense matmul peak, measured in the same
run. Then the original 4-GPU command runs under torchrun (FSDP full_shard) on every GPU here.

--dry_run runs the same code on CPU with a tiny model and two steps, so the test suite checks it.
The tokenizer is a SentencePiece model trained on the data itself (no hub); its vocabulary is
smaller than LLaMA's, but the model's embedding has LLaMA's 32,000 rows, so the compute is LLaMA's."""

import argparse
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time

import torch
import transformers

import tokens
import train
from bench.bench_train_mfu import attention_flops, matmul_parameters, matmul_peak_flops
from bench.common import ROOT

MODES = {"padded": [], "padding_free": ["--padding_free", "True"], "packing": ["--packing", "True"]}
ORIGINAL_FLAGS = [
    *("--bf16", "True", "--tf32", "True", "--learning_rate", "2e-5", "--weight_decay", "0."),
    *("--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine", "--logging_steps", "1"),
    *("--save_strategy", "no", "--report_to", "none", "--evaluation_strategy", "no"),
]


def model_config(vocab_size: int, dry_run: bool) -> transformers.LlamaConfig:
    shape = (
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        if dry_run
        else dict(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
        )
    )
    return transformers.LlamaConfig(
        vocab_size=vocab_size, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, **shape
    )


def build_model_dir(directory: pathlib.Path, dry_run: bool) -> pathlib.Path:
    """A tokenizer trained on the project's data and a random-init model, saved in `directory`."""
    import sentencepiece as spm

    directory.mkdir(parents=True, exist_ok=True)
    records = json.loads((ROOT / "alpaca_data.json").read_text())
    text = (f"{r['instruction']}\n{r.get('input', '')}\n{r['output']}" for r in records)
    spm.SentencePieceTrainer.train(
        sentence_iterator=text,
        model_prefix=str(directory / "tokenizer"),
        vocab_size=800 if dry_run else 8000,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    tokenizer = transformers.LlamaTokenizer.from_pretrained(str(directory), add_bos_token=True)
    tokenizer.save_pretrained(str(directory))
    torch.manual_seed(0)
    config = model_config(32000 if not dry_run else len(tokenizer) + 1, dry_run)
    transformers.LlamaForCausalLM(config).save_pretrained(str(directory))
    return directory


class Meter(transformers.TrainerCallback):
    """Time and non-padding tokens from the end of step `warmup` to the end of training."""

    def __init__(self, warmup: int):
        self.warmup, self.start = warmup, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.warmup:
            _synchronize()
            self.start = (time.perf_counter(), state.num_input_tokens_seen)

    def on_train_end(self, args, state, control, **kwargs):
        _synchronize()
        self.seconds = time.perf_counter() - self.start[0]
        self.tokens = state.num_input_tokens_seen - self.start[1]


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def configurations(gpu: bool) -> list[tuple[str, str, bool]]:
    """(batch mode, attention kernel, Liger) for everything this machine can run; says what it skips."""
    kernels = ["sdpa"]
    if gpu and importlib.util.find_spec("flash_attn"):
        kernels.append("flash_attention_2")
    else:
        print("gpu_bench: flash_attention_2 skipped (needs a GPU and the flash-attn package)")
    ligers = [False]
    if gpu and importlib.util.find_spec("liger_kernel"):
        ligers.append(True)
    else:
        print("gpu_bench: --use_liger_kernel skipped (needs a GPU and the liger-kernel package)")
    return [(mode, kernel, liger) for kernel in kernels for liger in ligers for mode in MODES]


def example_lengths(model_dir: pathlib.Path) -> list[int]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    tokenizer.add_special_tokens(tokens.missing_special_tokens(tokenizer))
    examples, _ = tokens.preprocess(json.loads((ROOT / "alpaca_data.json").read_text()), tokenizer, 512)
    return [len(e["input_ids"]) for e in examples]


def run_one(model_dir, work_dir, mode, kernel, liger, steps, warmup, peak, flops_per_token) -> None:
    name = f"{mode}-{kernel}{'-liger' if liger else ''}"
    # Four examples a step, as the original's per-device batch; a packed row of 512 tokens holds
    # about as many tokens as four padded examples, so packing trains one row a step.
    batch = "1" if mode == "packing" else "4"
    argv = [
        *("--model_name_or_path", str(model_dir), "--data_path", str(ROOT / "alpaca_data.json")),
        *("--output_dir", str(work_dir / name), "--max_steps", str(steps), "--per_device_train_batch_size", batch),
        *("--include_num_input_tokens_seen", "non_padding", "--attn_implementation", kernel),
        *ORIGINAL_FLAGS,
        *MODES[mode],
        *(["--use_liger_kernel", "True"] if liger else []),
    ]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    meter = Meter(warmup)
    trainer = train.train(argv, callbacks=[meter])
    memory = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    rate = meter.tokens / meter.seconds
    print(
        f"gpu_bench {mode} attn={kernel} liger={'on' if liger else 'off'}: {rate:,.0f} tok/s, "
        f"peak memory {memory:.1f} GiB, MFU {rate * flops_per_token / peak:.1%} "
        f"(loss {losses[0]:.3f} -> {losses[-1]:.3f}, {steps - warmup} timed steps)",
        flush=True,
    )
    del trainer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_torchrun(model_dir: pathlib.Path, work_dir: pathlib.Path, nproc: int, steps: int) -> None:
    """The original README's 4-GPU command (FSDP full_shard, LlamaDecoderLayer), on `nproc` processes."""
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"),
        *(str(ROOT / "train.py"), "--model_name_or_path", str(model_dir)),
        *("--data_path", str(ROOT / "alpaca_data.json"), "--output_dir", str(work_dir / "torchrun")),
        *("--max_steps", str(steps), "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4"),
        *("--gradient_accumulation_steps", "8", "--save_steps", "2000", "--save_total_limit", "1"),
        *ORIGINAL_FLAGS,
        *("--fsdp", "full_shard auto_wrap", "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer"),
    ]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"gpu_bench: torchrun failed\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    state = json.loads((work_dir / "torchrun" / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    print(
        f"gpu_bench torchrun --nproc_per_node={nproc} FSDP full_shard: {steps} steps of 4 x 8 x {nproc} examples "
        f"in {time.perf_counter() - start:.0f} s (with start-up), loss {losses[0]:.3f} -> {losses[-1]:.3f}",
        flush=True,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry_run", action="store_true", help="tiny model on CPU, two steps: checks the code path")
    parser.add_argument("--work_dir", default="/tmp/alpaca-gpu-bench", help="model and run outputs go here")
    parser.add_argument("--steps", type=int, default=40, help="training steps per configuration")
    parser.add_argument("--warmup", type=int, default=10, help="first steps left out of the timing")
    args = parser.parse_args()
    steps, warmup = (3, 1) if args.dry_run else (args.steps, args.warmup)
    gpu = torch.cuda.is_available()
    if not gpu and not args.dry_run:
        sys.exit("gpu_bench: no CUDA GPU here; use --dry_run to check the code path on CPU")
    work_dir = pathlib.Path(args.work_dir)
    model_dir = build_model_dir(work_dir / "model", args.dry_run)

    if gpu:
        print(
            f"gpu_bench: {torch.cuda.get_device_name()}, {torch.cuda.device_count()} GPU(s), torch {torch.__version__}"
        )
        peak, dtype_name = matmul_peak_flops(torch.bfloat16, size=8192, repeats=10, device="cuda"), "bf16"
    else:
        peak, dtype_name = matmul_peak_flops(torch.float32, size=512), "float32 (dry run)"
    print(f"gpu_bench: measured {dtype_name} dense matmul peak {peak / 1e12:,.2f} TFLOP/s", flush=True)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(model_dir))
    lengths = example_lengths(model_dir)
    flops_per_token = 6 * matmul_parameters(model) + attention_flops(model.config, lengths) / sum(lengths)
    print(f"gpu_bench: {sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
    del model

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for mode, kernel, liger in configurations(gpu):
        run_one(model_dir, work_dir, mode, kernel, liger, steps, warmup, peak, flops_per_token)
    run_torchrun(model_dir, work_dir, torch.cuda.device_count() if gpu else 2, 2 if args.dry_run else 5)


if __name__ == "__main__":
    main()
