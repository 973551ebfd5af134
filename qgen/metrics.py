"""Evaluation metrics of generated questions (``python -m qgen test``), as plain functions on strings.

- **BLEU-4** (torchmetrics' SacreBLEU: ``zh`` tokenisation for Chinese, i.e. every Han character is a
  token, ``13a`` for English) and **ROUGE-L** F1 (torchmetrics, with the same tokens: characters for
  Chinese, lower-cased words for English) of each generation against its reference question;
- **distinct-1/2**: unique n-grams / all n-grams over all generations (higher = more varied wording);
- **self-BLEU**: mean BLEU-4 of each generation against the others (lower = less alike).

Scores are corpus-averaged per language and then weighted by the number of examples of each language.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

_HAN_CHAR = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
_EN_TOKEN = re.compile(r"[a-z0-9]+|[^\sa-z0-9]", re.IGNORECASE)


def tokens(text: str, language: str) -> list[str]:
    """Metric tokens: non-space characters for Chinese; lower-cased words and symbols for English."""
    if language == "zh":
        return [c for c in text if not c.isspace()]
    return [t.lower() for t in _EN_TOKEN.findall(text)]


def bleu4(hypotheses: Sequence[str], references: Sequence[Sequence[str]], language: str) -> float:
    """Corpus BLEU-4 (SacreBLEU; ``zh`` tokeniser for Chinese, ``13a`` otherwise), in [0, 1]."""
    from torchmetrics.text import SacreBLEUScore

    if not hypotheses:
        return float("nan")
    metric = SacreBLEUScore(n_gram=4, tokenize="zh" if language == "zh" else "13a", lowercase=language != "zh")
    return float(metric(list(hypotheses), [list(r) for r in references]))


def rouge_l(hypotheses: Sequence[str], references: Sequence[str], language: str) -> float:
    """Mean ROUGE-L F1 over pairs, on :func:`tokens`, in [0, 1]."""
    from torchmetrics.text import ROUGEScore

    if not hypotheses:
        return float("nan")
    metric = ROUGEScore(rouge_keys="rougeL", normalizer=lambda s: s, tokenizer=lambda s: tokens(s, language))
    return float(metric(list(hypotheses), list(references))["rougeL_fmeasure"])


def distinct_n(texts: Sequence[str], language: str, n: int) -> float:
    """Unique n-grams / all n-grams over ``texts`` (0 when there is no n-gram)."""
    grams = [tuple(t[i : i + n]) for text in texts for t in [tokens(text, language)] for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def self_bleu(texts: Sequence[str], language: str, max_texts: int = 200, seed: int = 0) -> float:
    """Mean BLEU-4 of each text against all the others (at most ``max_texts``, sampled with ``seed``)."""
    texts = [t for t in texts if t.strip()]
    if len(texts) < 2:
        return float("nan")
    if len(texts) > max_texts:
        texts = [texts[i] for i in np.random.default_rng(seed).choice(len(texts), max_texts, replace=False)]
    from torchmetrics.functional.text import sacre_bleu_score

    tokenize = "zh" if language == "zh" else "13a"
    scores = [float(sacre_bleu_score([t], [texts[:i] + texts[i + 1 :]], n_gram=4, tokenize=tokenize))
              for i, t in enumerate(texts)]  # fmt: skip
    return float(np.mean(scores))


def generation_metrics(
    generated: Sequence[str], references: Sequence[str], languages: Sequence[str]
) -> dict[str, float]:
    """BLEU-4, ROUGE-L, distinct-1/2 and self-BLEU, per language and weighted over languages."""
    out: dict[str, float] = {}
    total = len(generated)
    weighted: dict[str, float] = {}
    for lang in sorted(set(languages)):
        rows = [i for i, x in enumerate(languages) if x == lang]
        hyp, ref = [generated[i] for i in rows], [references[i] for i in rows]
        part = {
            "bleu4": bleu4(hyp, [[r] for r in ref], lang),
            "rougeL": rouge_l(hyp, ref, lang),
            "distinct1": distinct_n(hyp, lang, 1),
            "distinct2": distinct_n(hyp, lang, 2),
            "self_bleu": self_bleu(hyp, lang),
        }
        for key, value in part.items():
            out[f"{key}_{lang}"] = value
            if value == value:  # not NaN
                weighted[key] = weighted.get(key, 0.0) + value * len(rows) / total
    out.update(weighted)
    return out
