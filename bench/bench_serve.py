"""Serving throughput on the embedded SmolLM2-135M-Instruct, greedy, the same Alpaca prompts:

- single stream: the previous server's way (transformers' `generate` with a streamer, one
  request at a time, plain `nn.Linear` layers) vs server.py's decoding loop with the linear
  layers prepacked for oneDNN, as inference.py serves (the model on the main thread), one
  streaming client over HTTP;
- 8 concurrent clients vs 1 against server.py (aggregate completion tokens per second over 16
  prompts: each of the 8 clients sends its next prompt as soon as the last one is answered, so
  requests arrive while others are being generated, as they do from the generator);
- the single stream again with `--dtype float16` (float16 linear weights, float32 arithmetic),
  against the same baseline; its texts may differ from float32's, and how many do is printed;
- the single stream and 8 clients vs 1 again with `--backend onnxruntime` (the decoding steps in
  ONNX Runtime, onnx_decode.py; the first run exports the step, which takes minutes, and says
  how long), how many texts are those of float32 PyTorch;
- with a `llama-server` binary on PATH, the ratio of server.py's single streams to it (the same
  model, converted to GGUF by llama.cpp's tools: pass one or more with --gguf).

Both float32 single-stream runs must produce the same text. Run: .venv/bin/python -m bench.bench_serve"""

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

from bench.common import ROOT

INSTRUCTIONS = [
    "Give three tips for staying healthy.",
    "Describe the water cycle.",
    "Write a short poem about the sea.",
    "Explain what a neural network is.",
    "List five fruits and their colours.",
    "How do I make a cup of tea?",
    "Name three famous painters.",
    "What is the capital of France, and why is it famous?",
    "Suggest a name for a small bookshop.",
    "Why is the sky blue?",
    "Give me a recipe for pancakes.",
    "What are the benefits of regular exercise?",
    "Summarise the plot of Romeo and Juliet.",
    "How does a bicycle stay upright?",
    "Write a haiku about autumn.",
    "Explain the difference between weather and climate.",
]


