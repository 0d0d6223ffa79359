"""Small helpers shared by the scripts: the Alpaca prompt templates, the record checker, JSON
and atomic file and directory writes, the command-line runner, and the quick check that a model
path can be loaded.

Kept free of torch and openai imports so that every script can import it cheaply."""

import contextlib
import json
import os
import shutil
import socket
import string
import sys
import tempfile
from collections.abc import Callable, Iterator
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

# The same two templates as a Hugging Face chat template (Jinja), so that any server that formats
# chats with the tokenizer's template (transformers serve, vLLM, llama.cpp --jinja) sends the
# model the prompt it was trained on. The instruction is the last user message; when the chat
# ends with two user messages, the first is the instruction and the second the input. A final
# assistant message is the response, followed by EOS, as training appends it.
_CHAT_TEMPLATE = (
    "{%- set answer = messages[-1]['content'] if messages and messages[-1]['role'] == 'assistant' else none -%}"
    "{%- set turns = messages[:-1] if answer is not none else messages -%}"
    "{%- set users = turns | selectattr('role', 'equalto', 'user') | list -%}"
    "{%- if not users -%}{{ raise_exception('an Alpaca prompt needs a user message (the instruction)') }}{%- endif -%}"
    "{%- if turns | length >= 2 and turns[-2]['role'] == 'user' and turns[-1]['role'] == 'user' -%}"
    "{%- set instruction, input = turns[-2]['content'], turns[-1]['content'] -%}"
    "{%- else -%}{%- set instruction, input = users[-1]['content'], '' -%}{%- endif -%}"
    "{{ PREFIX }}"
    "{%- if input -%}{{ PROMPT_INPUT }}{%- else -%}{{ PROMPT_NO_INPUT }}{%- endif -%}"
    "{%- if answer is not none -%}{{ answer + eos_token }}{%- endif -%}"
)


def _jinja_expression(template: str) -> str:
    """A PROMPT_DICT template as one Jinja expression: its text as string literals (JSON's
    escapes are Jinja's), its {fields} as variables."""
    parts = []
    for literal, field, _, _ in string.Formatter().parse(template):
        parts += [json.dumps(literal)] if literal else []
        parts += [field] if field else []
    return " + ".join(parts)


def alpaca_chat_template(bos_token: bool = False, space_after_bos: bool = False) -> str:
    """The Alpaca prompt as a chat template, beginning with the tokenizer's BOS (and a space,
    which a SentencePiece tokenizer reads as the word boundary it puts before the first word)
    for a tokenizer that adds one, since servers tokenize the rendered text without adding it."""
    prefix = " + ".join((["bos_token"] if bos_token else []) + (['" "'] if space_after_bos else [])) or '""'
    return (
        _CHAT_TEMPLATE.replace("PREFIX", prefix)
        .replace("PROMPT_INPUT", _jinja_expression(PROMPT_DICT["prompt_input"]))
        .replace("PROMPT_NO_INPUT", _jinja_expression(PROMPT_DICT["prompt_no_input"]))
    )


# The modes open() and mkdir() give under this process's umask (read once: os.umask sets it).
_UMASK = os.umask(0)
os.umask(_UMASK)
_NEW_FILE_MODE = 0o666 & ~_UMASK
_NEW_DIR_MODE = 0o777 & ~_UMASK


class UsageError(Exception):
    """A problem with the command line or an input file, reported as one line without a traceback."""


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
        with open(fd, "w", encoding="utf-8") as f:
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


@contextlib.contextmanager
def atomic_directory(target: str, overwrite: bool = False) -> Iterator[str]:
    """A fresh directory to write into: created beside `target`, renamed to `target` when the
    block succeeds and deleted when it fails, so the target never holds partial output. An
    existing target is replaced only with `overwrite`."""
    target = os.path.abspath(target)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.partial-", dir=os.path.dirname(target))
    try:
        yield staging
        # mkdtemp makes the directory private: give it, and the files in it, the usual modes.
        os.chmod(staging, _NEW_DIR_MODE)
        for entry in os.scandir(staging):
            os.chmod(entry.path, _NEW_DIR_MODE if entry.is_dir(follow_symlinks=False) else _NEW_FILE_MODE)
        if os.path.lexists(target):
            if not overwrite:
                raise UsageError(f"{target} appeared while writing; pass --overwrite True to replace it")
            _replace(target, staging)
        else:
            os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _replace(target: str, staging: str) -> None:
    """Rename `staging` over the existing `target`, putting the old one back if that fails."""
    retired = staging + ".old"
    os.rename(target, retired)
    try:
        os.rename(staging, target)
    except OSError:
        os.rename(retired, target)
        raise
    if os.path.isdir(retired):
        shutil.rmtree(retired)
    else:
        os.remove(retired)


