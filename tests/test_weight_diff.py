"""weight_diff.py on tiny LLaMA checkpoints built at test time: make_diff / recover / verify round
trips against the original's load-everything arithmetic, every input format, the [PAD] row, and
the failures that must leave nothing behind. Budget: under 1 minute on 2 cores."""

import hashlib
import json
import os
import pathlib
import pickle
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import model_card
import tokens
import utils
import weight_diff
from helpers import ROOT, build_tiny_llama

NON_WEIGHT_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
)


# ---------------------------------------------------------------------------------------------
# Helpers: checkpoints in every format, and the original's method


def load_weights(directory: pathlib.Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, read with the libraries directly."""
    tensors = {}
    for path in sorted(directory.iterdir()):
        if path.suffix == ".safetensors":
            tensors.update(load_file(path))
        elif path.suffix == ".bin":
            tensors.update(torch.load(path, weights_only=True))
    return tensors


def save_weights(
    tensors: dict[str, torch.Tensor],
    directory: pathlib.Path,
    fmt: str,
    shards: int = 1,
    like: pathlib.Path | None = None,
) -> pathlib.Path:
    """Write `tensors` as a checkpoint directory: fmt "safetensors" or "bin", in `shards` files
    (with the index json transformers writes when there are several), plus the config and
    tokenizer files of `like`."""
    directory.mkdir(parents=True)
    for name in NON_WEIGHT_FILES:
        if like is not None and (like / name).exists():
            shutil.copyfile(like / name, directory / name)
    base = "model.safetensors" if fmt == "safetensors" else "pytorch_model.bin"
    names = list(tensors)
    groups = [names[i::shards] for i in range(shards)]
    weight_map = {}
    for number, group in enumerate(groups, start=1):
        file_name = base if shards == 1 else base.replace(".", f"-{number:05d}-of-{shards:05d}.", 1)
        part = {name: tensors[name].contiguous() for name in group}
        if fmt == "safetensors":
            save_file(part, directory / file_name, metadata={"format": "pt"})
        else:
            torch.save(part, directory / file_name)
        weight_map.update({name: file_name for name in group})
    if shards > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
        (directory / f"{base}.index.json").write_text(json.dumps(index))
    return directory


def original_recover(path_raw: pathlib.Path, path_diff: pathlib.Path) -> dict[str, torch.Tensor]:
    """The original's recover: both models loaded whole in float32, [PAD] added to the raw one
    with mean rows when its tokenizer has no pad token, then added parameter by parameter."""
    model_raw = transformers.AutoModelForCausalLM.from_pretrained(path_raw, dtype=torch.float32)
    model_recovered = transformers.AutoModelForCausalLM.from_pretrained(path_diff, dtype=torch.float32)
    tokenizer_raw = transformers.AutoTokenizer.from_pretrained(path_raw)
    if tokenizer_raw.pad_token is None:
        tokens.smart_tokenizer_and_embedding_resize({"pad_token": "[PAD]"}, tokenizer_raw, model_raw)
    state_dict_recovered, state_dict_raw = model_recovered.state_dict(), model_raw.state_dict()
    with torch.no_grad():
        for name in state_dict_recovered:
            state_dict_recovered[name].add_(state_dict_raw[name])
    return {name: tensor.clone() for name, tensor in state_dict_recovered.items()}


def bits(tensor: torch.Tensor) -> bytes:
    return bytes(weight_diff.tensor_bytes(tensor.contiguous()))


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert bits(a[name]) == bits(b[name]), f"{name} differs"


def file_digests(directory: pathlib.Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def assert_nothing_left(target: pathlib.Path) -> None:
    """No output at the target and no temporary directory beside it."""
    assert not target.exists()
    leftovers = [p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.")]
    assert leftovers == []


# ---------------------------------------------------------------------------------------------
# Fixtures: raw (no pad token), raw with [PAD] already added, tuned, and the diffs


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, pathlib.Path]:
    """raw: a tiny LLaMA whose tokenizer has no pad token. padded: raw after fine-tuning's
    [PAD] step (one more embedding row, the mean). tuned: padded with every weight moved, as
    fine-tuning does. diff: make_diff(raw, tuned); recovered: recover(raw, diff)."""
    root = tmp_path_factory.mktemp("weight_diff")
    dirs = {name: root / name for name in ("raw", "padded", "tuned", "diff", "recovered")}
    model, tokenizer = build_tiny_llama(dirs["raw"])
    tokens.smart_tokenizer_and_embedding_resize({"pad_token": "[PAD]"}, tokenizer, model)
    model.save_pretrained(dirs["padded"])
    tokenizer.save_pretrained(dirs["padded"])
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.01)
    model.save_pretrained(dirs["tuned"])
    tokenizer.save_pretrained(dirs["tuned"])
    weight_diff.make_diff(str(dirs["raw"]), str(dirs["tuned"]), str(dirs["diff"]))
    weight_diff.recover(str(dirs["raw"]), str(dirs["diff"]), str(dirs["recovered"]), test_inference=False)
    return dirs


def recover_quietly(path_raw, path_diff, path_tuned=None, **kwargs) -> None:
    weight_diff.recover(
        str(path_raw), str(path_diff), None if path_tuned is None else str(path_tuned), test_inference=False, **kwargs
    )


# ---------------------------------------------------------------------------------------------
# Round trips


def test_round_trip_with_pad_row_is_bit_exact(dirs):
    recovered = load_weights(dirs["recovered"])
    # Bit for bit what the original computes, loading everything.
    assert_bit_identical(recovered, original_recover(dirs["raw"], dirs["diff"]))
    # Bit for bit what the manifest recorded at make time.
    weight_diff.verify(str(dirs["recovered"]), str(dirs["diff"]))
    manifest = json.loads((dirs["diff"] / weight_diff.MANIFEST_NAME).read_text())
    assert manifest["new_embedding_rows"] == {"lm_head.weight": 1, "model.embed_tokens.weight": 1}
    for name, tensor in recovered.items():
        assert manifest["tensors"][name]["sha256"] == hashlib.sha256(bits(tensor)).hexdigest()
    # The tuned weights to float32 rounding, and the manifest reports the largest difference.
    tuned, padded = load_weights(dirs["tuned"]), load_weights(dirs["padded"])
    largest = 0.0
    for name, tensor in tuned.items():
        difference = (recovered[name] - tensor).abs().max().item()
        scale = max(tensor.abs().max().item(), padded[name].abs().max().item())
        assert difference <= 2 * torch.finfo(torch.float32).eps * scale, name
        largest = max(largest, difference)
    assert manifest["max_abs_difference_from_tuned"] == largest


def test_diff_and_recovered_model_carry_tokenizer_and_config(dirs):
    for name in ("diff", "recovered"):
        tokenizer = transformers.AutoTokenizer.from_pretrained(dirs[name])
        assert tokenizer.pad_token == "[PAD]" and len(tokenizer) == 401
    model = transformers.AutoModelForCausalLM.from_pretrained(dirs["recovered"])
    assert model.config.vocab_size == 401
    assert_bit_identical({k: v for k, v in model.state_dict().items()}, load_weights(dirs["recovered"]))
    diff = load_weights(dirs["diff"])
    assert all(t.dtype == torch.float32 for t in diff.values())
    assert diff["model.embed_tokens.weight"].shape == (401, 32)
    # Ordinary permissions, not the private ones of temporary files.
    assert oct(dirs["recovered"].stat().st_mode & 0o777) == oct(0o777 & ~_umask())
    for path in dirs["recovered"].iterdir():
        assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask()), path.name


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_round_trip_without_pad_row(dirs, tmp_path):
    # The raw model already has the [PAD] token: plain subtraction, shapes unchanged.
    weight_diff.make_diff(str(dirs["padded"]), str(dirs["tuned"]), str(tmp_path / "diff"))
    manifest = json.loads((tmp_path / "diff" / weight_diff.MANIFEST_NAME).read_text())
    assert manifest["new_embedding_rows"] == {}
    recover_quietly(dirs["padded"], tmp_path / "diff", tmp_path / "out")
    weight_diff.verify(str(tmp_path / "out"), str(tmp_path / "diff"))
    assert_bit_identical(load_weights(tmp_path / "out"), original_recover(dirs["padded"], tmp_path / "diff"))
    assert_bit_identical(load_weights(tmp_path / "out"), load_weights(dirs["recovered"]))


def test_pad_row_is_the_mean_of_the_raw_rows(dirs):
    embedding = load_weights(dirs["raw"])["model.embed_tokens.weight"]
    grown = torch.cat([embedding, torch.full((1, embedding.shape[1]), float("nan"))])
    tokens.init_new_rows_to_mean(grown, 1)
    independent = np.asarray(embedding, dtype=np.float64).mean(axis=0)
    np.testing.assert_allclose(grown[-1].numpy(), independent, rtol=0, atol=1e-7)
    assert bits(grown[:-1]) == bits(embedding)
    # And exactly the row fine-tuning gave the [PAD] token.
    assert bits(grown) == bits(load_weights(dirs["padded"])["model.embed_tokens.weight"])


def _word_level_tokenizer_without_bos(directory: pathlib.Path, vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    """A tokenizer with <unk> and </s> but no BOS token and no "<s>" in its vocabulary, so
    train.py adds two tokens ([PAD] and <s>) and two embedding rows."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")
    for name in NON_WEIGHT_FILES[2:]:
        (directory / name).unlink(missing_ok=True)
    tokenizer.save_pretrained(directory)
    return tokenizer