def stream_tokens(base_url: str, prompt: str, max_tokens: int) -> tuple[str, int]:
    """One streamed completion over HTTP: its text and completion tokens (from the usage chunk)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    body["stream_options"] = {"include_usage": True}
    request = urllib.request.Request(
        base_url + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    text, tokens = "", 0
    with urllib.request.urlopen(request, timeout=600) as reply:
        for line in reply:
            data = line.decode().strip().removeprefix("data: ")
            if not data or data == "[DONE]":
                continue
            chunk = json.loads(data)
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                text += choice["text"]
    return text, tokens


def clients(base_url: str, prompts: list[str], max_tokens: int, concurrency: int) -> tuple[list[str], float]:
    """Every prompt sent by `concurrency` clients at once: the texts and aggregate tokens/s."""
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda p: stream_tokens(base_url, p, max_tokens), prompts))
    seconds = time.perf_counter() - start
    return [text for text, _ in results], sum(tokens for _, tokens in results) / seconds


def client_runs(url: str, runs: list[tuple[list[str], int]], max_tokens: int) -> list[tuple[list[str], float]]:
    """`clients` for each (prompts, concurrency) in turn."""
    return [clients(url, prompts, max_tokens, concurrency) for prompts, concurrency in runs]


def while_serving(model, tokenizer, max_tokens: int, runs: list[tuple[list[str], int]], step=None) -> list:
    """`client_runs` against server.py from a client process of its own (as the generator or
    lm-eval would be), while the server runs its model on this, the main, thread as
    `inference.py --serve` does."""
    from server import InferenceServer

    defaults = dict(temperature=0.0, top_p=1.0, top_k=0, num_beams=1, repetition_penalty=1.0)
    httpd = InferenceServer(
        ("127.0.0.1", 0), model, tokenizer, "bench", max_tokens, 8, defaults, scheduler_thread=False, step=step
    )
    httpd.RequestHandlerClass.log_message = lambda *a: None
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            result = pool.submit(client_runs, f"http://127.0.0.1:{httpd.server_port}", runs, max_tokens)
            result.add_done_callback(lambda _: httpd.stopping.set())
            httpd.serve_until_stopped()
    finally:
        httpd.server_close()
    return result.result()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max_tokens", type=int, default=48)
    parser.add_argument("--single", type=int, default=3, help="prompts for the single-stream runs")
    parser.add_argument("--gguf", nargs="+", default=[], help="the model as GGUF files, for llama-server (on PATH)")
    args = parser.parse_args()

    from embedded_model import embedded_model_path
    from generation import pack_linear_layers, stream_completion
    from inference import load_model_and_tokenizer
    from onnx_decode import load_decode_step
    from utils import format_prompt

    cache_dir = os.environ.get("ALPACA_CACHE") or str(ROOT / ".cache" / "alpaca")
    model_dir = embedded_model_path(cache_dir)
    model, tokenizer = load_model_and_tokenizer(model_dir)
    prompts = [format_prompt(instruction) for instruction in INSTRUCTIONS]
    single = prompts[: args.single]

    # The previous server: generate with a streamer, one request at a time.
    start, baseline_texts, baseline_tokens = time.perf_counter(), [], 0
    for prompt in single:
        pieces = list(stream_completion(model, tokenizer, prompt, args.max_tokens, do_sample=False))
        baseline_texts.append("".join(p for p, _ in pieces))
        baseline_tokens += min(args.max_tokens, len(tokenizer(baseline_texts[-1])["input_ids"]))
    baseline = baseline_tokens / (time.perf_counter() - start)

    start = time.perf_counter()
    step = load_decode_step(model, cache_dir)  # from the plain layers, as inference.py --backend onnxruntime does
    step_seconds = time.perf_counter() - start
    packed = pack_linear_layers(model)  # as inference.py does after loading

    runs = [(single, 1), (prompts, 1), (prompts, 8)]
    (ours_texts, ours), (one_texts, one), (eight_texts, eight) = while_serving(model, tokenizer, args.max_tokens, runs)
    assert ours_texts == baseline_texts, "server.py's greedy text differs from generate's"
    assert eight_texts == one_texts, "8 concurrent clients got other text than 1 at a time"
    (onnx_texts, onnx), (onnx_one_texts, onnx_one), (onnx_eight_texts, onnx_eight) = while_serving(
        model, tokenizer, args.max_tokens, runs, step
    )
    assert onnx_eight_texts == onnx_one_texts, "with onnxruntime, 8 concurrent clients got other text than 1 at a time"
    onnx_same = sum(a == b for a, b in zip(onnx_texts + onnx_one_texts, ours_texts + one_texts))
    del model, step

    half_model, _ = load_model_and_tokenizer(model_dir, dtype="float16")
    half_packed = pack_linear_layers(half_model)
    [(half_texts, half)] = while_serving(half_model, tokenizer, args.max_tokens, [(single, 1)])
    same = sum(a == b for a, b in zip(half_texts, baseline_texts))

    print(f"server.py: {packed} linear layers prepacked for oneDNN, {half_packed} for fbgemm in float16 (0: plain)")
    print(f"single stream: {baseline:.1f} tok/s before (generate + streamer), {ours:.1f} tok/s server.py; same text")
    print(f"serve-single: ratio={ours / baseline:.2f} (baseline={baseline:.1f} tok/s, ours={ours:.1f} tok/s)")
    print(
        f"serve-single-float16: ratio={half / baseline:.2f} (baseline={baseline:.1f} tok/s, ours={half:.1f} tok/s "
        f"with --dtype float16; {same} of {len(single)} texts as in float32)"
    )
    print(
        f"serve-concurrent: ratio={eight / one:.2f} (baseline={one:.1f} tok/s with 1 client, ours={eight:.1f} tok/s with 8)"
    )
    print(
        f"serve-single-onnxruntime: ratio={onnx / baseline:.2f} (baseline={baseline:.1f} tok/s, ours={onnx:.1f} tok/s "
        f"with --backend onnxruntime; {onnx_same} of {len(single) + len(prompts)} texts as in float32 PyTorch; "
        f"the step loaded in {step_seconds:.0f} s)"
    )
    print(
        f"serve-concurrent-onnxruntime: ratio={onnx_eight / onnx_one:.2f} (baseline={onnx_one:.1f} tok/s with 1 client, "
        f"ours={onnx_eight:.1f} tok/s with 8)"
    )
    for gguf in args.gguf:
        llama_server(gguf, args.max_tokens, single, {"float32": ours, "float16": half, "onnxruntime": onnx})


def llama_server(gguf: str, max_tokens: int, prompts: list[str], ours: dict[str, float]) -> None:
    binary = shutil.which("llama-server")
    if binary is None:
        print("llama-server: not run (needs llama-server on PATH)")
        return
    port = 8765
    process = subprocess.Popen(
        [binary, "-m", gguf, "--port", str(port), "-t", str(os.cpu_count())],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        _, theirs = clients(url, prompts, max_tokens, 1)
    finally:
        process.terminate()
        process.wait()
    for dtype, tokens_per_second in ours.items():
        print(
            f"serve-vs-llama-server: ratio={tokens_per_second / theirs:.2f} (baseline={theirs:.1f} tok/s llama-server "
            f"on {os.path.basename(gguf)}, ours={tokens_per_second:.1f} tok/s in {dtype})"
        )


if __name__ == "__main__":
    main()
