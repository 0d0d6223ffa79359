"""Exact ROUGE-L similarity of new instructions against a growing pool, hundreds of times faster
than computing it pair by pair with rouge_score.

The self-instruct generator keeps a candidate instruction only when its ROUGE-L F-measure against
every instruction it already holds is at most 0.7. The original ran rouge_score's pure-Python LCS
once per pair. Here each distinct word gets an integer id, written as one character, so that an
instruction becomes a short string and rapidfuzz's bit-parallel LCS (vectorised over many
candidates at once in `process.cdist`) counts common words. The F-measure is then computed with
rouge_score's float formula, operation for operation, so every score is bit-identical to
`rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)` and every keep/drop decision is the same.
"""

import collections
import re
from collections.abc import Iterable, Sequence

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import LCSseq

_TOKEN_RE = re.compile(r"[a-z0-9]+")
# Characters are code points: one id per distinct word, so at most this many distinct words.
_MAX_VOCABULARY = 0x110000


def rouge_tokenize(text: str) -> list[str]:
    """rouge_score's default tokenizer without stemming: lower-case the text, then every maximal
    run of a-z/0-9 is a token (rouge_score replaces the other characters by spaces and splits)."""
    return _TOKEN_RE.findall(text.lower())


def rouge_l_fmeasure(lcs: np.ndarray, target_length: np.ndarray, prediction_length: np.ndarray) -> np.ndarray:
    """rouge_score's ROUGE-L F-measure from LCS lengths and token counts (numpy broadcasting):
    precision = lcs / len(prediction), recall = lcs / len(target), F = 2*p*r / (p+r), and 0 when
    p + r is 0 or either side has no tokens. Same float64 operations in the same order, so the
    result is bit-identical to rouge_score's."""
    shape = np.broadcast_shapes(np.shape(lcs), np.shape(target_length), np.shape(prediction_length))
    lcs = np.array(np.broadcast_to(lcs, shape), dtype=np.float64)  # our own copy: the rest works in place
    # Token counts as floats (exact; numpy divides float by float much faster). A side without
    # tokens has an LCS of 0, so counting it as 1 token gives p = r = 0 and F = 0, as rouge_score.
    target_length = np.maximum(np.asarray(target_length, dtype=np.float64), 1.0)
    prediction_length = np.maximum(np.asarray(prediction_length, dtype=np.float64), 1.0)
    precision = np.divide(lcs, prediction_length, out=np.empty(shape))
    recall = np.divide(lcs, target_length, out=lcs)
    total = np.add(precision, recall, out=np.empty(shape))
    fmeasure = np.multiply(precision, 2, out=precision)  # 2 * p * r / (p + r), in rouge_score's order
    fmeasure *= recall
    # p + r is 0 only when the LCS is 0, and then so is 2*p*r: dividing by the smallest positive
    # float instead gives F = 0, and leaves every positive p + r (at least 1/length) unchanged.
    fmeasure /= np.maximum(total, np.finfo(np.float64).tiny, out=total)
    return fmeasure


def max_possible_fmeasure(length_a: np.ndarray, length_b: np.ndarray) -> np.ndarray:
    """The highest F-measure two instructions of these token counts can reach (their LCS is at most
    the shorter one). F grows with the LCS in steps far larger than float rounding, so a pair whose
    bound is not above the threshold can be skipped without changing any decision."""
    shorter = np.minimum(length_a, length_b)
    return rouge_l_fmeasure(shorter, length_a, length_b)


