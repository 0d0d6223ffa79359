"""inference.py on a tiny random LLaMA: the command line (one-shot, interactive, batch, LoRA,
unusable models, Ctrl-C) and the generation helpers it shares with the server (whose tests are
in test_server.py).

Budget: about 2 minutes on 2 CPU cores (about fifteen subprocesses, most of which load the tiny
model, one train.py run)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from transformers import AutoTokenizer

from generation import complete_batch, decoding_kwargs, stream_completion
from helpers import INSTRUCTIONS, ROOT, build_tiny_llama, reference_response
from inference import load_model_and_tokenizer
from utils import format_prompt, jdump, jload


def run_inference(*args, stdin: bytes | None = None, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """inference.py in a subprocess (`kwargs` go to subprocess.run); stdout as UTF-8 text without
    newline translation (a random model may print a carriage return)."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "inference.py"), *map(str, args)],
        input=stdin,
        capture_output=True,
        timeout=120,
        **kwargs,
    )
    if check:
        assert result.returncode == 0, result.stderr.decode(errors="replace")[-3000:]
    result.stdout = result.stdout.decode("utf-8")
    return result


def start_inference(*args, **kwargs) -> subprocess.Popen:
    """inference.py started in a subprocess; `kwargs` go to subprocess.Popen."""
    return subprocess.Popen([sys.executable, str(ROOT / "inference.py"), *map(str, args)], **kwargs)


def the_one_error_line(result: subprocess.CompletedProcess) -> str:
    """The line a failed run printed, checked to be all it printed."""
    stderr = result.stderr.decode()
    assert result.returncode == 1 and "Traceback" not in stderr, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("inference.py: error: "), stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def tiny(served_dir):
    return load_model_and_tokenizer(str(served_dir))


# --- command line ----------------------------------------------------------------------------


def test_one_shot_prints_only_the_response(tiny_llama_dir):
    instruction, input = INSTRUCTIONS[1]
    result = run_inference(
        "--model_name_or_path", tiny_llama_dir, "--instruction", instruction, "--input", input, "--max_new_tokens", 24
    )
    expected = reference_response(tiny_llama_dir, instruction, input)
    assert expected, "the reference response is empty: the comparison would prove nothing"
    assert result.stdout == expected + "\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--serve", "--backend", "tensorflow"], "--backend must be one of torch, onnxruntime, not tensorflow"),
        (["--instruction", "Hi.", "--backend", "onnxruntime"], "--backend onnxruntime runs the server's decoding"),
        (["--serve", "--backend", "onnxruntime", "--dtype", "float16"], "--backend onnxruntime runs a float32 model"),
    ],
    ids=["unknown", "not-serving", "not-float32"],
)
def test_a_backend_it_cannot_use_is_one_line_at_once(tiny_llama_dir, args, message):
    started = time.perf_counter()
    result = run_inference("--model_name_or_path", tiny_llama_dir, *args, check=False)
    assert the_one_error_line(result).startswith(f"inference.py: error: {message}")
    assert time.perf_counter() - started < 5  # before the model loads


@pytest.mark.slow
def test_text_flags_stay_text(tiny_llama_dir, tmp_path):
    # fire reads "1,2,3" as a tuple and 2024 as a number unless told the flag is text.
    expected = reference_response(tiny_llama_dir, "1,2,3")
    assert expected != reference_response(tiny_llama_dir, "(1, 2, 3)"), "the check would prove nothing"
    result = run_inference("--model_name_or_path", tiny_llama_dir, "--instruction", "1,2,3", "--max_new_tokens", 24)
    assert result.stdout == expected + "\n"

    input_file, output_file = tmp_path / "eval.json", tmp_path / "outputs.json"
    jdump([{"instruction": "Fine."}], input_file)
    run_inference(
        "--model_name_or_path",
        tiny_llama_dir,
        "--input_file",
        input_file,
        "--output_file",
        output_file,
        "--max_new_tokens",
        2,
        "--generator",
        "2024",
    )
    assert jload(output_file)[0]["generator"] == "2024"


def test_streamed_text_equals_batch_text_also_with_stop_strings(tiny):
    model, tokenizer = tiny
    prompt = format_prompt(*INSTRUCTIONS[0])
    whole = complete_batch(model, tokenizer, [prompt], 30)[0]
    chunks = list(stream_completion(model, tokenizer, prompt, 30))
    assert len(chunks) > 3, "the text did not arrive in pieces"
    assert "".join(delta for delta, _ in chunks) == whole.text
    assert [reason for _, reason in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1][1] == whole.finish_reason

    # A stop string that spans two streamed pieces (so the first piece must be held back):
    # both paths cut just before it.
    middle = len(chunks) // 2
    stop = chunks[middle - 1][0][-1] + chunks[middle][0][:2]
    cut = complete_batch(model, tokenizer, [prompt], 30, stop=[stop, "never appears"])[0]
    assert cut.text == whole.text[: whole.text.find(stop)] and cut.finish_reason == "stop"
    streamed = list(stream_completion(model, tokenizer, prompt, 30, stop=["never appears", stop]))
    assert "".join(delta for delta, _ in streamed) == cut.text and streamed[-1][1] == "stop"


