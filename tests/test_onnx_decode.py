"""onnx_decode.py: the server's decoding step exported to ONNX and run in ONNX Runtime
(inference.py --serve --backend onnxruntime), on a tiny LLaMA model built here. The server's
use of it is in test_server.py."""

import copy

import pytest
import torch

import onnx_decode
from generation import Batch, Row, Token, decode_together
from helpers import build_tiny_llama
from inference import load_model_and_tokenizer

PROMPTS = ["The fox number 1", "def add(a, b):", "Hi"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, onnx_cache):
    """A tiny model with large weights (peaked next-token scores), its tokenizer, the cache
    directory its step was exported into, and the step."""
    directory = tmp_path_factory.mktemp("peaked")
    build_tiny_llama(directory, initializer_range=0.3)
    model, tokenizer = load_model_and_tokenizer(str(directory), dtype="float32")
    return model, tokenizer, onnx_cache, onnx_decode.load_decode_step(model, onnx_cache)


def rows(tokenizer) -> list[Row]:
    return [Row(tokenizer(prompt)["input_ids"], max_new_tokens=8) for prompt in PROMPTS]


def test_the_step_gives_the_models_logits_and_cache_for_left_padded_rows(exported):
    model, tokenizer, _, step = exported
    with torch.inference_mode():
        plain, onnx = Batch(model, rows(tokenizer)), Batch(model, rows(tokenizer), step)
        assert plain.mask.eq(0).any(), "prompts of different lengths are left-padded"
        for _ in range(8):
            tokens = plain.logits.argmax(-1).tolist()
            plain.advance(tokens)
            onnx.advance(tokens)
            assert onnx.logits.shape == plain.logits.shape
            assert torch.allclose(onnx.logits, plain.logits, atol=1e-4, rtol=0)
            for mine, theirs in zip(onnx.cache.layers, plain.cache.layers, strict=True):
                assert mine.keys.shape == theirs.keys.shape and mine.values.shape == theirs.values.shape
                assert torch.allclose(mine.keys, theirs.keys, atol=1e-5, rtol=0)
                assert torch.allclose(mine.values, theirs.values, atol=1e-5, rtol=0)


def test_a_rows_step_does_not_depend_on_the_rows_beside_it(exported):
    # Two batches of the same prompts; one keeps only its middle row. Both then take the same
    # steps, and that row's logits must agree bit for bit.
    model, tokenizer, _, step = exported
    with torch.inference_mode():
        whole, alone = Batch(model, rows(tokenizer), step), Batch(model, rows(tokenizer), step)
        alone.keep([1])
        for _ in range(6):
            tokens = whole.logits.argmax(-1).tolist()
            whole.advance(tokens)
            alone.advance(tokens[1:2])
            assert torch.equal(alone.logits[0], whole.logits[1])


def test_rows_that_join_mid_batch_get_the_models_tokens_through_the_step(exported):
    model, tokenizer, _, step = exported

    def tokens_of(batch: list[Row]) -> list[list[int]]:
        return [[item.id for item in iter(row.out.get, None) if isinstance(item, Token)] for row in batch]

    alone = rows(tokenizer)
    for row in alone:
        decode_together(model, [row], end_ids=set())  # PyTorch only; no end token: 8 tokens each
    joining, asked = rows(tokenizer), []

    def admit(room: int) -> list[Row]:
        asked.append(room)
        return joining[1:] if len(asked) == 2 else []

    decode_together(model, joining[:1], end_ids=set(), admit=admit, max_rows=3, step=step)
    assert len(asked) > 2, "the other two rows joined after the second step"
    assert tokens_of(joining) == tokens_of(alone)


def test_the_export_is_kept_and_used_again_for_the_same_weights_only(exported, monkeypatch):
    model, _, cache, _ = exported
    kept = cache / "onnx" / onnx_decode.model_key(model)
    assert (kept / onnx_decode.FILE).exists()
    assert not [p for p in (cache / "onnx").iterdir() if p.name.startswith(".")], "no scratch directory left"

    def export_again(*args):
        raise AssertionError("exported again")

    monkeypatch.setattr(onnx_decode, "export_decode_step", export_again)
    onnx_decode.load_decode_step(model, cache)
    weight = model.lm_head.weight
    original = weight[0, 0].item()
    with torch.no_grad():
        weight[0, 0] = original + 1
        try:
            assert onnx_decode.model_key(model) != kept.name
        finally:
            weight[0, 0] = original
    assert onnx_decode.model_key(model) == kept.name


def test_a_model_it_cannot_run_is_refused_with_the_reason(exported, tmp_path):
    import transformers

    model, *_ = exported
    with pytest.raises(onnx_decode.StepError, match="float32 model on the CPU, not torch.float16"):
        onnx_decode.load_decode_step(copy.deepcopy(model).half(), tmp_path)
    config = transformers.MistralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=8,
    )  # fmt: skip
    windowed = transformers.MistralForCausalLM(config).eval()
    with pytest.raises(onnx_decode.StepError, match="KV cache keeps every position"):
        onnx_decode.load_decode_step(windowed, tmp_path)
    assert not (tmp_path / "onnx").exists()


def test_a_damaged_export_is_named_with_what_to_do(exported, tmp_path):
    model, *_ = exported
    directory = tmp_path / "onnx" / onnx_decode.model_key(model)
    directory.mkdir(parents=True)
    (directory / onnx_decode.FILE).write_bytes(b"not an onnx model")
    with pytest.raises(onnx_decode.StepError, match=f"cannot load .*; delete {directory} to export again"):
        onnx_decode.load_decode_step(model, tmp_path)
