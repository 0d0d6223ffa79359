"""rouge_dedup.py gives rouge_score's ROUGE-L F-measures bit for bit, and the original generator's
keep/drop decisions and statistics. Budget: about 15 s on 2 cores."""

import random
from functools import partial

import numpy as np
import pytest
from rouge_score import rouge_scorer, tokenize

import utils
from helpers import shared_file
from rouge_dedup import RougeLIndex, max_possible_fmeasure, rouge_l_fmeasure, rouge_tokenize

SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def reference_tokens(text: str) -> list[str]:
    return SCORER._tokenizer.tokenize(text)


def reference_fmeasures(query: str, pool: list[str]) -> np.ndarray:
    """rouge_score's F-measures, the way the original generator called it (query as target)."""
    score = partial(rouge_scorer._score_lcs, reference_tokens(query))
    return np.array([score(reference_tokens(other)).fmeasure for other in pool])


def near_copies(instructions: list[str], count: int, seed: int = 0) -> list[str]:
    """Instructions with a word dropped, repeated or swapped: F-measures near and above 0.7."""
    rng = random.Random(seed)
    copies = []
    for instruction in rng.sample(instructions, count):
        words = instruction.split()
        i = rng.randrange(len(words))
        edit = rng.choice(("drop", "repeat", "swap"))
        if edit == "drop" and len(words) > 1:
            del words[i]
        elif edit == "repeat":
            words.insert(i, words[i])
        else:
            j = rng.randrange(len(words))
            words[i], words[j] = words[j], words[i]
        copies.append(" ".join(words))
    return copies


def original_dedup(seeds: list[str], candidates: list[str], threshold: float = 0.7):
    """The original generator's loop: each candidate against the seeds and every kept one."""
    pool, kept = list(seeds), []
    for candidate in candidates:
        scores = reference_fmeasures(candidate, pool)
        if scores.size and scores.max() > threshold:
            kept.append(None)
            continue
        kept.append(scores)
        pool.append(candidate)
    return kept


@pytest.fixture(scope="module")
def seed_instructions() -> list[str]:
    path = shared_file("seed_tasks.jsonl")
    return [record["instruction"] for record in utils.jload(str(path))]


@pytest.fixture(scope="module")
def alpaca_instructions() -> list[str]:
    data = utils.jload(str(shared_file("alpaca_data.json")))
    return [d["instruction"] for d in random.Random(0).sample(data, 2000)]


def test_tokenizer_is_rouge_score_s(seed_instructions, alpaca_instructions):
    tricky = [
        "",
        "   ",
        "???",
        "Hello, World!",
        "e-mail_address 42nd",
        "İstanbul ÇAĞ straße",
        "naïve café 3.14",
        "tab\there\nnew",
        "ＡＢＣ full-width",
    ]
    for text in tricky + seed_instructions + alpaca_instructions:
        assert rouge_tokenize(text) == tokenize.tokenize(text, None) == reference_tokens(text)


def test_fmeasure_formula_is_bit_identical_to_rouge_score():
    lengths = np.arange(0, 41)
    for target in lengths:
        for prediction in lengths:
            lcs = np.arange(0, min(target, prediction) + 1)
            ours = rouge_l_fmeasure(lcs, target, prediction)
            expected = [
                rouge_scorer._score_lcs(
                    ["a"] * common + ["x"] * (target - common), ["a"] * common + ["y"] * (prediction - common)
                ).fmeasure
                for common in lcs
            ]
            assert ours.tolist() == expected


def test_scores_on_the_original_seed_tasks_are_bit_identical(seed_instructions):
    index = RougeLIndex(seed_instructions)
    assert len(index) == 175
    matrix = index.scores_many(seed_instructions)
    for i, instruction in enumerate(seed_instructions):
        expected = reference_fmeasures(instruction, seed_instructions)
        assert index.scores(instruction).tobytes() == expected.tobytes()
        assert matrix[i].tobytes() == expected.tobytes()


def test_scores_on_2000_alpaca_instructions_are_bit_identical(alpaca_instructions):
    index = RougeLIndex(alpaca_instructions)
    queries = alpaca_instructions[:25] + near_copies(alpaca_instructions, 25)
    matrix = index.scores_many(queries)
    assert (matrix > 0.7).sum() >= 45  # the near copies score high against their originals
    for query, row in zip(queries, matrix):
        assert row.tobytes() == reference_fmeasures(query, alpaca_instructions).tobytes()


