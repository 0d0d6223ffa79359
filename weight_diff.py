"""Release a fine-tuned model as a weight diff against its base model, and recover it.

    python weight_diff.py make_diff --path_raw R --path_tuned T --path_diff D
    python weight_diff.py recover --path_raw R --path_diff D --path_tuned T
    python weight_diff.py verify --path_tuned T --manifest D

The arithmetic is the original Alpaca release's: every tensor in float32, `diff = tuned - raw`
and `tuned = raw + diff`, parameter by parameter. When the raw tokenizer has no pad token, the
raw embedding matrices (input and output) first get one more row, the mean of the existing
rows, for the `[PAD]` token that fine-tuning added; the diff's extra row says this is needed.
(train.py also adds `</s>`, `<s>` and `<unk>` when the tokenizer lacks them: one mean row for
each token it adds, found with the rule train.py trains with, in tokens.py.)

How it is done differs from the original:
- streaming: one tensor at a time from (sharded) safetensors or `.bin` checkpoints, written
  straight into sharded safetensors, so memory stays at about the largest tensor whatever
  the model size (the original holds two float32 models: about 54 GB for 7B);
- safe: `.bin` files are unpickled with `weights_only=True`, which rebuilds tensors and plain
  containers only; a file that needs anything else is refused, never executed;
- exact: make_diff writes a manifest with the sha256 of every tensor as recover will compute
  it; recover checks each tensor against it, and `verify` checks a saved model;
- atomic: output is written into a temporary directory beside the target and renamed into
  place at the end, so on any error nothing is left at the target.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import pickle
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tqdm import tqdm

import model_card
import utils
from utils import UsageError

# torch, transformers and safetensors (and tokens, which imports torch) take seconds to import,
# so they are imported where they are used: a mistyped command line or model path is then
# reported at once.
if TYPE_CHECKING:
    import torch
    import transformers

MANIFEST_NAME = "weight_diff_manifest.json"
# The original's naive integrity check: the sum of all parameter sums of the recovered
# Alpaca-7B must be this value, within NAIVE_SUM_ATOL.
ALPACA_7B_SUM = 50637.1836
NAIVE_SUM_ATOL = 1e-2
# Checkpoints saved by transformers < 4.31 (such as the 2023 Alpaca-7B diff) hold every LLaMA
# layer's rotary `inv_freq` buffer; newer versions compute it from the config and neither save
# nor read it. A raw LLaMA converted today therefore lacks buffers the diff has: the raw side
# is then the computed buffer, as the original's raw model held it after loading (see
# `add_computed_rotary_buffers`). Buffers only the raw model has are skipped, with a note.
RECOMPUTED_BUFFER_SUFFIX = ".rotary_emb.inv_freq"
# dtypes by their names in torch (see `dtype_name`), which is imported only when they are used.
OUTPUT_DTYPES = ("float32", "bfloat16", "float16")
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}  # by their names there
SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
TEST_INSTRUCTION = "List three technologies that make life easier."
BLOCK_BYTES = 16 * 2**20  # read from a file at a time


# ---------------------------------------------------------------------------------------------
# Reading checkpoints tensor by tensor


def dtype_name(dtype: torch.dtype) -> str:
    """torch's name for `dtype`: "float32" for torch.float32."""
    return str(dtype).removeprefix("torch.")


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous tensor (little-endian, as safetensors stores them), not copied."""
    import torch

    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor is stored, and its shape and dtype, known before reading its data."""

    file: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int | None = None  # where its bytes start in a safetensors file (None: a .bin)


def index_checkpoint(directory: str) -> dict[str, TensorInfo]:
    """Every tensor of a Hugging Face checkpoint directory, without reading tensor data.
    Looks for the files transformers writes, safetensors first: model.safetensors or its
    sharded index, then pytorch_model.bin or its sharded index."""
    for weights_name in ("model.safetensors", "pytorch_model.bin"):
        index_path = os.path.join(directory, weights_name + ".index.json")
        if os.path.exists(index_path):
            return index_shards(index_path)
        single_path = os.path.join(directory, weights_name)
        if os.path.exists(single_path):
            return describe_shard(single_path)
    raise UsageError(
        f"{directory}: no model weights found (looked for model.safetensors, pytorch_model.bin "
        "and their sharded forms with an .index.json)"
    )


def index_shards(index_path: str) -> dict[str, TensorInfo]:
    """The tensors a sharded checkpoint's index lists, each checked to be in its shard."""
    try:
        weight_map = dict(utils.jload(index_path)["weight_map"])
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{index_path}: not a checkpoint index with a 'weight_map' ({e})") from None
    directory = os.path.dirname(index_path)
    shards = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = os.path.join(directory, shard)
        if not os.path.exists(shard_path):
            raise UsageError(f"{index_path}: lists shard {shard}, which does not exist")
        shards[shard] = describe_shard(shard_path)
    tensors = {}
    for name, shard in weight_map.items():
        if name not in shards[shard]:
            raise UsageError(f"{os.path.join(directory, shard)}: has no tensor {name}, which {index_path} places there")
        tensors[name] = shards[shard][name]
    return tensors


