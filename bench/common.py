"""Helpers shared by the benchmarks: the reference data in ../shared/data and the real
LLaMA-format tokenizer, loaded as train.py would load it."""

import pathlib
import shutil
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


def shared_file(relative: str) -> pathlib.Path:
    path = SHARED_DATA / relative
    if not path.exists():
        sys.exit(f"benchmark needs the reference file {path}, which is absent")
    return path


def llama_tokenizer():
    """The real 32K LLaMA-format tokenizer with train.py's special tokens added."""
    import transformers

    import tokens

    directory = tempfile.mkdtemp(prefix="bench-tokenizer-")
    shutil.copy(shared_file("sentencepiece_llama_format/tokenizer.model"), directory)
    transformers.LlamaTokenizer.from_pretrained(directory, add_bos_token=True).save_pretrained(directory)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, model_max_length=512, padding_side="right")
    tokenizer.add_special_tokens(tokens.missing_special_tokens(tokenizer))
    shutil.rmtree(directory)
    return tokenizer