def test_instructions_without_tokens_score_zero():
    index = RougeLIndex(["???", "Name three fruits."])
    assert index.scores("!!!").tolist() == [0.0, 0.0]
    assert index.scores("Name three fruits.").tolist() == [0.0, 1.0]
    assert RougeLIndex().scores("anything").shape == (0,)


def test_many_distinct_words_stay_exact():
    # Over 0xD800 distinct words: ids pass the surrogate range and the 16-bit range.
    instructions = [" ".join(f"w{i * 10 + j}" for j in range(10)) for i in range(7000)]
    index = RougeLIndex(instructions)
    query = "w5 w69990 w12 w3 w69995 zzz w69999"
    assert index.scores(query).tobytes() == reference_fmeasures(query, instructions).tobytes()
    assert index.scores(query)[-1] > 0


def test_add_if_novel_matches_the_original_loop(seed_instructions, alpaca_instructions):
    candidates = alpaca_instructions[:150] + near_copies(seed_instructions + alpaca_instructions[:150], 100, seed=1)
    random.Random(2).shuffle(candidates)
    expected = original_dedup(seed_instructions, candidates)
    index = RougeLIndex(seed_instructions)
    ours = []
    for start in range(0, len(candidates), 40):  # batches, as the generator folds one request at a time
        ours += index.add_if_novel(candidates[start : start + 40])
    assert [s is None for s in ours] == [s is None for s in expected]
    assert 20 < sum(s is None for s in ours) < 200
    for got, want in zip(ours, expected):
        if want is not None:
            assert got.tobytes() == want.tobytes()
            assert float(np.mean(got)) == float(np.mean(want))
    assert index.instructions == seed_instructions + [c for c, s in zip(candidates, ours) if s is not None]


def test_most_similar_is_the_top_ten_highest_first():
    index = RougeLIndex(["a b c d", "a b c x", "a b y z", "a q r s", "p q r s", "a b c d"])
    scores = index.scores("a b c d")
    # The original's dict: the top k positions, so a repeated text takes one key for two places.
    assert index.most_similar(scores, 3) == {"a b c d": 1.0, "a b c x": 0.75}
    top = index.most_similar(scores, 10)
    assert list(top.items()) == [
        ("a b c d", 1.0),
        ("a b c x", 0.75),
        ("a b y z", 0.5),
        ("a q r s", 0.25),
        ("p q r s", 0.0),
    ]
    # Ties go to the instruction indexed first.
    tied = RougeLIndex(["q one", "q two", "q three"])
    assert list(tied.most_similar(tied.scores("q"), 2)) == ["q one", "q two"]


def test_length_bound_never_hides_a_pair_above_the_threshold():
    for m in range(0, 61):
        for n in range(0, 61):
            bound = max_possible_fmeasure(np.int64(m), np.int64(n))
            reachable = rouge_l_fmeasure(np.arange(0, min(m, n) + 1), m, n)
            assert reachable.max(initial=0.0) == bound


def test_deduplicate_in_one_pass_makes_the_same_decisions(seed_instructions, alpaca_instructions):
    candidates = alpaca_instructions + near_copies(alpaca_instructions, 300, seed=3)
    random.Random(4).shuffle(candidates)
    batched = RougeLIndex(seed_instructions)
    expected = []
    for start in range(0, len(candidates), 80):
        expected += [s is not None for s in batched.add_if_novel(candidates[start : start + 80])]
    one_pass = RougeLIndex(seed_instructions)
    assert one_pass.deduplicate(candidates, chunk_size=256) == expected
    assert one_pass.instructions == batched.instructions
    assert 100 < expected.count(False) < 400


def test_a_score_of_exactly_the_threshold_is_kept():
    # 7 common words of 10 and 10: F is exactly 0.7, which the original keeps (it drops > 0.7).
    seed, at_threshold, above = "a b c d e f g h i j", "a b c d e f g x y z", "a b c d e f g h y z"
    assert reference_fmeasures(at_threshold, [seed]).tolist() == [0.7]
    assert [s is not None for s in RougeLIndex([seed]).add_if_novel([at_threshold, above])] == [True, False]
    assert RougeLIndex([seed]).deduplicate([at_threshold, above]) == [True, False]
