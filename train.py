"""Supervised fine-tuning on Alpaca-format data with the Hugging Face Trainer.

    torchrun --nproc_per_node=4 train.py --model_name_or_path M --data_path ./alpaca_data.json
        --output_dir O --fsdp "full_shard auto_wrap" --fsdp_transformer_layer_cls_to_wrap LlamaDecoderLayer ...

Each example is rendered with the Alpaca prompt template, tokenized as one text (prompt + output)
with BOS first and EOS last, and only the response tokens (and EOS) are trained. The Trainer does
the rest; this script wires data, tokenizer and model together and keeps the original's command
lines working on today's libraries. Run `python train.py --help` for the project's flags and
`--help_all` for the Trainer's too.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import pathlib
import random
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import transformers

import model_card
import utils
from utils import UsageError

# torch (and tokens.py, which needs it) take seconds to import, so they are imported where they
# are used: --help, and a mistyped command line or model path, are then answered at once.
if TYPE_CHECKING:
    import torch

# ---------------------------------------------------------------------------------------------
# Arguments: the project's own flags in the first four groups, then the Trainer's own.


@dataclass
class ModelArguments:
    _argument_group_name = "model"

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
    cache_dir: str | None = field(default=None, metadata={"help": "Where models downloaded from the hub are cached."})
    attn_implementation: str = field(
        default="sdpa",
        metadata={
            "help": "Attention kernel: sdpa (default; PyTorch's scaled_dot_product_attention; with "
            "--padding_free or --packing it runs once per example, so a packed row costs what its "
            "examples cost, except under --torch_compile), eager, or flash_attention_2 (needs an "
            "NVIDIA GPU and the flash_attn package; batches without padding then hand it cumulative "
            "sequence lengths instead of a mask).",
            "choices": ["sdpa", "eager", "flash_attention_2"],
        },
    )


@dataclass
class DataArguments:
    _argument_group_name = "data"

    data_path: str = field(
        metadata={"help": "Training data (required): a JSON list or JSON Lines file of {instruction, input, output}."}
    )
    val_set_size: int = field(
        default=0, metadata={"help": "Hold out this many examples (chosen with --seed) and report their eval loss."}
    )
    skip_invalid: bool = field(
        default=False,
        metadata={"help": "Drop invalid records (and count them) instead of stopping at the first one."},
    )
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
    packing: bool = field(
        default=False,
        metadata={
            "help": "Pack examples into rows of up to --model_max_length tokens (best fit decreasing; no example "
            "is split) and train the rows without padding; --per_device_train_batch_size then counts rows. Unlike "
            "--padding_free, which joins a batch into one row however long, each row stays within the limit."
        },
    )


@dataclass
class LoraArguments:
    _argument_group_name = "LoRA"

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


@dataclass
class OldSpellings:
    """Flags of the original README that today's transformers no longer accepts, mapped onto
    today's Trainer arguments by `map_old_spellings`."""

    _argument_group_name = "old spellings (the original README's flags, mapped to today's)"

    evaluation_strategy: str | None = field(default=None, metadata={"help": "Old name of --eval_strategy."})
    warmup_ratio: float | None = field(
        default=None,
        metadata={"help": "Old spelling of a fractional --warmup_steps: warmup over this share of all steps."},
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


PROJECT_ARGUMENTS = (ModelArguments, DataArguments, LoraArguments, OldSpellings)
HELP_EPILOG = (
    "Every flag of the Hugging Face Trainer (transformers.TrainingArguments: --output_dir, --num_train_epochs, "
    "--learning_rate, --bf16, --fsdp, --deepspeed, ...) is accepted too; `python train.py --help_all` lists them "
    "(it loads the Trainer, which takes a few seconds). Resuming: a run resumes from the newest complete checkpoint "
    "in --output_dir on its own; --resume_from_checkpoint PATH picks a checkpoint, --resume_from_checkpoint False "
    "starts afresh. Ctrl-C saves a checkpoint after the current step and stops."
)


@functools.cache
def trainer_arguments_class() -> type:
    """transformers.TrainingArguments with the original's default optimizer. Built on first use:
    importing the Trainer's arguments loads peft and most of transformers, which --help does not need."""

    @dataclass
    class TrainingArguments(transformers.TrainingArguments):
        _argument_group_name = "Hugging Face Trainer (transformers.TrainingArguments)"

        optim: str = field(default="adamw_torch", metadata={"help": "Optimizer (the original's default: adamw_torch)."})
        # The Trainer types it `str | bool`, which its own parser reads as a bool, refusing non_padding.
        include_num_input_tokens_seen: str = field(
            default="no",
            metadata={
                "help": "Count the input tokens trained on (state.num_input_tokens_seen): all, non_padding or no.",
                "choices": ["no", "all", "non_padding"],
            },
        )
        resume_from_checkpoint: str | None = field(
            default=None,
            metadata={
                "help": "A checkpoint directory to resume from, or False to start afresh. By default train.py "
                "resumes from the newest complete checkpoint in --output_dir."
            },
        )

    # The Trainer saves its arguments with torch.save, which pickles the class by its name:
    # make it findable as train.TrainingArguments.
    TrainingArguments.__qualname__ = "TrainingArguments"
    globals()["TrainingArguments"] = TrainingArguments
    return TrainingArguments


def build_parser(with_trainer: bool) -> transformers.HfArgumentParser:
    """The command line: the project's flags, and the Trainer's when `with_trainer` (without
    them, no abbreviation stands for a flag, since a Trainer flag may begin like one of ours)."""
    description, _, _ = __doc__.partition("Run `python train.py --help")
    types = PROJECT_ARGUMENTS + ((trainer_arguments_class(),) if with_trainer else ())
    return transformers.HfArgumentParser(
        types,
        prog="train.py",
        description=description.strip(),
        epilog=None if with_trainer else HELP_EPILOG,
        formatter_class=HelpFormatter,
        allow_abbrev=with_trainer,
    )


class HelpFormatter(transformers.hf_argparser.ArgumentDefaultsHelpFormatter):
    """Keep the module docstring's layout, and show no default for a required flag."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))

    def _get_help_string(self, action) -> str:
        return action.help if action.required else super()._get_help_string(action)


@dataclass
class Arguments:
    """The parsed command line: the project's flags, and the Trainer's as keyword arguments of
    transformers.TrainingArguments (built later, by `training_arguments`: building it sets up
    devices and the process group)."""

    model: ModelArguments
    data: DataArguments
    lora: LoraArguments
    trainer: dict[str, Any]


def parse_arguments(argv: Sequence[str] | None = None) -> Arguments:
    """Parse the command line, with no side effects: nothing is set up, no process group started.
    `--help` shows the project's flags (quickly); `--help_all` adds the Trainer's."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        build_parser(with_trainer=False).parse_args(["--help"])
    if "--help_all" in argv:
        build_parser(with_trainer=True).parse_args(["--help"])
    # The project's flags first, with the light parser: a model path that cannot work is then
    # reported before the Trainer's arguments (seconds to import) are even loaded.
    own, _ = build_parser(with_trainer=False).parse_known_args(argv)
    utils.check_model_source(own.model_name_or_path)
    namespace = vars(build_parser(with_trainer=True).parse_args(argv))

    def take(dataclass_type: type) -> Any:
        return dataclass_type(**{f.name: namespace.pop(f.name) for f in fields(dataclass_type) if f.init})

    model, data, lora, old = (take(t) for t in PROJECT_ARGUMENTS)
    trainer = map_old_spellings(old, namespace)
    route_activation_checkpointing(trainer)
    adapt_to_hardware(trainer, model)
    return Arguments(model, data, lora, trainer)


def map_old_spellings(old: OldSpellings, trainer: dict[str, Any]) -> dict[str, Any]:
    """The Trainer's arguments with the original README's flags translated into today's."""
    trainer = dict(trainer)
    if old.evaluation_strategy is not None:
        trainer["eval_strategy"] = old.evaluation_strategy
    if old.warmup_ratio is not None:
        if not 0 <= old.warmup_ratio < 1:
            raise UsageError(f"--warmup_ratio must be in [0, 1), got {old.warmup_ratio}")
        trainer["warmup_steps"] = old.warmup_ratio
    if old.group_by_length:
        trainer["train_sampling_strategy"] = "group_by_length"
    if old.fsdp_transformer_layer_cls_to_wrap:
        trainer["fsdp_config"] = _fsdp_config_with_layer_class(
            trainer.get("fsdp_config"), old.fsdp_transformer_layer_cls_to_wrap
        )
    return trainer


def _fsdp_config_with_layer_class(fsdp_config: Any, layer_class: str) -> dict:
    """--fsdp_config (a dict, a JSON file or inline JSON) with the layer class to wrap set."""
    config = _fsdp_config_dict(fsdp_config)
    config["transformer_layer_cls_to_wrap"] = [name.strip() for name in layer_class.split(",")]
    return config


def _fsdp_config_dict(fsdp_config: Any) -> dict:
    """--fsdp_config as a dict: it may be one already, a JSON file, inline JSON or absent."""
    if isinstance(fsdp_config, str) and fsdp_config.lstrip().startswith("{"):
        fsdp_config = json.loads(fsdp_config)
    elif isinstance(fsdp_config, str):
        fsdp_config = utils.jload(fsdp_config)
    return dict(fsdp_config or {})


def route_activation_checkpointing(trainer: dict[str, Any]) -> None:
    """--gradient_checkpointing (or --activation_checkpointing) under --fsdp becomes FSDP's own
    activation checkpointing (fsdp_config activation_checkpointing): the model-level call
    recomputes each layer outside FSDP's wrapping, gathering its sharded weights a second time,
    and the Trainer refuses the two together."""
    wanted = trainer.get("activation_checkpointing") or trainer.get("gradient_checkpointing")
    if not (trainer.get("fsdp") and wanted):
        return
    trainer["fsdp_config"] = {**_fsdp_config_dict(trainer.get("fsdp_config")), "activation_checkpointing": True}
    trainer["activation_checkpointing"] = trainer["gradient_checkpointing"] = None
    if os.environ.get("RANK", "0") == "0":
        print("--gradient_checkpointing with --fsdp: using FSDP's activation checkpointing (fsdp_config).")


def on_cpu(trainer: dict[str, Any]) -> bool:
    import torch

    return bool(trainer.get("use_cpu")) or not torch.accelerator.is_available()


def adapt_to_hardware(trainer: dict[str, Any], model: ModelArguments) -> None:
    """Run GPU command lines on a CPU-only machine, and give one clear line instead of a stack
    trace for precision modes the GPU lacks and GPU kernels that cannot run here. On CPU the
    Trainer needs use_cpu for gloo, and TF32 is a GPU matmul mode with no CPU meaning, so it is
    skipped with a warning."""
    import torch

    gpu = torch.cuda.is_available() and not trainer.get("use_cpu")
    kernels = (
        (model.attn_implementation == "flash_attention_2", "--attn_implementation flash_attention_2", "flash_attn"),
        (trainer.get("use_liger_kernel"), "--use_liger_kernel True", "liger_kernel"),
    )
    for wanted, flag, package in kernels:
        if wanted and importlib.util.find_spec(package) is None:
            raise UsageError(
                f"{flag} needs the {package} package, which is not installed (pip install "
                f"{package.replace('_', '-')}){'' if gpu else ', and an NVIDIA GPU'}; or drop the flag."
            )
        if wanted and not gpu:
            raise UsageError(
                f"{flag} needs an NVIDIA GPU (its kernels are CUDA/Triton); drop the flag on this machine."
            )
    if on_cpu(trainer):
        trainer["use_cpu"] = True
        utils.use_huge_pages_for_cpu_tensors()
        if trainer.get("tf32"):
            print("warning: --tf32 has no effect without an NVIDIA GPU; ignoring it.", file=sys.stderr)
            trainer["tf32"] = None
        if trainer.get("fp16"):
            raise UsageError("--fp16 True needs a GPU; on CPU use --bf16 True or full precision.")
        if trainer.get("bf16") and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            # It still runs (autocast emulates bfloat16), so the original command line keeps working.
            print(
                f"warning: --bf16 True on this CPU ({torch.backends.cpu.get_cpu_capability()}, no native bfloat16) is "
                "emulated and slower than full precision; drop the flag for CPU runs.",
                file=sys.stderr,
            )
    elif torch.cuda.is_available():
        if trainer.get("tf32") and torch.cuda.get_device_capability()[0] < 8:
            raise UsageError("--tf32 True needs an NVIDIA Ampere (or newer) GPU; this GPU has no TF32. Drop the flag.")
        if trainer.get("bf16") and not torch.cuda.is_bf16_supported(including_emulation=False):
            raise UsageError(
                "--bf16 True needs a GPU with bfloat16 support (Ampere or newer); use --fp16 True instead."
            )


def training_arguments(trainer: dict[str, Any]) -> transformers.TrainingArguments:
    """Set up the run time (launcher environment, devices, process group, DeepSpeed's
    communication) and return the Trainer's arguments."""
    if trainer.get("fsdp") and "WORLD_SIZE" not in os.environ:
        raise UsageError(
            "--fsdp shards the model over several processes: launch with torchrun --nproc_per_node=N train.py ..."
        )
    if trainer.get("deepspeed") and "RANK" not in os.environ:
        _describe_single_process_job()
    if on_cpu(trainer):
        # DeepSpeed, imported by the Trainer's integrations whenever it is installed, otherwise
        # warns on every CPU run that it found no accelerator.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    args = trainer_arguments_class()(**trainer)  # sets up devices and, under torchrun, the process group
    if args.deepspeed and on_cpu(trainer):
        # On CPU the Trainer starts torch.distributed (gloo) but not DeepSpeed's own
        # communication layer, which ZeRO-3 needs before the model is built.
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    return args


def _describe_single_process_job() -> None:
    """DeepSpeed expects the environment a launcher sets up and otherwise looks for MPI: for a
    plain `python train.py --deepspeed ...`, describe a one-process job instead."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    for name, value in defaults.items():
        os.environ.setdefault(name, value)


# ---------------------------------------------------------------------------------------------
# Data


def load_training_records(path: str, skip_invalid: bool) -> list[dict]:
    """Read and validate the training records; an invalid one stops the run with the file, the
    record index and the field, unless `skip_invalid`, which drops and counts them."""
    records = utils.load_records(path)
    valid, dropped = [], 0
    for index, record in enumerate(records):
        problems = utils.record_problems(record, nonempty=("instruction", "output"))
        if not problems:
            valid.append(record)
        elif skip_invalid:
            dropped += 1
        else:
            problem = utils.describe_problem(path, index, problems[0])
            raise UsageError(f"{problem} (use --skip_invalid True to drop such records)")
    if dropped:
        print(f"Dropped {dropped} invalid records of {len(records)} from {path}.")
    if not valid:
        raise UsageError(f"{path}: no valid records to train on")
    return valid


def make_supervised_data_module(
    tokenizer: transformers.PreTrainedTokenizerBase,
    data_args: DataArguments,
    training_args: transformers.TrainingArguments,
    flash_attn_kwargs: bool = False,
) -> dict:
    """Datasets and collator for the Trainer; tokenization runs once, on the main process.
    `flash_attn_kwargs`: padding-free batches carry the cumulative sequence lengths that
    FlashAttention and per-example sdpa take instead of a mask."""
    import tokens

    def load_and_tokenize():
        records = load_training_records(data_args.data_path, data_args.skip_invalid)
        examples, counts = tokens.preprocess(records, tokenizer, data_args.model_max_length)
        return examples, counts, len(records)

    examples, counts, num_records = tokens.run_on_main_process(load_and_tokenize)
    if not examples:
        raise UsageError(
            f"{data_args.data_path}: no example fits in --model_max_length {data_args.model_max_length}: "
            "the prompt alone is longer in every one"
        )
    if training_args.process_index == 0:
        print(
            f"{data_args.data_path}: {num_records} records -> {len(examples)} examples; "
            f"skipped {counts['skipped']} whose prompt alone exceeds {data_args.model_max_length} tokens, "
            f"cut {counts['cut']} long responses (no EOS)."
        )
    eval_dataset = None
    if data_args.val_set_size > 0:
        if data_args.val_set_size >= len(examples):
            raise UsageError(f"--val_set_size {data_args.val_set_size} leaves no training examples")
        order = list(range(len(examples)))
        random.Random(training_args.seed).shuffle(order)
        held_out = set(order[: data_args.val_set_size])
        eval_dataset = [examples[i] for i in sorted(held_out)]
        examples = [e for i, e in enumerate(examples) if i not in held_out]
    if data_args.packing:
        collator = tokens.DataCollatorForPackedRows(tokenizer.pad_token_id, flash_attn_kwargs=flash_attn_kwargs)
        pack = functools.partial(tokens.pack_examples, capacity=data_args.model_max_length)
        rows = pack(examples)
        if training_args.process_index == 0:
            fill = sum(len(r["input_ids"]) for r in rows) / (len(rows) * data_args.model_max_length)
            print(
                f"--packing: {len(examples)} examples -> {len(rows)} rows of <= {data_args.model_max_length} tokens ({fill:.1%} full)."
            )
        examples, eval_dataset = rows, eval_dataset and pack(eval_dataset)
    elif data_args.padding_free:
        collator = transformers.DataCollatorWithFlattening(
            separator_id=tokens.IGNORE_INDEX, return_flash_attn_kwargs=flash_attn_kwargs
        )
    else:
        collator = tokens.DataCollatorForSupervisedDataset(pad_token_id=tokenizer.pad_token_id)
    return dict(
        train_dataset=tokens.SupervisedDataset(examples),
        eval_dataset=eval_dataset and tokens.SupervisedDataset(eval_dataset),
        data_collator=collator,
    )


# ---------------------------------------------------------------------------------------------
# Model


def load_tokenizer(model_args: ModelArguments) -> transformers.PreTrainedTokenizerBase:
    """The base model's tokenizer, padding on the right for training. It keeps its own
    model_max_length (training cuts examples itself), so the saved tokenizer does not claim the
    model stops at the training length."""
    try:
        return transformers.AutoTokenizer.from_pretrained(
            model_args.model_name_or_path, cache_dir=model_args.cache_dir, padding_side="right"
        )
    except OSError as e:  # a hub name that is not there, or a download that failed
        raise UsageError(
            f"--model_name_or_path {model_args.model_name_or_path}: cannot load its tokenizer ({e})"
        ) from None


def load_model(model_args: ModelArguments) -> transformers.PreTrainedModel:
    import torch

    dtype = model_args.dtype if model_args.dtype == "auto" else getattr(torch, model_args.dtype)
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(
            model_args.model_name_or_path,
            cache_dir=model_args.cache_dir,
            dtype=dtype,
            attn_implementation=model_args.attn_implementation,
        )
    except OSError as e:
        raise UsageError(f"--model_name_or_path {model_args.model_name_or_path}: cannot load the model ({e})") from None


def check_fsdp_layer_classes(model: torch.nn.Module, training_args: transformers.TrainingArguments) -> None:
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
    import torch
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        return  # the parameters are partitioned: no forward pass outside the DeepSpeed engine
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]])
    # The model is still on the CPU, where FlashAttention cannot run: the check asks how the
    # model builds its mask from position ids, so sdpa answers it as well.
    kernel = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        apart = model(input_ids=ids, use_cache=False).logits
        packed = model(input_ids=ids.reshape(1, -1), position_ids=torch.arange(4).repeat(2)[None], use_cache=False)
    model.set_attn_implementation(kernel)
    difference = (packed.logits.reshape(apart.shape) - apart).abs().max()
    if difference > 0.02 * apart.abs().max():  # far above rounding noise, even in bfloat16
        raise UsageError(
            f"--padding_free: {type(model).__name__} lets packed examples attend to each other "
            "(its attention ignores the restarting position ids); train it without --padding_free"
        )


def attends_per_example(args: Arguments) -> bool:
    """Whether padding-free batches run sdpa once per example (tokens.per_example_sdpa_attention),
    which, like FlashAttention's varlen kernel, takes the examples' cumulative lengths. Not under
    --torch_compile: a graph specialised on one batch's example lengths would be compiled again
    for every batch, so compiled models keep sdpa's block-diagonal mask."""
    return (
        (args.data.padding_free or args.data.packing)
        and args.model.attn_implementation == "sdpa"
        # The Trainer compiles when any of these is given (a mode or backend alone turns it on).
        and not any(args.trainer.get(k) for k in ("torch_compile", "torch_compile_mode", "torch_compile_backend"))
    )


def add_lora(model: transformers.PreTrainedModel, lora_args: LoraArguments) -> torch.nn.Module:
    import peft

    config = peft.LoraConfig(
        r=lora_args.lora_r,
        lora_alpha=lora_args.lora_alpha,
        lora_dropout=lora_args.lora_dropout,
        target_modules=[m.strip() for m in lora_args.lora_target_modules.split(",")],
        task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(model, config)
    model.print_trainable_parameters()
    return model


def last_checkpoint(training_args: transformers.TrainingArguments) -> str | None:
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


def train(
    argv: Sequence[str] | None = None, callbacks: Sequence[transformers.TrainerCallback] = ()
) -> transformers.Trainer:
    """Train as the command line `argv` says; `callbacks` are added to the Trainer's (the GPU
    benchmark times the run with one)."""
    args = parse_arguments(argv)
    training_args = training_arguments(args.trainer)
    # Imported here: the Trainer loads peft and most of transformers, which --help does not need.
    import tokens
    import trainer_hooks

    # The data is read, checked and tokenized before the model loads, so that bad data fails in
    # seconds rather than after minutes of loading.
    tokenizer = load_tokenizer(args.model)
    num_new_tokens = tokenizer.add_special_tokens(tokens.missing_special_tokens(tokenizer))
    model_card.install_chat_template(tokenizer, log=training_args.process_index == 0)  # saved with every checkpoint
    padding_free = args.data.padding_free or args.data.packing
    flash = args.model.attn_implementation.startswith("flash_attention")
    per_example = attends_per_example(args)
    data_module = make_supervised_data_module(
        tokenizer, args.data, training_args, flash_attn_kwargs=flash or per_example
    )

    # Seeded before the model is built: LoRA's initial weights (and a model made with new rows)
    # then follow --seed, like the Trainer's own steps.
    transformers.set_seed(training_args.seed)
    model = load_model(args.model)
    check_fsdp_layer_classes(model, training_args)
    tokens.init_new_token_embeddings(model, len(tokenizer), num_new_tokens)
    tokens.set_special_token_ids(model, tokenizer)
    if padding_free:
        check_padding_free_support(model)
    if per_example:
        model.set_attn_implementation(tokens.PER_EXAMPLE_SDPA)
    if args.lora.use_lora:
        model = add_lora(model, args.lora)

    trainer = trainer_hooks.Trainer(model=model, processing_class=tokenizer, args=training_args, **data_module)
    if training_args.world_size > 1:
        trainer.add_callback(trainer_hooks.ShardReport())
    for callback in callbacks:
        trainer.add_callback(callback)
    interrupt = trainer_hooks.CheckpointOnInterrupt()
    trainer.add_callback(interrupt)
    trainer.train(resume_from_checkpoint=last_checkpoint(training_args))
    if interrupt.interrupted:
        stop_after_interrupt(trainer)
    if data_module["eval_dataset"] is not None and training_args.eval_strategy == "no":
        trainer.evaluate()
    trainer.save_state()
    trainer.save_model(training_args.output_dir)
    if args.lora.use_lora and args.lora.merge_lora and trainer.is_world_process_zero():
        merged_dir = os.path.join(training_args.output_dir, "merged")
        trainer.model.merge_and_unload().save_pretrained(merged_dir)
        tokenizer.save_pretrained(merged_dir)
    if trainer.is_world_process_zero():
        model_card.write_training_cards(args, trainer)
    end_process_group()
    return trainer


def stop_after_interrupt(trainer: transformers.Trainer) -> None:
    """After Ctrl-C: say where the run stopped and how to go on, and exit as interrupted (130)."""
    checkpoint = os.path.join(trainer.args.output_dir, f"checkpoint-{trainer.state.global_step}")
    if trainer.is_world_process_zero():
        print(
            f"train.py: interrupted after step {trainer.state.global_step}; {checkpoint} is saved. "
            "Run the same command again to resume from it.",
            file=sys.stderr,
            flush=True,
        )
    end_process_group()
    sys.exit(130)


def end_process_group() -> None:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Left to interpreter shutdown, the communication threads can abort the process.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    utils.run_main(train)
