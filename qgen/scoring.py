"""Pure scoring cores for generated questions: novelty, diversity, rigor and difficulty.

The reward callbacks (``callbacks/rewards.py``), the judge cluster and ``qgen score`` wrap these; they
work on plain strings and are unit-tested on fixed texts.

Similarity is TF-IDF cosine over character 2-4-grams (``char_wb``), which works for Chinese, where word
tokens would treat a whole sentence as one token. Before vectorising, text is lower-cased and every number
becomes ``0``: a question whose numbers alone were changed is *not* new, and scores as a near-copy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.feature_extraction.text import TfidfVectorizer

from qgen.formatting import ParsedQuestion, parse_question
from qgen.records import Question

_DIGITS = re.compile(r"\d+(?:\.\d+)?")
_SPACE = re.compile(r"\s+")


def normalize_for_similarity(text: str) -> str:
    return _SPACE.sub(" ", _DIGITS.sub("0", text.lower())).strip()


def char_vectorizer(max_features: int | None = 2**18, vocabulary: list[str] | None = None) -> TfidfVectorizer:
    return TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True, max_features=max_features,
                           preprocessor=normalize_for_similarity, dtype=np.float32, vocabulary=vocabulary)  # fmt: skip


@dataclass
class ScoringBatch:
    """What every scorer sees for one GRPO step (or one file of questions): ``N`` completions."""

    texts: list[str]
    parsed: list[ParsedQuestion]
    records: list[Question | None]  # the record behind each completion's prompt (None when scoring a file)
    languages: list[str]
    truncated: list[bool]
    group_size: int = 1
    lengths: list[int] | None = None  # completion lengths in tokens (None when scoring a file of texts)
    subjects: list[str] | None = None  # per question; None: the records' subjects ("" without a record)
    knowledge: list[list[str] | None] | None = None  # intended knowledge points; None: the records'

    @classmethod
    def of_texts(cls, texts: list[str], records: list | None = None, truncated: list[bool] | None = None,
                 group_size: int = 1, lengths: list[int] | None = None) -> ScoringBatch:  # fmt: skip
        """Model outputs, parsed here; each one's language is its record's (``en`` without one)."""
        records = list(records) if records is not None else [None] * len(texts)
        return cls(texts, [parse_question(t) for t in texts], records, [r.language if r else "en" for r in records],
                   list(truncated) if truncated is not None else [False] * len(texts), group_size, lengths)  # fmt: skip

    @property
    def questions(self) -> list[str]:
        """Each question's stem, or its raw text when it does not parse (what novelty and difficulty read)."""
        return [p.question or t for p, t in zip(self.parsed, self.texts)]

    def subject_list(self) -> list[str]:
        if self.subjects is not None:
            return list(self.subjects)
        return [r.subject if r is not None else "" for r in self.records]

    def knowledge_list(self) -> list[list[str] | None]:
        if self.knowledge is not None:
            return list(self.knowledge)
        return [r.knowledge if r is not None else None for r in self.records]


@dataclass
class RewardOutput:
    values: np.ndarray  # [N] in [0, 1]
    factor: np.ndarray | None = None  # [N] multiplier of the total reward (the novelty penalty)
    extra: dict[str, np.ndarray] = field(default_factory=dict)


def combine_scores(scorers: dict, texts: list[str], records: list, truncated: list[bool], group_size: int = 1,
                   normalize: bool = False, lengths: list[int] | None = None,
                   ) -> tuple[np.ndarray, dict[str, RewardOutput]]:  # fmt: skip
    """Score ``texts`` with every scorer (reward / judge callbacks: ``weight`` and ``score(batch)``).

    Returns the total of :func:`aggregate` (``sum_i w_i s_i``, divided by ``sum_i w_i`` with ``normalize``, times
    every scorer's ``factor``: the near-copy penalty) and each scorer's output. ``lengths``: the completions'
    token counts, for scorers that need them.
    """
    batch = ScoringBatch.of_texts(texts, records, truncated, group_size, lengths)
    outputs = {name: scorer.score(batch) for name, scorer in scorers.items()}
    total = aggregate(outputs, {name: scorer.weight for name, scorer in scorers.items()}, normalize=normalize)
    return total, outputs


