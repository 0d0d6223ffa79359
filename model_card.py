"""What a fine-tuned model carries about itself: the Alpaca prompt as its tokenizer's chat template,
so that any server formats a chat request the way training did, and a model card (README.md in
the Hugging Face model-card format) saying what it was trained from, on what and how.

train.py installs the template before training (so every checkpoint carries it) and writes the
card at the end; weight_diff.py carries the card into the diff and back into the recovered model."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import utils

CARD_NAME = "README.md"
DATA_LICENSE = "cc-by-nc-4.0"
# The note make_diff puts into a diff's card and recover takes out again, so that the recovered
# model's card is the tuned model's, byte for byte.
DIFF_NOTE_START = "<!-- weight diff note (weight_diff.py recover removes it) -->\n"
DIFF_NOTE_END = "<!-- end of weight diff note -->\n"
# Examples the chosen template prefix must reproduce token for token.
_PROBES = (("Give three tips for staying healthy.", ""), ("Add the two numbers.", "12 and 30"))


# ---------------------------------------------------------------------------------------------
# The chat template


def install_chat_template(tokenizer: Any, log: bool = True) -> None:
    """Make the Alpaca prompt the tokenizer's chat template. Servers tokenize the rendered chat
    without adding special tokens, so the template writes the BOS itself when the tokenizer adds
    one, in whichever form gives exactly the ids training gives the prompt (see
    utils.alpaca_chat_template); `log` says when the base model's own template is replaced."""
    candidates = [(False, False)]
    if tokenizer.bos_token:
        candidates = [(True, False), (True, True), (False, False)]
    chosen = next((c for c in candidates if _reproduces_training_ids(tokenizer, utils.alpaca_chat_template(*c))), None)
    if chosen is None:
        chosen = candidates[0]
        print(
            f"warning: {tokenizer.name_or_path}: no form of the Alpaca chat template tokenizes to the ids training "
            "gives the prompt; servers applying the saved template may send the model slightly different tokens"
        )
    template = utils.alpaca_chat_template(*chosen)
    if log and tokenizer.chat_template is not None and tokenizer.chat_template != template:
        print(
            f"{tokenizer.name_or_path}: replaced the base model's own chat template with the Alpaca prompt, which "
            "this model is trained on (servers format chats with the saved tokenizer's chat_template)"
        )
    tokenizer.chat_template = template


def chat_messages(instruction: str, input: str | None = None) -> list[dict]:
    """The chat that the Alpaca chat template renders as format_prompt(instruction, input)."""
    messages = [{"role": "user", "content": instruction}]
    return messages + [{"role": "user", "content": input}] if input else messages


def _reproduces_training_ids(tokenizer: Any, template: str) -> bool:
    for instruction, input in _PROBES:
        rendered = tokenizer.apply_chat_template(
            chat_messages(instruction, input), chat_template=template, add_generation_prompt=True, tokenize=False
        )
        trained = tokenizer(utils.format_prompt(instruction, input))["input_ids"]
        if tokenizer(rendered, add_special_tokens=False)["input_ids"] != trained:
            return False
    return True


# ---------------------------------------------------------------------------------------------
# The model card


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_training_cards(args: Any, trainer: Any) -> None:
    """The card of a train.py run (`args` is train.Arguments), in the output directory and,
    for a merged LoRA model, in OUTPUT_DIR/merged. Written after the model, replacing the card
    peft saves with an adapter."""
    output_dir = trainer.args.output_dir
    card = dict(
        base_model=args.model.model_name_or_path,
        data_path=args.data.data_path,
        hyperparameters=training_hyperparameters(args, trainer.args),
        results=training_results(trainer.state.log_history, args.data.val_set_size),
    )
    utils.write_text_atomically(model_card(**card, lora=args.lora.use_lora), os.path.join(output_dir, CARD_NAME))
    if args.lora.use_lora and args.lora.merge_lora:
        utils.write_text_atomically(model_card(**card, lora=False), os.path.join(output_dir, "merged", CARD_NAME))


def training_hyperparameters(args: Any, training_args: Any) -> dict[str, Any]:
    world = training_args.world_size
    per_device = training_args.per_device_train_batch_size
    accumulation = training_args.gradient_accumulation_steps
    hyperparameters = {
        "learning_rate": training_args.learning_rate,
        "lr_scheduler_type": str(getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type)),
        "warmup_steps": training_args.warmup_steps,
        "weight_decay": training_args.weight_decay,
        "optimizer": str(getattr(training_args.optim, "value", training_args.optim)),
        "num_train_epochs": training_args.num_train_epochs,
        "max_steps": training_args.max_steps,
        "batch size": f"{per_device * accumulation * world} ({per_device} per device x {accumulation} accumulation "
        f"x {world} processes)",
        "precision": "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "float32",
        "model_max_length": args.data.model_max_length,
        "padding_free": args.data.padding_free,
        "seed": training_args.seed,
    }
    if args.lora.use_lora:
        hyperparameters["LoRA"] = (
            f"r {args.lora.lora_r}, alpha {args.lora.lora_alpha}, dropout {args.lora.lora_dropout}, "
            f"modules {args.lora.lora_target_modules}"
        )
    return hyperparameters


