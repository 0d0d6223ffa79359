"""Generation throughput against the local OpenAI-compatible test server at a fixed latency
(200 ms per request): kept instructions per second with 8 requests in flight vs one at a time
(the original sends one request at a time). Same seed, so both runs must write the same
regen.json. Uses the project's prompt.txt and seed_tasks.jsonl."""

import argparse
import pathlib
import tempfile
import time

import generate_instruction
from bench.common import ROOT
from tests.openai_server import OpenAIServer


def run(server: OpenAIServer, output_dir: pathlib.Path, concurrency: int, count: int) -> float:
    """Seconds to keep `count` instructions."""
    start = time.perf_counter()
    generate_instruction.generate_instruction_following_data(
        output_dir=str(output_dir), seed_tasks_path=str(ROOT / "seed_tasks.jsonl"), prompt_path=str(ROOT / "prompt.txt"),
        num_instructions_to_generate=count, model_name="test-model", api_base=server.base_url, seed=0,
        max_concurrency=concurrency, num_cpus=2,
    )  # fmt: skip
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--latency", type=float, default=0.2, help="seconds the server takes per request")
    parser.add_argument("--count", type=int, default=4000, help="instructions to keep in each run")
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as directory, OpenAIServer(latency=args.latency) as server:
        directory = pathlib.Path(directory)
        sequential = run(server, directory / "k1", 1, args.count)
        concurrent = run(server, directory / f"k{args.concurrency}", args.concurrency, args.count)
        first, second = ((directory / name / "regen.json").read_bytes() for name in ("k1", f"k{args.concurrency}"))
        assert first == second, "regen.json differs between the runs"
        kept = len(generate_instruction.load_machine_instructions(str(directory / "k1" / "regen.json")))
    baseline, ours = kept / sequential, kept / concurrent
    print(
        f"{kept} kept in {sequential:.2f} s at K=1 and {concurrent:.2f} s at K={args.concurrency}; regen.json identical"
    )
    print(
        f"generation: ratio={ours / baseline:.2f} (baseline={baseline:.1f} kept/s at K=1, ours={ours:.1f} kept/s at K={args.concurrency}, {args.latency * 1e3:.0f} ms latency)"
    )


if __name__ == "__main__":
    main()