def aggregate(outputs: dict[str, RewardOutput], weights: dict[str, float], normalize: bool = False,
              group_size: int | None = None) -> np.ndarray:  # fmt: skip
    """The one way a question's components become its total (``[N]``, float32); a missing weight counts 1.

    Without ``group_size`` (``sum_then_normalize``, and the distillation cluster with ``normalize``): the weighted
    sum of the components (over the sum of the weights with ``normalize``), times every component's ``factor``.
    With ``group_size`` (GRPO's ``normalize_then_sum``): each component, times the factors, is standardised
    within its group of ``group_size`` first (:func:`qgen.losses.group_advantages`), then weighted and summed.
    """
    n = len(next(iter(outputs.values())).values)
    factor = np.ones(n, dtype=np.float32)
    for out in outputs.values():
        if out.factor is not None:
            factor = factor * np.asarray(out.factor, dtype=np.float32)
    if group_size is not None:
        from qgen.losses import group_advantages

        total = torch.zeros(n)
        for name, out in outputs.items():
            values = torch.as_tensor(np.asarray(out.values, dtype=np.float32) * factor)
            total += weights.get(name, 1.0) * group_advantages(values.view(-1, group_size), "group_std").view(-1)
        return total.numpy()
    summed = sum(weights.get(name, 1.0) * np.asarray(out.values, dtype=np.float32) for name, out in outputs.items())
    if normalize:
        summed = summed / (sum(weights.get(name, 1.0) for name in outputs) or 1.0)
    return np.asarray(summed * factor, dtype=np.float32)


def _top_k_rows(mat: sp.csr_matrix, k: int | None) -> sp.csr_matrix:
    """Keep the ``k`` largest weights of each row (vectorised: one lexsort) and re-normalise rows to unit length."""
    mat = mat.tocsr().astype(np.float32)
    counts = np.diff(mat.indptr)
    rows = np.repeat(np.arange(mat.shape[0]), counts)
    if k is not None and mat.nnz and counts.max() > k:
        order = np.lexsort((-mat.data, rows))  # by row, heaviest first
        rank = np.arange(mat.nnz) - mat.indptr[rows[order]]
        keep = np.sort(order[rank < k])
        mat = sp.csr_matrix((mat.data[keep], mat.indices[keep], np.concatenate([[0], np.cumsum(np.minimum(counts, k))])),
                            shape=mat.shape)  # fmt: skip
        rows = rows[keep]
    norms = np.sqrt(np.bincount(rows, weights=mat.data.astype(np.float64) ** 2, minlength=mat.shape[0]))
    mat.data /= np.maximum(norms[rows], 1e-12).astype(np.float32)
    return mat


@dataclass
class _PrefixLists:
    """Prefix filtering of one bank block at one threshold (see :meth:`NoveltyIndex._prefix_lists`)."""

    lists: sp.csr_matrix  # [F, n]: weight of each row's prefix features (inverted lists, by feature)
    start: np.ndarray  # [n]: global rank of each row's first prefix feature (F: no prefix)
    suffix_sq: np.ndarray  # [n]: squared norm of each row's suffix (< threshold**2)


def _row_max(mat: sp.csr_matrix) -> np.ndarray:
    """``[rows]`` largest value of each row of a non-negative CSR matrix without duplicates (0 if empty),
    straight from its data: ``mat.max(axis=1)`` sorts the indices first, the slowest part of the lookup.
    """
    out = np.zeros(mat.shape[0], dtype=np.float32)
    filled = np.diff(mat.indptr) > 0
    if filled.any():
        out[filled] = np.maximum.reduceat(mat.data, mat.indptr[:-1][filled])
    return np.maximum(out, 0.0)


