"""Pure scoring cores for generated questions: novelty, diversity, rigor and difficulty.

The reward callbacks (``callbacks/rewards.py``), the judge cluster and ``qgen score`` wrap these; they
work on plain strings and are unit-tested on fixed texts.

Similarity is TF-IDF cosine over character 2-4-grams (``char_wb``), which works for Chinese, where word
tokens would treat a whole sentence as one token. Before vectorising, text is lower-cased and every digit
becomes ``0``: a question whose numbers alone were changed is *not* new, and scores as a near-copy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from sklearn.feature_extraction.text import TfidfVectorizer

from qgen.formatting import ParsedQuestion
from qgen.records import Question

_DIGITS = re.compile(r"\d")
_SPACE = re.compile(r"\s+")


def normalize_for_similarity(text: str) -> str:
    return _SPACE.sub(" ", _DIGITS.sub("0", text.lower())).strip()


def char_vectorizer(max_features: int | None = 2**18) -> TfidfVectorizer:
    return TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True, max_features=max_features,
                           preprocessor=normalize_for_similarity, dtype=np.float32)  # fmt: skip


@dataclass
class ScoringBatch:
    """What every scorer sees for one GRPO step (or one file of questions): ``N`` completions."""

    texts: list[str]
    parsed: list[ParsedQuestion]
    records: list[Question | None]  # the record behind each completion's prompt (None when scoring a file)
    languages: list[str]
    truncated: list[bool]
    group_size: int = 1


@dataclass
class RewardOutput:
    values: np.ndarray  # [N] in [0, 1]
    factor: np.ndarray | None = None  # [N] multiplier of the total reward (the novelty penalty)
    extra: dict[str, np.ndarray] = field(default_factory=dict)


class NoveltyIndex:
    """A bank of known questions and the maximum TF-IDF cosine similarity of new texts to it.

    The vocabulary and IDF are fitted once on the initial bank; questions added later are vectorised with
    them and appended. The product is a sparse ``[n, F] x [F, bank]`` multiplication.
    """

    def __init__(self, bank: list[str], max_features: int | None = 2**18):
        if not bank:
            raise ValueError("the novelty bank is empty: give it at least one known question")
        self.vectorizer = char_vectorizer(max_features)
        self._blocks = [self.vectorizer.fit_transform(bank).T.tocsr()]  # [F, bank] blocks
        self.texts: list[str] = []  # questions added after fitting, in order
        self.initial_size = len(bank)

    def __len__(self) -> int:
        return self.initial_size + len(self.texts)

    def add(self, texts: list[str]) -> None:
        if texts:
            self._blocks.append(self.vectorizer.transform(texts).T.tocsr())
            self.texts.extend(texts)
            if len(self._blocks) > 8:  # keep the product a few big blocks, not many small ones
                self._blocks = [sp.hstack(self._blocks, format="csr")]

    def max_similarity(self, texts: list[str]) -> np.ndarray:
        """``[n]`` highest cosine similarity of each text to any question in the bank."""
        q = self.vectorizer.transform(texts)  # [n, F]
        best = np.zeros(len(texts), dtype=np.float32)
        for block in self._blocks:
            sims = (q @ block).toarray()  # [n, bank_block]
            best = np.maximum(best, sims.max(axis=1) if sims.size else best)
        return best


def group_diversity(texts: list[str], group_size: int) -> np.ndarray:
    """``[N]``: 1 - mean similarity of each completion to the others of its group (1 = unlike all others)."""
    out = np.ones(len(texts), dtype=np.float32)
    for start in range(0, len(texts), group_size):
        group = [t if t.strip() else "(empty)" for t in texts[start : start + group_size]]
        if len(group) < 2:
            continue
        try:
            mat = char_vectorizer(None).fit_transform(group)
        except ValueError:  # no n-grams at all (e.g. one-character texts)
            continue
        sims = (mat @ mat.T).toarray()  # [g, g]
        np.fill_diagonal(sims, 0.0)
        out[start : start + len(group)] = 1.0 - sims.sum(axis=1) / (len(group) - 1)
    return np.clip(out, 0.0, 1.0)


CONNECTIVES = {
    "zh": ("因为", "所以", "故", "即", "由于", "因此", "从而", "则", "可得", "得", "由", "又", "综上", "于是"),
    "en": ("since", "therefore", "hence", "thus", "because", "so ", "it follows", "we get", "we have", "implies", "then"),
}


def rigor_score(parsed: ParsedQuestion, language: str, truncated: bool) -> float:
    """Logical rigor of one generated question, in [0, 1].

    0.3 x share of the sections present (question, answer, analysis) + 0.2 x answer consistent (a
    non-empty answer; for multiple choice, only letters that are among the options) + 0.3 x density of
    reasoning connectives in the analysis (one per 40 characters scores 1) + 0.2 x not truncated.
    """
    sections = sum(bool(s.strip()) for s in (parsed.question, parsed.answer, parsed.analysis)) / 3
    answer = parsed.answer.strip()
    if parsed.options:
        letters = set(re.findall(r"[A-H]", answer.upper()))
        consistent = bool(letters) and letters <= set(parsed.options)
    else:
        consistent = bool(answer)
    analysis = parsed.analysis.lower()
    words = CONNECTIVES["zh" if language == "zh" else "en"]
    hits = sum(analysis.count(w) for w in words)
    density = min(1.0, hits / max(1.0, len(analysis) / 40)) if analysis else 0.0
    return 0.3 * sections + 0.2 * consistent + 0.3 * density + 0.2 * (not truncated)


_HARD_WORDS = ("证明", "求证", "取值范围", "最大值", "最小值", "恒成立", "存在", "数列", "导数", "prove", "show that",
               "maximum", "minimum", "for all", "integer", "how many", "probability", "sequence", "polynomial")  # fmt: skip


def heuristic_difficulty(question: str, analysis: str = "") -> float:
    """The seed recipe's fallback, in [0, 1]: longer statements and solutions and 'hard' keywords score higher."""
    text = f"{question} {analysis}".lower()
    length = min(1.0, len(text) / 1200)
    keywords = min(1.0, sum(w in text for w in _HARD_WORDS) / 4)
    formulas = min(1.0, text.count("$") / 40)
    return float(0.5 * length + 0.3 * keywords + 0.2 * formulas)


