"""train.py's speed paths on CPU: the best-fit packer, padding-free batches with cumulative
sequence lengths (checked against padded batches), the GPU-only flags' one-line errors and
--bf16's warning on CPU, gradient checkpointing under FSDP and LoRA, --torch_compile, and
bench/gpu.sh's dry run."""

import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch
import transformers

import tokens
import train
import utils
from helpers import ROOT
from test_train import RECORDS, logged_losses, run_script


@pytest.fixture()
def data_file(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(RECORDS))
    return path


# --------------------------------------------------------------------------------------------
# The packer


def test_best_fit_decreasing_puts_each_example_in_the_fullest_row_it_fits():
    # 5 opens a row, 4 fits beside it, the 3s open a second row, the 2s fill it, 1 ends the first.
    assert tokens.pack_best_fit_decreasing([5, 4, 3, 3, 2, 2, 1], 10) == [[0, 1, 6], [2, 3, 4, 5]]


@pytest.mark.parametrize("seed", range(20))
def test_the_packer_keeps_every_example_once_whole_and_within_the_row(seed):
    rng = random.Random(seed)
    capacity = rng.choice([16, 64, 512])
    lengths = [rng.randint(1, capacity + 10) for _ in range(rng.randint(1, 300))]
    examples = [{"input_ids": [i] * n, "labels": [-i] * n} for i, n in enumerate(lengths)]
    rows = tokens.pack_examples(examples, capacity)
    seen = []
    for row in rows:
        row_lengths = tokens.sequence_lengths(row["position_ids"])
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"]) == sum(row_lengths)
        assert len(row["input_ids"]) <= capacity or len(row_lengths) == 1  # too long: a row of its own
        start = 0
        for n in row_lengths:
            ids = row["input_ids"][start : start + n]
            assert ids == [ids[0]] * n and lengths[ids[0]] == n, "an example is whole and unmixed"
            assert row["labels"][start : start + n] == [-ids[0]] * n
            seen.append(ids[0])
            start += n
    assert sorted(seen) == list(range(len(lengths))), "every example exactly once"
    assert len(rows) <= 2 * math.ceil(sum(lengths) / capacity) + sum(n > capacity for n in lengths)


def test_the_projects_data_packs_into_nearly_full_rows(tiny_llama_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.add_special_tokens(tokens.missing_special_tokens(tokenizer))
    # The tiny tokenizer spells most words byte by byte: rows of 2048 of its tokens hold about as
    # many examples as rows of 512 real LLaMA tokens.
    examples, _ = tokens.preprocess(utils.load_records(str(ROOT / "alpaca_data.json")), tokenizer, 2048)
    rows = tokens.pack_examples(examples, 2048)
    assert sum(len(r["input_ids"]) for r in rows) == sum(len(e["input_ids"]) for e in examples)
    assert sum(len(r["input_ids"]) for r in rows) / (2048 * len(rows)) > 0.95


# --------------------------------------------------------------------------------------------
# Padding-free batches give the padded loss


def example_loss(logits, labels):
    """One example's mean loss over its trained tokens, from its own logits and labels."""
    return torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=tokens.IGNORE_INDEX).item()


