"""Scoring cores on fixed strings: novelty (Chinese and English), diversity, rigor, difficulty."""

import os
import re

import numpy as np
import pytest
from conftest import ROOT, SHARED, needs_shared

from qgen.formatting import parse_question, render_target
from qgen.records import Question, read_source
from qgen.scoring import (
    DifficultyModel,
    NoveltyIndex,
    group_diversity,
    heuristic_difficulty,
    normalize_for_similarity,
    rigor_score,
)


def renumber(text: str) -> str:
    return re.sub(r"\d+", lambda m: str(int(m.group()) * 3 + 7), text)


@pytest.fixture(scope="module")
def bundled_bank():
    return [r.question for r in read_source("jsonl", os.path.join(ROOT, "data", "*.jsonl")).records]


def _check_novelty(index, bank, lang, unrelated):
    original = next(q for q in bank if re.search(r"\d", q) and (lang == "zh") == bool(re.search(r"[\u4e00-\u9fff]", q)))
    changed = renumber(original)
    assert changed != original
    exact, renumbered, other = index.max_similarity([original, changed, unrelated])
    assert exact >= 0.99, exact
    assert renumbered >= 0.85, renumbered
    assert other < 0.3, other


def test_novelty_bundled_bank_english_and_chinese(bundled_bank):
    index = NoveltyIndex(bundled_bank)
    _check_novelty(index, bundled_bank, "en", "Describe the water cycle and explain why clouds form over warm oceans.")
    _check_novelty(index, bundled_bank, "zh", "请简述辛亥革命的历史意义，并说明它对近代中国社会的影响。")


@needs_shared
def test_novelty_shared_bank_english_and_chinese():
    bank = [r.question for r in read_source("math", os.path.join(SHARED, "math/train.jsonl")).records]
    bank += [
        r.question
        for r in read_source("gaokao_bench", os.path.join(SHARED, "gaokao_bench/Objective_Questions")).records
    ]
    index = NoveltyIndex(bank)
    _check_novelty(index, bank, "en", "Describe the water cycle and explain why clouds form over warm oceans.")
    _check_novelty(index, bank, "zh", "小明周末和家人去郊外野餐，请写一篇日记记录这一天的见闻和感受。")


def test_novelty_bank_grows():
    index = NoveltyIndex(["What is 1 + 1?", "Find the area of a square of side 2."])
    new = "Explain photosynthesis in plants."
    assert index.max_similarity([new])[0] < 0.3
    index.add([new])
    assert len(index) == 3 and index.max_similarity([new])[0] > 0.99


def test_group_diversity():
    texts = [
        "Find the sum of 1 and 2.",
        "Find the sum of 1 and 2.",
        "Prove that there are infinitely many primes.",
        "Describe a triangle with integer sides.",
    ]
    div = group_diversity(texts, group_size=2)
    assert div[0] == pytest.approx(0.0, abs=1e-5) and div[1] == pytest.approx(0.0, abs=1e-5)
    assert div[2] > 0.7 and div[2] == pytest.approx(div[3], abs=1e-6)


def test_rigor_score_orders_outputs():
    good = parse_question(
        render_target("设 $x=2$，求 $x^2$。", "4", "因为 $x=2$，所以 $x^2=4$，故答案为 4。", None, "zh")
    )
    no_analysis = parse_question("题干：设 $x=2$，求 $x^2$。\n参考答案：4")
    bad_choice = parse_question(
        render_target("Pick one.", "E", "Since no reason, hence E.", {"A": "1", "B": "2"}, "en")
    )
    from qgen.answers import check_answers

    verdicts = [c.consistent for c in check_answers([good, no_analysis, bad_choice])]
    assert verdicts == [True, None, False]  # verified right; no solution to check; E is not one of 2 options
    # (tier + h) / 3: tier 2 / 1 / 0; h = (3 sections + 3 connective density + 2 not truncated) / 8
    assert rigor_score(good, "zh", False, True) == pytest.approx(1.0)
    assert rigor_score(good, "zh", True, True) == pytest.approx((2 + 6 / 8) / 3)
    assert rigor_score(good, "zh", False, None) == pytest.approx(2 / 3)  # the check not run: the middle tier
    assert rigor_score(no_analysis, "zh", False, None) == pytest.approx((1 + (3 * 2 / 3 + 2) / 8) / 3)
    assert rigor_score(bad_choice, "en", False, False) == pytest.approx(1 / 3)  # its heuristics are perfect
    assert rigor_score(bad_choice, "en", False, False) <= 1 / 3 < rigor_score(no_analysis, "zh", False, None)