def describe_shard(path: str) -> dict[str, TensorInfo]:
    """Names, shapes and dtypes of the tensors in one .safetensors or .bin file."""
    import torch
    from safetensors import SafetensorError, safe_open

    if path.endswith(".safetensors"):
        try:  # safe_open validates the header and that the file holds all the data it lists
            with safe_open(path, framework="pt") as f:
                slices = {name: f.get_slice(name) for name in f.keys()}
                stored = {name: (tuple(s.get_shape()), s.get_dtype()) for name, s in slices.items()}
        except SafetensorError as e:
            raise UsageError(f"{path}: not a readable safetensors file, probably truncated or corrupt ({e})") from None
        for name, (_, dtype) in stored.items():
            if dtype not in SAFETENSORS_DTYPES:
                raise UsageError(f"{path}: tensor {name} has dtype {dtype}; only floating-point weights can be diffed")
        # The byte offsets, which safe_open does not expose, for plain reads (see stored_blocks).
        with open(path, "rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_size))
        return {
            name: TensorInfo(
                path,
                shape,
                getattr(torch, SAFETENSORS_DTYPES[dtype]),
                8 + header_size + header[name]["data_offsets"][0],
            )
            for name, (shape, dtype) in stored.items()
        }
    state_dict = load_bin(path)
    for name, tensor in state_dict.items():
        if not tensor.is_floating_point():
            raise UsageError(
                f"{path}: tensor {name} has dtype {tensor.dtype}; only floating-point weights can be diffed"
            )
    return {name: TensorInfo(path, tuple(tensor.shape), tensor.dtype) for name, tensor in state_dict.items()}


def load_bin(path: str) -> dict[str, torch.Tensor]:
    """A .bin state dict, memory-mapped (nothing is read until used) and unpickled with
    `weights_only=True`: only tensors and plain containers are rebuilt, so a file carrying
    code cannot run it. A file that needs more than that is refused, with no fallback."""
    import torch

    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        reason = next((line.strip() for line in str(e).splitlines() if "Unsupported" in line), "")
        raise UsageError(
            f"{path}: refused: unpickling it needs objects other than tensors, which could run "
            f"arbitrary code, so it is not loaded. Get the weights from a trusted source, "
            f"preferably as safetensors. {reason}"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise UsageError(f"{path}: not a readable PyTorch checkpoint, probably truncated or corrupt ({e})") from None
    if not isinstance(state_dict, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()
    ):
        raise UsageError(f"{path}: not a state dict (a mapping from tensor names to tensors)")
    return state_dict


@functools.cache
def read_buffer() -> torch.Tensor:
    """The one buffer that file reads go through, allocated once. (Large buffers allocated and
    freed tensor after tensor fragment the C heap, and the process grows by about a tensor's
    size each time: measured 1.1 GB instead of 0.5 GB over a 0.3B-parameter model. The same
    goes for `reusable_buffer`.)"""
    import torch

    return torch.empty(BLOCK_BYTES, dtype=torch.uint8)


def stored_blocks(info: TensorInfo, name: str) -> Iterator[tuple[int, torch.Tensor]]:
    """A stored tensor's elements in order (flattened), BLOCK_BYTES at a time, as pairs of
    (index of the first element, block); a block is valid until the next one is yielded.
    Safetensors data is read with plain file reads into one reused buffer: memory stays at one
    block, where a memory map would keep every page it touched resident until it is closed."""
    numel = math.prod(info.shape)
    block_elements = BLOCK_BYTES // info.dtype.itemsize
    if info.offset is None:  # .bin: memory-mapped copy-on-write, so the file is never written
        flat = load_bin(info.file)[name].reshape(-1)
        for start in range(0, numel, block_elements):
            yield start, flat[start : start + block_elements]
        return
    buffer = read_buffer().view(info.dtype)
    with open(info.file, "rb", buffering=0) as f:
        f.seek(info.offset)
        for start in range(0, numel, block_elements):
            block = buffer[: min(block_elements, numel - start)]
            read_exactly(f, block, info, name)
            yield start, block


def read_exactly(f, tensor: torch.Tensor, info: TensorInfo, name: str) -> None:
    """Fill `tensor` with the next bytes of an open safetensors file."""
    if f.readinto(tensor_bytes(tensor)) != tensor.nbytes:
        raise UsageError(f"{info.file}: ends inside tensor {name}; the file is truncated")


def load_into(tensor: torch.Tensor, info: TensorInfo | torch.Tensor, name: str) -> None:
    """Copy a stored tensor (or a computed one) into the first elements of `tensor`, converting
    it to the dtype of `tensor` (float32 here, as the original loaded every model)."""
    flat = tensor.view(-1)
    if not isinstance(info, TensorInfo):
        flat[: info.numel()] = info.reshape(-1)
        return
    if info.offset is not None and info.dtype == tensor.dtype:  # nothing to convert: read it in
        with open(info.file, "rb", buffering=0) as f:
            f.seek(info.offset)
            read_exactly(f, flat[: math.prod(info.shape)], info, name)
        return
    for start, block in stored_blocks(info, name):
        flat[start : start + len(block)] = block


def add_stored(tensor: torch.Tensor, info: TensorInfo, name: str) -> None:
    """`tensor += stored tensor` in float32, one block of the stored tensor at a time."""
    flat = tensor.view(-1)
    for start, block in stored_blocks(info, name):
        flat[start : start + len(block)].add_(block)


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch ops on one thread meanwhile. The stream's adds and sums run at memory speed on
    one core, well above disk speed, while splitting each op over threads makes it wait for
    whichever core is busy: on a loaded 2-core machine an add ran at 1.3 GB/s on two threads
    and at 8 to 11 GB/s on one."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def reusable_buffer(shapes: list[tuple[int, ...]], dtype: torch.dtype) -> torch.Tensor:
    """Memory for the largest of `shapes`, to hold each tensor in turn (see `shaped`), instead
    of a new tensor each time, which would fragment the heap (see `read_buffer`)."""
    import torch

    return torch.empty(max(math.prod(shape) for shape in shapes), dtype=dtype)


def shaped(buffer: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The start of a reusable buffer, viewed as a tensor of `shape`."""
    return buffer[: math.prod(shape)].view(shape)


# ---------------------------------------------------------------------------------------------
# Writing sharded safetensors one tensor at a time


class ShardedSafetensorsWriter:
    """Writes tensors into sharded safetensors files as they are computed. A safetensors file
    starts with a header giving every tensor's shape and byte offsets, so the layout of all
    shards is planned up front from the known shapes; `write` then takes the tensors in that
    order and appends each one's bytes."""

    def __init__(self, directory: str, layout: dict[str, tuple[tuple[int, ...], torch.dtype]], max_shard_bytes: int):
        self.directory = directory
        self.layout = layout
        self.shards: list[list[str]] = [[]]
        shard_bytes = 0
        for name in layout:
            if self.shards[-1] and shard_bytes + self.nbytes(name) > max_shard_bytes:
                self.shards.append([])
                shard_bytes = 0
            self.shards[-1].append(name)
            shard_bytes += self.nbytes(name)
        count = len(self.shards)
        self.file_names = (
            ["model.safetensors"]
            if count == 1
            else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
        )
        self.order = [name for shard in self.shards for name in shard]
        self.shard_of = {name: i for i, shard in enumerate(self.shards) for name in shard}
        self.written = 0
        self.file = None
        self.open_shard = -1

    def nbytes(self, name: str) -> int:
        shape, dtype = self.layout[name]
        return math.prod(shape) * dtype.itemsize

    def start_shard(self, shard: int) -> None:
        header = {"__metadata__": {"format": "pt"}}  # transformers requires format=pt
        offset = 0
        for name in self.shards[shard]:
            shape, dtype = self.layout[name]
            header[name] = {
                "dtype": SAFETENSORS_NAMES[dtype_name(dtype)],
                "shape": list(shape),
                "data_offsets": [offset, offset + self.nbytes(name)],
            }
            offset += self.nbytes(name)
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the format pads the header to 8-byte alignment
        self.finish_file()
        self.file = open(os.path.join(self.directory, self.file_names[shard]), "wb")
        self.file.write(len(encoded).to_bytes(8, "little") + encoded)
        self.open_shard = shard

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor of the plan, which must have the planned shape and dtype."""
        expected = self.order[self.written] if self.written < len(self.order) else None
        if name != expected:
            raise RuntimeError(f"tensor {name} written out of the planned order (expected {expected})")
        shape, dtype = self.layout[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise RuntimeError(f"tensor {name}: planned {shape} {dtype}, got {tuple(tensor.shape)} {tensor.dtype}")
        if self.shard_of[name] != self.open_shard:
            self.start_shard(self.shard_of[name])
        self.file.write(tensor_bytes(tensor))
        self.written += 1

    def finish_file(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def __enter__(self) -> ShardedSafetensorsWriter:
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        """Close the open shard; after success, check all was written and write the index."""
        self.finish_file()
        if error_type is not None:
            return
        if self.written != len(self.order):
            raise RuntimeError(f"{len(self.order) - self.written} planned tensors were never written")
        if len(self.shards) > 1:
            weight_map = {name: self.file_names[self.shard_of[name]] for name in self.order}
            total_size = sum(self.nbytes(name) for name in self.order)
            index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
            utils.jdump(index, os.path.join(self.directory, "model.safetensors.index.json"), indent=2)


# ---------------------------------------------------------------------------------------------
# The arithmetic and the checks shared by make_diff and recover


def pair_checkpoints(
    path_raw: str, path_other: str
) -> tuple[dict[str, TensorInfo | torch.Tensor], dict[str, TensorInfo], list[str], dict[str, int]]:
    """Index the raw model and the tuned model or diff and match their tensors (see
    `match_tensors`). Returns both indexes, the names to process in state_dict order (tensors
    the model does not declare, old rotary buffers, last) and the embedding matrices' new rows."""
    raw, other = index_checkpoint(path_raw), index_checkpoint(path_other)
    config = load_config(path_other)
    declared, tied = state_dict_layout(config)
    # Transformers saves a tied tensor once; older .bin checkpoints hold it under both names.
    for tensors in (raw, other):
        for copy, name in tied.items():
            if name in tensors:
                tensors.pop(copy, None)
    add_computed_rotary_buffers(raw, other, config)
    names, new_rows = match_tensors(raw, other, path_raw, path_other)
    order = [name for name in declared if name in names] + sorted(names.difference(declared))
    return raw, other, order, new_rows


def add_computed_rotary_buffers(
    raw: dict[str, TensorInfo | torch.Tensor], other: dict[str, TensorInfo], config: transformers.PretrainedConfig
) -> None:
    """Give the raw model the rotary `inv_freq` buffers that `other` (a diff or tuned model saved
    by transformers < 4.31) holds and it lacks, computed from the config as LLaMA layers then
    computed them when the model was built: the original's raw model held these values, so
    recovered = computed + diff, and the naive sum (Alpaca-7B's 50637.1836) counts them."""
    import torch

    missing = [name for name in other.keys() - raw.keys() if name.endswith(RECOMPUTED_BUFFER_SUFFIX)]
    if not missing:
        return
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    for name in missing:
        if other[name].shape != tuple(inv_freq.shape):
            raise UsageError(
                f"tensor {name}: shape {other[name].shape}, but the config gives rotary buffers of shape {tuple(inv_freq.shape)}"
            )
        raw[name] = inv_freq
    print(
        f"note: {len(missing)} rotary inv_freq buffers of an old checkpoint computed from the config for the raw model"
    )


def match_tensors(
    raw: dict[str, TensorInfo | torch.Tensor], other: dict[str, TensorInfo], path_raw: str, path_other: str
) -> tuple[set[str], dict[str, int]]:
    """Check that `other` (the tuned model or the diff) has the raw model's tensors with the
    same shapes, except embedding matrices with a row more for each special token that
    fine-tuning added to the raw tokenizer ([PAD] when it has no pad token, as the original).
    Returns the names to process, and the embedding matrices with their number of new rows."""
    skipped = {name for name in raw.keys() - other.keys() if name.endswith(RECOMPUTED_BUFFER_SUFFIX)}
    if skipped:
        print(
            f"note: skipping {len(skipped)} rotary inv_freq buffers that only the raw model has (transformers recomputes them)"
        )
    for has, lacks, names in (
        (path_raw, path_other, raw.keys() - other.keys() - skipped),
        (path_other, path_raw, other.keys() - raw.keys() - skipped),
    ):
        if names:
            listed = ", ".join(sorted(names)[:3]) + (", ..." if len(names) > 3 else "")
            raise UsageError(
                f"{has} has {len(names)} tensors that {lacks} lacks ({listed}): "
                "the two are not the same model architecture"
            )
    names = raw.keys() & other.keys()
    grown = {
        name
        for name in names
        if other[name].shape[1:] == raw[name].shape[1:] and other[name].shape[0] > raw[name].shape[0]
    }
    # Only look at the tokenizer when some matrix has more rows: as many rows as train.py adds
    # tokens to the raw tokenizer are expected.
    num_new_tokens = count_added_tokens(path_raw) if grown else 0
    for name in sorted(names):
        if raw[name].shape == other[name].shape or (
            name in grown and other[name].shape[0] == raw[name].shape[0] + num_new_tokens
        ):
            continue
        hint = ""
        if name in grown:
            hint = (
                f" (fine-tuning adds {num_new_tokens} special tokens to the raw tokenizer, so as many embedding rows)"
            )
        raise UsageError(
            f"tensor {name}: shape {raw[name].shape} in {path_raw} but {other[name].shape} in {path_other}{hint}"
        )
    return names, {name: num_new_tokens for name in grown}


def count_added_tokens(path_raw: str) -> int:
    """How many tokens train.py adds to the raw tokenizer before fine-tuning ([PAD] when there
    is no pad token, and EOS/BOS/UNK when missing or empty): the number of new embedding rows."""
    import tokens

    tokenizer = load_tokenizer(path_raw)
    return tokenizer.add_special_tokens(tokens.missing_special_tokens(tokenizer))


def load_tokenizer(directory: str) -> transformers.PreTrainedTokenizerBase:
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as e:
        raise UsageError(f"{directory}: cannot load its tokenizer ({e})") from None


def load_config(directory: str) -> transformers.PretrainedConfig:
    import transformers

    try:
        return transformers.AutoConfig.from_pretrained(directory)
    except (OSError, ValueError) as e:
        raise UsageError(f"{directory}: cannot load its config.json ({e})") from None


def state_dict_layout(config: transformers.PretrainedConfig) -> tuple[list[str], dict[str, str]]:
    """The model's state_dict names in order, which the original iterated (the naive integrity
    sum adds float32 values in this order), and its tied copies: {copy: the name it is tied to},
    such as lm_head.weight when the word embeddings are tied."""
    import torch
    import transformers

    with torch.device("meta"):  # builds the module tree without allocating any weight
        model = transformers.AutoModelForCausalLM.from_config(config)
    first_name, tied = {}, {}
    for name, tensor in model.state_dict(keep_vars=True).items():  # a tied tensor is one object
        if id(tensor) in first_name:
            tied[name] = first_name[id(tensor)]
        else:
            first_name[id(tensor)] = name
    return list(first_name.values()), tied


def sha256_hex(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor_bytes(tensor)).hexdigest()


def naive_sum(sums: dict[str, torch.Tensor], order: list[str]) -> float:
    """The original's naive integrity value: the float32 sum, in state_dict order, of the
    sums of all recovered tensors."""
    return float(sum(sums[name] for name in order))


def expected_naive_sum(expected_sum: float | None, manifest: dict | None, path_diff: str) -> float | None:
    """--expected_sum, else the manifest's value, else Alpaca-7B's for an Alpaca-7B diff."""
    if expected_sum is not None:
        return float(expected_sum)
    if manifest is not None:
        return manifest["naive_sum"]
    return ALPACA_7B_SUM if is_alpaca_7b(utils.jload(os.path.join(path_diff, "config.json"))) else None


def check_naive_sum(total: float, expected: float | None, path_raw: str) -> str:
    """Print the naive integrity value, fail when it is off the expected one, and return the
    outcome for recover's summary of the checks."""
    print(f"naive integrity check: the sum of all recovered weights is {total:.4f}", end="")
    if expected is None:
        print(" (not checked: pass --expected_sum to check it)")
        return "not applicable (no expected sum: the diff has no manifest and is not Alpaca-7B's; pass --expected_sum)"
    if abs(total - expected) > NAIVE_SUM_ATOL:
        print(", FAILED")
        raise UsageError(
            f"naive integrity check failed: the recovered weights sum to {total:.4f}, expected "
            f"{expected:.4f} (atol {NAIVE_SUM_ATOL}); a checkpoint file may be corrupt, or the "
            f"raw model at {path_raw} is not the one the diff was made from (for a model other "
            "than Alpaca-7B, pass its --expected_sum or --check_integrity_naively False)"
        )
    print(f", expected {expected:.4f}: ok")
    return f"passed ({total:.4f}, expected {expected:.4f})"


def is_alpaca_7b(config: dict) -> bool:
    """Whether a diff's config is the released Alpaca-7B's (LLaMA-7B with the [PAD] token)."""
    shape = (
        config.get("model_type"),
        config.get("hidden_size"),
        config.get("num_hidden_layers"),
        config.get("vocab_size"),
    )
    return shape == ("llama", 4096, 32, 32001)


def read_manifest(path: str) -> dict:
    """A manifest written by make_diff, given as its file or the diff directory holding it."""
    if os.path.isdir(path):
        path = os.path.join(path, MANIFEST_NAME)
    try:
        manifest = utils.jload(path)
        tensors = manifest["tensors"]
        for entry in tensors.values():
            entry["shape"], entry["sha256"] = tuple(entry["shape"]), str(entry["sha256"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UsageError(f"{path}: not a readable weight diff manifest ({e!r})") from None
    manifest["path"] = path
    return manifest


def check_manifest_layout(manifest: dict, tensors: dict[str, TensorInfo], names: set[str], source: str) -> None:
    """The manifest must describe exactly the tensors about to be checked, with their shapes."""
    listed = set(manifest["tensors"])
    for problem, found in (
        ("lists tensors missing from", listed - names),
        ("does not list tensors of", names - listed),
    ):
        if found:
            raise UsageError(f"{manifest['path']} {problem} {source}: {', '.join(sorted(found)[:3])}")
    for name in sorted(names):
        if manifest["tensors"][name]["shape"] != tensors[name].shape:
            raise UsageError(
                f"tensor {name}: shape {tensors[name].shape} in {source} but {manifest['tensors'][name]['shape']} in {manifest['path']}"
            )


def has_manifest(directory: str) -> bool:
    return os.path.exists(os.path.join(directory, MANIFEST_NAME))


def refuse_diff_as_raw(path_raw: str, path_diff: str) -> None:
    """Only a diff made by make_diff holds a manifest, so a --path_raw with one is a diff, most
    likely given in place of the base model. Recovering from it would give a model nobody wants
    (with the [PAD] row it fails on shapes; without, raw + diff is the same sum either way round
    and would pass the naive check), so it is refused."""
    if not has_manifest(path_raw):
        return
    problem = "both paths are weight diffs" if has_manifest(path_diff) else "--path_raw and --path_diff look swapped"
    raise UsageError(
        f"--path_raw {path_raw} holds {MANIFEST_NAME}, so it is a weight diff made by make_diff, not the base "
        f"model: {problem} (recover takes --path_raw <base model> --path_diff <diff>)"
    )


def check_target(target: str, overwrite: bool, inputs: list[str]) -> None:
    """Refuse an existing target without --overwrite, and never let output replace an input."""
    if os.path.lexists(target) and not overwrite:
        raise UsageError(f"{target} already exists; pass --overwrite True to replace it")
    real_target = os.path.realpath(target)
    for path in inputs:
        real_input = os.path.realpath(path)
        if real_target == real_input or real_input.startswith(real_target + os.sep):
            raise UsageError(f"{target} is an input ({path}); write the output somewhere else")


def output_dir(target: str | None, overwrite: bool) -> contextlib.AbstractContextManager[str]:
    """Where a command writes: a directory renamed to `target` only when all of it is written
    (see utils.atomic_directory), or a temporary one, always deleted, without a target."""
    if target is None:
        return tempfile.TemporaryDirectory(prefix="weight_diff-")
    return utils.atomic_directory(target, overwrite)


def save_config_and_tokenizer(source_dir: str, target_dir: str, dtype: torch.dtype, recovering: bool = False) -> None:
    """The model config (with its dtype set to the saved weights'), the generation config, the
    tokenizer and the model card of `source_dir`, saved beside the weights in `target_dir`. A
    diff's card says it is a diff (recovering takes that note out again), and a recovered
    model's tokenizer gets the Alpaca chat template (the 2023 Alpaca-7B diff has none)."""
    config_path = os.path.join(source_dir, "config.json")
    if not os.path.exists(config_path):
        raise UsageError(f"{source_dir}: no config.json")
    config = utils.jload(config_path)
    config["dtype"] = dtype_name(dtype)
    if "torch_dtype" in config:  # the key's name before transformers 4.56
        config["torch_dtype"] = dtype_name(dtype)
    utils.jdump(config, os.path.join(target_dir, "config.json"), indent=2)
    generation_config = os.path.join(source_dir, "generation_config.json")
    if os.path.exists(generation_config):
        shutil.copyfile(generation_config, os.path.join(target_dir, "generation_config.json"))
    tokenizer = load_tokenizer(source_dir)
    if recovering:
        model_card.install_chat_template(tokenizer)
    tokenizer.save_pretrained(target_dir)
    card_path = os.path.join(source_dir, model_card.CARD_NAME)
    if os.path.exists(card_path):
        with open(card_path, encoding="utf-8") as f:
            card = f.read()
        card = model_card.undiff_card(card) if recovering else model_card.diff_card(card)
        utils.write_text_atomically(card, os.path.join(target_dir, model_card.CARD_NAME))


def check_device(device: str) -> None:
    import torch

    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise UsageError(f"--device {device} cannot be used here for the test inference ({e})") from None


def run_test_inference(model_dir: str, device: str, dtype: torch.dtype) -> str:
    """Greedy 100-token completion of the Alpaca no-input prompt by the model in `model_dir`,
    printed and returned: a quick look that the recovered model talks sense."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    prompt = utils.format_prompt(TEST_INSTRUCTION)
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    output = model.generate(
        **inputs,
        max_new_tokens=100,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    completion = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"Input: {prompt}\nCompletion: {completion}")
    return completion


# ---------------------------------------------------------------------------------------------
# The three commands


def make_diff(
    path_raw: str,
    path_tuned: str,
    path_diff: str,
    device: str = "cpu",
    overwrite: bool = False,
    max_shard_size_gb: float = 5.0,
) -> None:
    """Write the weight diff `tuned - raw` (float32) with the tuned tokenizer and a manifest.

    Args:
        path_raw: the base model directory (e.g. LLaMA-7B in Hugging Face format).
        path_tuned: the fine-tuned model directory.
        path_diff: where to write the diff; must not exist unless --overwrite True.
        device: accepted for the original's command line; the arithmetic streams through the
            CPU (it is bound by disk and memory speed, and IEEE float32 gives the same bits
            on any device).
        overwrite: replace an existing path_diff (only once the new diff is complete).
        max_shard_size_gb: largest safetensors shard to write, in GB (10^9 bytes).
    """
    utils.check_model_source(path_raw, flag="--path_raw", hub=False)
    utils.check_model_source(path_tuned, flag="--path_tuned", hub=False)
    check_target(path_diff, overwrite, [path_raw, path_tuned])
    import torch  # only now that the arguments are checked

    import tokens

    with torch.inference_mode():
        raw, tuned, order, new_rows = pair_checkpoints(path_raw, path_tuned)
        shapes = [tuned[name].shape for name in order]
        raw_buffer, tuned_buffer, diff_buffer = (reusable_buffer(shapes, torch.float32) for _ in range(3))
        with output_dir(path_diff, overwrite) as out:
            layout = {name: (tuned[name].shape, torch.float32) for name in order}
            entries, sums, largest_difference = {}, {}, 0.0
            with ShardedSafetensorsWriter(out, layout, int(max_shard_size_gb * 1e9)) as writer, one_torch_thread():
                for name in tqdm(order, desc="make_diff", unit="tensor"):
                    raw_tensor, tuned_tensor, diff = (
                        shaped(b, tuned[name].shape) for b in (raw_buffer, tuned_buffer, diff_buffer)
                    )
                    load_into(raw_tensor, raw[name], name)
                    if name in new_rows:
                        tokens.init_new_rows_to_mean(raw_tensor, new_rows[name])
                    load_into(tuned_tensor, tuned[name], name)
                    torch.sub(tuned_tensor, raw_tensor, out=diff)
                    writer.write(name, diff)
                    # What recover will compute, raw + diff, which can differ from tuned in the last
                    # bit: the manifest holds its hash, so that recover can check it bit for bit.
                    recovered = raw_tensor.add_(diff)
                    entries[name] = {"shape": list(recovered.shape), "sha256": sha256_hex(recovered)}
                    sums[name] = recovered.sum()
                    largest_difference = max(largest_difference, tuned_tensor.sub_(recovered).abs_().max().item())
            manifest = {
                "about": "sha256 of every float32 tensor as `weight_diff.py recover` computes it (raw + diff)",
                "dtype": "float32",
                "naive_sum": naive_sum(sums, order),
                "new_embedding_rows": dict(sorted(new_rows.items())),
                "max_abs_difference_from_tuned": largest_difference,
                "tensors": entries,
            }
            utils.jdump(manifest, os.path.join(out, MANIFEST_NAME), indent=2)
            save_config_and_tokenizer(path_tuned, out, torch.float32)
    print(
        f"wrote {path_diff}: {len(order)} tensors; naive sum of the recovered weights {manifest['naive_sum']:.4f}; "
        f"largest difference between recovered and tuned weights {largest_difference:.3g}"
    )


def recover(
    path_raw: str,
    path_diff: str,
    path_tuned: str | None = None,
    device: str = "cpu",
    test_inference: bool = True,
    check_integrity_naively: bool = True,
    expected_sum: float | None = None,
    output_dtype: str = "float32",
    overwrite: bool = False,
    max_shard_size_gb: float = 5.0,
) -> None:
    """Recover the tuned weights `raw + diff`, check them, and save them with the tokenizer.

    Args:
        path_raw: the base model directory (e.g. LLaMA-7B converted to Hugging Face format).
            A diff made by make_diff, which holds weight_diff_manifest.json, is refused, since
            the two paths are then swapped.
        path_diff: the weight diff directory (e.g. the released Alpaca-7B diff).
        path_tuned: where to save the recovered model; must not exist unless --overwrite True.
            Without it the model is recovered into a temporary directory, checked, tried and
            deleted.
        device: where to run the test inference, "cpu" or "cuda". The arithmetic streams
            through the CPU (it is bound by disk and memory speed, and IEEE float32 gives the
            same bits on any device).
        test_inference: generate a completion of an Alpaca prompt with the recovered model
            (this loads the whole model into memory).
        check_integrity_naively: compare the sum of all recovered weights with the expected
            one (--expected_sum, else the diff's manifest, else 50637.1836 for an Alpaca-7B
            diff, as the original); the sum is printed either way.
        expected_sum: the expected sum of all recovered weights for a model other than
            Alpaca-7B.
        output_dtype: dtype of the saved weights: float32 (as the original), bfloat16 or
            float16. Checks are made on the float32 values before casting.
        overwrite: replace an existing path_tuned (only once the new model is complete).
        max_shard_size_gb: largest safetensors shard to write, in GB (10^9 bytes).
    """
    if output_dtype not in OUTPUT_DTYPES:
        raise UsageError(f"--output_dtype {output_dtype}: choose one of {', '.join(OUTPUT_DTYPES)}")
    utils.check_model_source(path_raw, flag="--path_raw", hub=False)
    utils.check_model_source(path_diff, flag="--path_diff", hub=False)
    refuse_diff_as_raw(path_raw, path_diff)
    if test_inference:  # fail now, not after the whole recovery
        check_device(device)
    if path_tuned is not None:
        check_target(path_tuned, overwrite, [path_raw, path_diff])
    import torch  # only now that the arguments are checked

    import tokens

    dtype = getattr(torch, output_dtype)
    with torch.inference_mode():
        raw, diff, order, new_rows = pair_checkpoints(path_raw, path_diff)
        # What each check found, for the summary at the end.
        checks = {}
        manifest = read_manifest(path_diff) if has_manifest(path_diff) else None
        if manifest is not None:
            check_manifest_layout(manifest, diff, set(order), path_diff)
        else:
            # The 2023 Alpaca-7B diff has no manifest; any other diff without one may be no diff at all.
            checks["manifest"] = (
                f"skipped: no {MANIFEST_NAME} in --path_diff {path_diff} (make_diff writes one; the 2023 Alpaca-7B "
                "diff has none. If it is the base model, --path_raw and --path_diff are swapped)"
            )
            print(f"manifest check: {checks['manifest']}")
        shapes = [diff[name].shape for name in order]
        buffer = reusable_buffer(shapes, torch.float32)
        cast_buffer = reusable_buffer(shapes, dtype) if dtype != torch.float32 else None
        with output_dir(path_tuned, overwrite) as out:
            layout = {name: (diff[name].shape, dtype) for name in order}
            sums = {}
            with ShardedSafetensorsWriter(out, layout, int(max_shard_size_gb * 1e9)) as writer, one_torch_thread():
                for name in tqdm(order, desc="recover", unit="tensor"):
                    # raw + diff in one buffer, the diff added a block at a time: one tensor in memory.
                    # (The original computed diff + raw; float addition is commutative, bit for bit.)
                    recovered = shaped(buffer, diff[name].shape)
                    load_into(recovered, raw[name], name)
                    if name in new_rows:
                        tokens.init_new_rows_to_mean(recovered, new_rows[name])
                    add_stored(recovered, diff[name], name)
                    if manifest is not None and sha256_hex(recovered) != manifest["tensors"][name]["sha256"]:
                        raise UsageError(
                            f"recovered tensor {name} does not match {manifest['path']}: the raw model at "
                            f"{path_raw} is not the one the diff was made from, or a file is corrupt"
                        )
                    sums[name] = recovered.sum()
                    writer.write(
                        name,
                        recovered if cast_buffer is None else shaped(cast_buffer, recovered.shape).copy_(recovered),
                    )
            if manifest is not None:
                checks["manifest"] = f"passed (all {len(order)} recovered tensors match {manifest['path']}, sha256)"
                print(f"exact integrity check: all {len(order)} recovered tensors match {manifest['path']} (sha256)")
            total = naive_sum(sums, order)
            if check_integrity_naively:
                expected = expected_naive_sum(expected_sum, manifest, path_diff)
                checks["naive sum"] = check_naive_sum(total, expected, path_raw)
            else:
                checks["naive sum"] = "skipped (--check_integrity_naively False)"
                print(f"naive integrity check: {checks['naive sum']}; the sum of all recovered weights is {total:.4f}")
            save_config_and_tokenizer(path_diff, out, dtype, recovering=True)
            if test_inference:
                run_test_inference(out, device, dtype)
            checks["test inference"] = f"ran on {device}" if test_inference else "skipped (--test_inference False)"
    if path_tuned is not None:
        print(f"wrote {path_tuned}: {len(order)} tensors in {output_dtype}")
    print("checks:\n" + "\n".join(f"  {check}: {outcome}" for check, outcome in checks.items()))


def verify(path_tuned: str, manifest: str) -> None:
    """Check a saved model bit for bit against the manifest of the diff it was recovered from.

    Args:
        path_tuned: the recovered model directory (saved in float32).
        manifest: the manifest file, or the diff directory holding weight_diff_manifest.json.
    """
    import torch

    expected = read_manifest(manifest)
    tensors = index_checkpoint(path_tuned)
    names = {name for name in tensors if name in expected["tensors"] or not name.endswith(RECOMPUTED_BUFFER_SUFFIX)}
    check_manifest_layout(expected, tensors, names, path_tuned)
    buffer = reusable_buffer([tensors[name].shape for name in names], torch.float32)
    for name in tqdm(sorted(names), desc="verify", unit="tensor"):
        if tensors[name].dtype != torch.float32:
            raise UsageError(
                f"{tensors[name].file}: tensor {name} is {tensors[name].dtype}, but the manifest holds "
                "hashes of float32 values (recover checks them before casting to --output_dtype)"
            )
        tensor = shaped(buffer, tensors[name].shape)
        load_into(tensor, tensors[name], name)
        if sha256_hex(tensor) != expected["tensors"][name]["sha256"]:
            raise UsageError(f"{tensors[name].file}: tensor {name} does not match {expected['path']}")
    print(f"{path_tuned}: all {len(names)} tensors match {expected['path']}")


if __name__ == "__main__":
    utils.run_fire({"make_diff": make_diff, "recover": recover, "verify": verify})