@pytest.mark.parametrize("attention", ["sdpa", "eager", tokens.PER_EXAMPLE_SDPA])
@pytest.mark.parametrize("mode", ["packing", "padding_free"])
def test_padding_free_batches_give_each_example_its_padded_loss(tiny_llama_dir, attention, mode):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    tokens.smart_tokenizer_and_embedding_resize(tokens.missing_special_tokens(tokenizer), tokenizer, model)
    examples, _ = tokens.preprocess(RECORDS, tokenizer, 512)
    padded = tokens.DataCollatorForSupervisedDataset(pad_token_id=tokenizer.pad_token_id)(examples)
    with torch.no_grad():
        padded_logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    expected = [
        example_loss(padded_logits[i, : len(e["input_ids"])], torch.tensor(e["labels"])) for i, e in enumerate(examples)
    ]

    if mode == "packing":  # rows shorter than all 8 examples: several rows, the shorter ones padded
        rows = tokens.pack_examples(examples, 3 * max(len(e["input_ids"]) for e in examples))
        batch = tokens.DataCollatorForPackedRows(tokenizer.pad_token_id, flash_attn_kwargs=True)(rows)
        row_length = batch["input_ids"].shape[1]
        assert len(rows) > 1 and any(len(r["input_ids"]) < row_length for r in rows)
        spans = [(r * row_length, tokens.sequence_lengths(row["position_ids"])) for r, row in enumerate(rows)]
    else:
        batch = transformers.DataCollatorWithFlattening(separator_id=-100, return_flash_attn_kwargs=True)(examples)
        spans = [(0, [len(e["input_ids"]) for e in examples])]
    assert batch["cu_seq_lens_q"].dtype == torch.int32 and batch["cu_seq_lens_q"][-1] == batch["input_ids"].numel()
    model.set_attn_implementation(attention)
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    flat_ids, flat_labels = batch["input_ids"].reshape(-1), batch["labels"].reshape(-1)
    flat_logits = logits.reshape(-1, logits.shape[-1])
    found = {}
    for start, lengths in spans:
        for n in lengths:
            assert start in batch["cu_seq_lens_q"].tolist(), "the kernel is told where each example starts"
            assert flat_labels[start] == tokens.IGNORE_INDEX, "no example is trained on its neighbour's last token"
            labels = torch.cat([torch.tensor([tokens.IGNORE_INDEX]), flat_labels[start + 1 : start + n]])
            found[tuple(flat_ids[start : start + n].tolist())] = example_loss(flat_logits[start : start + n], labels)
            start += n
    assert len(found) == len(examples)
    for example, loss in zip(examples, expected):
        assert abs(found[tuple(example["input_ids"])] - loss) < 1e-5


