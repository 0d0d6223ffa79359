"""The server's decoding step in ONNX Runtime, for a float32 model on the CPU
(`inference.py --serve --backend onnxruntime`).

PyTorch runs a decoding step as about 1,500 small operations, each with the interpreter's and
the dispatcher's overhead, and its matrix-vector products read the weights at about 10 GB/s on
this project's 2-core sandbox. ONNX Runtime runs the same step as one graph, with products that
read them at nearly the memory's bandwidth: 34 to 41 ms a token (growing with the cache)
instead of 88 ms for the embedded SmolLM2-135M (docs/inference.md#throughput).

The step (one new token per row: its id, the attention mask, its position and each layer's
cached keys and values in; the logits of the next token and the grown keys and values out) is
exported once per model with torch.onnx, which takes minutes, and kept in
`$ALPACA_CACHE/onnx/` (else `~/.cache/alpaca/onnx/`) under a hash of the weights, the config
and the library versions, so a later start, or another copy of the same model, loads it in
seconds. Prompts still go through PyTorch; only the steps after them run here.
"""

import contextlib
import hashlib
import logging
import os
import pathlib
import shutil
import sys
import tempfile
import warnings

import numpy as np
import onnxruntime
import onnxscript
import torch
import transformers

from embedded_model import default_cache_dir
from generation import grows_plainly

FILE = "decode_step.onnx"
FORMAT = "1"  # the step's inputs and outputs as StepModule lays them out: change it with them


class StepError(Exception):
    """This model's decoding step cannot be exported, or its export cannot be loaded."""


class DecodeStep:
    """An exported decoding step in an ONNX Runtime session. Called with a batch's chosen tokens,
    attention mask, positions and KV cache (a transformers DynamicCache), it grows the cache's
    layers and returns the next token's float32 logits, one row per token; a row's results do
    not depend on the rows beside it (tests/test_onnx_decode.py)."""

    def __init__(self, path: pathlib.Path, threads: int):
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # a damaged file, or one this onnxruntime cannot read
            raise StepError(
                f"cannot load {path} ({_first_line(error)}); delete {path.parent} to export again"
            ) from error
        self.layers = sum(entry.name.startswith("key_") for entry in self.session.get_inputs())

    def __call__(
        self, tokens: list[int], mask: torch.Tensor, positions: torch.Tensor, cache: transformers.DynamicCache
    ) -> torch.Tensor:
        feed = {
            "input_ids": np.array(tokens, dtype=np.int64)[:, None],
            "attention_mask": mask.numpy(),
            "position_ids": positions[:, None].numpy(),
        }
        for i, layer in enumerate(cache.layers):
            feed[f"key_{i}"] = np.ascontiguousarray(layer.keys.numpy())
            feed[f"value_{i}"] = np.ascontiguousarray(layer.values.numpy())
        logits, *grown = self.session.run(None, feed)
        for i, layer in enumerate(cache.layers):
            layer.keys, layer.values = torch.from_numpy(grown[i]), torch.from_numpy(grown[self.layers + i])
        return torch.from_numpy(logits)


def load_decode_step(model: transformers.PreTrainedModel, cache_dir: str | os.PathLike | None = None) -> DecodeStep:
    """The model's decoding step in ONNX Runtime, exported first if the cache has none for it.
    Needs a float32 model on the CPU, with the plain linear layers (before
    `generation.pack_linear_layers`). Raises StepError for a model it cannot run, or whose export
    it cannot load."""
    if model.device.type != "cpu" or model.dtype != torch.float32:
        raise StepError(f"it runs a float32 model on the CPU, not {model.dtype} on {model.device}")
    if not grows_plainly(transformers.DynamicCache(config=model.config)):
        raise StepError("it runs models whose KV cache keeps every position (no sliding window, no state)")
    directory = pathlib.Path(cache_dir or default_cache_dir()) / "onnx" / model_key(model)
    if not (directory / FILE).exists():
        print(f"exporting the decoding step to ONNX, once for this model, into {directory}", file=sys.stderr)
        _export_whole(model, directory)
    return DecodeStep(directory / FILE, torch.get_num_threads())


