"""train.py on tiny LLaMA models built at test time: real Trainer steps, real torchrun."""

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import transformers

import tokens
import train
import utils
from helpers import ROOT, build_tiny_llama, shared_file

RECORDS = [
    {"instruction": "Name the largest planet in the solar system.", "input": "", "output": "Jupiter."},
    {"instruction": "Add the two numbers.", "input": "12 and 30", "output": "42"},
    {"instruction": "Give the opposite of the word.", "input": "ancient", "output": "modern"},
    {"instruction": "Say hello in French.", "output": "Bonjour."},
    {
        "instruction": "Classify the review as positive or negative.",
        "input": "The soup was cold and bland.",
        "output": "Negative",
    },
    {"instruction": "Count the vowels in the word.", "input": "banana", "output": "3"},
    {"instruction": "Finish the proverb: the early bird...", "input": "", "output": "catches the worm."},
    {"instruction": "Convert 2 kilometres to metres.", "input": "", "output": "2,000 metres."},
]


@pytest.fixture()
def data_file(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(RECORDS))
    return path


def run_script(args, nproc=None, timeout=600, check=True, env=None):
    """Run train.py as users do: `python train.py ...` or `torchrun --nproc_per_node=N train.py ...`."""
    if nproc:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    else:
        launcher = [sys.executable]
    result = subprocess.run(
        launcher + [str(ROOT / "train.py"), "--report_to", "none", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=None if env is None else {**os.environ, **env},
    )
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def logged_losses(output_dir, key="loss"):
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [entry[key] for entry in state["log_history"] if key in entry]


def logits(model_dir, ids=(1, 20, 30, 40, 50)):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


# --------------------------------------------------------------------------------------------
# Training runs


def test_overfit_loss_halves_and_saved_model_gives_same_logits(tiny_llama_dir, data_file, tmp_path):
    out = tmp_path / "out"
    trainer = train.train(
        [
            "--model_name_or_path",
            str(tiny_llama_dir),
            "--data_path",
            str(data_file),
            "--output_dir",
            str(out),
            "--num_train_epochs",
            "40",
            "--per_device_train_batch_size",
            "4",
            "--learning_rate",
            "1e-2",
            "--lr_scheduler_type",
            "constant",
            "--logging_steps",
            "1",
            "--save_strategy",
            "no",
            "--report_to",
            "none",
        ]
    )
    losses = logged_losses(out)
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] / 2, losses
    assert (out / "model.safetensors").exists() and (out / "trainer_state.json").exists()
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    trained = trainer.model.eval()
    with torch.no_grad():
        expected = trained(ids.to(trained.device)).logits.cpu()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.dtype == torch.float32
    torch.testing.assert_close(logits(out), expected, rtol=0, atol=0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.pad_token == "[PAD]" and reloaded.config.pad_token_id == tokenizer.pad_token_id
    generation = transformers.GenerationConfig.from_pretrained(out)
    assert generation.pad_token_id == tokenizer.pad_token_id and tokenizer.eos_token_id in [generation.eos_token_id]


def test_a_new_eos_token_becomes_a_generation_stop(tmp_path):
    model, tokenizer = build_tiny_llama(tmp_path)
    tokenizer.eos_token = ""
    tokens.smart_tokenizer_and_embedding_resize({"pad_token": "[PAD]", "eos_token": "<|end|>"}, tokenizer, model)
    tokens.set_special_token_ids(model, tokenizer)
    assert model.generation_config.eos_token_id == [2, tokenizer.convert_tokens_to_ids("<|end|>")]
    assert model.generation_config.pad_token_id == model.config.pad_token_id == tokenizer.pad_token_id


@pytest.mark.distributed
def test_torchrun_fsdp_with_the_original_readme_flags(tiny_llama_dir, data_file, tmp_path):
    out = tmp_path / "out"
    result = run_script(
        [
            "--model_name_or_path",
            tiny_llama_dir,
            "--data_path",
            data_file,
            "--bf16",
            "True",
            "--output_dir",
            out,
            "--num_train_epochs",
            "1",
            "--per_device_train_batch_size",
            "2",
            "--per_device_eval_batch_size",
            "2",
            "--gradient_accumulation_steps",
            "1",
            "--evaluation_strategy",
            "no",
            "--save_strategy",
            "steps",
            "--save_steps",
            "2000",
            "--save_total_limit",
            "1",
            "--learning_rate",
            "2e-5",
            "--weight_decay",
            "0.",
            "--warmup_ratio",
            "0.03",
            "--lr_scheduler_type",
            "cosine",
            "--logging_steps",
            "1",
            "--fsdp",
            "full_shard auto_wrap",
            "--fsdp_transformer_layer_cls_to_wrap",
            "LlamaDecoderLayer",
            "--tf32",
            "True",
        ],
        nproc=2,
    )
    assert "--tf32 has no effect without an NVIDIA GPU" in result.stderr
    assert "Setting accelerator to CPU" not in result.stdout + result.stderr  # DeepSpeed's false alarm
    held = _held_parameter_values(result.stdout)
    assert sorted(held) == [0, 1]
    total = held[0][1]
    assert held[0][0] < total and held[1][0] < total, held
    assert held[0][0] + held[1][0] == total, "the two FSDP shards together hold every value once"
    assert len(logged_losses(out)) == 2  # 8 examples / (2 per device * 2 ranks)
    saved = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).state_dict()
    assert sum(t.numel() for t in saved.values()) == total
    # The full state dict gathered on rank 0 is the trained model: near the base, not equal to it.
    changes = [(saved[name][: base[name].shape[0]] - base[name]).abs().max().item() for name in base]
    assert 0 < max(changes) < 1e-2, changes