def test_per_example_attention_gives_the_gradients_of_the_dense_block_diagonal_mask(tiny_llama_dir):
    """Backward through the per-example split (the part a forward-only check misses): every
    parameter's gradient on a packed batch equals that of sdpa under the dense mask."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    tokens.smart_tokenizer_and_embedding_resize(tokens.missing_special_tokens(tokenizer), tokenizer, model)
    examples, _ = tokens.preprocess(RECORDS, tokenizer, 512)
    rows = tokens.pack_examples(examples, 3 * max(len(e["input_ids"]) for e in examples))
    batch = tokens.DataCollatorForPackedRows(tokenizer.pad_token_id, flash_attn_kwargs=True)(rows)
    gradients = []
    for per_example in (False, True):
        if per_example:
            model.set_attn_implementation(tokens.PER_EXAMPLE_SDPA)
        model.zero_grad()
        model(**batch, use_cache=False).loss.backward()
        gradients.append({name: p.grad.clone() for name, p in model.named_parameters()})
    assert model.config._attn_implementation == tokens.PER_EXAMPLE_SDPA
    for name, dense in gradients[0].items():
        assert torch.allclose(gradients[1][name], dense, atol=1e-6, rtol=1e-4), name


@pytest.mark.parametrize(
    "flags, per_example",
    [
        (["--packing", "True"], True),
        (["--padding_free", "True"], True),
        ([], False),
        (["--packing", "True", "--attn_implementation", "eager"], False),
        (["--packing", "True", "--torch_compile", "True"], False),
        (["--padding_free", "True", "--torch_compile_mode", "default"], False),
    ],
)
def test_which_runs_attend_per_example(tiny_llama_dir, data_file, tmp_path, flags, per_example):
    common = ["--model_name_or_path", str(tiny_llama_dir), "--data_path", str(data_file), "--output_dir", str(tmp_path)]
    assert train.attends_per_example(train.parse_arguments(common + flags)) is per_example


def test_per_example_attention_refuses_an_example_that_crosses_rows():
    assert tokens.lengths_per_row([0, 3, 8, 10, 16], 2, 8) == [[3, 5], [2, 6]]
    with pytest.raises(ValueError, match="the example at 3 runs past the end of its row of 8"):
        tokens.lengths_per_row([0, 3, 10, 16], 2, 8)
    with pytest.raises(ValueError, match="16 tokens, not the batch's 3 rows of 8"):
        tokens.lengths_per_row([0, 8, 16], 3, 8)


def test_per_example_attention_uses_the_lengths_and_not_the_mask():
    """Given cumulative lengths, the mask is not what decides (here it lets every token see every
    other): each span attends causally to itself alone. A sliding window, which per-example
    causal sdpa cannot express, goes back to the mask."""
    torch.manual_seed(0)
    query, key, value = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    everything = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    lengths = torch.tensor([0, 2, 6, 9, 12], dtype=torch.int32)  # row 0: 2 + 4 tokens, row 1: 3 + 3
    module = torch.nn.Module().eval()
    out, _ = tokens.per_example_sdpa_attention(module, query, key, value, everything, cu_seq_lens_q=lengths)
    for row, spans in enumerate([[(0, 2), (2, 6)], [(0, 3), (3, 6)]]):
        for start, end in spans:
            q, k, v = (
                query[row : row + 1, :, start:end],
                key[row : row + 1, :, start:end],
                value[row : row + 1, :, start:end],
            )
            expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            assert torch.allclose(out[row, start:end], expected[0].transpose(0, 1), atol=1e-6)
    module.num_key_value_groups = 2  # what transformers' sdpa reads from a LLaMA attention layer
    windowed, _ = tokens.per_example_sdpa_attention(
        module, query, key, value, everything, cu_seq_lens_q=lengths, sliding_window=2
    )
    unmasked = torch.nn.functional.scaled_dot_product_attention(query, key, value, enable_gqa=True).transpose(1, 2)
    assert torch.allclose(windowed, unmasked, atol=1e-6), "with a window the mask decides"


def test_training_on_packed_rows_gives_the_padded_loss(tiny_llama_dir, data_file, tmp_path, capsys):
    """One step over all eight examples, padded in one batch or packed into rows of 256 tokens (four rows):
    the same mean loss over the same response tokens."""
    common = [
        *("--model_name_or_path", str(tiny_llama_dir), "--data_path", str(data_file)),
        *("--max_steps", "1", "--per_device_train_batch_size", "8", "--learning_rate", "0"),
        *("--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--model_max_length", "256"),
    ]
    train.train(common + ["--output_dir", str(tmp_path / "padded")])
    trainer = train.train(common + ["--output_dir", str(tmp_path / "packed"), "--packing", "True"])
    assert trainer.model.config._attn_implementation == tokens.PER_EXAMPLE_SDPA, "sdpa runs once per example"
    assert "--packing: 8 examples -> 4 rows of <= 256 tokens" in capsys.readouterr().out
    [padded], [packed] = logged_losses(tmp_path / "padded"), logged_losses(tmp_path / "packed")
    assert abs(padded - packed) < 1e-5


# --------------------------------------------------------------------------------------------
# GPU-only flags on CPU: one line each


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--attn_implementation", "flash_attention_2"],
            "--attn_implementation flash_attention_2 needs the flash_attn package, which is not installed "
            "(pip install flash-attn), and an NVIDIA GPU",
        ),
        (
            ["--use_liger_kernel", "True"],
            "--use_liger_kernel True needs the liger_kernel package, which is not installed "
            "(pip install liger-kernel), and an NVIDIA GPU",
        ),
        (["--fp16", "True"], "--fp16 True needs a GPU"),
    ],
)
def test_gpu_only_flags_on_cpu_are_one_clear_line(tiny_llama_dir, tmp_path, flags, message):
    argv = ["--model_name_or_path", str(tiny_llama_dir), "--data_path", "d.json", "--output_dir", str(tmp_path)]
    with pytest.raises(utils.UsageError) as error:
        train.parse_arguments(argv + flags)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_bf16_on_a_cpu_without_native_bfloat16_runs_with_one_warning(tiny_llama_dir, tmp_path, capsys):
    argv = ["--model_name_or_path", str(tiny_llama_dir), "--data_path", "d.json", "--output_dir", str(tmp_path)]
    args = train.parse_arguments(argv + ["--bf16", "True"])
    assert args.trainer["bf16"] and args.trainer["use_cpu"], "the original command line keeps working"
    warnings = [line for line in capsys.readouterr().err.splitlines() if "--bf16" in line]
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert warnings == []
    else:
        assert warnings == [
            f"warning: --bf16 True on this CPU ({torch.backends.cpu.get_cpu_capability()}, no native bfloat16) is "
            "emulated and slower than full precision; drop the flag for CPU runs."
        ]


@pytest.mark.parametrize("already", [None, "0"])
def test_cpu_training_backs_large_tensors_with_huge_pages_unless_told_otherwise(
    tiny_llama_dir, tmp_path, monkeypatch, already
):
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", already or "")  # so that the test's end restores it
    if already is None:
        monkeypatch.delenv("THP_MEM_ALLOC_ENABLE")
    argv = ["--model_name_or_path", str(tiny_llama_dir), "--data_path", "d.json", "--output_dir", str(tmp_path)]
    train.parse_arguments(argv)
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == (already or "1")


def test_the_script_says_so_in_one_line_before_loading_anything(tiny_llama_dir, tmp_path):
    result = run_script(
        [
            *("--model_name_or_path", tiny_llama_dir, "--data_path", tmp_path / "absent.json"),
            *("--output_dir", tmp_path / "o", "--use_liger_kernel", "True"),
        ],
        check=False,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("train.py: error: --use_liger_kernel True needs")


# --------------------------------------------------------------------------------------------
# Gradient checkpointing


def test_gradient_checkpointing_under_fsdp_becomes_fsdps_activation_checkpointing(tiny_llama_dir, tmp_path):
    config = tmp_path / "fsdp.json"
    config.write_text(json.dumps({"cpu_ram_efficient_loading": False}))
    args = train.parse_arguments(
        [
            *("--model_name_or_path", str(tiny_llama_dir), "--data_path", "d.json", "--output_dir", str(tmp_path)),
            *("--fsdp", "full_shard auto_wrap", "--fsdp_config", str(config), "--gradient_checkpointing", "True"),
            *("--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer"),
        ]
    )
    assert args.trainer["fsdp_config"] == {
        "cpu_ram_efficient_loading": False,
        "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
        "activation_checkpointing": True,
    }
    assert not args.trainer["gradient_checkpointing"] and not args.trainer["activation_checkpointing"]
    plain = train.parse_arguments(
        [
            *("--model_name_or_path", str(tiny_llama_dir), "--data_path", "d.json", "--output_dir", str(tmp_path)),
            *("--gradient_checkpointing", "True"),
        ]
    )
    assert plain.trainer["gradient_checkpointing"] and not plain.trainer["fsdp_config"]


def test_gradient_checkpointing_with_lora_trains_to_the_same_losses(tiny_llama_dir, data_file, tmp_path):
    common = [
        *("--model_name_or_path", str(tiny_llama_dir), "--data_path", str(data_file)),
        *("--max_steps", "3", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2"),
        *("--logging_steps", "1", "--save_strategy", "no", "--report_to", "none"),
        *("--use_lora", "True", "--lora_dropout", "0", "--lora_target_modules", "q_proj,v_proj,o_proj"),
    ]
    train.train(common + ["--output_dir", str(tmp_path / "plain")])
    trainer = train.train(common + ["--output_dir", str(tmp_path / "ckpt"), "--gradient_checkpointing", "True"])
    assert trainer.model.base_model.model.model.gradient_checkpointing
    plain, checkpointed = logged_losses(tmp_path / "plain"), logged_losses(tmp_path / "ckpt")
    assert len(plain) == 3 and plain[-1] != plain[0], "the adapter trains"
    for a, b in zip(plain, checkpointed, strict=True):
        assert abs(a - b) < 1e-5


# --------------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.slow  # inductor compiles C++ kernels for the model: about a minute on 2 cores
def test_torch_compile_trains_to_the_same_losses(tiny_llama_dir, data_file, tmp_path):
    common = [
        *("--model_name_or_path", str(tiny_llama_dir), "--data_path", str(data_file)),
        *("--max_steps", "3", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2"),
        *("--logging_steps", "1", "--save_strategy", "no", "--report_to", "none"),
    ]
    train.train(common + ["--output_dir", str(tmp_path / "eager")])
    trainer = train.train(common + ["--output_dir", str(tmp_path / "compiled"), "--torch_compile", "True"])
    assert hasattr(trainer.model_wrapped, "_orig_mod") or hasattr(trainer.model, "_orig_mod"), "the model ran compiled"
    eager, compiled = logged_losses(tmp_path / "eager"), logged_losses(tmp_path / "compiled")
    assert len(eager) == 3 and eager[-1] != eager[0]
    for a, b in zip(eager, compiled, strict=True):
        assert abs(a - b) < 1e-4  # fused kernels reorder float32 sums
    _, loading = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "compiled", output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"], "saved under the model's own names"


@pytest.mark.distributed
@pytest.mark.parametrize(
    "batching", [[], ["--packing", "True", "--model_max_length", "256"]], ids=["padded", "packing"]
)
def test_torchrun_fsdp_with_gradient_checkpointing_gives_the_same_losses(tiny_llama_dir, data_file, tmp_path, batching):
    """Also with packed rows, whose per-example attention the checkpointed layers run again."""
    common = [
        *("--model_name_or_path", tiny_llama_dir, "--data_path", data_file, "--max_steps", "2"),
        *("--per_device_train_batch_size", "2", "--learning_rate", "1e-2", "--logging_steps", "1"),
        *("--save_strategy", "no", "--fsdp", "full_shard auto_wrap"),
        *("--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer", *batching),
    ]
    run_script(common + ["--output_dir", tmp_path / "plain"], nproc=2)
    result = run_script(common + ["--output_dir", tmp_path / "ckpt", "--gradient_checkpointing", "True"], nproc=2)
    assert result.stdout.count("using FSDP's activation checkpointing") == 1
    assert "rank 1: activation checkpointing wraps 2 layers" in result.stdout  # both decoder layers
    assert "redundant AllGather" not in result.stdout + result.stderr
    plain, checkpointed = logged_losses(tmp_path / "plain"), logged_losses(tmp_path / "ckpt")
    assert len(plain) == 2 and plain[0] != plain[1]
    for a, b in zip(plain, checkpointed, strict=True):
        assert abs(a - b) < 1e-5


# --------------------------------------------------------------------------------------------
# The GPU benchmark's dry run


@pytest.mark.slow
@pytest.mark.distributed
def test_gpu_benchmark_dry_run_runs_every_configuration_on_a_tiny_model(tmp_path):
    """bench/gpu.sh --dry_run: the GPU benchmark's code on CPU with a tiny model, torchrun included."""
    result = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), "--dry_run", "--work_dir", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("gpu_bench ")]
    assert len(rows) >= 3, result.stdout
    for mode in ("padded", "padding_free", "packing"):
        assert any(row.startswith(f"gpu_bench {mode} attn=sdpa liger=off: ") and "% (loss" in row for row in rows)
    assert "flash_attention_2 skipped" in result.stdout and "--use_liger_kernel skipped" in result.stdout
    assert any(row.startswith("gpu_bench torchrun --nproc_per_node=2 FSDP full_shard: 2 steps") for row in rows)
