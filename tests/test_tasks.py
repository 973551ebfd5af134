import os

import pytest
from conftest import ROOT
from sklearn.feature_extraction.text import TfidfVectorizer

from qgen.records import read_source
from qgen.tasks import build_examples

MIX = {"historical": 0.5, "variant": 0.3, "innovative": 0.2}


@pytest.fixture(scope="module")
def bundled():
    return read_source("jsonl", os.path.join(ROOT, "data", "*.jsonl")).records


def test_mixture_proportions_and_determinism(bundled):
    ex1, stats = build_examples(bundled, MIX, seed=3)
    ex2, _ = build_examples(bundled, MIX, seed=3)
    assert [e.task for e in ex1] == [e.task for e in ex2]
    n = len(bundled)
    # assigned shares within 5 points of the mixture (the variant share includes its fallbacks)
    assert abs(stats.tasks["innovative"] / n - 0.2) < 0.05
    assert abs((stats.tasks["variant"] + stats.variant_fallback) / n - 0.3) < 0.05
    assert sum(stats.tasks.values()) == n


def test_variant_partner_is_similar_but_not_duplicate(bundled):
    examples, _ = build_examples(bundled, {"variant": 1.0}, seed=0)
    by_id = {r.id: r for r in bundled}
    variants = [e for e in examples if e.task == "variant"]
    assert len(variants) > len(bundled) * 0.8
    for e in variants[:50]:
        partner = by_id[e.partner_id]
        assert partner.id != e.record.id and partner.subject == e.record.subject
        assert partner.question in e.messages[1]["content"]
        vec = TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 3), sublinear_tf=True).fit(
            [r.question for r in bundled if r.subject == e.record.subject and r.language == e.record.language]
        )
        a, b = vec.transform([e.record.question, partner.question])
        assert 0.3 <= (a @ b.T).toarray()[0, 0] < 0.85


def test_targets_are_real_records(bundled):
    examples, _ = build_examples(bundled, MIX, seed=1)
    for e in examples[:100]:
        target = e.messages[-1]["content"]
        assert e.record.question.strip() in target and e.record.answer in target
        assert target.startswith("题干：" if e.record.language == "zh" else "Question: ")


def test_bad_mixture_is_rejected(bundled):
    with pytest.raises(ValueError, match="task_mixture"):
        build_examples(bundled, {"historic": 1.0}, seed=0)