@pytest.mark.distributed
def test_torchrun_fsdp_cpu_offload(tiny_llama_dir, data_file, tmp_path):
    out = tmp_path / "out"
    result = run_script(
        [
            "--model_name_or_path",
            tiny_llama_dir,
            "--data_path",
            data_file,
            "--output_dir",
            out,
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "2",
            "--save_strategy",
            "no",
            "--fsdp",
            "full_shard auto_wrap offload",
            "--fsdp_transformer_layer_cls_to_wrap",
            "LlamaDecoderLayer",
        ],
        nproc=2,
    )
    held = _held_parameter_values(result.stdout)
    assert held[0][0] < held[0][1]
    logits(out)


def _held_parameter_values(stdout):
    held = {}
    for line in stdout.splitlines():
        if ": holds " in line and line.startswith("rank "):
            rank, rest = line[len("rank ") :].split(": holds ")
            local, total = rest.replace(" parameter values", "").split(" of ")
            held[int(rank)] = (int(local.replace(",", "")), int(total.replace(",", "")))
    return held


@pytest.mark.distributed
@pytest.mark.slow
def test_torchrun_deepspeed_zero3_offload_saves_a_reloadable_model(tiny_llama_dir, data_file, tmp_path):
    out = tmp_path / "out"
    result = run_script(
        [
            "--model_name_or_path",
            tiny_llama_dir,
            "--data_path",
            data_file,
            "--output_dir",
            out,
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "2",
            "--save_strategy",
            "no",
            "--logging_steps",
            "1",
            "--deepspeed",
            ROOT / "configs" / "default_offload_opt_param.json",
        ],
        nproc=2,
    )
    held = _held_parameter_values(result.stdout)
    assert held[0][0] < held[0][1], "ZeRO-3 partitions the parameters"
    assert all(math.isfinite(x) for x in logged_losses(out))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).get_input_embeddings().weight
    assert reloaded.shape[0] == len(transformers.AutoTokenizer.from_pretrained(out))
    # The [PAD] row was set (on gathered ZeRO-3 parameters) to the mean of the raw rows, and a
    # pad input gets no gradient, so it is still that mean after training.
    raw = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).get_input_embeddings().weight
    assert reloaded.shape[0] == raw.shape[0] + 1
    torch.testing.assert_close(reloaded[-1], raw.mean(dim=0), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_padding_free_training_logs_the_padded_losses(tiny_llama_dir, data_file, tmp_path):
    common = [
        "--model_name_or_path",
        tiny_llama_dir,
        "--data_path",
        data_file,
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "4",
        "--learning_rate",
        "0",
        "--logging_steps",
        "1",
        "--save_strategy",
        "no",
    ]
    run_script(common + ["--output_dir", tmp_path / "padded"])
    run_script(common + ["--output_dir", tmp_path / "free", "--padding_free", "True"])
    for padded, free in zip(logged_losses(tmp_path / "padded"), logged_losses(tmp_path / "free"), strict=True):
        assert abs(padded - free) < 1e-5


@pytest.mark.slow
def test_padding_free_is_refused_for_a_model_whose_attention_crosses_examples(tmp_path, data_file):
    from helpers import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(tmp_path / "opt")
    config = transformers.OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=32,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )
    transformers.OPTForCausalLM(config).save_pretrained(tmp_path / "opt")
    result = run_script(
        [
            "--model_name_or_path",
            tmp_path / "opt",
            "--data_path",
            data_file,
            "--output_dir",
            tmp_path / "o",
            "--padding_free",
            "True",
        ],
        check=False,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "--padding_free: OPTForCausalLM lets packed examples attend to each other" in result.stderr


def test_old_flag_spellings_map_to_todays_arguments(tiny_llama_dir, tmp_path):
    args = train.parse_arguments(
        [
            "--model_name_or_path",
            str(tiny_llama_dir),
            "--data_path",
            "d.json",
            "--output_dir",
            str(tmp_path),
            "--evaluation_strategy",
            "steps",
            "--warmup_ratio",
            "0.03",
            "--group_by_length",
            "True",
        ]
    )
    trainer_args = train.training_arguments(args.trainer)
    assert trainer_args.eval_strategy == "steps" and trainer_args.warmup_steps == 0.03
    assert trainer_args.train_sampling_strategy == "group_by_length"


def test_parsing_the_command_line_sets_nothing_up(tiny_llama_dir, tmp_path, monkeypatch):
    """Parsing (even of a DeepSpeed run outside a launcher) leaves the environment and
    torch.distributed alone; training_arguments() is where the run time is set up."""
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    before = dict(os.environ)
    args = train.parse_arguments(
        [
            "--model_name_or_path",
            str(tiny_llama_dir),
            "--data_path",
            "d.json",
            "--output_dir",
            str(tmp_path),
            "--deepspeed",
            str(ROOT / "configs" / "default_offload_opt_param.json"),
            "--model_max_length",
            "64",
            "--use_lora",
            "True",
        ]
    )
    assert dict(os.environ) == before and not torch.distributed.is_initialized()
    assert args.data.model_max_length == 64 and args.lora.use_lora and args.trainer["deepspeed"].endswith(".json")


def test_resume_picks_the_newest_complete_checkpoint(tmp_path, capsys):
    for step, complete in ((5, True), (10, True), (15, False), (20, False)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")

    def resume(given, output_dir=tmp_path):
        return train.last_checkpoint(argparse.Namespace(output_dir=str(output_dir), resume_from_checkpoint=given))

    assert resume(None) == str(tmp_path / "checkpoint-10")
    assert "Skipping" in capsys.readouterr().out
    assert resume("True") == str(tmp_path / "checkpoint-10")
    assert resume("False") is None
    assert resume("/elsewhere/checkpoint-3") == "/elsewhere/checkpoint-3"
    assert resume(None, output_dir=tmp_path / "new") is None


@pytest.mark.slow
def test_padding_free_group_by_length_and_validation_split(tiny_llama_dir, data_file, tmp_path):
    out = tmp_path / "out"
    result = run_script(
        [
            "--model_name_or_path",
            tiny_llama_dir,
            "--data_path",
            data_file,
            "--output_dir",
            out,
            "--num_train_epochs",
            "2",
            "--per_device_train_batch_size",
            "3",
            "--padding_free",
            "True",
            "--group_by_length",
            "True",
            "--val_set_size",
            "2",
            "--save_strategy",
            "no",
            "--logging_steps",
            "1",
        ]
    )
    assert "8 records -> 8 examples" in result.stdout
    losses = logged_losses(out)
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)  # 6 training examples, batches of 3
    eval_losses = logged_losses(out, "eval_loss")
    assert len(eval_losses) == 1 and math.isfinite(eval_losses[0])


@pytest.mark.slow
def test_lora_training_saves_adapter_and_merged_model(tiny_llama_dir, data_file, tmp_path):
    import peft

    out = tmp_path / "out"
    run_script(
        [
            "--model_name_or_path",
            tiny_llama_dir,
            "--data_path",
            data_file,
            "--output_dir",
            out,
            "--max_steps",
            "4",
            "--per_device_train_batch_size",
            "4",
            "--learning_rate",
            "1e-2",
            "--save_strategy",
            "no",
            "--use_lora",
            "True",
            "--lora_r",
            "4",
            "--lora_target_modules",
            "q_proj,v_proj,o_proj",
            "--merge_lora",
            "True",
        ]
    )
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    base.resize_token_embeddings(len(tokenizer))
    adapted = peft.PeftModel.from_pretrained(base, out).eval()
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    with torch.no_grad():
        expected = adapted(ids).logits
        untouched = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir)(ids).logits
    merged = logits(out / "merged")
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(merged[..., : untouched.shape[-1]], untouched, atol=1e-4), "LoRA changed the model"


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_final_loss(tiny_llama_dir, data_file, tmp_path):
    common = [
        "--model_name_or_path",
        tiny_llama_dir,
        "--data_path",
        data_file,
        "--max_steps",
        "30",
        "--per_device_train_batch_size",
        "2",
        "--learning_rate",
        "5e-3",
        "--logging_steps",
        "1",
        "--save_strategy",
        "steps",
        "--save_steps",
        "5",
        "--seed",
        "7",
        "--report_to",
        "none",
    ]
    straight = tmp_path / "straight"
    run_script(common + ["--output_dir", straight])

    resumed = tmp_path / "resumed"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *map(str, common), "--output_dir", str(resumed)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    deadline = time.time() + 300
    while not (resumed / "checkpoint-10" / "trainer_state.json").exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (resumed / "model.safetensors").exists(), "killed before the end"
    result = run_script(common + ["--output_dir", resumed])
    assert "Resuming from" in result.stdout
    assert abs(logged_losses(resumed)[-1] - logged_losses(straight)[-1]) < 1e-4


