"""Supervised fine-tuning on Alpaca-format data with the Hugging Face Trainer.

    torchrun --nproc_per_node=4 train.py --model_name_or_path M --data_path ./alpaca_data.json \
        --output_dir O --fsdp "full_shard auto_wrap" --fsdp_transformer_layer_cls_to_wrap LlamaDecoderLayer ...

Each example is rendered with the Alpaca prompt template, tokenized as one text (prompt + output)
with BOS first and EOS last, and only the response tokens (and EOS) are trained. The Trainer does
the rest; this script wires data, tokenizer and model together and keeps the original's command
lines working on today's libraries. Run `python train.py --help` for every flag.
"""
import bisect
import contextlib
import json
import os
import pathlib
import random
import socket
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import transformers
from torch.utils.data import Dataset

import utils

IGNORE_INDEX = -100
DEFAULT_PAD_TOKEN = "[PAD]"
DEFAULT_EOS_TOKEN = "</s>"
DEFAULT_BOS_TOKEN = "<s>"
DEFAULT_UNK_TOKEN = "<unk>"


class UsageError(Exception):
    """A problem with the command line or the data, reported as one line without a traceback."""


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="facebook/opt-125m", metadata={"help": "Base model: a local checkpoint directory or a hub name."}
    )
    dtype: str = field(
        default="float32",
        metadata={
            "help": "Dtype the weights are loaded in: float32 (default, as the original; mixed precision "
            "comes from --bf16/--fp16), bfloat16, float16, or auto (the checkpoint's own dtype).",
            "choices": ["float32", "bfloat16", "float16", "auto"],
        },
    )


