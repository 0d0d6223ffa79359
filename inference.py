"""Talk to a fine-tuned Alpaca model: one instruction, an interactive loop, a batch over a file,
or an HTTP server (server.py) that speaks the OpenAI completions and chat API and serves a small
web page.

    python inference.py --model_name_or_path OUT --instruction "Give three tips for staying healthy."
    python inference.py --model_name_or_path OUT                      # interactive, until EOF
    python inference.py --model_name_or_path OUT --input_file eval.json --output_file outputs.json
    python inference.py --model_name_or_path OUT --serve --port 8000  # http://127.0.0.1:8000/

Prompts use the Alpaca template from utils.py, the one training used.
"""

from __future__ import annotations

import collections
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

import fire
from tqdm import tqdm

import utils
from generation import (
    complete_batch,
    decoding_kwargs,
    end_token_ids,
    pack_linear_layers,
    stream_completion,
    stripped,
)
from utils import UsageError, format_prompt, jdump

# torch and transformers take seconds to import, so they are imported where they are used: a
# mistyped command line or model path is then reported at once.
if TYPE_CHECKING:
    import transformers

# ---------------------------------------------------------------------------------------------
# Loading


def load_model_and_tokenizer(
    model_name_or_path: str, lora_weights: str | None = None, dtype: str = "auto"
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    """The model (with its LoRA adapter merged when `lora_weights` is given) and its tokenizer,
    ready for left-padded batched generation."""
    import torch
    import transformers

    import tokens

    # train.py saves the tokenizer beside the adapter, with the pad token it may have added.
    tokenizer_dir = lora_weights if lora_weights and _has_tokenizer(lora_weights) else model_name_or_path
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir, padding_side="left")
    if tokenizer.pad_token is None:
        # Only padded positions use it, and the attention mask hides them.
        tokenizer.pad_token = tokenizer.eos_token
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=torch_dtype)
    if lora_weights:
        import peft

        tokens.grow_embeddings(model, len(tokenizer))
        model = peft.PeftModel.from_pretrained(model, lora_weights).merge_and_unload()
    # Generation stops at every end-of-sequence token (see end_token_ids), and pads with ours.
    model.generation_config.eos_token_id = sorted(end_token_ids(model, tokenizer)[1])
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), tokenizer


def _has_tokenizer(directory: str) -> bool:
    return any(os.path.exists(os.path.join(directory, name)) for name in utils.TOKENIZER_FILES)


def check_sources(model_name_or_path: str, lora_weights: str | None) -> None:
    """Fail at once, in one line, for a model or adapter that cannot be loaded (see
    utils.check_model_source), rather than with a long traceback after the slow loading began."""
    if _is_adapter(model_name_or_path) and not os.path.exists(os.path.join(model_name_or_path, "config.json")):
        raise UsageError(
            f"--model_name_or_path {model_name_or_path} holds a LoRA adapter: pass it as --lora_weights, "
            "and the model it was trained from as --model_name_or_path"
        )
    # train.py saves the tokenizer beside the adapter; the base model then needs none.
    adapter_has_tokenizer = lora_weights is not None and _has_tokenizer(lora_weights)
    utils.check_model_source(model_name_or_path, "--model_name_or_path", tokenizer=not adapter_has_tokenizer)
    if lora_weights is None:
        return
    if not os.path.isdir(lora_weights):  # no such directory, or a hub name
        utils.check_model_source(lora_weights, "--lora_weights", tokenizer=False)
    elif not _is_adapter(lora_weights):
        raise UsageError(
            f"--lora_weights {lora_weights}: the directory has no adapter_config.json, so it is no LoRA adapter "
            "(train.py --use_lora writes one)"
        )


def _is_adapter(directory: str) -> bool:
    return os.path.exists(os.path.join(directory, "adapter_config.json"))