def test_difficulty_model_learns_labels_and_falls_back():
    easy = [
        Question(str(i), "t", "en", "m", "p", f"What is {i} plus {i}?", str(2 * i), "Add.", difficulty=0.0)
        for i in range(30)
    ]
    hard = [Question(str(i + 99), "t", "en", "m", "p",
                     f"Prove that for every integer n > {i} the polynomial x^n + {i} x + 1 has no rational root.",
                     "x", "Suppose a root p/q exists; by the rational root theorem and parity we derive a contradiction.",
                     difficulty=1.0) for i in range(30)]  # fmt: skip
    model = DifficultyModel().fit(easy + hard)
    pred = model.predict(
        ["What is 50 plus 50?", "Prove that for every integer n > 3 the polynomial x^n + 5x + 1 is irreducible."],
        ["Add.", "Suppose it factors; by the rational root theorem we derive a contradiction."],
    )
    assert pred[0] < 0.3 and pred[1] > 0.7
    untrained = DifficultyModel().predict(["Short?"], [""])
    assert untrained[0] == pytest.approx(heuristic_difficulty("Short?"))
    assert heuristic_difficulty("Prove that the maximum of $x$ ..." * 20) > heuristic_difficulty("What is 1+1?")


def _exact_cosine(bank, queries):
    """Brute force: the same hashed, sublinear TF-IDF as NoveltyIndex, full vectors, dense product."""
    index = NoveltyIndex(bank, top_k=None)
    b = index.tfidf.transform(index.hasher.transform(bank)).toarray()
    q = index.tfidf.transform(index.hasher.transform(queries)).toarray()
    return (q @ b.T).max(axis=1)


def test_the_near_copy_decision_is_exact_where_the_pruned_index_is_not(bundled_bank):
    """Queries made from bank questions with growing damage (words dropped) put the exact cosine on both
    sides of 0.85; the decision must equal brute force on every one of them, whatever the pruned index says.
    """
    import random

    rng = random.Random(0)
    bank = bundled_bank[:300]
    queries = []
    for text in bank[:150]:
        words = text.split()
        for drop in (0.1, 0.2, 0.35):
            kept = [w for w in words if rng.random() > drop] or words[:1]
            queries.append(" ".join(kept) if len(words) > 3 else text[: max(1, int(len(text) * (1 - drop)))])
    exact = _exact_cosine(bank, queries)
    index = NoveltyIndex(bank)  # the default pruned index (top_k=64)
    sims, near = index.near_copy_similarity(queries, 0.85)
    assert near.tolist() == (exact > 0.85).tolist()
    np.testing.assert_allclose(sims[near], exact[near], atol=1e-5)
    assert (sims[~near] <= 0.85).all()
    assert 10 < near.sum() < len(queries) - 10  # both sides of the threshold are exercised
    flips = ((index.max_similarity(queries) > 0.85) != (exact > 0.85)).sum()
    print(f"pruned-index decision flips: {flips} of {len(queries)}")
    # questions added to the bank are covered too
    new = "A brand new question about the volume of a cone of radius 3 and height 4?"
    index.add([new])
    _, near_new = index.near_copy_similarity([new], 0.85)
    assert near_new.tolist() == [True]


@pytest.mark.parametrize(("threshold", "margin"), [(0.5, 0.05), (0.7, 0.05), (0.85, 0.05), (0.95, 0.05),
                                                   (0.85, 0.0), (0.85, 0.4)])  # fmt: skip