def test_several_new_rows_as_train_py_adds_them(tmp_path):
    model, _ = build_tiny_llama(tmp_path / "raw")
    tokenizer = _word_level_tokenizer_without_bos(tmp_path / "raw", model.config.vocab_size)
    raw_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    assert tokens.smart_tokenizer_and_embedding_resize(tokens.missing_special_tokens(tokenizer), tokenizer, model) == 2
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01)
    model.save_pretrained(tmp_path / "tuned")
    tokenizer.save_pretrained(tmp_path / "tuned")
    weight_diff.make_diff(str(tmp_path / "raw"), str(tmp_path / "tuned"), str(tmp_path / "diff"))
    recover_quietly(tmp_path / "raw", tmp_path / "diff", tmp_path / "out")
    recovered = load_weights(tmp_path / "out")
    diff = load_weights(tmp_path / "diff")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        grown = torch.cat([raw_state[name], raw_state[name].mean(dim=0, keepdim=True).expand(2, -1)])
        assert bits(recovered[name]) == bits(grown + diff[name])
    weight_diff.verify(str(tmp_path / "out"), str(tmp_path / "diff"))


def test_new_rows_must_match_the_tokens_fine_tuning_adds(dirs, tmp_path):
    # Raw weights without the [PAD] row but a tokenizer that already has a pad token: fine-tuning
    # would add no row, so the diff's extra row cannot be explained.
    raw = save_weights(load_weights(dirs["raw"]), tmp_path / "raw", "safetensors", like=dirs["padded"])
    with pytest.raises(utils.UsageError, match=r"shape \(400, 32\) in .* but \(401, 32\) .*adds 0 special tokens"):
        recover_quietly(raw, dirs["diff"], tmp_path / "out")
    assert_nothing_left(tmp_path / "out")


