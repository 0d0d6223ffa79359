"""What train.py saves about the model: a model card (README.md, the Hugging Face model-card
format, read back with huggingface_hub's own parser) in the output directory, and the Alpaca chat
template in every tokenizer it saves: the final model, each checkpoint, a LoRA adapter and the
merged model."""

import hashlib
import json
import subprocess
import sys

import pytest
import transformers
import yaml
from huggingface_hub import ModelCard

import model_card
import utils
from helpers import ROOT

RECORDS = [
    {"instruction": "Name the largest planet in the solar system.", "input": "", "output": "Jupiter."},
    {"instruction": "Add the two numbers.", "input": "12 and 30", "output": "42"},
    {"instruction": "Give the opposite of the word.", "input": "ancient", "output": "modern"},
    {"instruction": "Say hello in French.", "output": "Bonjour."},
    {"instruction": "Count the vowels in the word.", "input": "banana", "output": "3"},
    {"instruction": "Convert 2 kilometres to metres.", "input": "", "output": "2,000 metres."},
]


def run_train(*args) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--report_to", "none", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "my_data.json"
    path.write_text(json.dumps(RECORDS))
    return path


def assert_has_the_alpaca_template(directory):
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    messages = model_card.chat_messages("Add the two numbers.", "12 and 30")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert ids["input_ids"] == tokenizer(utils.format_prompt("Add the two numbers.", "12 and 30"))["input_ids"]


def read_card(directory):
    text = (directory / "README.md").read_text()
    front, body = text.removeprefix("---\n").split("\n---\n", 1)
    return yaml.safe_load(front), body, ModelCard(text)


def table_value(body, name):
    row = next(line for line in body.splitlines() if line.startswith(f"| {name}"))
    return row.split("|")[2].strip()


def test_full_fine_tune_saves_card_and_template_with_model_and_checkpoints(tiny_llama_dir, data_file, tmp_path):
    out = tmp_path / "out"
    run_train(
        "--model_name_or_path", tiny_llama_dir, "--data_path", data_file, "--output_dir", out,
        "--max_steps", 4, "--per_device_train_batch_size", 2, "--learning_rate", "1e-3",
        "--save_strategy", "steps", "--save_steps", 2, "--logging_steps", 1, "--val_set_size", 2,
    )  # fmt: skip
    for directory in (out, out / "checkpoint-2", out / "checkpoint-4"):
        assert_has_the_alpaca_template(directory)

    metadata, body, card = read_card(out)
    assert metadata == {
        "base_model": str(tiny_llama_dir),
        "license": "cc-by-nc-4.0",
        "datasets": ["my_data.json"],
        "tags": ["alpaca", "instruction-tuning", "text-generation"],
        "pipeline_tag": "text-generation",
        "library_name": "transformers",
    }
    assert card.data.base_model == str(tiny_llama_dir) and card.data.license == "cc-by-nc-4.0"
    sha256 = hashlib.sha256(data_file.read_bytes()).hexdigest()
    assert f"| `my_data.json` | {len(RECORDS)} | `{sha256}` |" in body
    assert "CC BY-NC 4.0" in body
    assert utils.PROMPT_DICT["prompt_input"] in body and utils.PROMPT_DICT["prompt_no_input"] in body
    assert table_value(body, "learning_rate") == "0.001"
    assert table_value(body, "batch size").startswith("2 (2 per device x 1 accumulation x 1 processes)")
    assert table_value(body, "max_steps") == "4"

    log = json.loads((out / "trainer_state.json").read_text())["log_history"]
    last_loss = [entry["loss"] for entry in log if "loss" in entry][-1]
    eval_loss = [entry["eval_loss"] for entry in log if "eval_loss" in entry][-1]
    assert float(table_value(body, "training loss (last logged, step 4)")) == pytest.approx(last_loss, abs=1e-4)
    assert float(table_value(body, "eval loss (2 held-out examples)")) == pytest.approx(eval_loss, abs=1e-4)


def test_lora_adapter_and_merged_model_carry_card_and_template(tiny_llama_dir, data_file, tmp_path):
    out = tmp_path / "out"
    run_train(
        "--model_name_or_path", tiny_llama_dir, "--data_path", data_file, "--output_dir", out,
        "--max_steps", 2, "--per_device_train_batch_size", 2, "--save_strategy", "steps", "--save_steps", 2,
        "--use_lora", "True", "--lora_r", 4, "--merge_lora", "True",
    )  # fmt: skip
    for directory in (out, out / "checkpoint-2", out / "merged"):
        assert_has_the_alpaca_template(directory)
    adapter, adapter_body, _ = read_card(out)  # ours, in place of the one peft writes
    assert adapter["library_name"] == "peft" and "lora" in adapter["tags"]
    assert table_value(adapter_body, "LoRA") == "r 4, alpha 16, dropout 0.05, modules q_proj,v_proj"
    merged, _, _ = read_card(out / "merged")
    assert merged["library_name"] == "transformers" and "lora" not in merged["tags"]
    assert "eval loss" not in adapter_body  # the run held nothing out


def test_diff_card_note_is_taken_out_again():
    card = model_card.model_card("base", str(ROOT / "alpaca_data.json"), {"learning_rate": 2e-5}, {"loss": 1.0})
    diff = model_card.diff_card(card)
    assert diff.startswith(card.split("\n---\n")[0] + "\n---\n") and "weight_diff.py recover" in diff
    assert model_card.undiff_card(diff) == card
