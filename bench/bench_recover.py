"""Benchmark `weight_diff.py recover` against the original's load-everything method.

Builds a synthetic LLaMA-shaped raw model and weight diff (float32, sharded safetensors with an
index, a 32000-token tokenizer without a pad token, so the [PAD] row is exercised), then
recovers the tuned weights twice, each in its own fresh process so that peak resident memory
is measured per method:

- baseline: the original's method, re-implemented from its description: both models loaded
  whole in float32 with `from_pretrained`, the [PAD] token added to the raw model with mean
  rows, `state_dict` added parameter by parameter, the naive sum, `save_pretrained`;
- ours: `weight_diff.recover` (streaming, manifest-free since the diff is synthetic).

Checks the two outputs are bit-identical, measures a plain copy of the input files (what the
disk allows), and prints detail lines and then

    recover peak RSS: ratio=X.XX (baseline=..., ours=...)
    recover: ratio=X.XX (baseline=... s, ours=... s)

    python -m bench.bench_recover                       # about 1B parameters, ~16 GB of files
    python -m bench.bench_recover --num_params 2e8 --hidden_size 1024
"""

import concurrent.futures
import json
import multiprocessing
import os
import shutil
import tempfile
import time

import fire
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

import tokens
import weight_diff

VOCAB_SIZE = 32000
SHARD_BYTES = 2 * 10**9