def test_tied_embeddings_stored_once_or_twice(tmp_path):
    # transformers saves a tied lm_head once (safetensors); older .bin checkpoints hold both
    # names. Either way round, the model recovers, with the tie intact.
    model, tokenizer = build_tiny_llama(tmp_path / "raw", tie_word_embeddings=True)
    tokens.smart_tokenizer_and_embedding_resize(tokens.missing_special_tokens(tokenizer), tokenizer, model)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01)
    model.save_pretrained(tmp_path / "tuned")
    tokenizer.save_pretrained(tmp_path / "tuned")
    tuned = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    assert "lm_head.weight" in tuned and "lm_head.weight" not in load_weights(tmp_path / "tuned")
    raw_both = save_weights(
        {
            **load_weights(tmp_path / "raw"),
            "lm_head.weight": load_weights(tmp_path / "raw")["model.embed_tokens.weight"],
        },
        tmp_path / "raw_both",
        "bin",
        like=tmp_path / "raw",
    )
    tuned_both = save_weights(tuned, tmp_path / "tuned_both", "bin", like=tmp_path / "tuned")
    # (raw for make_diff, tuned, raw for recover): each input once with both names.
    cases = {"a": (tmp_path / "raw", tuned_both, raw_both), "b": (raw_both, tmp_path / "tuned", tmp_path / "raw")}
    for case, (raw, tuned_dir, raw_again) in cases.items():
        weight_diff.make_diff(str(raw), str(tuned_dir), str(tmp_path / f"diff_{case}"))
        recover_quietly(raw_again, tmp_path / f"diff_{case}", tmp_path / f"out_{case}")
        out = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / f"out_{case}")
        assert out.lm_head.weight is out.model.embed_tokens.weight
        assert torch.allclose(out.model.embed_tokens.weight, tuned["model.embed_tokens.weight"], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "fmt,shards", [("safetensors", 3), ("bin", 1), ("bin", 2)], ids=["safetensors-sharded", "bin", "bin-sharded"]
)
def test_every_input_format_recovers_the_same_bits(dirs, tmp_path, fmt, shards):
    raw = save_weights(load_weights(dirs["raw"]), tmp_path / "raw", fmt, shards, like=dirs["raw"])
    diff = save_weights(load_weights(dirs["diff"]), tmp_path / "diff", fmt, shards, like=dirs["diff"])
    shutil.copyfile(dirs["diff"] / weight_diff.MANIFEST_NAME, diff / weight_diff.MANIFEST_NAME)
    before = file_digests(raw), file_digests(diff)
    recover_quietly(raw, diff, tmp_path / "out")
    assert_bit_identical(load_weights(tmp_path / "out"), load_weights(dirs["recovered"]))
    assert (file_digests(raw), file_digests(diff)) == before  # inputs never written
    weight_diff.verify(str(tmp_path / "out"), str(diff))


