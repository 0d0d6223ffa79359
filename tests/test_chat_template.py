"""The Alpaca chat template that train.py saves with every tokenizer: rendered and tokenized the
way servers do it (transformers serve, vLLM: tokenize=True, or the rendered text tokenized with
add_special_tokens=False), it gives the prompt and the token ids training used, on the real
LLaMA-format tokenizer and on the embedded SmolLM2 tokenizer, with and without input."""

import jinja2
import pytest
import transformers

import model_card
import tokens
import utils

RECORDS = [
    {"instruction": "Give three tips for staying healthy.", "input": "", "output": "1. Eat well."},
    {"instruction": "Add the two numbers.", "input": "12 and 30", "output": "42"},
    # Text that looks like Jinja or JSON escapes is data, never template.
    {"instruction": 'Explain {{ x }} and {% if %} and "\\n".', "input": "line one\nline {# two #}", "output": "Ok."},
]


@pytest.fixture(scope="module", params=["llama", "smollm2"])
def tokenizer(request, llama_tokenizer_dir, embedded_model_dir):
    directory = llama_tokenizer_dir if request.param == "llama" else embedded_model_dir
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    model_card.install_chat_template(tokenizer)
    return tokenizer


def test_the_llama_template_writes_bos_and_the_word_boundary_and_smollm2_writes_nothing_before(tokenizer):
    rendered = tokenizer.apply_chat_template(
        model_card.chat_messages("Say hi."), add_generation_prompt=True, tokenize=False
    )
    # The LLaMA tokenizer adds <s>, and reads the space after it as the "▁" SentencePiece puts
    # before the first word; SmolLM2 adds no BOS.
    expected_prefix = "<s> " if tokenizer.bos_token == "<s>" else ""
    assert rendered == expected_prefix + utils.format_prompt("Say hi.")
    assert rendered == tokenizer.decode(tokenizer(utils.format_prompt("Say hi."))["input_ids"])


@pytest.mark.parametrize("record", RECORDS, ids=["no input", "input", "jinja-like text"])
def test_rendered_chat_is_the_training_prompt_and_its_ids_are_the_training_ids(tokenizer, record):
    messages = model_card.chat_messages(record["instruction"], record["input"])
    prompt = utils.format_prompt(record["instruction"], record["input"])
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered.endswith(prompt) and len(rendered) - len(prompt) <= len(tokenizer.bos_token or "") + 1
    [(ids, response_start)] = tokens.tokenize_records([record], tokenizer)
    training_prompt_ids = ids[:response_start]
    served = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert served["input_ids"] == training_prompt_ids
    assert tokenizer(rendered, add_special_tokens=False)["input_ids"] == training_prompt_ids
    # inference.py tokenizes the prompt with the special tokens added: the same ids again.
    assert tokenizer(prompt)["input_ids"] == training_prompt_ids


@pytest.mark.parametrize("record", RECORDS[:2], ids=["no input", "input"])
def test_a_chat_ending_with_the_answer_renders_the_whole_training_example(tokenizer, record):
    messages = model_card.chat_messages(record["instruction"], record["input"])
    messages.append({"role": "assistant", "content": record["output"]})
    [example], _ = tokens.preprocess([record], tokenizer, max_length=512)
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer(rendered, add_special_tokens=False)["input_ids"] == example["input_ids"]


def test_the_message_convention(tokenizer):
    def render(messages):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def user(text):
        return {"role": "user", "content": text}

    base = render([user("Name a colour.")])
    assert base.endswith(utils.format_prompt("Name a colour."))
    # A system message is not part of the Alpaca prompt; an empty input is no input.
    assert render([{"role": "system", "content": "Be brief."}, user("Name a colour.")]) == base
    assert render([user("Name a colour."), user("")]) == base
    # Two user messages at the end: instruction, then input.
    assert render([user("Translate it."), user("Hola")]).endswith(utils.format_prompt("Translate it.", "Hola"))
    # Alpaca is single-turn: after an answer, the last user message is the instruction.
    earlier = [user("Say hi."), {"role": "assistant", "content": "Hi."}, user("Name a colour.")]
    assert render(earlier) == base
    with pytest.raises(jinja2.TemplateError, match="needs a user message"):
        render([{"role": "system", "content": "Be brief."}])


def test_the_template_is_saved_and_loaded_with_the_tokenizer(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path).chat_template == tokenizer.chat_template


def test_replacing_a_base_models_own_template_is_logged(llama_tokenizer_dir, embedded_model_dir, capsys):
    smollm2 = transformers.AutoTokenizer.from_pretrained(embedded_model_dir)
    assert "<|im_start|>" in smollm2.chat_template  # its own template: ChatML
    model_card.install_chat_template(smollm2)
    assert "replaced the base model's own chat template with the Alpaca prompt" in capsys.readouterr().out
    model_card.install_chat_template(smollm2)  # already the Alpaca template: nothing replaced
    llama = transformers.AutoTokenizer.from_pretrained(llama_tokenizer_dir)
    assert llama.chat_template is None
    model_card.install_chat_template(llama)
    assert "replaced" not in capsys.readouterr().out