def llama_config(num_params: float, hidden_size: int, vocab_size: int) -> transformers.LlamaConfig:
    """A LLaMA-shaped config (LLaMA's MLP width and 128-wide heads) with as many layers as it
    takes to reach about `num_params` parameters."""
    intermediate_size = 256 * -(-(8 * hidden_size // 3) // 256)
    per_layer = 4 * hidden_size**2 + 3 * hidden_size * intermediate_size + 2 * hidden_size
    layers = max(1, round((num_params - 2 * vocab_size * hidden_size) / per_layer))
    return transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden_size // 128),
        num_key_value_heads=max(1, hidden_size // 128),
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )


def save_tokenizer(directory: str, with_pad: bool) -> None:
    """A 32000-token word-level tokenizer with <unk>/<s>/</s> = 0/1/2 and no pad token, as
    LLaMA's; with_pad adds [PAD] as the 32001st token, as fine-tuning does."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB_SIZE)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    if with_pad:
        tokenizer.add_special_tokens({"pad_token": tokens.DEFAULT_PAD_TOKEN})
    tokenizer.save_pretrained(directory)


def save_random_checkpoint(directory: str, config: transformers.LlamaConfig, scale: float, seed: int) -> int:
    """Random float32 weights for `config` saved as sharded safetensors with an index json,
    written with the safetensors library; returns the bytes written."""
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in transformers.LlamaForCausalLM(config).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    weight_map, shard, shard_bytes, total = {}, {}, 0, 0
    shard_names = []

    def flush() -> None:
        name = f"model-{len(shard_names) + 1:05d}.safetensors"
        save_file(shard, os.path.join(directory, name), metadata={"format": "pt"})
        shard_names.append(name)
        weight_map.update({tensor_name: name for tensor_name in shard})
        shard.clear()

    for name, shape in shapes.items():
        tensor = torch.randn(shape, generator=generator) * scale
        if shard and shard_bytes + tensor.nbytes > SHARD_BYTES:
            flush()
            shard_bytes = 0
        shard[name] = tensor
        shard_bytes += tensor.nbytes
        total += tensor.nbytes
    flush()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
    config.save_pretrained(directory)
    return total


def recover_baseline(path_raw: str, path_diff: str, path_tuned: str) -> None:
    """The original's recover: everything loaded at once in float32."""
    load = dict(dtype=torch.float32, device_map={"": "cpu"})
    model_raw = transformers.AutoModelForCausalLM.from_pretrained(path_raw, **load)
    model_recovered = transformers.AutoModelForCausalLM.from_pretrained(path_diff, **load)
    tokenizer_raw = transformers.AutoTokenizer.from_pretrained(path_raw)
    if tokenizer_raw.pad_token is None:
        tokens.smart_tokenizer_and_embedding_resize({"pad_token": tokens.DEFAULT_PAD_TOKEN}, tokenizer_raw, model_raw)
    tokenizer_recovered = transformers.AutoTokenizer.from_pretrained(path_diff)
    state_dict_recovered = model_recovered.state_dict()
    state_dict_raw = model_raw.state_dict()
    with torch.no_grad():
        for name in state_dict_recovered:
            state_dict_recovered[name].add_(state_dict_raw[name])
    total = sum(tensor.sum() for tensor in state_dict_recovered.values())
    print(f"baseline naive sum {float(total):.4f}")
    model_recovered.save_pretrained(path_tuned)
    tokenizer_recovered.save_pretrained(path_tuned)


def recover_ours(path_raw: str, path_diff: str, path_tuned: str) -> None:
    weight_diff.recover(path_raw, path_diff, path_tuned, test_inference=False)


def peak_rss_gb() -> float:
    """This process's peak resident memory. Read from VmHWM, not getrusage's ru_maxrss, which
    on Linux carries over the parent's size through fork and exec."""
    with open("/proc/self/status") as f:
        kilobytes = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kilobytes * 1024 / 1e9


def timed_with_peak_rss(method: str, *args: str) -> tuple[float, float]:
    """Runs in a fresh child process: the method's wall time in seconds and the process's peak
    resident memory in GB."""
    start = time.perf_counter()
    globals()[method](*args)
    return time.perf_counter() - start, peak_rss_gb()


def in_child(method: str, *args: str) -> tuple[float, float]:
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing inherited
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(timed_with_peak_rss, method, *args).result()


def weight_files(directory: str) -> list[str]:
    return sorted(os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".safetensors"))


def plain_copy_seconds(sources: list[str], target_dir: str) -> float:
    os.makedirs(target_dir)
    start = time.perf_counter()
    for source in sources:
        shutil.copyfile(source, os.path.join(target_dir, os.path.basename(source)))
    seconds = time.perf_counter() - start
    shutil.rmtree(target_dir)
    return seconds


def assert_identical(dir_a: str, dir_b: str) -> int:
    """Compares two saved models tensor by tensor, bit for bit; returns the tensor count."""
    a, b = weight_diff.index_checkpoint(dir_a), weight_diff.index_checkpoint(dir_b)
    assert a.keys() == b.keys(), f"different tensor names: {sorted(a.keys() ^ b.keys())[:5]}"
    for name in a:
        with safe_open(a[name].file, "pt") as fa, safe_open(b[name].file, "pt") as fb:
            ta, tb = fa.get_tensor(name), fb.get_tensor(name)
        same = ta.dtype == tb.dtype and ta.shape == tb.shape
        assert same and weight_diff.tensor_bytes(ta) == weight_diff.tensor_bytes(tb), f"{name} differs"
    return len(a)


def main(num_params: float = 1e9, hidden_size: int = 2048, workdir: str | None = None, keep: bool = False) -> None:
    """Run the benchmark.

    Args:
        num_params: approximate parameter count of the synthetic model.
        hidden_size: its hidden size (the layer count follows from num_params).
        workdir: where to put the files (raw, diff, two outputs: about 16 bytes per
            parameter); a fresh temporary directory by default.
        keep: keep the files afterwards instead of deleting them.
    """
    root = tempfile.mkdtemp(prefix="bench_recover-", dir=workdir)
    try:
        path_raw, path_diff = os.path.join(root, "raw"), os.path.join(root, "diff")
        os.makedirs(path_raw)
        os.makedirs(path_diff)
        raw_config = llama_config(num_params, hidden_size, VOCAB_SIZE)
        diff_config = llama_config(num_params, hidden_size, VOCAB_SIZE + 1)
        start = time.perf_counter()
        input_bytes = save_random_checkpoint(path_raw, raw_config, scale=0.02, seed=0)
        input_bytes += save_random_checkpoint(path_diff, diff_config, scale=0.001, seed=1)
        save_tokenizer(path_raw, with_pad=False)
        save_tokenizer(path_diff, with_pad=True)
        parameters = input_bytes // 8
        print(
            f"synthetic LLaMA: {parameters / 1e9:.2f}B parameters, {raw_config.num_hidden_layers} layers, "
            f"hidden {hidden_size}; inputs {input_bytes / 1e9:.1f} GB written in {time.perf_counter() - start:.0f} s"
        )
        inputs = weight_files(path_raw) + weight_files(path_diff)
        copy_seconds = plain_copy_seconds(inputs, os.path.join(root, "copy"))
        print(f"plain copy of the input files: {copy_seconds:.1f} s, {input_bytes / 1e9 / copy_seconds:.2f} GB/s")

        results = {}
        for method in ("recover_baseline", "recover_ours"):
            output = os.path.join(root, method)
            results[method] = in_child(method, path_raw, path_diff, output)
            seconds, peak = results[method]
            print(
                f"{method}: {seconds:.1f} s ({input_bytes / 1e9 / seconds:.2f} GB/s of input), peak RSS {peak:.2f} GB"
            )
        count = assert_identical(os.path.join(root, "recover_baseline"), os.path.join(root, "recover_ours"))
        print(f"outputs identical: {count} tensors, bit for bit")
        (base_s, base_rss), (ours_s, ours_rss) = results["recover_baseline"], results["recover_ours"]
        print(f"recover peak RSS: ratio={base_rss / ours_rss:.2f} (baseline={base_rss:.2f} GB, ours={ours_rss:.2f} GB)")
        print(f"recover: ratio={base_s / ours_s:.2f} (baseline={base_s:.1f} s, ours={ours_s:.1f} s)")
    finally:
        if keep:
            print(f"files kept in {root}")
        else:
            shutil.rmtree(root)


if __name__ == "__main__":
    fire.Fire(main)