def training_results(log_history: list[dict], val_set_size: int) -> dict[str, Any]:
    """The final logged training loss, the run's mean loss and, when the run held examples out,
    its last eval loss, from the Trainer's log history."""
    results = {}
    losses = [entry for entry in log_history if "loss" in entry]
    if losses:
        results[f"training loss (last logged, step {losses[-1].get('step')})"] = losses[-1]["loss"]
    summary = next((entry for entry in reversed(log_history) if "train_loss" in entry), None)
    if summary is not None:
        results["training loss (mean over the run)"] = summary["train_loss"]
    evals = [entry for entry in log_history if "eval_loss" in entry]
    if evals:
        results[f"eval loss ({val_set_size} held-out examples)"] = evals[-1]["eval_loss"]
    return results


def model_card(
    base_model: str, data_path: str, hyperparameters: dict[str, Any], results: dict[str, Any], lora: bool = False
) -> str:
    """The card's text: YAML front matter as the Hub reads it, then what the model is."""
    data_name = os.path.basename(data_path)
    tags = ["alpaca", "instruction-tuning", "text-generation"] + (["lora", "peft"] if lora else [])
    front_matter = [
        f"base_model: {json.dumps(base_model)}",
        f"license: {DATA_LICENSE}",
        "datasets:",
        f"- {json.dumps(data_name)}",
        "tags:",
        *(f"- {tag}" for tag in tags),
        "pipeline_tag: text-generation",
        f"library_name: {'peft' if lora else 'transformers'}",
    ]
    records = len(utils.load_records(data_path))
    what = "A LoRA adapter for" if lora else "A fine-tune of"
    lines = [
        "---",
        *front_matter,
        "---",
        "",
        f"# {what} {base_model} on Alpaca-format instructions",
        "",
        f"Trained with `train.py` (the Stanford Alpaca recipe): supervised fine-tuning on `{data_name}`, "
        "the loss on the response tokens only.",
        "",
        "## Training data",
        "",
        "| file | records | sha256 |",
        "|---|---|---|",
        f"| `{data_name}` | {records} | `{file_sha256(data_path)}` |",
        "",
        "Data made the Alpaca way (self-instruct with an OpenAI model) is licensed CC BY-NC 4.0 "
        "(Creative Commons Attribution-NonCommercial 4.0 International), and so is this model; it is "
        "also bound by the license of its base model.",
        "",
        "## Prompt template",
        "",
        "The model answers the Alpaca prompt, which its tokenizer carries as `chat_template`: a chat "
        "request to any server that applies it (transformers serve, vLLM, llama.cpp with `--jinja`) is "
        "formatted as in training. The last user message is the instruction; when a chat ends with two "
        "user messages, the first is the instruction and the second the input.",
        "",
        "Without an input:",
        "",
        "```text",
        utils.PROMPT_DICT["prompt_no_input"],
        "```",
        "",
        "With an input:",
        "",
        "```text",
        utils.PROMPT_DICT["prompt_input"],
        "```",
        "",
        "## Training",
        "",
        "| hyperparameter | value |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in hyperparameters.items()),
        "",
        "## Results",
        "",
        "| measure | value |",
        "|---|---|",
        *(f"| {name} | {value:.4f} |" for name, value in results.items()),
        "",
    ]
    return "\n".join(lines)


def diff_card(card: str) -> str:
    """A tuned model's card as its weight diff carries it: with a note, after the front matter,
    that these are differences to add to the base model."""
    note = (
        DIFF_NOTE_START + "\n**These are weight differences, not a model**: add them to the base model with\n"
        "`python weight_diff.py recover --path_raw <base model> --path_diff <this directory> --path_tuned <output>`.\n\n"
        + DIFF_NOTE_END
    )
    head, separator, body = _split_front_matter(card)
    return head + separator + note + body


def undiff_card(card: str) -> str:
    """The tuned model's card again, without the weight diff note."""
    start = card.find(DIFF_NOTE_START)
    end = card.find(DIFF_NOTE_END, start)
    if start < 0 or end < 0:
        return card
    return card[:start] + card[end + len(DIFF_NOTE_END) :]


def _split_front_matter(card: str) -> tuple[str, str, str]:
    """(front matter, the line closing it, the rest); ("", "", card) for a card without one."""
    if not card.startswith("---\n"):
        return "", "", card
    end = card.find("\n---\n", 4)
    if end < 0:
        return "", "", card
    return card[: end + 1], "---\n", card[end + 5 :]