class RougeLIndex:
    """Instructions indexed for exact ROUGE-L F-measure queries, in insertion order.

    `scores(x)[i]` equals rouge_score's rougeL F-measure of x against the i-th indexed instruction,
    bit for bit. `add_if_novel` runs the generator's keep/drop rule over a batch of candidates.
    `workers` is the number of threads rapidfuzz may use (-1: all cores)."""

    def __init__(self, instructions: Iterable[str] = (), workers: int = -1):
        self.instructions: list[str] = []
        self.workers = workers
        self._vocabulary: dict[str, int] = {}
        self._encoded: list[str] = []
        self._lengths = np.zeros(64, dtype=np.int64)  # grown by doubling; the first len(self) are valid
        instructions = list(instructions)
        self._register_words(instructions)
        for instruction in instructions:
            self.add(instruction)

    def __len__(self) -> int:
        return len(self.instructions)

    @property
    def lengths(self) -> np.ndarray:
        """Token counts of the indexed instructions (a view; do not modify)."""
        return self._lengths[: len(self)]

    def _register_words(self, instructions: Sequence[str]) -> None:
        """Give new words ids, most frequent first: rapidfuzz looks up characters below 256 in a
        table and others in a hash map, so frequent words with small ids make the LCS faster."""
        frequencies = collections.Counter(
            token for instruction in instructions for token in rouge_tokenize(instruction)
        )
        for token, _ in frequencies.most_common():
            self._vocabulary.setdefault(token, len(self._vocabulary))

    def encode(self, instruction: str) -> str:
        """The instruction as a string with one character per rouge token (new words get new ids)."""
        ids = [self._vocabulary.setdefault(token, len(self._vocabulary)) for token in rouge_tokenize(instruction)]
        if len(self._vocabulary) > _MAX_VOCABULARY:
            raise ValueError(f"more than {_MAX_VOCABULARY} distinct words: too many for one index")
        return "".join(map(chr, ids))

    def add(self, instruction: str) -> None:
        """Index one more instruction (it gets the next position)."""
        self._append(instruction, self.encode(instruction))

    def _append(self, instruction: str, encoded: str) -> None:
        if len(self) == len(self._lengths):
            self._lengths = np.concatenate([self._lengths, np.zeros_like(self._lengths)])
        self._lengths[len(self)] = len(encoded)
        self.instructions.append(instruction)
        self._encoded.append(encoded)

    def _lcs_fmeasures(self, queries: Sequence[str], choices: Sequence[str], choice_lengths: np.ndarray) -> np.ndarray:
        """F-measures of encoded queries (rows, the rouge "target") against encoded choices
        (columns, the rouge "prediction"), all pairs in one rapidfuzz call."""
        if not queries or not choices:
            return np.zeros((len(queries), len(choices)))
        lcs = process.cdist(queries, choices, scorer=LCSseq.similarity, dtype=np.int32, workers=self.workers)
        query_lengths = np.array([len(q) for q in queries], dtype=np.int64)
        return rouge_l_fmeasure(lcs, query_lengths[:, None], choice_lengths[None, :])

    def scores(self, instruction: str) -> np.ndarray:
        """F-measures of `instruction` against every indexed instruction, in insertion order."""
        return self.scores_many([instruction])[0]

    def scores_many(self, instructions: Sequence[str]) -> np.ndarray:
        """A (len(instructions), len(self)) matrix of F-measures, computed in one batched call."""
        encoded = [self.encode(instruction) for instruction in instructions]
        return self._lcs_fmeasures(encoded, self._encoded, self.lengths)

    def add_if_novel(self, candidates: Sequence[str], threshold: float = 0.7) -> list[np.ndarray | None]:
        """The generator's rule, candidate by candidate in order: drop a candidate whose F-measure
        against any indexed instruction, or any candidate kept before it in this batch, is above
        `threshold`; otherwise index it. Returns, per candidate, None when dropped, else its scores
        against everything indexed before it (for `most_similar` and the average)."""
        encoded = [self.encode(candidate) for candidate in candidates]
        against_index = self._lcs_fmeasures(encoded, self._encoded, self.lengths)
        lengths = np.array([len(e) for e in encoded], dtype=np.int64)
        among_batch = self._lcs_fmeasures(encoded, encoded, lengths)
        results: list[np.ndarray | None] = []
        kept_in_batch: list[int] = []
        for i, candidate in enumerate(candidates):
            row = np.concatenate([against_index[i], among_batch[i, kept_in_batch]])
            if row.size and row.max() > threshold:
                results.append(None)
                continue
            results.append(row)
            kept_in_batch.append(i)
            self._append(candidate, encoded[i])
        return results

    def most_similar(self, scores: np.ndarray, k: int = 10) -> dict[str, float]:
        """The k highest of `scores` (as returned for a candidate) as {instruction: score}, highest
        first; ties go to the instruction indexed first."""
        if len(scores) > k:
            kth_highest = np.partition(scores, len(scores) - k)[len(scores) - k]
            positions = np.flatnonzero(scores >= kth_highest)
        else:
            positions = np.arange(len(scores))
        positions = positions[np.argsort(-scores[positions], kind="stable")][:k]
        return {self.instructions[p]: float(scores[p]) for p in positions}

    def deduplicate(self, instructions: Sequence[str], threshold: float = 0.7, chunk_size: int = 1024) -> list[bool]:
        """Add a whole list in one pass with the same rule as `add_if_novel` (each instruction
        against everything indexed and every earlier kept one), returning keep flags. Only the
        decisions are computed, which lets the length bound skip every pair whose token counts
        cannot reach the threshold."""
        self._register_words(instructions)
        keep: list[bool] = []
        for start in range(0, len(instructions), chunk_size):
            chunk = list(instructions[start : start + chunk_size])
            encoded = [self.encode(instruction) for instruction in chunk]
            lengths = np.array([len(e) for e in encoded], dtype=np.int64)
            too_similar = self._exceeds_index(encoded, lengths, threshold)
            among_chunk = self._lcs_fmeasures(encoded, encoded, lengths) > threshold
            kept_in_chunk: list[int] = []
            for i, instruction in enumerate(chunk):
                if too_similar[i] or among_chunk[i, kept_in_chunk].any():
                    keep.append(False)
                    continue
                keep.append(True)
                kept_in_chunk.append(i)
                self._append(instruction, encoded[i])
        return keep

    def _exceeds_index(
        self, encoded: list[str], lengths: np.ndarray, threshold: float, group_size: int = 64
    ) -> np.ndarray:
        """Whether each encoded query has an F-measure above `threshold` against the index,
        comparing only with indexed instructions whose token count could get there."""
        order = np.argsort(self.lengths, kind="stable")
        sorted_lengths = self.lengths[order]
        sorted_encoded = [self._encoded[i] for i in order]
        distinct_lengths = np.unique(sorted_lengths)
        exceeds = np.zeros(len(encoded), dtype=bool)
        by_length = np.argsort(lengths, kind="stable")
        # Queries of similar length share one window of candidate lengths and one cdist call.
        for group_start in range(0, len(by_length), group_size):
            group = by_length[group_start : group_start + group_size]
            reachable = np.zeros(len(distinct_lengths), dtype=bool)
            for m in np.unique(lengths[group]):
                reachable |= max_possible_fmeasure(m, distinct_lengths) > threshold
            if not reachable.any():
                continue
            low = np.searchsorted(sorted_lengths, distinct_lengths[reachable].min(), side="left")
            high = np.searchsorted(sorted_lengths, distinct_lengths[reachable].max(), side="right")
            fmeasures = self._lcs_fmeasures(
                [encoded[i] for i in group], sorted_encoded[low:high], sorted_lengths[low:high]
            )
            exceeds[group] = (fmeasures > threshold).any(axis=1)
        return exceeds