def load_or_explain(
    model_name_or_path: str, lora_weights: str | None, dtype: str
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    """`load_model_and_tokenizer` for the command line: a model that cannot be loaded (after
    `check_sources` found nothing wrong: from the hub, mostly) is a one-line UsageError."""
    try:
        return load_model_and_tokenizer(model_name_or_path, lora_weights, dtype)
    except OSError as error:  # from the hub: a name it does not have, a gated model, a lost connection
        source = model_name_or_path + (f" with --lora_weights {lora_weights}" if lora_weights else "")
        raise UsageError(f"cannot load {source}: {' '.join(str(error).split())}") from None


BACKENDS = ("torch", "onnxruntime")


def load_step(model: transformers.PreTrainedModel) -> Callable:
    """The server's decoding step in ONNX Runtime (onnx_decode.py), or a UsageError saying why not."""
    try:
        import onnx_decode
    except ImportError as error:
        raise UsageError(
            f"--backend onnxruntime needs the onnxruntime and onnxscript packages ({error}): "
            "pip install onnxruntime onnxscript"
        ) from None
    try:
        return onnx_decode.load_decode_step(model)
    except onnx_decode.StepError as error:
        raise UsageError(f"--backend onnxruntime: {error}; serve with --backend torch instead") from None


# ---------------------------------------------------------------------------------------------
# Command line: one instruction, interactive loop, batch over a file


def print_response(model, tokenizer, instruction: str, input: str | None, max_new_tokens: int, **decoding) -> None:
    """Generate the response to one instruction, printing it as it comes."""
    prompt = format_prompt(instruction, input)
    for delta, _ in stripped(stream_completion(model, tokenizer, prompt, max_new_tokens, **decoding)):
        print(delta, end="", flush=True)
    print(flush=True)


def interactive(model, tokenizer, max_new_tokens: int, **decoding) -> None:
    """Read an instruction and an optional input from stdin, respond, repeat until end of file.
    Ctrl-C during a response stops it; Ctrl-C at a prompt ends the loop, as end of file does.
    The prompts go to stderr so that stdout holds only the responses."""
    while (request := read_request()) is not None:
        try:
            print_response(model, tokenizer, *request, max_new_tokens, **decoding)
        except KeyboardInterrupt:
            print(flush=True)  # end the response's line
            sys.stderr.write("(stopped)\n")
    sys.stderr.write("\n")


def read_request() -> tuple[str, str] | None:
    """The next instruction and its input (maybe empty) from stdin, asked for on stderr; None
    at end of file or Ctrl-C."""
    try:
        instruction = ""
        while not instruction:
            instruction = ask("Instruction: ")
            if instruction is None:
                return None
        return instruction, ask("Input (optional, Enter to skip): ") or ""
    except KeyboardInterrupt:
        return None


def ask(prompt: str) -> str | None:
    """A line of stdin, stripped, after writing `prompt` to stderr; None at end of file."""
    sys.stderr.write(prompt)
    sys.stderr.flush()
    line = sys.stdin.readline()
    return line.strip() if line else None


def read_instructions(path: str, required: tuple[str, ...] = ("instruction",)) -> list[dict]:
    """The `{instruction, input?}` records of a JSON or JSON Lines file (a Self-Instruct task:
    one record per instance), checked."""
    return utils.load_evaluation_records(path, required=required)


def record_key(record: dict) -> tuple[str, str]:
    return record["instruction"], record.get("input") or ""


def load_batch(input_file: str, output_file: str, generator: str) -> tuple[list[dict], dict[int, dict]]:
    """The records of `input_file`, and the responses `generator` already wrote to `output_file`,
    by record index (matched by instruction and input, duplicates in order)."""
    records = read_instructions(input_file)
    done: dict[int, dict] = {}
    if os.path.exists(output_file):
        positions = collections.defaultdict(collections.deque)
        for index, record in enumerate(records):
            positions[record_key(record)].append(index)
        for number, record in enumerate(read_instructions(output_file, required=("instruction", "output"))):
            if not positions[record_key(record)]:
                raise UsageError(
                    f"{output_file}: record {number} is not a response to a record of {input_file}; "
                    "choose another --output_file"
                )
            if record.get("generator") != generator:
                raise UsageError(
                    f"{output_file}: record {number} was written by generator {record.get('generator')!r}, "
                    f"not {generator!r}; choose another --output_file (or --generator)"
                )
            done[positions[record_key(record)].popleft()] = record
    return records, done


def write_outputs(done: dict[int, dict], output_file: str) -> None:
    jdump([done[index] for index in sorted(done)], output_file)


def run_batch(
    model,
    tokenizer,
    records: list[dict],
    done: dict[int, dict],
    output_file: str,
    generator: str,
    batch_size: int,
    max_new_tokens: int,
    **decoding,
) -> None:
    """Respond to every record not `done`, writing all responses as `{instruction, input, output,
    generator}` records (AlpacaEval's model_outputs.json shape, other fields kept) in input order
    to `output_file` after each batch. Ctrl-C exits (status 130) with what is done written."""
    todo = [index for index in range(len(records)) if index not in done]
    # Longest prompts first: similar lengths share a batch (less padding), and a batch too big
    # for memory fails at once rather than at the end.
    prompts = {index: format_prompt(records[index]["instruction"], records[index].get("input")) for index in todo}
    todo.sort(key=lambda index: -len(prompts[index]))
    try:
        with tqdm(total=len(todo), desc="generating", unit="record") as progress:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                completions = complete_batch(model, tokenizer, [prompts[i] for i in chunk], max_new_tokens, **decoding)
                for index, completion in zip(chunk, completions):
                    record = records[index]
                    done[index] = {
                        **record,
                        "input": record.get("input") or "",
                        "output": completion.text.strip(),
                        "generator": generator,
                    }
                write_outputs(done, output_file)
                progress.update(len(chunk))
    except KeyboardInterrupt:
        write_outputs(done, output_file)  # Ctrl-C may have come between a batch and its writing
        print(
            f"inference.py: interrupted; {len(done)} of {len(records)} responses are saved in {output_file}: "
            "run the same command again to generate the rest",
            file=sys.stderr,
        )
        sys.exit(130)  # as utils.run_main exits after a Ctrl-C, with this line instead of its own


# ---------------------------------------------------------------------------------------------


# fire would read text such as "1, 2" or "{a: 1}" as a tuple or a dict: these flags are text as given.
@fire.decorators.SetParseFns(
    **dict.fromkeys(
        [
            "model_name_or_path",
            "instruction",
            "input",
            "lora_weights",
            "input_file",
            "output_file",
            "host",
            "generator",
            "dtype",
            "backend",
        ],
        str,
    )
)
def main(
    model_name_or_path: str,
    instruction: str | None = None,
    input: str | None = None,
    lora_weights: str | None = None,
    input_file: str | None = None,
    output_file: str | None = None,
    serve: bool = False,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    num_beams: int = 1,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    batch_size: int = 8,
    generator: str | None = None,
    dtype: str = "auto",
    backend: str = "torch",
) -> None:
    """Generate with a fine-tuned model. With --instruction: print the response (streamed). With
    --input_file/--output_file: respond to every record of a file. With --serve: run an HTTP
    server. With none of them: read instructions from stdin until end of file.

    Args:
        model_name_or_path: a checkpoint directory (train.py's --output_dir, or a recovered model),
            or a Hugging Face hub name.
        instruction: the instruction to respond to.
        input: optional input (context) for the instruction.
        lora_weights: a LoRA adapter directory (train.py --use_lora) to apply to the model.
        input_file: a JSON or JSON Lines list of {instruction, input?} records.
        output_file: where batch mode writes {instruction, input, output, generator} records;
            records the same generator already wrote there are kept and skipped (restartable).
        serve: run the HTTP server (server.py: OpenAI /v1/completions, /v1/chat/completions; a page at /).
        host: address to listen on; 127.0.0.1 keeps the server private to this machine.
        port: port to listen on (0 picks a free one).
        max_new_tokens: most tokens to generate per response (the server's default max_tokens).
        temperature: 0 is greedy decoding; above 0 samples.
        top_p: nucleus sampling mass (when sampling).
        top_k: sample among the k most likely tokens only; 0 is no limit (when sampling).
        num_beams: beam search width; above 1 the response is shown (or streamed) whole at the end.
        repetition_penalty: above 1 discourages repeating tokens.
        seed: random seed, for reproducible sampling.
        batch_size: prompts generated together in batch mode; with --serve, the most sequences
            (of any number of requests arriving together) generated together.
        generator: the name written into batch outputs (default: the model or adapter folder name).
        dtype: weights' dtype: auto (as saved), float32, bfloat16 or float16. A float16 model on
            an x86 CPU keeps its linear layers' weights in float16 and computes in float32 with
            fbgemm's kernel, so a single stream decodes faster than in float32 (outputs differ
            slightly).
        backend: with --serve on the CPU, what runs the decoding steps after each prompt: torch,
            or onnxruntime (a float32 model; its step is exported to ONNX the first time, which
            takes minutes, and cached in $ALPACA_CACHE/onnx; each token then takes about 40% of
            torch's time). Prompts go through torch either way.
    """
    if backend not in BACKENDS:
        raise UsageError(f"--backend must be one of {', '.join(BACKENDS)}, not {backend}")
    if backend == "onnxruntime":
        if not serve:
            raise UsageError("--backend onnxruntime runs the server's decoding steps: it needs --serve")
        if dtype not in ("auto", "float32"):
            raise UsageError(f"--backend onnxruntime runs a float32 model, not --dtype {dtype}")
        dtype = "float32"
    if serve and (instruction is not None or input_file is not None):
        raise UsageError("--serve takes no --instruction or --input_file")
    if (input_file is None) != (output_file is None):
        raise UsageError("--input_file and --output_file go together")
    if input_file is not None and instruction is not None:
        raise UsageError("use either --instruction or --input_file")
    if input is not None and instruction is None:
        raise UsageError("--input needs --instruction")
    name = os.path.basename(os.path.normpath(lora_weights or model_name_or_path))
    if input_file is not None:  # a bad file is reported, and a finished one written, before the model loads
        records, done = load_batch(input_file, output_file, generator or name)
        print(f"{len(done)} of {len(records)} records already in {output_file}", file=sys.stderr)
        if len(done) == len(records):
            write_outputs(done, output_file)
            return
    check_sources(model_name_or_path, lora_weights)
    if seed is not None:
        import transformers

        transformers.set_seed(seed)
    model, tokenizer = load_or_explain(model_name_or_path, lora_weights, dtype)
    step = load_step(model) if backend == "onnxruntime" else None  # exported from the plain layers
    if packed := pack_linear_layers(model):
        print(
            f"{packed} linear layers prepacked for the CPU's matmul kernels (generation.pack_linear_layers)",
            file=sys.stderr,
        )
    decoding = decoding_kwargs(temperature, top_p, top_k, num_beams, repetition_penalty)
    if serve:
        import server

        defaults = dict(
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            num_beams=num_beams,
            repetition_penalty=repetition_penalty,
        )
        server.run_server(model, tokenizer, name, host, port, max_new_tokens, batch_size, defaults, step)
    elif input_file is not None:
        run_batch(
            model, tokenizer, records, done, output_file, generator or name, batch_size, max_new_tokens, **decoding
        )
    elif instruction is not None:
        print_response(model, tokenizer, instruction, input, max_new_tokens, **decoding)
    else:
        interactive(model, tokenizer, max_new_tokens, **decoding)


if __name__ == "__main__":
    utils.run_fire(main)