def test_stops_at_the_end_token_training_appended(tmp_path):
    # train.py ends every example with the tokenizer's EOS token; a checkpoint whose
    # generation_config names another end token (and whose pad token is its own, added by
    # train.py) must still stop there, and say it stopped.
    model, tokenizer = build_tiny_llama(tmp_path, eos_token_id=0)  # generation_config: <unk> ends
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    model.resize_token_embeddings(len(tokenizer))
    ids = torch.tensor([tokenizer(format_prompt(*INSTRUCTIONS[0]))["input_ids"]])
    with torch.no_grad():
        plain = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :].tolist()
        # Where the model said its 6th token it now says EOS (the same direction, larger).
        model.lm_head.weight[tokenizer.eos_token_id] = 2 * model.lm_head.weight[plain[5]]
        new = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1] :].tolist()
    assert tokenizer.eos_token_id in new[1:] and new.index(tokenizer.eos_token_id) < len(new) - 1
    expected = tokenizer.decode(new[: new.index(tokenizer.eos_token_id)], skip_special_tokens=True)
    model.save_pretrained(str(tmp_path))
    tokenizer.save_pretrained(str(tmp_path))

    model, tokenizer = load_model_and_tokenizer(str(tmp_path))
    prompt = format_prompt(*INSTRUCTIONS[0])
    completion = complete_batch(model, tokenizer, [prompt], 12)[0]
    assert (completion.text.strip(), completion.finish_reason) == (expected, "stop")
    assert completion.completion_tokens == new.index(tokenizer.eos_token_id)
    streamed = list(stream_completion(model, tokenizer, prompt, 12))
    assert "".join(delta for delta, _ in streamed) == completion.text and streamed[-1][1] == "stop"


def test_beam_search_streams_its_text_in_one_piece(tiny):
    # Beam search knows its best beam only at the end; the server's streams (and so the web
    # page) must still work when it runs with --num_beams.
    model, tokenizer = tiny
    prompt, decoding = format_prompt(*INSTRUCTIONS[2]), decoding_kwargs(num_beams=3)
    whole = complete_batch(model, tokenizer, [prompt], 12, **decoding)[0]
    assert list(stream_completion(model, tokenizer, prompt, 12, **decoding)) == [(whole.text, whole.finish_reason)]


def test_left_padded_batches_equal_one_at_a_time(tiny):
    model, tokenizer = tiny
    prompts = [format_prompt(*pair) for pair in INSTRUCTIONS]
    assert len({len(tokenizer(p)["input_ids"]) for p in prompts}) > 1, "prompts must differ in length"
    batched = complete_batch(model, tokenizer, prompts, 20)
    alone = [complete_batch(model, tokenizer, [p], 20)[0] for p in prompts]
    assert [c.text for c in batched] == [c.text for c in alone]
    assert [c.completion_tokens for c in batched] == [c.completion_tokens for c in alone]


@pytest.mark.slow
def test_interactive_loop_until_end_of_file(tiny_llama_dir):
    (first, _), (second, second_input) = INSTRUCTIONS[0], INSTRUCTIONS[2]
    stdin = f"{first}\n\n{second}\n{second_input}\n".encode()
    result = run_inference("--model_name_or_path", tiny_llama_dir, "--max_new_tokens", 24, stdin=stdin)
    expected = [reference_response(tiny_llama_dir, first), reference_response(tiny_llama_dir, second, second_input)]
    assert result.stdout == expected[0] + "\n" + expected[1] + "\n"
    assert result.stderr.decode().count("Instruction: ") == 3  # the third one met end of file


@pytest.mark.slow
def test_lora_adapter_trained_by_train_py(tiny_llama_dir, tmp_path):
    # train.py adds a [PAD] token to this tokenizer, so the adapter folder holds the tokenizer and
    # the resized embeddings; --merge_lora also saves the merged model to compare with.
    data = tmp_path / "data.json"
    jdump(
        [
            {"instruction": i, "input": x, "output": "The quick brown fox jumps over the lazy dog."}
            for i, x in INSTRUCTIONS
        ],
        data,
    )
    adapter = tmp_path / "adapter"
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "--model_name_or_path",
        tiny_llama_dir,
        "--data_path",
        data,
        "--output_dir",
        adapter,
        "--use_lora",
        "True",
        "--lora_target_modules",
        "q_proj,v_proj,down_proj",
        "--merge_lora",
        "True",
        "--max_steps",
        3,
        "--learning_rate",
        5e-2,
        "--per_device_train_batch_size",
        5,
        "--save_strategy",
        "no",
        "--report_to",
        "none",
    ]
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert AutoTokenizer.from_pretrained(str(adapter)).pad_token == "[PAD]"

    instruction = INSTRUCTIONS[0][0]
    result = run_inference(
        "--model_name_or_path",
        tiny_llama_dir,
        "--lora_weights",
        adapter,
        "--instruction",
        instruction,
        "--max_new_tokens",
        24,
    )
    with_adapter = result.stdout.rstrip("\n")
    assert with_adapter == reference_response(adapter / "merged", instruction)
    assert with_adapter != reference_response(tiny_llama_dir, instruction)