@dataclass
class DataArguments:
    data_path: str = field(
        default=None,
        metadata={"help": "Training data: a JSON list or JSON Lines file of {instruction, input, output} records."},
    )
    val_set_size: int = field(
        default=0, metadata={"help": "Hold out this many examples (chosen with --seed) and report their eval loss."}
    )
    skip_invalid: bool = field(
        default=False,
        metadata={"help": "Drop invalid records (and count them) instead of stopping at the first one."},
    )


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloaded models are cached."})
    optim: str = field(default="adamw_torch", metadata={"help": "Optimizer (the original's default: adamw_torch)."})
    model_max_length: int = field(
        default=512,
        metadata={
            "help": "Maximum sequence length. Examples whose prompt alone does not fit are skipped; "
            "longer responses are cut (and then get no EOS)."
        },
    )
    padding_free: bool = field(
        default=False,
        metadata={
            "help": "Concatenate each batch into one row without padding; positions restart and attention "
            "stays inside each example, so the loss is the same as with padding."
        },
    )
    use_lora: bool = field(default=False, metadata={"help": "Train a LoRA adapter (peft) instead of all weights."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: str = field(
        default="q_proj,v_proj", metadata={"help": "Comma-separated module names that get LoRA adapters."}
    )
    merge_lora: bool = field(
        default=False, metadata={"help": "With --use_lora, also save the merged full model in OUTPUT_DIR/merged."}
    )
    # Old spellings from the original README that today's transformers no longer accepts.
    evaluation_strategy: str | None = field(default=None, metadata={"help": "Old name of --eval_strategy."})
    warmup_ratio: float | None = field(
        default=None, metadata={"help": "Old spelling of a fractional --warmup_steps: warmup over this share of all steps."}
    )
    group_by_length: bool = field(
        default=False, metadata={"help": "Old spelling of --train_sampling_strategy group_by_length."}
    )
    fsdp_transformer_layer_cls_to_wrap: str | None = field(
        default=None,
        metadata={
            "help": "Decoder-layer class FSDP wraps (e.g. LlamaDecoderLayer); moved into --fsdp_config "
            "(transformer_layer_cls_to_wrap) as today's transformers expects."
        },
    )

    def __post_init__(self):
        self._map_old_flags()
        on_cpu = self.use_cpu or not torch.accelerator.is_available()
        if on_cpu:
            self._adapt_to_cpu()
        elif torch.cuda.is_available():
            self._check_cuda_precision_flags()
        if self.fsdp and "WORLD_SIZE" not in os.environ:
            raise UsageError("--fsdp shards the model over several processes: launch with torchrun --nproc_per_node=N train.py ...")
        if self.deepspeed and "RANK" not in os.environ:
            _describe_single_process_job()
        super().__post_init__()
        if self.deepspeed and on_cpu:
            # On CPU the Trainer starts torch.distributed (gloo) but not DeepSpeed's own
            # communication layer, which ZeRO-3 needs before the model is built.
            import deepspeed

            deepspeed.init_distributed(dist_backend="gloo")

    def _map_old_flags(self) -> None:
        if self.evaluation_strategy is not None:
            self.eval_strategy = self.evaluation_strategy
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1:
                raise UsageError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
            self.warmup_steps = self.warmup_ratio
        if self.group_by_length:
            self.train_sampling_strategy = "group_by_length"
        if self.fsdp_transformer_layer_cls_to_wrap:
            self.fsdp_config = _fsdp_config_with_layer_class(self.fsdp_config, self.fsdp_transformer_layer_cls_to_wrap)

    def _check_cuda_precision_flags(self) -> None:
        """One clear line instead of a stack trace for precision modes this GPU lacks."""
        if self.tf32 and torch.cuda.get_device_capability()[0] < 8:
            raise UsageError("--tf32 True needs an NVIDIA Ampere (or newer) GPU; this GPU has no TF32. Drop the flag.")
        if self.bf16 and not torch.cuda.is_bf16_supported(including_emulation=False):
            raise UsageError("--bf16 True needs a GPU with bfloat16 support (Ampere or newer); use --fp16 True instead.")

    def _adapt_to_cpu(self) -> None:
        """Run GPU command lines on a CPU-only machine: the Trainer needs use_cpu for gloo, and
        TF32 is a GPU matmul mode with no CPU meaning, so it is skipped with a warning."""
        self.use_cpu = True
        if self.tf32:
            print("warning: --tf32 has no effect without an NVIDIA GPU; ignoring it.", file=sys.stderr)
            self.tf32 = None
        if self.fp16:
            raise UsageError("--fp16 True needs a GPU; on CPU use --bf16 True or full precision.")


def _describe_single_process_job() -> None:
    """DeepSpeed expects the environment a launcher sets up and otherwise looks for MPI: for a
    plain `python train.py --deepspeed ...`, describe a one-process job instead."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    for name, value in defaults.items():
        os.environ.setdefault(name, value)


def _fsdp_config_with_layer_class(fsdp_config: Any, layer_class: str) -> dict:
    """--fsdp_config (a dict, a JSON file or inline JSON) with the layer class to wrap set."""
    if isinstance(fsdp_config, str) and fsdp_config.lstrip().startswith("{"):
        fsdp_config = json.loads(fsdp_config)
    elif isinstance(fsdp_config, str):
        with open(fsdp_config, encoding="utf-8") as f:
            fsdp_config = json.load(f)
    config = dict(fsdp_config or {})
    config["transformer_layer_cls_to_wrap"] = [name.strip() for name in layer_class.split(",")]
    return config


# ---------------------------------------------------------------------------------------------
# Data


def load_records(path: str, skip_invalid: bool) -> list[dict]:
    """Read and validate the training records; an invalid one stops the run with the file, the
    record index and the field, unless `skip_invalid`, which drops and counts them."""
    try:
        records = utils.jload(path)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read training data: {e}") from None
    if not isinstance(records, list):
        raise UsageError(f"{path}: expected a JSON list (or JSON Lines) of records, got {type(records).__name__}")
    valid, dropped = [], 0
    for index, record in enumerate(records):
        problem = _record_problem(record)
        if problem is None:
            valid.append(record)
        elif skip_invalid:
            dropped += 1
        else:
            raise UsageError(f"{path}: record {index}: {problem} (use --skip_invalid True to drop such records)")
    if dropped:
        print(f"Dropped {dropped} invalid records of {len(records)} from {path}.")
    if not valid:
        raise UsageError(f"{path}: no valid records to train on")
    return valid


def _record_problem(record: Any) -> str | None:
    if not isinstance(record, dict):
        return f"expected an object, got {type(record).__name__}"
    for key in ("instruction", "output"):
        if key not in record:
            return f"field '{key}' is missing"
        if not isinstance(record[key], str):
            return f"field '{key}' is {type(record[key]).__name__}, not a string"
        if not record[key].strip():
            return f"field '{key}' is empty"
    if record.get("input") is not None and not isinstance(record["input"], str):
        return f"field 'input' is {type(record['input']).__name__}, not a string"
    return None


def preprocess(
    records: Sequence[dict], tokenizer: transformers.PreTrainedTokenizerBase, max_length: int
) -> tuple[list[dict], dict]:
    """Tokenize prompt + output in one batched call and mask the prompt out of the labels.

    A token belongs to the response when it ends after the prompt's last character, so a token
    that merges the end of the prompt with the start of the response (e.g. ":-") is trained.
    Returns the examples and counts of skipped (prompt does not fit) and cut (response truncated)."""
    prompts = [utils.format_prompt(r["instruction"], r.get("input")) for r in records]
    texts = [prompt + r["output"] for prompt, r in zip(prompts, records)]
    encoded = tokenizer(texts, return_offsets_mapping=True, return_attention_mask=False, verbose=False)
    examples, skipped, cut = [], 0, 0
    for prompt, ids, offsets in zip(prompts, encoded["input_ids"], encoded["offset_mapping"]):
        response_start = bisect.bisect_right([end for _, end in offsets], len(prompt))
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


def _run_on_main_process(fn: Callable[[], Any]) -> Any:
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


def make_supervised_data_module(
    tokenizer: transformers.PreTrainedTokenizerBase, data_args: DataArguments, training_args: TrainingArguments
) -> dict:
    """Datasets and collator for the Trainer; tokenization runs once, on the main process."""

    def load_and_tokenize():
        records = load_records(data_args.data_path, data_args.skip_invalid)
        examples, counts = preprocess(records, tokenizer, training_args.model_max_length)
        return examples, counts, len(records)

    examples, counts, num_records = _run_on_main_process(load_and_tokenize)
    if training_args.process_index == 0:
        print(
            f"{data_args.data_path}: {num_records} records -> {len(examples)} examples; "
            f"skipped {counts['skipped']} whose prompt alone exceeds {training_args.model_max_length} tokens, "
            f"cut {counts['cut']} long responses (no EOS)."
        )
    eval_dataset = None
    if data_args.val_set_size > 0:
        if data_args.val_set_size >= len(examples):
            raise UsageError(f"--val_set_size {data_args.val_set_size} leaves no training examples")
        order = list(range(len(examples)))
        random.Random(training_args.seed).shuffle(order)
        held_out = set(order[: data_args.val_set_size])
        eval_dataset = SupervisedDataset([examples[i] for i in sorted(held_out)])
        examples = [e for i, e in enumerate(examples) if i not in held_out]
    if training_args.padding_free:
        collator = transformers.DataCollatorWithFlattening(separator_id=IGNORE_INDEX)
    else:
        collator = DataCollatorForSupervisedDataset(pad_token_id=tokenizer.pad_token_id)
    return dict(train_dataset=SupervisedDataset(examples), eval_dataset=eval_dataset, data_collator=collator)


# ---------------------------------------------------------------------------------------------
# Tokenizer and model


def missing_special_tokens(tokenizer: transformers.PreTrainedTokenizerBase) -> dict[str, str]:
    """The special tokens to add: a pad token when there is none, and EOS/BOS/UNK when missing or
    an empty string (some converted LLaMA tokenizers ship them empty, so EOS is never learned)."""
    tokens = {}
    if tokenizer.pad_token is None:
        tokens["pad_token"] = DEFAULT_PAD_TOKEN
    for name, default in (("eos_token", DEFAULT_EOS_TOKEN), ("bos_token", DEFAULT_BOS_TOKEN), ("unk_token", DEFAULT_UNK_TOKEN)):
        if not getattr(tokenizer, name):
            tokens[name] = default
    return tokens


def smart_tokenizer_and_embedding_resize(
    special_tokens: dict[str, str], tokenizer: transformers.PreTrainedTokenizerBase, model: transformers.PreTrainedModel
) -> int:
    """Add special tokens; when that grows the vocabulary, grow the input and output embeddings
    and set each new token's row to the mean of the old tokens' rows. Returns the number of
    tokens added."""
    num_new_tokens = tokenizer.add_special_tokens(special_tokens)
    if num_new_tokens == 0:
        return 0
    # Some checkpoints pad the embedding matrix beyond the vocabulary: never shrink it, the new
    # ids may already have (unused) rows.
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    weights = [model.get_input_embeddings().weight]
    if model.get_output_embeddings() is not None and model.get_output_embeddings().weight is not weights[0]:
        weights.append(model.get_output_embeddings().weight)
    with _gathered(weights), torch.no_grad():
        for weight in weights:
            init_new_rows_to_mean(weight, num_new_tokens, len(tokenizer))
    return num_new_tokens


def init_new_rows_to_mean(weight: torch.Tensor, num_new_rows: int, vocab_size: int | None = None) -> None:
    """Set the rows of the `num_new_rows` tokens just added, the last ones of a vocabulary of
    `vocab_size` (by default every row of `weight`), to the mean of the rows before them.
    weight_diff.py uses it too, so a recovered model gets exactly the rows training gave."""
    end = weight.shape[0] if vocab_size is None else vocab_size
    weight[end - num_new_rows : end] = weight[: end - num_new_rows].mean(dim=0, keepdim=True)


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


def _gathered(params):
    """Under DeepSpeed ZeRO-3 parameters are partitioned: gather them (rank 0 edits) first."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    return contextlib.nullcontext()


def load_model(model_args: ModelArguments, training_args: TrainingArguments) -> transformers.PreTrainedModel:
    dtype = model_args.dtype if model_args.dtype == "auto" else getattr(torch, model_args.dtype)
    return transformers.AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path, cache_dir=training_args.cache_dir, dtype=dtype
    )


def check_fsdp_layer_classes(model: torch.nn.Module, training_args: TrainingArguments) -> None:
    """Fail early, listing the model's decoder-layer classes, when the class to wrap is wrong."""
    if not training_args.fsdp or not isinstance(training_args.fsdp_config, dict):
        return
    wanted = training_args.fsdp_config.get("transformer_layer_cls_to_wrap") or []
    present = {type(m).__name__ for m in model.modules()}
    unknown = [name for name in wanted if name not in present]
    if unknown:
        layers = set(getattr(model, "_no_split_modules", None) or []) | {
            n for n in present if n.endswith(("DecoderLayer", "Block"))
        }
        raise UsageError(
            f"--fsdp_transformer_layer_cls_to_wrap {','.join(unknown)}: {type(model).__name__} has no such layer; "
            f"its decoder-layer classes are: {', '.join(sorted(layers & present)) or 'none found'}"
        )


def check_padding_free_support(model: transformers.PreTrainedModel) -> None:
    """Refuse --padding_free for a model whose attention crosses packed examples: it must build
    its attention mask from the restarting position ids, and some models (e.g. OPT) do not.
    Two short sequences are compared packed and apart."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        return  # the parameters are partitioned: no forward pass outside the DeepSpeed engine
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]])
    with torch.no_grad():
        apart = model(input_ids=ids, use_cache=False).logits
        packed = model(input_ids=ids.reshape(1, -1), position_ids=torch.arange(4).repeat(2)[None], use_cache=False)
    difference = (packed.logits.reshape(apart.shape) - apart).abs().max()
    if difference > 0.02 * apart.abs().max():  # far above rounding noise, even in bfloat16
        raise UsageError(
            f"--padding_free: {type(model).__name__} lets packed examples attend to each other "
            "(its attention ignores the restarting position ids); train it without --padding_free"
        )


def add_lora(model: transformers.PreTrainedModel, training_args: TrainingArguments) -> torch.nn.Module:
    import peft

    config = peft.LoraConfig(
        r=training_args.lora_r,
        lora_alpha=training_args.lora_alpha,
        lora_dropout=training_args.lora_dropout,
        target_modules=[m.strip() for m in training_args.lora_target_modules.split(",")],
        task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(model, config)
    model.print_trainable_parameters()
    return model


# ---------------------------------------------------------------------------------------------
# Trainer


class Trainer(transformers.Trainer):
    """The Hugging Face Trainer, plus one compatibility step: FSDP on CPU.

    accelerate switches to FSDP only on multi-GPU/NPU/XPU set-ups and otherwise silently trains
    with plain DDP. FSDP2 (`fully_shard`) works on CPU with the gloo backend, so when FSDP was
    asked for and the processes run on CPU, the accelerator state is switched to FSDP here
    (CPU offload with pinned memory is not possible without a GPU, hence pin_memory=False)."""

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        from accelerate import PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        state = self.accelerator.state
        if self.args.fsdp_plugin_args is None or state.distributed_type != DistributedType.MULTI_CPU:
            return
        plugin_args = dict(self.args.fsdp_plugin_args)
        if plugin_args.get("cpu_offload"):
            from torch.distributed.fsdp import CPUOffloadPolicy

            plugin_args["cpu_offload"] = CPUOffloadPolicy(pin_memory=False)
        state.fsdp_plugin = FullyShardedDataParallelPlugin(**plugin_args)
        # AcceleratorState re-reads distributed_type from PartialState whenever it is built again.
        state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
        self.is_fsdp_enabled = True


class ShardReport(transformers.TrainerCallback):
    """Print how many parameter values each rank holds, so a sharded run can be told from a
    replicated one at a glance."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        local = sum(_numel(p)[0] for p in model.parameters())
        total = sum(_numel(p)[1] for p in model.parameters())
        print(f"rank {args.process_index}: holds {local:,} of {total:,} parameter values", flush=True)


def _numel(param: torch.Tensor) -> tuple[int, int]:
    """(values held by this rank, values in the whole parameter) for plain, FSDP2 (DTensor) and
    DeepSpeed ZeRO-3 (partitioned) parameters."""
    if hasattr(param, "ds_tensor"):
        return param.ds_tensor.numel(), param.ds_numel
    if hasattr(param, "to_local"):
        return param.to_local().numel(), param.numel()
    return param.numel(), param.numel()


def last_checkpoint(training_args: TrainingArguments) -> str | None:
    """The checkpoint to resume from: the one given by --resume_from_checkpoint, none for
    `False`, else (or for `True`) the newest complete checkpoint in the output directory."""
    given = training_args.resume_from_checkpoint
    if given and given.lower() == "false":
        return None
    if given and given.lower() != "true":
        return given
    complete = []
    for checkpoint in pathlib.Path(training_args.output_dir).glob("checkpoint-*"):
        if not checkpoint.name.removeprefix("checkpoint-").isdigit():
            continue
        # trainer_state.json is written last: without it the run died while saving.
        if (checkpoint / "trainer_state.json").exists():
            complete.append(checkpoint)
        else:
            print(f"Skipping {checkpoint}: incomplete (the run stopped while saving it).")
    if not complete:
        return None
    newest = max(complete, key=lambda c: int(c.name.removeprefix("checkpoint-")))
    print(f"Resuming from {newest} (found in --output_dir; --resume_from_checkpoint False starts afresh).")
    return str(newest)


def train(argv: Sequence[str] | None = None) -> transformers.Trainer:
    parser = transformers.HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if not data_args.data_path:
        raise UsageError("--data_path is required")

    model = load_model(model_args, training_args)
    check_fsdp_layer_classes(model, training_args)
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        model_args.model_name_or_path,
        cache_dir=training_args.cache_dir,
        model_max_length=training_args.model_max_length,
        padding_side="right",
    )
    smart_tokenizer_and_embedding_resize(missing_special_tokens(tokenizer), tokenizer, model)
    set_special_token_ids(model, tokenizer)
    if training_args.padding_free:
        check_padding_free_support(model)
    if training_args.use_lora:
        model = add_lora(model, training_args)

    data_module = make_supervised_data_module(tokenizer, data_args, training_args)
    trainer = Trainer(model=model, processing_class=tokenizer, args=training_args, **data_module)
    if training_args.world_size > 1:
        trainer.add_callback(ShardReport())
    trainer.train(resume_from_checkpoint=last_checkpoint(training_args))
    if data_module["eval_dataset"] is not None and training_args.eval_strategy == "no":
        trainer.evaluate()
    trainer.save_state()
    trainer.save_model(training_args.output_dir)
    if training_args.use_lora and training_args.merge_lora and trainer.is_world_process_zero():
        merged_dir = os.path.join(training_args.output_dir, "merged")
        trainer.model.merge_and_unload().save_pretrained(merged_dir)
        tokenizer.save_pretrained(merged_dir)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Left to interpreter shutdown, the communication threads can abort the process.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return trainer


if __name__ == "__main__":
    try:
        train()
    except UsageError as e:
        sys.exit(f"train.py: error: {e}")