# ---------------------------------------------------------------------------------------------
# Records

# One problem of a record: the field it concerns (None for the record as a whole) and what is wrong.
Problem = tuple[str | None, str]


def record_problems(
    record: Any,
    required: tuple[str, ...] = ("instruction", "output"),
    optional: tuple[str, ...] = ("input",),
    nonempty: tuple[str, ...] = (),
) -> list[Problem]:
    """The problems of one record, the one check every script applies: not an object, a
    `required` field missing, a required or `optional` field that is not a string (an optional
    one may be null), or a `nonempty` field that is blank."""
    if not isinstance(record, dict):
        return [(None, f"not a JSON object ({type(record).__name__})")]
    problems = []
    for key in required + optional:
        if key not in record or (key in optional and record[key] is None):
            if key in required:
                problems.append((key, "missing"))
        elif not isinstance(record[key], str):
            problems.append((key, f"not a string ({type(record[key]).__name__})"))
        elif key in nonempty and not record[key].strip():
            problems.append((key, "empty"))
    return problems


def seed_task_problems(
    record: Any, required: tuple[str, ...] = ("id", "name", "instruction"), nonempty: tuple[str, ...] = ()
) -> list[Problem]:
    """The problems of one seed task: its `required` string fields, and `instances`, a non-empty
    list of {input, output} records (fields named `instances[N].input`, ...)."""
    problems = record_problems(record, required=required, optional=(), nonempty=nonempty)
    if not isinstance(record, dict):
        return problems
    instances = record.get("instances")
    if not isinstance(instances, list) or not instances:
        return problems + [("instances", "missing" if instances is None else "not a non-empty list")]
    for number, instance in enumerate(instances):
        prefix = f"instances[{number}]"
        for field, message in record_problems(instance, required=("input", "output"), optional=(), nonempty=nonempty):
            problems.append((prefix if field is None else f"{prefix}.{field}", message))
    return problems


def describe_problem(path: str, index: int | None, problem: Problem) -> str:
    """`PATH: record I, field "F": what is wrong`, leaving out what does not apply; I is the
    0-based position of the record in the file."""
    field, message = problem
    where = [f"record {index}"] if index is not None else []
    where += [f'field "{field}"'] if field else []
    return f"{path}: {', '.join(where)}: {message}" if where else f"{path}: {message}"


def load_records(path: str) -> list:
    """The records of a JSON list or JSON Lines file (a file of one object is one record); a
    UsageError naming the file when it cannot be read or holds something else."""
    try:
        records = jload(path)
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text ({e})") from None
    except ValueError as e:  # jload's message names the file and the line
        raise UsageError(str(e)) from None
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
    if isinstance(records, dict):
        records = [records]
    if not isinstance(records, list):
        raise UsageError(f"{path}: expected a JSON list or JSON Lines of records, got {type(records).__name__}")
    return records


def load_evaluation_records(path: str, **rules: tuple[str, ...]) -> list[dict]:
    """The records of an evaluation set read as published: Self-Instruct's user-oriented set
    (`{id, motivation_app, instruction, instances: [{input, output}]}`) gives one
    `{instruction, input, output, ...}` record per instance, its output the reference; the
    AlpacaEval set, model outputs and training data are read as they are. Each record is then
    checked by `record_problems(record, **rules)`."""
    records = []
    for index, record in enumerate(load_records(path)):
        if not (isinstance(record, dict) and "instances" in record):
            records.append(record)
            continue
        problems = seed_task_problems(record, required=("instruction",))
        if problems:
            raise UsageError(describe_problem(path, index, problems[0]))
        task = {key: value for key, value in record.items() if key != "instances"}
        records += [
            {**task, "input": instance["input"], "output": instance["output"]} for instance in record["instances"]
        ]
    for index, record in enumerate(records):
        problems = record_problems(record, **rules)
        if problems:
            raise UsageError(describe_problem(path, index, problems[0]))
    return records