@pytest.mark.parametrize("dtype,fmt", [(torch.bfloat16, "safetensors"), (torch.float16, "bin")])
def test_half_precision_raw_is_upcast_before_adding(dirs, tmp_path, dtype, fmt):
    raw = save_weights(
        {k: v.to(dtype) for k, v in load_weights(dirs["raw"]).items()},
        tmp_path / "raw",
        fmt,
        shards=2,
        like=dirs["raw"],
    )
    weight_diff.make_diff(str(raw), str(dirs["tuned"]), str(tmp_path / "diff"))
    recover_quietly(raw, tmp_path / "diff", tmp_path / "out")
    assert_bit_identical(load_weights(tmp_path / "out"), original_recover(raw, tmp_path / "diff"))
    weight_diff.verify(str(tmp_path / "out"), str(tmp_path / "diff"))


def test_sharded_output_with_index(dirs, tmp_path):
    recover_quietly(dirs["raw"], dirs["diff"], tmp_path / "out", max_shard_size_gb=50e-6)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert_bit_identical(load_weights(tmp_path / "out"), load_weights(dirs["recovered"]))
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert_bit_identical(dict(model.state_dict()), load_weights(dirs["recovered"]))


def test_output_dtype_bfloat16(dirs, tmp_path):
    recover_quietly(dirs["raw"], dirs["diff"], tmp_path / "out", output_dtype="bfloat16")
    expected = {name: t.to(torch.bfloat16) for name, t in load_weights(dirs["recovered"]).items()}
    assert_bit_identical(load_weights(tmp_path / "out"), expected)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    with pytest.raises(utils.UsageError, match="is torch.bfloat16, but the manifest holds hashes of float32"):
        weight_diff.verify(str(tmp_path / "out"), str(dirs["diff"]))


def test_recover_without_target_writes_nothing(dirs, tmp_path, capsys):
    recover_quietly(dirs["raw"], dirs["diff"])
    out = capsys.readouterr().out
    assert "the sum of all recovered weights is" in out and ": ok" in out
    assert list(tmp_path.iterdir()) == []