# --------------------------------------------------------------------------------------------
# Tokenization, masking and truncation


@pytest.mark.slow
def test_token_sequences_match_the_original_recipe_on_the_52k(llama_tokenizer_dir):
    records = json.loads(shared_file("alpaca_data.json").read_text())
    tokenizer = transformers.AutoTokenizer.from_pretrained(llama_tokenizer_dir, model_max_length=512)
    tokenizer.add_special_tokens(tokens.missing_special_tokens(tokenizer))
    examples, counts = tokens.preprocess(records, tokenizer, 512)

    # The original recipe: tokenize prompt + output + "</s>" as one text, and the prompt alone.
    prompts = [utils.format_prompt(r["instruction"], r.get("input")) for r in records]
    full = tokenizer([p + r["output"] + tokenizer.eos_token for p, r in zip(prompts, records)])["input_ids"]
    prompt_only = tokenizer(prompts)["input_ids"]
    fits = [i for i in range(len(records)) if len(prompt_only[i]) < 512]
    assert counts["skipped"] == len(records) - len(fits)
    assert counts["cut"] == sum(len(full[i]) > 512 for i in fits)
    assert len(examples) == len(fits)

    straddling = 0
    for example, i in zip(examples, fits):
        ids, labels = example["input_ids"], example["labels"]
        assert ids == full[i][:512]
        assert ids[0] == tokenizer.bos_token_id
        assert (ids[-1] == tokenizer.eos_token_id) == (len(full[i]) <= 512)
        masked = labels.index(next(x for x in labels if x != tokens.IGNORE_INDEX))
        assert labels[masked:] == ids[masked:] and set(labels[:masked]) == {tokens.IGNORE_INDEX}
        if masked != len(prompt_only[i]):
            # The prompt's last token merged with the response's first characters: that token is trained.
            straddling += 1
            assert masked == len(prompt_only[i]) - 1
            assert ids[:masked] == prompt_only[i][:masked]
    assert 0.01 * len(fits) < straddling < 0.05 * len(fits), straddling