def _export_whole(model: transformers.PreTrainedModel, directory: pathlib.Path) -> None:
    """Export beside `directory` and rename the export there whole, so that an interrupted export
    leaves no half-written model for the next start to load."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    scratch = pathlib.Path(tempfile.mkdtemp(prefix=".export-", dir=directory.parent))
    try:
        export_decode_step(model, scratch / FILE)
        os.chmod(scratch, 0o755)  # mkdtemp's 0700 would keep a shared cache from its other users
        try:
            os.rename(scratch, directory)
        except OSError:  # another process finished the same export first
            if not (directory / FILE).exists():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def model_key(model: transformers.PreTrainedModel) -> str:
    """A hash of everything the exported step depends on: the weights, the config, and the
    versions of the libraries that export it."""
    digest = hashlib.sha256()
    versions = (FORMAT, torch.__version__, transformers.__version__, onnxscript.__version__)
    for text in (model.config.to_json_string(), *versions):
        digest.update(text.encode())
    for name, tensor in model.state_dict().items():
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:32]


class StepModule(torch.nn.Module):
    """The model's forward for one new token per row, the cache given and returned as tensors."""

    def __init__(self, model: transformers.PreTrainedModel):
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        cache = transformers.DynamicCache(config=self.model.config)
        for layer, (key, value) in enumerate(zip(keys, values, strict=True)):
            cache.update(key, value, layer)
        logits = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache
        ).logits[:, -1]
        return logits, [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]


def export_decode_step(model: transformers.PreTrainedModel, path: pathlib.Path) -> None:
    """Export the decoding step to `path` (its weights in a file beside it), for any batch size
    and cache length."""
    example, shapes = _example_inputs(model.config)
    layers = model.config.num_hidden_layers
    names = ["input_ids", "attention_mask", "position_ids", *(f"key_{i}" for i in range(layers))]
    names += [f"value_{i}" for i in range(layers)]
    outputs = ["logits", *(f"next_key_{i}" for i in range(layers)), *(f"next_value_{i}" for i in range(layers))]
    with torch.no_grad(), _eager_attention(model), _exporter_quiet():
        program = _export(
            StepModule(model).eval(),
            example,
            dynamic_shapes=shapes,
            input_names=names,
            output_names=outputs,
            dynamo=True,
            external_data=True,
            verbose=False,
        )
    program.save(str(path), external_data=True)


def _example_inputs(config: transformers.PretrainedConfig) -> tuple[tuple, tuple]:
    """Inputs to trace the step with, and which of their sizes may vary: the rows, and the
    cached length (the mask is one longer)."""
    layers = config.num_hidden_layers
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    batch, past = 2, 5  # sizes 0 and 1 would be taken for constants
    cached = [torch.zeros(batch, heads, past, head_dim) for _ in range(layers)]
    example = (
        torch.zeros(batch, 1, dtype=torch.long),
        torch.ones(batch, past + 1, dtype=torch.long),
        torch.full((batch, 1), past),
        cached,
        [tensor.clone() for tensor in cached],
    )
    rows, length = torch.export.Dim("rows"), torch.export.Dim("past")
    per_layer = [{0: rows, 2: length}] * layers
    return example, ({0: rows}, {0: rows, 1: length + 1}, {0: rows}, per_layer, per_layer)


@contextlib.contextmanager
def _eager_attention(model: transformers.PreTrainedModel):
    """transformers' plain attention while exporting: the sdpa path decides on a causal mask
    from the shapes, which the exporter cannot follow."""
    attention = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(attention)


def _export(*args, **kwargs):
    """torch.onnx.export, its errors (which run to pages) cut to their first line."""
    try:
        return torch.onnx.export(*args, **kwargs)
    except Exception as error:
        raise StepError(f"the exporter cannot follow this model ({_first_line(error)})") from error


def _first_line(error: Exception) -> str:
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"


@contextlib.contextmanager
def _exporter_quiet():
    """The exporter's warnings (about optional packages, deprecations inside torch) say nothing a
    user of this step can act on; errors still raise."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
