"""Small helpers shared by the scripts: the Alpaca prompt templates and JSON I/O.

Kept free of torch and openai imports so that every script can import it cheaply."""
import io
import json
import os
import tempfile
from typing import Any

# The two Alpaca templates, character for character as the original trained on them.
PROMPT_DICT = {
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
    ),
    "prompt_no_input": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:"
    ),
}


# The mode open() would give a new file under this process's umask (read once: os.umask sets it).
_UMASK = os.umask(0)
os.umask(_UMASK)
_NEW_FILE_MODE = 0o666 & ~_UMASK


def format_prompt(instruction: str, input: str | None = None) -> str:
    """The Alpaca prompt for one example; an empty or absent input uses the no-input template."""
    if input:
        return PROMPT_DICT["prompt_input"].format(instruction=instruction, input=input)
    return PROMPT_DICT["prompt_no_input"].format(instruction=instruction)


def jload(path: str) -> Any:
    """Read a JSON file, or a JSON Lines file (one object per line) when it is not one JSON value."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as whole_file_error:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                if number == 1:
                    raise ValueError(f"{path}: not valid JSON: {whole_file_error}") from None
                raise ValueError(f"{path}: line {number} is not valid JSON: {e}") from None
        return records


def jdump(obj: Any, path: str, indent: int = 4) -> None:
    """Write `obj` as JSON atomically (see `write_text_atomically`)."""
    write_text_atomically(json.dumps(obj, indent=indent, ensure_ascii=False, default=str), path)


def write_text_atomically(text: str, path: str) -> None:
    """Write `text` to `path` through a temporary file beside it, flushed, fsynced and renamed
    over it, so a crash at any moment leaves either the old file or the new one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=directory)
    try:
        with io.open(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, _NEW_FILE_MODE)  # mkstemp makes owner-only files; give the usual mode
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    # The rename is durable only once the directory entry is on disk too.
    directory_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)