def test_the_original_52k_loads_with_its_28_empty_outputs_reported(capsys):
    path = str(shared_file("alpaca_data.json"))
    with pytest.raises(utils.UsageError, match=r'record 284, field "output": empty \(use --skip_invalid True'):
        train.load_training_records(path, skip_invalid=False)
    assert len(train.load_training_records(path, skip_invalid=True)) == 52002 - 28
    assert "Dropped 28 invalid records of 52002" in capsys.readouterr().out


def test_a_token_straddling_the_prompt_boundary_is_trained(llama_tokenizer_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(llama_tokenizer_dir)
    tokenizer.add_special_tokens(tokens.missing_special_tokens(tokenizer))
    record = {"instruction": "Give the temperature.", "input": "", "output": "-5 degrees"}
    [example], _ = tokens.preprocess([record], tokenizer, 512)
    pieces = tokenizer.convert_ids_to_tokens(example["input_ids"])
    first_trained = next(i for i, label in enumerate(example["labels"]) if label != tokens.IGNORE_INDEX)
    assert pieces[first_trained] == ":-"
    assert example["labels"][-1] == tokenizer.eos_token_id


def test_truncation_skips_prompts_that_do_not_fit_and_cuts_long_responses(tiny_llama_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.add_special_tokens(tokens.missing_special_tokens(tokenizer))
    records = [
        {"instruction": "Repeat: " + "word " * 200, "input": "", "output": "ok"},
        {"instruction": "Tell a story.", "input": "", "output": "once upon a time " * 100},
        {"instruction": "Say yes.", "input": "", "output": "yes"},
    ]
    examples, counts = tokens.preprocess(records, tokenizer, 128)
    assert counts == {"skipped": 1, "cut": 1}
    story, yes = examples
    assert len(story["input_ids"]) == 128 and story["input_ids"][-1] != tokenizer.eos_token_id
    assert yes["input_ids"][-1] == tokenizer.eos_token_id
    for example in examples:
        assert any(label != tokens.IGNORE_INDEX for label in example["labels"]), "no batch may be all-masked"


def test_padding_free_loss_equals_padded_loss_per_example(tiny_llama_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokens.smart_tokenizer_and_embedding_resize(tokens.missing_special_tokens(tokenizer), tokenizer, model)
    examples, _ = tokens.preprocess(RECORDS[:4], tokenizer, 512)
    padded = tokens.DataCollatorForSupervisedDataset(pad_token_id=tokenizer.pad_token_id)(examples)
    flat = transformers.DataCollatorWithFlattening(separator_id=tokens.IGNORE_INDEX)(examples)
    with torch.no_grad():
        padded_logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        # use_cache=False as in training (the Trainer sets it): with a cache the model cannot see the packing.
        flat_logits = model(input_ids=flat["input_ids"], position_ids=flat["position_ids"], use_cache=False).logits[0]
    start = 0
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        labels = torch.tensor(example["labels"])
        per_token = torch.nn.functional.cross_entropy
        padded_loss = per_token(padded_logits[row, : n - 1], labels[1:], ignore_index=tokens.IGNORE_INDEX)
        flat_loss = per_token(flat_logits[start : start + n - 1], labels[1:], ignore_index=tokens.IGNORE_INDEX)
        assert abs(padded_loss.item() - flat_loss.item()) < 1e-5
        start += n


# --------------------------------------------------------------------------------------------
# Special tokens


def _mean_of_old_rows(weight, added):
    return weight[:-added].double().mean(dim=0).float()


def test_missing_pad_token_is_added_with_mean_embedding_rows(tiny_llama_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_llama_dir)
    old_input = model.get_input_embeddings().weight.detach().clone()
    old_output = model.get_output_embeddings().weight.detach().clone()
    assert tokens.missing_special_tokens(tokenizer) == {"pad_token": "[PAD]"}
    added = tokens.smart_tokenizer_and_embedding_resize(tokens.missing_special_tokens(tokenizer), tokenizer, model)
    assert added == 1 and tokenizer.pad_token == "[PAD]"
    for new, old in (
        (model.get_input_embeddings().weight, old_input),
        (model.get_output_embeddings().weight, old_output),
    ):
        assert new.shape[0] == old.shape[0] + 1
        torch.testing.assert_close(new[:-1], old, rtol=0, atol=0)
        torch.testing.assert_close(new[-1], old.double().mean(dim=0).float(), rtol=1e-6, atol=1e-6)


def test_empty_eos_token_is_replaced_without_growing_when_the_piece_exists(tiny_llama_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.pad_token = tokenizer.unk_token
    tokenizer.eos_token = ""
    assert tokens.missing_special_tokens(tokenizer) == {"eos_token": "</s>"}
    size = model.get_input_embeddings().weight.shape[0]
    assert tokens.smart_tokenizer_and_embedding_resize({"eos_token": "</s>"}, tokenizer, model) == 0
    assert tokenizer.eos_token == "</s>" and tokenizer.eos_token_id == 2
    assert model.get_input_embeddings().weight.shape[0] == size


def test_present_special_tokens_leave_the_model_untouched(tiny_llama_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    model.resize_token_embeddings(len(tokenizer))
    before = model.get_input_embeddings().weight.detach().clone()
    assert tokens.missing_special_tokens(tokenizer) == {}
    assert tokens.smart_tokenizer_and_embedding_resize({}, tokenizer, model) == 0
    torch.testing.assert_close(model.get_input_embeddings().weight, before, rtol=0, atol=0)


def test_a_padded_embedding_matrix_is_not_shrunk(tmp_path):
    model, tokenizer = build_tiny_llama(tmp_path, vocab_size=416)  # 400 tokens, 16 spare rows
    old = model.get_input_embeddings().weight.detach().clone()
    assert tokens.smart_tokenizer_and_embedding_resize({"pad_token": "[PAD]"}, tokenizer, model) == 1
    weight = model.get_input_embeddings().weight
    assert weight.shape == old.shape and tokenizer.pad_token_id == 400
    torch.testing.assert_close(weight[400], old[:400].mean(dim=0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(weight[401:], old[401:], rtol=0, atol=0)


def test_tied_embeddings_get_one_mean_row(tmp_path):
    model, tokenizer = build_tiny_llama(tmp_path, tie_word_embeddings=True)
    old = model.get_input_embeddings().weight.detach().clone()
    tokenizer.eos_token = ""
    added = tokens.smart_tokenizer_and_embedding_resize(
        {"pad_token": "[PAD]", "eos_token": "<|end|>"}, tokenizer, model
    )
    assert added == 2
    weight = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight.data_ptr() == weight.data_ptr()
    torch.testing.assert_close(weight[-2:], old.mean(dim=0).expand(2, -1), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "records, message",
    [
        ("just text", "expected a JSON list"),
        ([RECORDS[0], {"input": "x", "output": "y"}], 'record 1, field "instruction": missing'),
        ([RECORDS[0], RECORDS[1], {"instruction": "x"}], 'record 2, field "output": missing'),
        ([{"instruction": "x", "output": 5}], 'record 0, field "output": not a string (int)'),
        ([{"instruction": "x", "input": ["a"], "output": "y"}], 'record 0, field "input": not a string (list)'),
        ([RECORDS[0], {"instruction": "x", "output": "  "}], 'record 1, field "output": empty'),
        ([RECORDS[0], "just text"], "record 1: not a JSON object (str)"),
    ],
)
def test_bad_records_are_named_with_file_index_and_field(tmp_path, records, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records))
    with pytest.raises(utils.UsageError) as error:
        train.load_training_records(str(path), skip_invalid=False)
    assert str(path) in str(error.value) and message in str(error.value)


def test_skip_invalid_drops_and_counts(tmp_path, capsys):
    path = tmp_path / "mixed.jsonl"
    lines = [RECORDS[0], {"instruction": "x"}, RECORDS[1], {"instruction": "", "output": "y"}]
    path.write_text("\n".join(json.dumps(r) for r in lines))
    assert train.load_training_records(str(path), skip_invalid=True) == [RECORDS[0], RECORDS[1]]
    assert "Dropped 2 invalid records of 4" in capsys.readouterr().out


@pytest.mark.distributed
def test_bad_data_and_wrong_layer_class_fail_with_one_clear_line(tiny_llama_dir, data_file, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([RECORDS[0], {"instruction": "x", "output": None}]))
    result = run_script(
        ["--model_name_or_path", tiny_llama_dir, "--data_path", bad, "--output_dir", tmp_path / "o"], check=False
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f'train.py: error: {bad}: record 1, field "output": not a string (NoneType)' in result.stderr

    result = run_script(
        [
            "--model_name_or_path",
            tiny_llama_dir,
            "--data_path",
            data_file,
            "--output_dir",
            tmp_path / "o",
            "--fsdp",
            "full_shard auto_wrap",
            "--fsdp_transformer_layer_cls_to_wrap",
            "LLaMADecoderLayer",
        ],
        nproc=1,
        check=False,
    )
    # (torchrun then adds its own report of the failed process)
    assert result.returncode != 0 and "train.py: error: --fsdp_transformer_layer_cls_to_wrap" in result.stderr
    assert "LLaMADecoderLayer: LlamaForCausalLM has no such layer" in result.stderr
    assert "LlamaDecoderLayer" in result.stderr.split("decoder-layer classes are:")[1]


def test_fsdp_without_torchrun_says_how_to_launch(tiny_llama_dir, data_file, tmp_path):
    result = run_script(
        [
            "--model_name_or_path",
            tiny_llama_dir,
            "--data_path",
            data_file,
            "--output_dir",
            tmp_path / "o",
            "--fsdp",
            "full_shard auto_wrap",
        ],
        check=False,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "launch with torchrun --nproc_per_node=N" in result.stderr


@pytest.mark.distributed
def test_deepspeed_in_one_plain_process(tiny_llama_dir, data_file, tmp_path):
    out = tmp_path / "out"
    run_script(
        [
            "--model_name_or_path",
            tiny_llama_dir,
            "--data_path",
            data_file,
            "--output_dir",
            out,
            "--max_steps",
            "1",
            "--per_device_train_batch_size",
            "2",
            "--save_strategy",
            "no",
            "--deepspeed",
            ROOT / "configs" / "default_offload_opt_param.json",
        ]
    )
    logits(out)


def test_help_explains_the_added_flags():
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0
    for flag in (
        "--data_path",
        "--model_max_length",
        "--padding_free",
        "--use_lora",
        "--evaluation_strategy",
        "--fsdp_transformer_layer_cls_to_wrap",
        "--warmup_ratio",
        "--skip_invalid",
        "--val_set_size",
    ):
        assert flag in result.stdout
    assert os.path.basename(str(ROOT / "train.py")) in result.stdout


# --------------------------------------------------------------------------------------------
# The first hour: fast, clear failures and no false alarms


@pytest.mark.parametrize(
    "path, message", [("{tmp}/nope", "no such directory"), ("demo_output/tunedd", "cannot be reached")]
)
def test_a_model_that_does_not_exist_is_one_line_at_once(data_file, tmp_path, path, message):
    path = path.format(tmp=tmp_path)
    result = run_script(
        ["--model_name_or_path", path, "--data_path", data_file, "--output_dir", tmp_path / "o"],
        check=False,
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"train.py: error: --model_name_or_path {path}: ")
    assert message in result.stderr


def test_data_that_leaves_nothing_to_train_is_one_line(tiny_llama_dir, data_file, tmp_path):
    result = run_script(
        [
            "--model_name_or_path",
            tiny_llama_dir,
            "--data_path",
            data_file,
            "--output_dir",
            tmp_path / "o",
            "--model_max_length",
            "8",
        ],
        check=False,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"train.py: error: {data_file}: no example fits in --model_max_length 8" in result.stderr


def test_bad_data_fails_before_the_model_is_loaded(tiny_llama_dir, tmp_path):
    """The model's weights are unreadable: the data error comes first, so the model was not loaded."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for item in tiny_llama_dir.iterdir():
        (model_dir / item.name).write_bytes(item.read_bytes())
    (model_dir / "model.safetensors").write_bytes(b"not safetensors")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([RECORDS[0], {"instruction": "x"}]))
    result = run_script(
        ["--model_name_or_path", model_dir, "--data_path", bad, "--output_dir", tmp_path / "o"], check=False
    )
    assert f'train.py: error: {bad}: record 1, field "output": missing' in result.stderr, result.stderr[-2000:]


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_the_same_command_resumes_without_false_alarms(data_file, tmp_path):
    """The first Ctrl-C ends training after the step with a checkpoint and one line; the rerun
    resumes from it. A tied model resumes without the 'missing keys: lm_head.weight' warning,
    CPU runs without DeepSpeed's accelerator warning, and the tokenizer keeps its own
    model_max_length (not the training length)."""
    base = tmp_path / "tied"
    build_tiny_llama(base, tie_word_embeddings=True)
    base_max_length = transformers.AutoTokenizer.from_pretrained(base).model_max_length
    out = tmp_path / "out"
    flags = [
        "--model_name_or_path",
        base,
        "--data_path",
        data_file,
        "--output_dir",
        out,
        "--logging_steps",
        "1",
        "--per_device_train_batch_size",
        "2",
        "--save_strategy",
        "no",
        "--model_max_length",
        "256",
    ]
    command = [sys.executable, str(ROOT / "train.py"), "--report_to", "none", *map(str, flags), "--max_steps", "100000"]
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    while "'loss'" not in process.stdout.readline():  # training has started
        assert process.poll() is None, process.stderr.read()[-3000:]
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    [line] = [line for line in stderr.splitlines() if "interrupted" in line]
    assert line.startswith("train.py: interrupted after step ") and "Run the same command again" in line
    [checkpoint] = out.glob("checkpoint-*")
    assert (checkpoint / "trainer_state.json").exists() and checkpoint.name in line
    step = int(checkpoint.name.removeprefix("checkpoint-"))

    rerun = run_script(flags + ["--max_steps", step + 1])
    output = rerun.stdout + rerun.stderr
    assert f"Resuming from {checkpoint}" in output
    assert "missing keys" not in output and "Setting accelerator to CPU" not in output + stderr
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == step + 1
    assert transformers.AutoTokenizer.from_pretrained(out).model_max_length == base_max_length
