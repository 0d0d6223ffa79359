"""Plain helpers shared by the tests (import them with `from helpers import ...`): the
repository root, access to the reference data in ../shared/data (skipped, or failed under
ALPACA_REQUIRE_SHARED=1, when it is absent), draining a server subprocess's stderr, and tiny
LLaMA-architecture models and tokenizers built at test time. The fixtures are in conftest.py."""

import os
import pathlib
import subprocess
import threading

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"

# Text the tiny SentencePiece model is trained on: the prompt templates and some English,
# so that Alpaca prompts tokenize into real multi-character pieces.
_TOKENIZER_CORPUS = [
    "Below is an instruction that describes a task, paired with an input that provides further context.",
    "Write a response that appropriately completes the request.",
    "### Instruction:\nGive three tips for staying healthy.\n\n### Input:\n\n### Response:",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "Summarize the following article in two sentences: it rained all day in the city.",
    "Translate the sentence into French. Classify the review as positive or negative.",
    "def add(a, b):\n    return a + b  # numbers 0 1 2 3 4 5 6 7 8 9 :- ;) ...",
]


# Instruction and input pairs the inference and server tests answer.
INSTRUCTIONS = [
    ("Give three tips for staying healthy.", ""),
    ("Translate the sentence into French.", "The quick brown fox jumps over the lazy dog."),
    ("Classify the review as positive or negative.", "The cat sleeps in the sun."),
    ("Summarize the following article in two sentences.", "It rained all day in the city while the fox slept."),
    ("Write a response.", ""),
]


def shared_file(relative: str) -> pathlib.Path:
    """Path of a file in ../shared/data; skip the test when it is missing, or fail under
    ALPACA_REQUIRE_SHARED=1."""
    path = SHARED_DATA / relative
    if not path.exists():
        message = f"reference data {path} is absent"
        if os.environ.get("ALPACA_REQUIRE_SHARED") == "1":
            pytest.fail(message + " and ALPACA_REQUIRE_SHARED=1")
        pytest.skip(message)
    return path


def drain_stderr(process: subprocess.Popen) -> None:
    """Keep reading a server's stderr (its request logs) in the background, so that it never
    blocks on a full pipe."""
    threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()


def build_tiny_tokenizer(directory: pathlib.Path, vocab_size: int = 400):
    """Train a LLaMA-style SentencePiece BPE model (byte fallback, <unk>/<s>/</s> = 0/1/2,
    no pad token) and save it as a Hugging Face tokenizer in `directory`."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_TOKENIZER_CORPUS * 50),
        model_prefix=str(directory / "tokenizer"),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    (directory / "tokenizer.vocab").unlink()
    tokenizer = LlamaTokenizer.from_pretrained(str(directory), add_bos_token=True)
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def build_tiny_llama(directory: pathlib.Path, seed: int = 0, **config_overrides):
    """A random-init LlamaForCausalLM (about 100K parameters) with the tiny tokenizer, saved
    as a float32 safetensors checkpoint in `directory`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer(directory)
    config = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    config.update(config_overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**config)).to(torch.float32)
    model.save_pretrained(str(directory))
    return model, tokenizer


def reference_response(model_dir, instruction: str, input: str = "", max_new_tokens: int = 24) -> str:
    """The greedy response to an Alpaca prompt computed directly with transformers: generate,
    stop at EOS, decode (what inference.py and the server must answer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from utils import format_prompt

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tokenizer(format_prompt(instruction, input), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        output = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.eos_token_id,
        )
    new = output[0, ids.shape[1] :].tolist()
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id)]
    return tokenizer.decode(new, skip_special_tokens=True).strip()