def test_exact_similarity_above_equals_brute_force_at_any_threshold(bundled_bank, threshold, margin, monkeypatch):
    """Candidates come only from the query's prefix features and are dropped by the bound before their exact
    cosine: no pair at or above the threshold is missed, whatever the query's prefix margin.
    """
    import random

    monkeypatch.setattr(NoveltyIndex, "QUERY_MARGIN", margin)

    rng = random.Random(1)
    bank = bundled_bank[:400]
    queries = []
    for text in bank[::3]:
        words = text.split()
        drop = rng.choice((0.05, 0.15, 0.3, 0.5))
        kept = [w for w in words if rng.random() > drop] or words[:1]
        queries.append(" ".join(kept) if len(words) > 3 else text[: max(1, int(len(text) * (1 - drop)))])
    exact = _exact_cosine(bank, queries)
    got = NoveltyIndex(bank).exact_similarity_above(queries, threshold)
    above = exact >= threshold + 1e-6
    assert above.any()
    np.testing.assert_allclose(got[above], exact[above], atol=1e-5)
    assert (got[exact < threshold - 1e-6] == -1).all()


def test_a_chunked_fast_index_with_merged_additions_answers_as_one_block(bundled_bank, monkeypatch):
    """The fast index is split every ``CHUNK`` questions and additions are merged after 8 of them: the
    similarities, the nearest positions and the near-copy decisions must not change.
    """
    bank, extra = bundled_bank[:300], bundled_bank[300:400]
    queries = bundled_bank[:40:4] + extra[::10] + ["A question about nothing in the bank at all?"]
    one = NoveltyIndex(bank)
    monkeypatch.setattr(NoveltyIndex, "CHUNK", 64)
    chunked = NoveltyIndex(bank)
    assert [b.shape[1] for b in chunked._blocks] == [64, 64, 64, 64, 44]
    for i in range(0, len(extra), 10):
        one.add(extra[i : i + 10])
        chunked.add(extra[i : i + 10])
    assert len(chunked._full) == 3  # merged once, after the 8th addition
    np.testing.assert_array_equal(chunked.max_similarity(queries), one.max_similarity(queries))
    sims, where = chunked.nearest(queries)
    np.testing.assert_array_equal(sims, one.nearest(queries)[0])
    assert where.tolist() == one.nearest(queries)[1].tolist()
    texts = bank + extra  # positions count the bank, then the added questions in order
    found = [normalize_for_similarity(texts[w]) for w in where[10:20]]
    assert found == [normalize_for_similarity(q) for q in extra[::10]]
    assert (where[10:20] >= 300).any()  # some are found only among the additions
    for a, b in zip(chunked.near_copy_similarity(queries, 0.85), one.near_copy_similarity(queries, 0.85)):
        np.testing.assert_array_equal(a, b)


@needs_shared
def test_cross_validation_picks_the_alpha_with_the_best_held_out_spearman():
    from scipy.stats import spearmanr

    path = os.path.join(SHARED, "math", "train.jsonl")
    records = [r for r in read_source("math", path).records if r.difficulty is not None][:600]
    model = DifficultyModel(max_features=2**14)
    scores = model.cross_validate(records[:500], alphas=(1.0, 1e5), folds=5)
    assert set(scores) == {1.0, 1e5}
    assert model.alpha == max(scores, key=scores.get) == 1.0  # a huge penalty flattens what the text says
    assert scores[1.0] > scores[1e5] and 0.3 < scores[1.0] < 1.0
    rho = spearmanr(model.fit(records[:500]).predict([r.question for r in records[500:]],
                                                     [r.analysis for r in records[500:]],
                                                     [r.subject for r in records[500:]]),
                    [r.difficulty for r in records[500:]])[0]  # fmt: skip
    assert rho > 0.3
    with pytest.raises(ValueError, match="at least 100 labelled records"):
        DifficultyModel().cross_validate(records[:50])


