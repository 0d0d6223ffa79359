"""Judging throughput against the local OpenAI-compatible test server at a fixed latency (200 ms
per request): judgments per second with 8 requests in flight vs one at a time. Both runs must
write the same annotations.json; a rerun over the finished cache must make no request."""

import argparse
import pathlib
import tempfile
import time

import evaluate
from tests.openai_server import OpenAIServer, judged_pair


def verdict(prompt: str, model: str) -> str:
    _, first, second = judged_pair(prompt)
    return "1" if len(first) % 7 > len(second) % 7 else "2"


def run(server: OpenAIServer, files: tuple[str, str], output_dir: pathlib.Path, concurrency: int) -> float:
    """Seconds to judge every pair."""
    start = time.perf_counter()
    evaluate.win_rate(
        *files, "test-model", api_base=server.base_url, output_dir=str(output_dir), max_concurrency=concurrency
    )
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--latency", type=float, default=0.2, help="seconds the server takes per request")
    parser.add_argument("--pairs", type=int, default=40, help="pairs to judge (two judgments each)")
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as directory, OpenAIServer(writer=verdict, latency=args.latency) as server:
        directory = pathlib.Path(directory)
        files = []
        for name, words in (("tuned", "a fine answer"), ("base", "an answer")):
            records = [
                {"instruction": f"task {n}", "output": f"{words} {'!' * (n % 11)}", "generator": name}
                for n in range(args.pairs)
            ]
            evaluate.utils.jdump(records, str(directory / f"{name}.json"))
            files.append(str(directory / f"{name}.json"))
        sequential = run(server, files, directory / "k1", 1)
        concurrent = run(server, files, directory / f"k{args.concurrency}", args.concurrency)
        first, second = ((directory / n / "annotations.json").read_bytes() for n in ("k1", f"k{args.concurrency}"))
        assert first == second, "annotations.json differs between the runs"
        asked = len(server.requests)
        rerun = run(server, files, directory / f"k{args.concurrency}", args.concurrency)
        assert len(server.requests) == asked, "the rerun over a finished cache made requests"
    judgments = 2 * args.pairs
    baseline, ours = judgments / sequential, judgments / concurrent
    print(
        f"{judgments} judgments in {sequential:.2f} s at K=1 and {concurrent:.2f} s at K={args.concurrency}; "
        f"annotations.json identical; rerun over the cache: 0 requests in {rerun:.2f} s"
    )
    print(
        f"judge: ratio={ours / baseline:.2f} (baseline={baseline:.2f} judgments/s at K=1, ours={ours:.2f} judgments/s "
        f"at K={args.concurrency}, {args.latency * 1e3:.0f} ms latency)"
    )


if __name__ == "__main__":
    main()