@pytest.mark.slow
def test_batch_file_writes_alpaca_eval_records_and_restarts(tiny_llama_dir, tmp_path):
    records = [{"instruction": i, "input": x, "dataset": "test"} for i, x in INSTRUCTIONS]
    records[4].pop("input")
    input_file, output_file = tmp_path / "eval.jsonl", tmp_path / "outputs.json"
    input_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    args = [
        "--model_name_or_path",
        tiny_llama_dir,
        "--input_file",
        input_file,
        "--output_file",
        output_file,
        "--max_new_tokens",
        16,
        "--batch_size",
        3,
    ]

    run_inference(*args)
    outputs = jload(output_file)
    assert [(o["instruction"], o["input"]) for o in outputs] == INSTRUCTIONS
    assert all(o["generator"] == tiny_llama_dir.name and o["dataset"] == "test" for o in outputs)
    assert [o["output"] for o in outputs] == [reference_response(tiny_llama_dir, i, x, 16) for i, x in INSTRUCTIONS]

    # Restart with two records done, one of them edited: it is kept, the other three are made.
    kept = dict(outputs[3], output="kept from the first run")
    jdump([kept, outputs[0]], output_file)
    result = run_inference(*args)
    assert "2 of 5 records already" in result.stderr.decode()
    assert jload(output_file) == outputs[:3] + [kept] + outputs[4:]


@pytest.mark.slow
def test_batch_file_errors_name_the_file_and_record(tiny_llama_dir, tmp_path):
    input_file, output_file = tmp_path / "eval.json", tmp_path / "outputs.json"
    jdump([{"instruction": "Fine."}, {"input": "no instruction"}], input_file)
    result = run_inference(
        "--model_name_or_path", tiny_llama_dir, "--input_file", input_file, "--output_file", output_file, check=False
    )
    assert result.returncode != 0 and f'{input_file}: record 1, field "instruction": missing' in result.stderr.decode()
    assert not output_file.exists()

    # An output file from another input is refused, and left as it was.
    jdump([{"instruction": "Fine."}], input_file)
    jdump([{"instruction": "Something else.", "input": "", "output": "x", "generator": "g"}], output_file)
    before = output_file.read_bytes()
    result = run_inference(
        "--model_name_or_path", tiny_llama_dir, "--input_file", input_file, "--output_file", output_file, check=False
    )
    assert result.returncode != 0 and f"{output_file}: record 0 is not a response" in result.stderr.decode()
    assert output_file.read_bytes() == before

    # Nor are the responses of another model (another --generator) this run's to keep.
    jdump([{"instruction": "Fine.", "input": "", "output": "x", "generator": "another-model"}], output_file)
    before = output_file.read_bytes()
    result = run_inference(
        "--model_name_or_path", tiny_llama_dir, "--input_file", input_file, "--output_file", output_file, check=False
    )
    message = f"{output_file}: record 0 was written by generator 'another-model', not '{tiny_llama_dir.name}'"
    assert result.returncode != 0 and message in result.stderr.decode()
    assert output_file.read_bytes() == before


def test_batch_with_nothing_to_generate_writes_the_output_without_loading_the_model(tmp_path):
    input_file, output_file = tmp_path / "eval.json", tmp_path / "outputs.json"
    jdump([], input_file)
    # No model there: nothing is generated, so it is not loaded.
    run_inference("--model_name_or_path", tmp_path / "absent", "--input_file", input_file, "--output_file", output_file)
    assert jload(output_file) == []

    jdump([{"instruction": "Done."}], input_file)
    done = [{"instruction": "Done.", "input": "", "output": "yes", "generator": "absent"}]
    jdump(done, output_file)
    result = run_inference(
        "--model_name_or_path", tmp_path / "absent", "--input_file", input_file, "--output_file", output_file
    )
    assert jload(output_file) == done and "1 of 1 records already" in result.stderr.decode()