class DifficultyModel:
    """Difficulty in [0, 1] learned from labelled questions: TF-IDF (char 2-4-grams plus word 1-2-grams)
    over question + solution, a log-length feature, and ridge regression. Without labels it is the heuristic."""

    def __init__(self, alpha: float = 3.0, max_features: int = 2**17):
        self.alpha, self.max_features = alpha, max_features
        self.pipeline = None
        self.n_train = 0

    @staticmethod
    def _text(question: str, analysis: str) -> str:
        return f"{question}\n{analysis}"

    def _features(self, texts: list[str], fit: bool):
        chars, words = self._vectorizers
        lengths = sp.csr_matrix(np.log1p([[len(t)] for t in texts]).astype(np.float32) / 8)
        parts = [chars.fit_transform(texts), words.fit_transform(texts)] if fit else [chars.transform(texts), words.transform(texts)]
        return sp.hstack(parts + [lengths], format="csr")

    def fit(self, records: list[Question]) -> DifficultyModel:
        from sklearn.linear_model import Ridge

        labelled = [r for r in records if r.difficulty is not None]
        if len(labelled) < 20:
            return self
        self._vectorizers = (
            char_vectorizer(self.max_features),
            TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, max_features=self.max_features, min_df=2, dtype=np.float32),
        )
        x = self._features([self._text(r.question, r.analysis) for r in labelled], fit=True)
        self.pipeline = Ridge(alpha=self.alpha).fit(x, np.array([r.difficulty for r in labelled], dtype=np.float32))
        self.n_train = len(labelled)
        return self

    def predict(self, questions: list[str], analyses: list[str] | None = None) -> np.ndarray:
        analyses = analyses or [""] * len(questions)
        if self.pipeline is None:
            return np.array([heuristic_difficulty(q, a) for q, a in zip(questions, analyses)], dtype=np.float32)
        x = self._features([self._text(q, a) for q, a in zip(questions, analyses)], fit=False)
        return np.clip(self.pipeline.predict(x), 0.0, 1.0).astype(np.float32)