def test_one_scorer_gives_rewards_predict_and_score_the_same_values(tmp_path):
    """The reward callbacks, ``predict``'s written scores and ``qgen score`` read the same components from one
    :class:`QuestionScorer` kind: for the same texts, training records, bank and truncation flags their
    difficulty, novelty, rigor, answer verdict and educational value agree (predict rounds to 4 places).
    """
    import json
    from types import SimpleNamespace

    from callbacks import DifficultyReward, EducationalValueJudge, NoveltyReward, PredictionWriter, RigorReward
    from qgen.generation import parsed_row
    from qgen.score import main as score_main
    from qgen.scoring import combine_scores

    train = read_source("jsonl", os.path.join(ROOT, "data", "*.jsonl")).records[:400]
    copied = train[3]
    texts = [
        "Question: Compute 3*4 + 5.\nAnswer: 17\nSolution: Since 3*4 = 12, we get 12 + 5 = 17, so the answer is 17.",
        "Question: Find x if 2x = 10.\nAnswer: 6\nSolution: Dividing by 2 gives x = 5. The answer is 5.",
        f"题干：{copied.question}\n参考答案：{copied.answer}\n解析：{copied.analysis or '略'}",  # a copy of the bank
        "题干：求 1+1。\n参考答案：2\n解析：因为 1+1=2，所以答案为 2。",
    ]
    language = ["en", "en", "zh", "zh"]
    subject = ["algebra", "algebra", copied.subject, "math"]
    records = [Question(f"p{i}", "prompts", language[i], subject[i], "problem", "", "") for i in range(4)]
    datamodule = SimpleNamespace(load_records=lambda: {"train": train})
    trainer = SimpleNamespace(datamodule=datamodule)
    callbacks = {c.name: c for c in (DifficultyReward(), NoveltyReward(), RigorReward(), EducationalValueJudge())}
    for c in callbacks.values():
        c.setup(trainer, SimpleNamespace(), "fit")
    assert callbacks["difficulty"].scorer is callbacks["novelty"].scorer  # built once per run
    _, rewards = combine_scores(callbacks, texts, records, [False] * 4)

    writer = PredictionWriter(str(tmp_path / "p.jsonl"))
    writer.scorer = callbacks["difficulty"].scorer
    rows = [{"text": t, **parsed_row(t), "language": language[i], "subject": subject[i], "truncated": False}
            for i, t in enumerate(texts)]  # fmt: skip
    writer.score(rows)
    predicted = [r["scores"] for r in rows]

    inputs = tmp_path / "q.jsonl"
    inputs.write_text("".join(json.dumps({"id": str(i), "question": r["question"], "answer": r["answer"],
                                          "analysis": r["analysis"], "subject": subject[i], "language": language[i]},
                                         ensure_ascii=False) + "\n" for i, r in enumerate(rows)), encoding="utf-8")  # fmt: skip
    bank = tmp_path / "train.jsonl"
    bank.write_text("".join(json.dumps({k: getattr(r, k) for k in ("id", "question", "answer", "analysis", "subject",
                                                                    "language", "difficulty") if getattr(r, k) is not None},
                                       ensure_ascii=False) + "\n" for r in train), encoding="utf-8")  # fmt: skip
    out = tmp_path / "scored.jsonl"
    assert score_main(["--input", f"jsonl:{inputs}", "--difficulty-train", f"jsonl:{bank}", "--output", str(out)]) == 0
    scored = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]

    for i in range(4):
        for name, reward_value in (("difficulty", rewards["difficulty"].values[i]), ("rigor", rewards["rigor"].values[i]),
                                   ("novelty", rewards["novelty"].values[i])):  # fmt: skip
            assert predicted[i][name] == pytest.approx(reward_value, abs=6e-5), (i, name)
            assert scored[i][name] == pytest.approx(reward_value, abs=1e-6), (i, name)
        assert predicted[i]["educational_value"] == pytest.approx(rewards["educational_value"].values[i], abs=6e-5)
        assert predicted[i]["answer_consistent"] == scored[i]["answer_consistent"]
    assert [s["answer_consistent"] for s in predicted] == [True, False, True, True]
    assert rewards["novelty"].extra["near_copy"].tolist()[2] == 1.0 and predicted[2]["near_copy"]
    assert len({round(v, 3) for v in rewards["difficulty"].values}) > 1  # a fitted model, not one constant