@pytest.mark.parametrize(
    "files, args, message",
    [
        ([], ["--model_name_or_path", "./nope"], "--model_name_or_path ./nope: no such directory"),
        (
            [],
            ["--model_name_or_path", "demo_output/tunedd"],
            "--model_name_or_path demo_output/tunedd: no such local directory, and the Hugging Face hub",
        ),
        (
            ["tuned/config.json"],
            ["--model_name_or_path", "tuned"],
            "--model_name_or_path tuned: the directory has no weights (model.safetensors or pytorch_model.bin, "
            "or their index), no tokenizer",
        ),
        (
            ["adapter/adapter_config.json", "adapter/adapter_model.safetensors"],
            ["--model_name_or_path", "adapter"],
            "--model_name_or_path adapter holds a LoRA adapter: pass it as --lora_weights",
        ),
        (
            ["base/config.json", "base/model.safetensors", "base/tokenizer.json", "adapter/adapter_model.safetensors"],
            ["--model_name_or_path", "base", "--lora_weights", "adapter"],
            "--lora_weights adapter: the directory has no adapter_config.json",
        ),
    ],
    ids=["missing-directory", "typo-read-as-a-hub-name", "no-weights-nor-tokenizer", "adapter-as-model", "no-adapter"],
)
def test_an_unusable_model_is_one_line_at_once(tmp_path, files, args, message):
    # The files are empty: the check looks at which files there are, before anything is loaded.
    for name in files:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).touch()
    started = time.perf_counter()
    result = run_inference(
        *args, "--instruction", "Hi.", check=False, cwd=tmp_path, env=dict(os.environ, HF_HUB_OFFLINE="1")
    )
    assert the_one_error_line(result).startswith(f"inference.py: error: {message}")
    assert time.perf_counter() - started < 5  # not after importing torch, nor after the hub's retries


@pytest.mark.slow
def test_a_model_the_hub_does_not_give_is_one_line(tmp_path):
    class NotFound(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    hub = ThreadingHTTPServer(("127.0.0.1", 0), NotFound)  # a hub that can be reached, and has nothing
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    env = {name: value for name, value in os.environ.items() if name not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{hub.server_port}", HF_HOME=str(tmp_path / "hf"))
    try:
        result = run_inference(
            "--model_name_or_path", "someone/no-such-model", "--instruction", "Hi.", check=False, env=env
        )
    finally:
        hub.shutdown()
    assert the_one_error_line(result).startswith("inference.py: error: cannot load someone/no-such-model: ")


@pytest.mark.slow
def test_ctrl_c_stops_an_answer_and_the_loop_goes_on(tiny_llama_dir):
    # The tiny model answers this instruction until --max_new_tokens: long enough to interrupt.
    # (Its answer is bytes that are no UTF-8, which only inference.py's decoder turns into the
    # text that it prints.)
    instruction = "Write a response."
    model, tokenizer = load_model_and_tokenizer(str(tiny_llama_dir))
    full = complete_batch(model, tokenizer, [format_prompt(instruction)], 200)[0].text.strip()
    process = start_inference(
        "--model_name_or_path",
        tiny_llama_dir,
        "--max_new_tokens",
        200,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    process.stdin.write(f"{instruction}\n\n".encode())
    process.stdin.flush()
    first = process.stdout.read(1)  # the answer is being written
    process.send_signal(signal.SIGINT)
    # The same instruction again, answered in full; then end of file.
    stdout, stderr = process.communicate(f"{instruction}\n\n".encode(), timeout=120)
    stdout, stderr = (first + stdout).decode(), stderr.decode()
    assert process.returncode == 0 and "Traceback" not in stderr, stderr[-3000:]
    assert stderr.count("(stopped)") == 1 and stderr.count("Instruction: ") == 3
    assert stdout.endswith("\n" + full + "\n")
    stopped = stdout[: -len(full) - 2]
    assert stopped and full.startswith(stopped) and len(stopped) < len(full)


@pytest.mark.slow
def test_ctrl_c_stops_a_batch_that_the_same_command_resumes(tiny_llama_dir, tmp_path):
    input_file, output_file = tmp_path / "eval.json", tmp_path / "outputs.json"
    jdump([{"instruction": "Write a response."}] * 2, input_file)  # each one runs to --max_new_tokens
    args = ["--model_name_or_path", tiny_llama_dir, "--input_file", input_file, "--output_file", output_file]
    args += ["--batch_size", 1, "--max_new_tokens", 150]
    process = start_inference(*args, stderr=subprocess.PIPE, text=True)
    while not output_file.exists():  # written after the first batch
        assert process.poll() is None, process.stderr.read()[-3000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    line = (
        f"inference.py: interrupted; 1 of 2 responses are saved in {output_file}: "
        "run the same command again to generate the rest"
    )
    assert stderr.rstrip().endswith("\n" + line)
    saved = jload(output_file)
    assert len(saved) == 1

    result = run_inference(*args)
    assert "1 of 2 records already" in result.stderr.decode()
    assert jload(output_file) == saved * 2  # the same greedy response: the saved one was whole