def test_diff_with_2023_rotary_buffers_and_raw_without(dirs, tmp_path, capsys):
    # The 2023 diff holds every layer's inv_freq; a LLaMA converted today does not. The original,
    # run then, loaded the raw model with the inv_freq it computed, so raw + diff and the naive
    # sum (the Alpaca-7B value) include it: 32 layers of about 7.46 each for LLaMA-7B.
    diff = load_weights(dirs["diff"])
    config = transformers.AutoConfig.from_pretrained(dirs["raw"])
    head_dim = config.hidden_size // config.num_attention_heads
    computed = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    offsets = {
        f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.full((head_dim // 2,), 0.25 * (i + 1))
        for i in range(2)
    }
    diff.update(offsets)
    save_weights(diff, tmp_path / "diff", "safetensors", like=dirs["diff"])
    manifest = json.loads((dirs["diff"] / weight_diff.MANIFEST_NAME).read_text())
    expected = manifest["naive_sum"] + sum((computed + offset).sum().item() for offset in offsets.values())
    recover_quietly(dirs["raw"], tmp_path / "diff", tmp_path / "out", expected_sum=expected)
    assert f"expected {expected:.4f}: ok" in capsys.readouterr().out
    recovered = load_weights(tmp_path / "out")
    for name, offset in offsets.items():
        assert bits(recovered.pop(name)) == bits(computed + offset)
    assert_bit_identical(recovered, load_weights(dirs["recovered"]))
    # make_diff the other way round: a 2023 tuned model against a raw converted today.
    tuned = load_weights(dirs["tuned"])
    tuned.update({name: computed + offset for name, offset in offsets.items()})
    save_weights(tuned, tmp_path / "tuned", "bin", like=dirs["tuned"])
    weight_diff.make_diff(str(dirs["raw"]), str(tmp_path / "tuned"), str(tmp_path / "diff2"))
    for name, offset in offsets.items():
        assert bits(load_weights(tmp_path / "diff2")[name]) == bits((computed + offset) - computed)


def test_raw_only_rotary_buffers_are_skipped(dirs, tmp_path, capsys):
    raw = load_weights(dirs["raw"])
    raw["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    save_weights(raw, tmp_path / "raw", "bin", like=dirs["raw"])
    recover_quietly(tmp_path / "raw", dirs["diff"], tmp_path / "out")
    assert "skipping 1 rotary inv_freq buffers" in capsys.readouterr().out
    assert_bit_identical(load_weights(tmp_path / "out"), load_weights(dirs["recovered"]))


# ---------------------------------------------------------------------------------------------
# Integrity checks


def test_verify_catches_a_single_flipped_bit(dirs, tmp_path):
    tensors = load_weights(dirs["recovered"])
    tampered = tensors["model.layers.1.mlp.up_proj.weight"].clone()
    tampered.view(torch.int32)[3, 5] ^= 1  # the lowest mantissa bit of one value
    tensors["model.layers.1.mlp.up_proj.weight"] = tampered
    save_weights(tensors, tmp_path / "model", "safetensors")
    with pytest.raises(utils.UsageError, match=r"tensor model\.layers\.1\.mlp\.up_proj\.weight does not match"):
        weight_diff.verify(str(tmp_path / "model"), str(dirs["diff"] / weight_diff.MANIFEST_NAME))


def test_wrong_raw_model_is_caught_by_the_manifest(dirs, tmp_path):
    build_tiny_llama(tmp_path / "other_raw", seed=7)
    with pytest.raises(
        utils.UsageError,
        match=r"recovered tensor model\.embed_tokens\.weight does not match .*not the one the diff was made from",
    ):
        recover_quietly(tmp_path / "other_raw", dirs["diff"], tmp_path / "out")
    assert_nothing_left(tmp_path / "out")


def test_naive_integrity_check_without_manifest(dirs, tmp_path, capsys):
    diff = save_weights(load_weights(dirs["diff"]), tmp_path / "diff", "safetensors", like=dirs["diff"])
    manifest = json.loads((dirs["diff"] / weight_diff.MANIFEST_NAME).read_text())
    with pytest.raises(utils.UsageError, match="naive integrity check failed"):
        recover_quietly(dirs["raw"], diff, tmp_path / "out", expected_sum=manifest["naive_sum"] + 0.5)
    assert_nothing_left(tmp_path / "out")
    recover_quietly(dirs["raw"], diff, tmp_path / "out", expected_sum=manifest["naive_sum"])
    assert f"expected {manifest['naive_sum']:.4f}: ok" in capsys.readouterr().out
    recover_quietly(dirs["raw"], diff, tmp_path / "out2")
    assert "not checked: pass --expected_sum" in capsys.readouterr().out


def test_alpaca_7b_expected_sum_is_kept():
    assert weight_diff.ALPACA_7B_SUM == 50637.1836 and weight_diff.NAIVE_SUM_ATOL == 1e-2
    config = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "vocab_size": 32001}
    assert weight_diff.is_alpaca_7b(config)
    assert not weight_diff.is_alpaca_7b({**config, "vocab_size": 32000})


def _recover_output(capsys, *args, **kwargs) -> tuple[str, list[str]]:
    """What recover prints, and the lines of its closing summary of the checks."""
    recover_quietly(*args, **kwargs)
    out = capsys.readouterr().out
    return out, out[out.index("checks:\n") :].splitlines()


def test_summary_lists_each_check_and_its_outcome(dirs, capsys):
    manifest = json.loads((dirs["diff"] / weight_diff.MANIFEST_NAME).read_text())
    total = f"{manifest['naive_sum']:.4f}"
    _, summary = _recover_output(capsys, dirs["raw"], dirs["diff"])
    assert summary == [
        "checks:",
        f"  manifest: passed (all {len(manifest['tensors'])} recovered tensors match "
        f"{dirs['diff'] / weight_diff.MANIFEST_NAME}, sha256)",
        f"  naive sum: passed ({total}, expected {total})",
        "  test inference: skipped (--test_inference False)",
    ]
    _, summary = _recover_output(capsys, dirs["raw"], dirs["diff"], check_integrity_naively=False)
    assert summary[2] == "  naive sum: skipped (--check_integrity_naively False)"


def test_diff_without_manifest_recovers_and_says_the_manifest_check_was_skipped(dirs, tmp_path, capsys):
    diff = tmp_path / "diff"
    shutil.copytree(dirs["diff"], diff)
    (diff / weight_diff.MANIFEST_NAME).unlink()
    out, summary = _recover_output(capsys, dirs["raw"], diff, tmp_path / "out")
    skipped = f"skipped: no weight_diff_manifest.json in --path_diff {diff} (make_diff writes one"
    assert f"manifest check: {skipped}" in out.splitlines()[0]  # said before recovering, and again at the end
    assert summary[1].startswith(f"  manifest: {skipped}") and "are swapped" in summary[1]
    assert summary[2].startswith("  naive sum: not applicable (no expected sum")
    assert_bit_identical(load_weights(tmp_path / "out"), load_weights(dirs["recovered"]))


def test_swapped_raw_and_diff_are_refused(dirs, tmp_path):
    # Without a [PAD] row the shapes agree and raw + diff is the same sum either way round: a
    # recovery from swapped paths would pass. With one, it would fail on shapes. Both are refused
    # up front, naming the swap.
    weight_diff.make_diff(str(dirs["padded"]), str(dirs["tuned"]), str(tmp_path / "diff"))
    for raw, diff in ((dirs["padded"], tmp_path / "diff"), (dirs["raw"], dirs["diff"])):
        with pytest.raises(
            utils.UsageError,
            match=rf"^--path_raw {re.escape(str(diff))} holds weight_diff_manifest\.json, so it is a weight diff .*"
            r"--path_raw and --path_diff look swapped",
        ):
            recover_quietly(diff, raw, tmp_path / "out")
        assert_nothing_left(tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# Bad inputs: a clear error naming the problem, and nothing at the target


def _diff_variant(dirs, tmp_path, edit) -> pathlib.Path:
    tensors = load_weights(dirs["diff"])
    edit(tensors)
    return save_weights(tensors, tmp_path / "diff", "safetensors", like=dirs["diff"])


@pytest.mark.parametrize(
    "edit,message",
    [
        (
            lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"),
            r"raw has 1 tensors that .*diff lacks \(model\.layers\.1\.self_attn\.k_proj\.weight\)",
        ),
        (
            lambda t: t.update({"model.layers.9.extra.weight": torch.zeros(2)}),
            r"diff has 1 tensors that .*raw lacks \(model\.layers\.9\.extra\.weight\)",
        ),
        (
            lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(64, 31)}),
            r"tensor model\.layers\.0\.mlp\.up_proj\.weight: shape \(64, 32\) in .*raw but \(64, 31\) in .*diff",
        ),
    ],
    ids=["missing", "extra", "shape"],
)
def test_mismatched_tensors(dirs, tmp_path, edit, message):
    diff = _diff_variant(dirs, tmp_path, edit)
    with pytest.raises(utils.UsageError, match=message):
        recover_quietly(dirs["raw"], diff, tmp_path / "out")
    assert_nothing_left(tmp_path / "out")


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_truncated_shard(dirs, tmp_path, fmt):
    diff = save_weights(load_weights(dirs["diff"]), tmp_path / "diff", fmt, shards=2, like=dirs["diff"])
    shard = sorted(diff.glob(f"*-00002-of-00002.{'safetensors' if fmt == 'safetensors' else 'bin'}"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(utils.UsageError, match=rf"{shard.name}: not a readable .*truncated or corrupt"):
        recover_quietly(dirs["raw"], diff, tmp_path / "out")
    assert_nothing_left(tmp_path / "out")


def test_missing_shard(dirs, tmp_path):
    diff = save_weights(load_weights(dirs["diff"]), tmp_path / "diff", "safetensors", shards=2, like=dirs["diff"])
    (diff / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(utils.UsageError, match=r"lists shard model-00001-of-00002\.safetensors, which does not exist"):
        recover_quietly(dirs["raw"], diff, tmp_path / "out")
    assert_nothing_left(tmp_path / "out")


class _Payload:
    """Unpickling this calls open(path, "w"): it creates a file, standing in for any code."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_carrying_code_is_refused_without_running_it(dirs, tmp_path):
    tensors = load_weights(dirs["diff"])
    # Proof that the payload is live: plain unpickling runs it.
    control_marker = tmp_path / "control_marker"
    pickle.loads(pickle.dumps(_Payload(str(control_marker))))
    assert control_marker.exists()

    marker = tmp_path / "marker"
    diff = save_weights(tensors, tmp_path / "diff", "bin", like=dirs["diff"])
    torch.save({**tensors, "model.norm.weight": _Payload(str(marker))}, diff / "pytorch_model.bin")
    with pytest.raises(
        utils.UsageError, match=r"pytorch_model\.bin: refused: unpickling it needs objects other than tensors"
    ) as error:
        recover_quietly(dirs["raw"], diff, tmp_path / "out")
    assert "Unsupported global" in str(error.value) and "weights_only=False" not in str(error.value)
    assert not marker.exists()
    assert_nothing_left(tmp_path / "out")


def test_existing_target_needs_overwrite(dirs, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(utils.UsageError, match="already exists; pass --overwrite True"):
        recover_quietly(dirs["raw"], dirs["diff"], target)
    assert (target / "keep.txt").read_text() == "mine"
    with pytest.raises(utils.UsageError, match="is an input"):
        recover_quietly(dirs["raw"], dirs["diff"], dirs["diff"], overwrite=True)
    recover_quietly(dirs["raw"], dirs["diff"], target, overwrite=True)
    assert not (target / "keep.txt").exists()
    assert_bit_identical(load_weights(target), load_weights(dirs["recovered"]))
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# ---------------------------------------------------------------------------------------------
# The command line


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "weight_diff.py"), *args], capture_output=True, text=True, cwd=ROOT, timeout=120
    )


@pytest.mark.slow
def test_command_line_recover_with_test_inference(dirs, tmp_path):
    result = _run(
        "recover",
        "--path_raw",
        str(dirs["raw"]),
        "--path_diff",
        str(dirs["diff"]),
        "--path_tuned",
        str(tmp_path / "out"),
        "--test_inference",
        "True",
    )
    assert result.returncode == 0, result.stderr
    # The Alpaca no-input template with \n line breaks, then a greedy completion.
    prompt = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\nList three technologies that make life easier.\n\n### Response:"
    assert f"Input: {prompt}\nCompletion: " in result.stdout
    assert "expected" in result.stdout and ": ok" in result.stdout
    assert "\n  test inference: ran on cpu\n" in result.stdout
    assert_bit_identical(load_weights(tmp_path / "out"), load_weights(dirs["recovered"]))

    failed = _run("verify", "--path_tuned", str(dirs["raw"]), "--manifest", str(dirs["diff"]))
    assert failed.returncode == 1
    assert (
        failed.stderr.strip().splitlines()[-1].startswith("weight_diff.py: error: ")
        and "Traceback" not in failed.stderr
    )


def _model_without(source: pathlib.Path, directory: pathlib.Path, *names: str) -> pathlib.Path:
    """A copy of the model directory `source` without the files `names`."""
    shutil.copytree(source, directory, ignore=shutil.ignore_patterns(*names))
    return directory


@pytest.mark.parametrize(
    "command,flag,problem",
    [
        ("make_diff", "--path_raw", "no such directory"),
        ("make_diff", "--path_raw", "the directory has no weights"),
        ("make_diff", "--path_tuned", "the directory has no tokenizer"),
        ("recover", "--path_diff", "no such directory"),
    ],
    ids=["missing-raw", "raw-without-weights", "tuned-without-tokenizer", "missing-diff"],
)
def test_unusable_model_path_fails_at_once_in_one_line(dirs, tmp_path, command, flag, problem):
    paths = {"--path_raw": dirs["raw"], "--path_tuned": dirs["tuned"], "--path_diff": dirs["diff"]}
    if problem == "no such directory":
        paths[flag] = tmp_path / "nowhere"
    elif problem == "the directory has no weights":
        paths[flag] = _model_without(paths[flag], tmp_path / "model", "*.safetensors")
    else:
        paths[flag] = _model_without(paths[flag], tmp_path / "model", "tokenizer*")
    target = "--path_diff" if command == "make_diff" else "--path_tuned"
    paths[target] = tmp_path / "out"
    result = _run(command, *(str(part) for flag_and_path in paths.items() for part in flag_and_path))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"weight_diff.py: error: {flag} {paths[flag]}: {problem}")
    assert_nothing_left(tmp_path / "out")


def test_importing_does_not_import_openai():
    code = "import sys, weight_diff; assert 'openai' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120).returncode == 0


def test_unusable_device_fails_before_recovering(dirs, tmp_path):
    device = "cuda" if not torch.cuda.is_available() else "cuda:999"
    result = _run(
        "recover",
        "--path_raw",
        str(dirs["raw"]),
        "--path_diff",
        str(dirs["diff"]),
        "--path_tuned",
        str(tmp_path / "out"),
        "--device",
        device,
    )
    assert result.returncode == 1 and f"error: --device {device} cannot be used here" in result.stderr
    assert "recover:" not in result.stderr  # no progress bar: nothing was recovered first
    assert_nothing_left(tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# The model card and the chat template


def test_recovered_tokenizer_gets_the_alpaca_chat_template(dirs):
    # The tuned tokenizer here has no template, as the 2023 Alpaca-7B diff's has none.
    assert transformers.AutoTokenizer.from_pretrained(dirs["diff"]).chat_template is None
    tokenizer = transformers.AutoTokenizer.from_pretrained(dirs["recovered"])
    messages = model_card.chat_messages(weight_diff.TEST_INSTRUCTION)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert ids["input_ids"] == tokenizer(utils.format_prompt(weight_diff.TEST_INSTRUCTION))["input_ids"]


def test_the_model_card_goes_into_the_diff_and_back_unchanged(dirs, tmp_path):
    tuned = tmp_path / "tuned"
    shutil.copytree(dirs["tuned"], tuned)
    card = model_card.model_card("base", str(ROOT / "alpaca_data.json"), {"learning_rate": 2e-5}, {"loss": 1.0})
    (tuned / "README.md").write_text(card)
    weight_diff.make_diff(str(dirs["raw"]), str(tuned), str(tmp_path / "diff"))
    diff_card = (tmp_path / "diff" / "README.md").read_text()
    assert diff_card == model_card.diff_card(card) and "weight_diff.py recover" in diff_card
    recover_quietly(dirs["raw"], tmp_path / "diff", tmp_path / "recovered")
    assert (tmp_path / "recovered" / "README.md").read_text() == card