# ---------------------------------------------------------------------------------------------
# Command lines


def run_fire(component: Any, errors: tuple[type[BaseException], ...] = (), interrupted: str = "interrupted") -> None:
    """Run a fire command line: help printed straight to the terminal (fire would open a pager),
    returned values not printed (the scripts write files), and a UsageError (or one of `errors`)
    and a Ctrl-C reported as one line each (see `run_main`)."""
    import fire

    os.environ.setdefault("PAGER", "cat")
    run_main(lambda: fire.Fire(component, serialize=lambda result: None), errors, interrupted)


def run_main(
    main: Callable[[], Any], errors: tuple[type[BaseException], ...] = (), interrupted: str = "interrupted"
) -> None:
    """Call `main`, reporting a UsageError (or one of `errors`) as one line without a traceback,
    `SCRIPT: error: ...` with exit status 1, and a Ctrl-C as `SCRIPT: <interrupted>` with exit
    status 130 (`interrupted` can say what was saved and how to go on)."""
    script = os.path.basename(sys.argv[0])
    try:
        main()
    except (UsageError, *errors) as e:
        sys.exit(f"{script}: error: {e}")
    except KeyboardInterrupt:
        print(f"\n{script}: {interrupted}", file=sys.stderr)
        sys.exit(130)


# ---------------------------------------------------------------------------------------------
# Models

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# tokenizer_config.json alone is no tokenizer: transformers would build an empty one from it.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def check_model_source(
    name_or_path: str, flag: str = "--model_name_or_path", tokenizer: bool = True, hub: bool = True
) -> None:
    """Fail at once, in one line, for a model that cannot be loaded, instead of a long traceback
    after the hub client's retries: a local directory without config.json, weights or (with
    `tokenizer`) tokenizer files, or a name that is no local path while the hub cannot be reached.
    With `hub=False` (weight_diff.py streams tensors from local files) a path that does not exist
    is never taken for a hub name."""
    if os.path.isdir(name_or_path):
        files = set(os.listdir(name_or_path))
        missing = [
            what
            for what, names in (
                ("config.json", ("config.json",)),
                ("weights (model.safetensors or pytorch_model.bin, or their index)", WEIGHT_FILES),
                ("tokenizer (tokenizer.json, tokenizer.model or vocab.json)", TOKENIZER_FILES if tokenizer else ()),
            )
            if names and not files & set(names)
        ]
        if missing:
            raise UsageError(f"{flag} {name_or_path}: the directory has no {', no '.join(missing)}")
        return
    if os.path.exists(name_or_path):
        raise UsageError(f"{flag} {name_or_path}: not a directory")
    if not hub:
        raise UsageError(f"{flag} {name_or_path}: no such directory (only local model directories are read here)")
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1
    if looks_local:
        raise UsageError(f"{flag} {name_or_path}: no such directory")
    if not hub_reachable():
        raise UsageError(
            f"{flag} {name_or_path}: no such local directory, and the Hugging Face hub, where a model of that "
            "name would be found, cannot be reached from here"
        )


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (or the mirror HF_ENDPOINT names) answers a connection."""
    from urllib.parse import urlsplit

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def use_huge_pages_for_cpu_tensors() -> None:
    """Have PyTorch's CPU allocator back tensors of 2 MB and more with transparent huge pages,
    unless THP_MEM_ALLOC_ENABLE is set already. Without them, every large tensor a training step
    frees goes back to the kernel (glibc maps allocations over 32 MB afresh each time) and the
    next step faults it in again 4 KB at a time: on this project's 2-core sandbox a quarter of a
    packed step's time went to the kernel. PyTorch reads the setting once, at its first large
    allocation, so this must run before the model is loaded."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