class NoveltyIndex:
    """A bank of known questions and the maximum TF-IDF cosine similarity of new texts to it.

    Character 2-4-grams are hashed (``2**20`` buckets: no vocabulary to hold for a million questions) and
    weighted by sublinear TF x IDF, the IDF fitted once on the initial bank. Each vector keeps only its
    ``top_k`` heaviest n-grams (re-normalised): the n-grams every question shares ("the ", "已知") carry
    little weight anyway (those in more than ``max_df`` of the bank are dropped outright), and dropping
    them keeps the inverted lists short, so scoring 8 questions against
    a million takes milliseconds. Exact copies still score 1, and so do copies with changed numbers (every
    number is normalised to ``0``). ``top_k=None`` gives the exact cosine. ``keep_bank=False`` fits the
    IDF on ``bank`` but starts with an empty bank (the run's own questions are then added with :meth:`add`).
    The near-copy decision (:meth:`near_copy_similarity`) is always taken on the exact cosine.
    """

    CHUNK = 2**18  # bank questions per block of the fast index
    QUERY_MARGIN = 0.05  # a query's prefix is cut at threshold - QUERY_MARGIN (exact_similarity_above)

    def __init__(self, bank: list[str], n_features: int = 2**20, top_k: int | None = 64, max_df: float = 0.02,
                 batch: int = 50_000, keep_bank: bool = True):  # fmt: skip
        from sklearn.feature_extraction.text import HashingVectorizer, TfidfTransformer

        if not bank:
            raise ValueError("the novelty bank is empty: give it at least one known question")
        self.hasher = HashingVectorizer(analyzer="char_wb", ngram_range=(2, 4), n_features=n_features, alternate_sign=False,
                                        norm=None, preprocessor=normalize_for_similarity, dtype=np.float32)  # fmt: skip
        self.top_k, self.batch = top_k, batch
        counts = sp.vstack(
            [self.hasher.transform(bank[i : i + batch]) for i in range(0, len(bank), batch)], format="csr"
        )
        self.tfidf = TfidfTransformer(sublinear_tf=True).fit(counts)
        df = np.bincount(counts.indices, minlength=n_features)
        # n-grams in more than max_df of the bank (and at least 50 questions) say nothing about novelty and
        # make the inverted lists long: they are dropped, like TfidfVectorizer's max_df
        self.stop = (df > max(50, max_df * len(bank))) if top_k is not None else np.zeros(n_features, dtype=bool)
        full = self._unit(counts) if keep_bank else None
        self._blocks = self._pruned_blocks(full) if keep_bank else []  # [F, <= CHUNK] blocks: inverted lists
        self.texts: list[str] = []  # questions added after fitting, in order
        self.initial_size = len(bank) if keep_bank else 0
        # the exact side (near-copy decisions): full unit TF-IDF rows, and per threshold their prefix lists.
        # One global feature order for prefix filtering: most common in the bank first (ties by feature id).
        self._rank = np.empty(n_features, dtype=np.int64)
        self._rank[np.lexsort((np.arange(n_features), -df))] = np.arange(n_features)
        self._full = [full] if keep_bank else []  # [bank, F]
        self._prefix: dict[float, list[_PrefixLists]] = {}  # threshold -> one per block of _full

    def _unit(self, counts: sp.csr_matrix) -> sp.csr_matrix:
        """``[n, F]`` unit TF-IDF rows of hashed ``counts``: the exact vectors."""
        return self.tfidf.transform(counts).astype(np.float32).tocsr()

    def _prune(self, unit: sp.csr_matrix) -> sp.csr_matrix:
        """The fast index's vectors: ``unit`` rows without stop n-grams, their ``top_k`` heaviest kept (in place)."""
        if self.stop.any():
            unit.data[self.stop[unit.indices]] = 0.0
            unit.eliminate_zeros()
        return _top_k_rows(unit, self.top_k)

    def _pruned_blocks(self, unit: sp.csr_matrix) -> list[sp.csr_matrix]:
        """The fast index of ``unit`` rows: ``[F, <= CHUNK]`` inverted lists, one per ``CHUNK`` rows. A product
        with one block accumulates into ``CHUNK`` dense slots, which stay in cache: 1.7x faster than one block
        for a million questions.
        """
        return [self._prune(unit[s : s + self.CHUNK].copy()).T.tocsr() for s in range(0, unit.shape[0], self.CHUNK)]

    def vectorize(self, texts: list[str]) -> sp.csr_matrix:
        return self._prune(self._unit(self.hasher.transform(texts)))

    def __len__(self) -> int:
        return self.initial_size + len(self.texts)

    def add(self, texts: list[str]) -> None:
        if texts:
            full = self._unit(self.hasher.transform(texts))
            self._blocks.extend(self._pruned_blocks(full))
            self._full.append(full)
            for threshold, blocks in self._prefix.items():
                blocks.append(self._prefix_lists(full, threshold))
            self.texts.extend(texts)
            if len(self._full) > 8:  # keep the products a few big blocks, not many small ones
                self._full = [sp.vstack(self._full, format="csr")]
                self._blocks = self._pruned_blocks(self._full[0])  # pruning is row by row: the same lists
                self._prefix = {t: [_PrefixLists(sp.hstack([b.lists for b in blocks], format="csr"),
                                                 np.concatenate([b.start for b in blocks]),
                                                 np.concatenate([b.suffix_sq for b in blocks]))]
                                for t, blocks in self._prefix.items()}  # fmt: skip

    # ------------------------------------------------------------------------------ exact near-copy decision
    def _split(self, idx: np.ndarray, weights: np.ndarray, threshold: float):
        """One unit row (features ``idx``, ``weights``) in the global order, cut into suffix and prefix.

        Returns ``(order, ranks, mass, k)``: ``idx[order]`` is the row from its most common feature to its
        rarest, ``ranks`` their global ranks, ``mass[j]`` the squared norm of the first ``j`` of them, and ``k``
        the length of the suffix: the longest run of most common features whose squared weights sum below
        ``threshold**2``. The prefix is the rest.
        """
        ranks = self._rank[idx]
        order = np.argsort(ranks)
        mass = np.concatenate([[0.0], np.cumsum(weights[order].astype(np.float64) ** 2)])
        k = int(np.searchsorted(mass[1:], threshold * threshold, side="left"))
        return order, ranks[order], mass, k

    def _prefix_lists(self, full: sp.csr_matrix, threshold: float) -> _PrefixLists:
        """The inverted lists of every row's *prefix* features (prefix filtering, Bayardo et al. 2007).

        For unit vectors ``cos(q, b) = q.b_prefix + q.b_suffix`` and ``q.b_suffix <= |b_suffix| < threshold``, so
        every ``b`` with ``cos(q, b) >= threshold`` shares a prefix feature with ``q``: candidates from the
        prefix lists miss no near-copy, while the long lists of common n-grams (``"the "``, ``"已知"``) mostly
        stay out of the index. The lists hold the weights, and each row's prefix start and suffix norm are
        kept, for the bound that drops most candidates before their exact cosine (:meth:`exact_similarity_above`).
        """
        n, n_features = full.shape
        rows, cols, vals = [], [], []
        start = np.full(n, n_features, dtype=np.int64)
        suffix_sq = np.zeros(n, dtype=np.float64)
        for r in range(n):
            lo, hi = full.indptr[r], full.indptr[r + 1]
            idx, weights = full.indices[lo:hi], full.data[lo:hi]
            order, ranks, mass, k = self._split(idx, weights, threshold)
            suffix_sq[r] = mass[k]
            if k < len(order):
                start[r] = ranks[k]
            rows.append(np.full(len(order) - k, r, dtype=np.int64))
            cols.append(idx[order[k:]])
            vals.append(weights[order[k:]])
        rows_a = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        cols_a = np.concatenate(cols) if cols else np.zeros(0, np.int64)
        vals_a = np.concatenate(vals) if vals else np.zeros(0, np.float32)
        lists = sp.csr_matrix((vals_a.astype(np.float32), (cols_a, rows_a)), shape=(n_features, n))
        return _PrefixLists(lists, start, suffix_sq)

    def exact_similarity_above(self, texts: list[str], threshold: float,
                               unit: sp.csr_matrix | None = None) -> np.ndarray:  # fmt: skip
        """``[n]``: the exact TF-IDF cosine to the most similar bank question when it is at least ``threshold``,
        else ``-1``. Exact: full vectors (no top-k pruning, no dropped n-grams), and no near-copy is missed.
        ``unit``: the texts' unit TF-IDF rows, when already computed.

        1. Candidates: only the query's own prefix features are looked up in the bank's prefix lists. If
           ``cos(q, b) >= threshold`` they share a feature in both prefixes (say ``q``'s prefix starts no later
           than ``b``'s in the global order: every feature they share outside ``b``'s prefix lies in ``b``'s
           suffix, and those add up to less than ``|b_suffix| < threshold``; the other way round likewise with
           ``|q_suffix|``, which a longer query prefix only makes smaller).
        2. Bound: with ``m`` the later of the two prefix starts, every shared feature at or after ``m`` is in
           both prefixes, so the lists give its part of ``q.b`` exactly; the part before ``m`` is at most
           ``|q_<m| |b_<m|`` (Cauchy-Schwarz), where one factor is a suffix norm (``< threshold``) and the other
           is known exactly (``q``'s) or bounded by the weight of ``b`` already seen. Candidates whose bound is
           below ``threshold`` cannot be near-copies.
        3. The exact cosine of the remaining candidates, from their full rows.
        """
        key = float(threshold)
        if key not in self._prefix:
            self._prefix[key] = [self._prefix_lists(full, key) for full in self._full]
        q = self._unit(self.hasher.transform(texts)) if unit is None else unit  # [n, F] unit rows
        best = np.full(len(texts), -1.0, dtype=np.float32)
        dense = np.zeros(q.shape[1], dtype=np.float32)  # one query at a time, as a dense vector
        slack = 1e-4  # the bound is taken in float64 from float32 weights; keep every borderline candidate
        for i in range(len(texts)):
            feats, weights = q.indices[q.indptr[i] : q.indptr[i + 1]], q.data[q.indptr[i] : q.indptr[i + 1]]
            # the query's own prefix is cut QUERY_MARGIN lower (longer): a few more lists to read, but its
            # suffix norm, a factor of the bound, is smaller, which drops ~15x more candidates at 0.85
            order, ranks, mass, k = self._split(feats, weights, max(0.0, key - self.QUERY_MARGIN))
            if k == len(order):  # no prefix (an empty text): no cosine can reach the threshold
                continue
            lookup, lookup_w = feats[order[k:]], weights[order[k:]].astype(np.float64)
            q_start, q_suffix_sq = ranks[k], mass[k]
            dense[feats] = weights
            for full, prefix in zip(self._full, self._prefix[key]):
                indptr = prefix.lists.indptr
                starts, lens = indptr[lookup], indptr[lookup + 1] - indptr[lookup]
                total = int(lens.sum())
                if not total:
                    continue
                # the lists of the query's prefix features, gathered: bank rows and their weights
                offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens) + np.arange(total)
                rows, b_w = prefix.lists.indices[offsets], prefix.lists.data[offsets].astype(np.float64)
                cands, where = np.unique(rows, return_inverse=True)
                shared = np.bincount(where, weights=np.repeat(lookup_w, lens) * b_w, minlength=len(cands))
                b_seen_sq = np.bincount(where, weights=b_w * b_w, minlength=len(cands))
                b_start = prefix.start[cands]
                q_before_sq = mass[np.searchsorted(ranks, b_start, side="left")]  # q's weight ranked before b_start
                rest = np.where(b_start >= q_start, np.sqrt(q_before_sq * prefix.suffix_sq[cands]),
                                np.sqrt(q_suffix_sq * np.maximum(1.0 - b_seen_sq, 0.0)))  # fmt: skip
                cands = cands[shared + rest >= key - slack]
                if not len(cands):
                    continue
                top = float((full[cands] @ dense).max())  # the exact cosine of every remaining candidate
                if top >= threshold and top > best[i]:
                    best[i] = top
            dense[feats] = 0.0
        return best

    def near_copy_similarity(self, texts: list[str], threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """``([n] similarity, [n] bool near-copy)`` with the near-copy decision taken on the exact cosine.

        Where the exact cosine exceeds ``threshold`` the similarity is that exact value; elsewhere it is the
        fast index's estimate capped at ``threshold`` (the pruned index can overshoot the exact cosine), so no
        reported similarity above the threshold goes without the near-copy decision, and no near-copy is missed.
        """
        unit = self._unit(self.hasher.transform(texts))  # hashed and weighed once for both paths
        exact = self.exact_similarity_above(texts, threshold, unit)
        near = exact > threshold
        approx = np.minimum(self._max_pruned(self._prune(unit)), threshold)
        return np.where(near, exact, approx).astype(np.float32), near

    def max_similarity(self, texts: list[str]) -> np.ndarray:
        """``[n]`` highest cosine similarity of each text to any question in the bank (the reward's hot path:
        no argmax, see :meth:`nearest` for the matching question).
        """
        return self._max_pruned(self.vectorize(texts))

    def _max_pruned(self, q: sp.csr_matrix) -> np.ndarray:
        best = np.zeros(q.shape[0], dtype=np.float32)
        for block in self._blocks:
            best = np.maximum(best, _row_max((q @ block).tocsr()))  # [n, bank_block] sparse, no duplicates
        return best

    def nearest(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """``([n] similarity, [n] bank position)`` of each text's most similar bank question (-1: none shares
        an n-gram). Positions count the initial bank first, then the added questions in order.
        """
        q = self.vectorize(texts)  # [n, F]
        best = np.zeros(len(texts), dtype=np.float32)
        where = np.full(len(texts), -1, dtype=np.int64)
        offset = 0
        for block in self._blocks:
            sims = (q @ block).tocsr()  # [n, bank_block], sparse
            if sims.nnz:
                top = np.asarray(sims.argmax(axis=1)).ravel()
                value = sims.max(axis=1).toarray().ravel()
                better = value > best
                best[better], where[better] = value[better], top[better] + offset
            offset += block.shape[1]
        return best, where


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
    "en": (
        "since",
        "therefore",
        "hence",
        "thus",
        "because",
        "so ",
        "it follows",
        "we get",
        "we have",
        "implies",
        "then",
    ),
}


def rigor_gates(parsed: ParsedQuestion, truncated: bool, consistent: bool | None) -> str:
    """The first rigor gate a question fails, ``""`` when it passes them all: every section present, not
    truncated, a stated answer, and that answer verified equal to the solution's (:mod:`qgen.answers`;
    an unverifiable answer fails this gate).
    """
    if not (parsed.question.strip() and parsed.answer.strip() and parsed.analysis.strip()):
        return "sections"
    if truncated:
        return "truncated"
    if consistent is not True:
        return "answer_consistent"
    return ""


def rigor_heuristics(parsed: ParsedQuestion, language: str, truncated: bool) -> float:
    """The unverified part of rigor, in [0, 1]: 3/8 x share of the sections present (question, answer,
    analysis) + 3/8 x density of reasoning connectives in the analysis (one per 40 characters scores 1) +
    2/8 x not truncated.
    """
    sections = sum(bool(s.strip()) for s in (parsed.question, parsed.answer, parsed.analysis)) / 3
    analysis = parsed.analysis.lower()
    words = CONNECTIVES["zh" if language == "zh" else "en"]
    hits = sum(analysis.count(w) for w in words)
    density = min(1.0, hits / max(1.0, len(analysis) / 40)) if analysis else 0.0
    return (3 * sections + 3 * density + 2 * (not truncated)) / 8


def rigor_score(parsed: ParsedQuestion, language: str, truncated: bool, consistent: bool | None = None,
                gated: bool = False) -> float:  # fmt: skip
    """Logical rigor of one generated question, in [0, 1]: the answer check first, the heuristics within.

    ``(tier + h) / 3`` with ``h`` = :func:`rigor_heuristics` and ``tier`` 2 for an answer verified consistent
    with the question's own solution, 1 when it cannot be verified (``consistent=None``: no stated answer, no
    final answer or choice in the solution, or the check not run), 0 when verified inconsistent. So a question
    whose answer is verified wrong scores at most 1/3 and one verified right at least 2/3: no density of
    connectives lifts a wrong answer above a right one. With ``gated`` a question that fails a gate
    (:func:`rigor_gates`, which an unverifiable answer fails too) scores 0.
    """
    if gated and rigor_gates(parsed, truncated, consistent):
        return 0.0
    tier = {True: 2, None: 1, False: 0}[consistent]
    return (tier + rigor_heuristics(parsed, language, truncated)) / 3


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
    """Difficulty in [0, 1] learned from labelled questions, by ridge regression on

    - TF-IDF of the question and of the solution, separately (character 2-4-grams and word 1-2-grams),
    - a few length counts (characters, formulas, lines of the solution),
    - the subject (one-hot): levels are relative to a subject (MATH's "Level 5" Prealgebra is easier than
      its "Level 5" Intermediate Algebra), and knowing it lifts the Spearman correlation on MATH from 0.70
      to 0.73.

    Without at least 20 labels it is the heuristic.
    """

    def __init__(self, alpha: float = 3.0, max_features: int = 2**17):
        self.alpha, self.max_features = alpha, max_features
        self.coef: np.ndarray | None = None  # ridge weights over the features; None = the heuristic
        self.intercept = 0.0
        self.subjects: list[str] = []
        self.n_train = 0

    @property
    def fitted(self) -> bool:
        return self.coef is not None

    def _make_vectorizers(self, vocabularies: list[list[str]] | None = None) -> list[TfidfVectorizer]:
        vocabularies = vocabularies or [None] * 4
        words = dict(ngram_range=(1, 2), sublinear_tf=True, max_features=self.max_features, min_df=2, dtype=np.float32)
        return [char_vectorizer(self.max_features, vocabularies[0]), char_vectorizer(self.max_features, vocabularies[1]),
                TfidfVectorizer(**words, vocabulary=vocabularies[2]),
                TfidfVectorizer(**words, vocabulary=vocabularies[3])]  # fmt: skip

    def _features(self, questions: list[str], analyses: list[str], subjects: list[str], fit: bool):
        fields = [questions, analyses, questions, analyses]
        parts = [v.fit_transform(f) if fit else v.transform(f) for v, f in zip(self._vectorizers, fields)]
        counts = [
            [len(q), len(a), a.count("$"), a.count("\\"), a.count("\n"), q.count("$")]
            for q, a in zip(questions, analyses)
        ]
        parts.append(sp.csr_matrix(np.log1p(np.array(counts, dtype=np.float32)) / 8))
        parts.append(
            sp.csr_matrix(
                np.array([[s == k for k in self.subjects] for s in subjects], dtype=np.float32).reshape(
                    len(subjects), -1
                )
            )
        )
        return sp.hstack(parts, format="csr")

    def _fit_features(self, records: list[Question]):
        """Fit the vectorizers and the subject list on ``records``; their feature matrix."""
        self._vectorizers = self._make_vectorizers()
        self.subjects = sorted({r.subject for r in records})
        return self._records_features(records, fit=True)

    def _records_features(self, records: list[Question], fit: bool = False):
        return self._features([r.question for r in records], [r.analysis for r in records],
                              [r.subject for r in records], fit=fit)  # fmt: skip

    def fit(self, records: list[Question]) -> DifficultyModel:
        from sklearn.linear_model import Ridge

        labelled = [r for r in records if r.difficulty is not None]
        if len(labelled) < 20:
            return self
        x = self._fit_features(labelled)
        ridge = Ridge(alpha=self.alpha).fit(x, np.array([r.difficulty for r in labelled], dtype=np.float32))
        self.coef, self.intercept = np.asarray(ridge.coef_, dtype=np.float32), float(ridge.intercept_)
        self.n_train = len(labelled)
        return self

    def cross_validate(self, records: list[Question], alphas: tuple[float, ...] = (0.3, 1.0, 3.0, 10.0, 30.0),
                       folds: int = 5, seed: int = 0) -> dict[float, float]:  # fmt: skip
        """Mean Spearman correlation over ``folds`` folds of ``records`` for each ridge ``alpha``: the features
        are fitted on each fold's training part only (vocabularies, IDF), and every alpha shares them.
        Sets ``self.alpha`` to the best one; call :meth:`fit` afterwards.
        """
        from scipy.stats import spearmanr
        from sklearn.linear_model import Ridge

        labelled = [r for r in records if r.difficulty is not None]
        if len(labelled) < 20 * folds:
            raise ValueError(f"cross-validation needs at least {20 * folds} labelled records, got {len(labelled)}")
        order = np.random.default_rng(seed).permutation(len(labelled))
        scores: dict[float, list[float]] = {a: [] for a in alphas}
        for k in range(folds):
            held = set(order[k::folds].tolist())
            train = [r for i, r in enumerate(labelled) if i not in held]
            test = [labelled[i] for i in sorted(held)]
            probe = DifficultyModel(max_features=self.max_features)
            x, x_test = probe._fit_features(train), probe._records_features(test)
            y, y_test = (np.array([r.difficulty for r in part], dtype=np.float32) for part in (train, test))
            for alpha in alphas:
                predicted = Ridge(alpha=alpha).fit(x, y).predict(x_test)
                scores[alpha].append(float(spearmanr(predicted, y_test)[0]))
        means = {a: float(np.mean(v)) for a, v in scores.items()}
        self.alpha = max(means, key=means.get)
        return means

    def predict(
        self, questions: list[str], analyses: list[str] | None = None, subjects: list[str] | None = None
    ) -> np.ndarray:
        analyses = analyses or [""] * len(questions)
        if not self.fitted:
            return np.array([heuristic_difficulty(q, a) for q, a in zip(questions, analyses)], dtype=np.float32)
        x = self._features(questions, analyses, subjects or [""] * len(questions), fit=False)
        return np.clip(x @ self.coef + self.intercept, 0.0, 1.0).astype(np.float32)

    # --------------------------------------------------------------------- checkpoint state: plain values only
    def state(self) -> dict:
        """The fitted model as plain values (strings, numbers, tensors): no pickle, so a checkpoint that holds
        it loads under ``torch.load(weights_only=True)`` and cannot run code.
        """
        if not self.fitted:
            return {}
        vocabularies = [sorted(v.vocabulary_, key=v.vocabulary_.get) for v in self._vectorizers]
        return {
            "format": 1,
            "alpha": float(self.alpha),
            "max_features": int(self.max_features),
            "vocabularies": vocabularies,
            "idf": [torch.from_numpy(np.asarray(v.idf_, dtype=np.float32)) for v in self._vectorizers],
            "coef": torch.from_numpy(self.coef),
            "intercept": float(self.intercept),
            "subjects": list(self.subjects),
            "n_train": int(self.n_train),
        }

    @classmethod
    def from_state(cls, state: dict) -> DifficultyModel:
        """Rebuild from :meth:`state`; anything else (e.g. pickled bytes from older checkpoints) is refused."""
        if not isinstance(state, dict) or state.get("format") != 1:
            raise ValueError("difficulty model state is not qgen's plain format (format 1); refusing to load it")
        model = cls(state["alpha"], state["max_features"])
        model.subjects, model.n_train = list(state["subjects"]), int(state["n_train"])
        model._vectorizers = model._make_vectorizers([list(v) for v in state["vocabularies"]])
        for vec, idf in zip(model._vectorizers, state["idf"]):
            vec.idf_ = torch.as_tensor(idf).numpy().astype(np.float64)
        model.coef = torch.as_tensor(state["coef"]).numpy().astype(np.float32)
        model.intercept = float(state["intercept"])
        return model


_STEP_SPLIT = re.compile(r"[。；;\n]|(?<=[.!?])\s")


def educational_value(parsed: ParsedQuestion, language: str, knowledge: list[str] | None = None) -> float:
    """A cheap stand-in for a teacher's educational-value rating of one question, in [0, 1].

    Four equal parts: (1) a worked solution of at least three steps (sentences or lines); (2) the question
    and solution touch the intended knowledge points (share of them mentioned; half credit when none are
    given); (3) a statement of teachable length (Chinese 20-400 characters, English 12-150 words; linear
    fall-off outside); (4) a short, checkable answer (non-empty, at most 60 characters, or option letters).
    ``callbacks.OpenAIJudge`` asks an LLM for the real thing.
    """
    steps = [s for s in _STEP_SPLIT.split(parsed.analysis) if len(s.strip()) >= 4]
    worked = min(1.0, len(steps) / 3)
    body = f"{parsed.question}\n{parsed.analysis}".lower()
    if knowledge:
        covered = sum(k.lower() in body for k in knowledge if k.strip()) / max(1, len([k for k in knowledge if k.strip()]))
    else:
        covered = 0.5
    size = len(parsed.question) if language == "zh" else len(parsed.question.split())
    low, high = (20, 400) if language == "zh" else (12, 150)
    length = 1.0 if low <= size <= high else (size / low if size < low else max(0.0, 2.0 - size / high))
    answer = parsed.answer.strip()
    checkable = bool(answer) and (len(answer) <= 60 or bool(parsed.options))
    return float(0.25 * worked + 0.25 * covered + 0.25 * length + 0.25 * checkable)


# ------------------------------------------------------------------------------------------- the scorer
class QuestionScorer:
    """Every score of a question in one place: the reward callbacks, ``predict``'s written scores, ``test`` and
    ``qgen score`` all call this class, so the same text with the same training records, bank and truncation
    flag gets the same values everywhere.

    - ``difficulty``: the ridge model fitted on the training records' labels (:class:`DifficultyModel`; its
      keyword/length heuristic with fewer than 20 labels);
    - ``novelty``: ``1 - max TF-IDF similarity`` to the bank (the training questions by default), with the
      near-copy decision (``> threshold``) on the exact cosine (:meth:`NoveltyIndex.near_copy_similarity`);
    - ``rigor`` (:func:`rigor_score`) after the answer check (:mod:`qgen.answers`): consistent / inconsistent /
      unverifiable;
    - ``educational_value`` (:func:`educational_value`).

    Build it once per run (:meth:`for_datamodule` caches it on the run's data module) or from any records
    (:meth:`fit`). The reward callbacks configure their component (weight, threshold, penalty, gating) and log
    it; the scorer computes it.
    """

    def __init__(self, difficulty: DifficultyModel | None = None, bank: NoveltyIndex | None = None,
                 threshold: float = 0.85):  # fmt: skip
        self.difficulty_model = difficulty if difficulty is not None else DifficultyModel()
        self.bank, self.threshold = bank, threshold

    @classmethod
    def fit(cls, train: list[Question], bank: list[str] | None = None, threshold: float = 0.85,
            top_k: int | None = 64) -> QuestionScorer:  # fmt: skip
        """The difficulty model fitted on ``train`` and the novelty bank of ``bank`` (default: its questions)."""
        known = bank if bank is not None else [r.question for r in train]
        return cls(DifficultyModel().fit(train), NoveltyIndex(known, top_k=top_k) if known else None, threshold)

    @classmethod
    def for_datamodule(cls, datamodule, top_k: int | None = 64) -> QuestionScorer:
        """The run's scorer, fitted on its training records once and shared by every caller of the run."""
        cache = datamodule.__dict__.setdefault("_question_scorers", {})
        if top_k not in cache:
            cache[top_k] = cls.fit(datamodule.load_records()["train"], top_k=top_k)
        return cache[top_k]

    # ------------------------------------------------------------------------------------- components
    def difficulty(self, batch: ScoringBatch) -> np.ndarray:
        return self.difficulty_model.predict(batch.questions, [p.analysis for p in batch.parsed], batch.subject_list())

    def similarity(self, batch: ScoringBatch, threshold: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(max similarity to the bank, near-copy flag)`` per question (zeros without a bank)."""
        if self.bank is None:
            n = len(batch.texts)
            return np.zeros(n, np.float32), np.zeros(n, bool)
        return self.bank.near_copy_similarity(batch.questions, self.threshold if threshold is None else threshold)

    # the text-only components need no fitted model or bank: callable on the class
    @staticmethod
    def answer_checks(batch: ScoringBatch) -> list:
        from qgen.answers import check_answers

        return check_answers(batch.parsed)

    @staticmethod
    def rigor(batch: ScoringBatch, consistent: list[bool | None], gated: bool = False) -> np.ndarray:
        return np.array([rigor_score(p, lang, cut, ok, gated) for p, lang, cut, ok in
                         zip(batch.parsed, batch.languages, batch.truncated, consistent)], dtype=np.float32)  # fmt: skip

    @staticmethod
    def educational_value(batch: ScoringBatch) -> np.ndarray:
        return np.array([educational_value(p, lang, k) for p, lang, k in
                         zip(batch.parsed, batch.languages, batch.knowledge_list())], dtype=np.float32)  # fmt: skip

    def score(self, batch: ScoringBatch, threshold: float | None = None) -> dict[str, list]:
        """Every component of every question: ``difficulty``, ``rigor``, ``answer_consistent`` (true / false /
        ``None``: unverifiable), ``answer_check`` (the reason, ``ok`` when consistent), ``novelty``,
        ``max_similarity``, ``near_copy`` (above ``threshold``, default the scorer's) and ``educational_value``,
        one list each.
        """
        checks = self.answer_checks(batch)
        consistent = [c.consistent for c in checks]
        sims, near = self.similarity(batch, threshold)
        return {
            "difficulty": [float(v) for v in self.difficulty(batch)],
            "rigor": [float(v) for v in self.rigor(batch, consistent)],
            "answer_consistent": consistent,
            "answer_check": [c.reason or "ok" for c in checks],
            "novelty": [float(1.0 - s) for s in sims],
            "max_similarity": [float(s) for s in sims],
            "near_copy": [bool(x) for x in near],
            "educational_value": [float(v) for v in self.educational_value(batch)],
        }
