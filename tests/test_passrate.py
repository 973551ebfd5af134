"""Pass-rate rewards and the adaptive solver-sampling rule (qgen.passrate), and SolverDifficulty using them."""

import itertools

import pytest
from test_solver import ScriptedSolver, score

from callbacks import SolverDifficulty
from qgen.passrate import AdaptiveRule, pass_rate_reward, predictive


def test_each_shape_against_hand_values():
    # 3 of 10: band 1 - 2|0.3 - 0.5| = 0.6; learnability 4 * 0.3 * 0.7 = 0.84; absolute zero 1 - 0.3 = 0.7
    assert pass_rate_reward("band", 3, 10) == pytest.approx(0.6)
    assert pass_rate_reward("learnability", 3, 10) == pytest.approx(0.84)
    assert pass_rate_reward("absolute_zero", 3, 10) == pytest.approx(0.7)
    for shape in ("band", "learnability", "absolute_zero"):
        assert pass_rate_reward(shape, 0, 10) == 0.0  # no sample reaches the stated answer: invalid
    assert pass_rate_reward("band", 5, 10) == pass_rate_reward("learnability", 5, 10) == 1.0
    assert pass_rate_reward("absolute_zero", 10, 10) == 0.0
    with pytest.raises(ValueError, match="unknown pass-rate shape"):
        pass_rate_reward("flat", 1, 2)


def test_the_predictive_is_beta_binomial_under_a_uniform_prior():
    # 0 of 2 agreed: P(none of 8 more) = B(1, 11) / B(1, 3) = (1/11) / (1/3) = 3/11
    probs = predictive(0, 2, 8)
    assert probs[0] == pytest.approx(3 / 11) and sum(probs) == pytest.approx(1.0)
    assert predictive(1, 2, 1) == pytest.approx([0.5, 0.5])  # posterior mean (1 + 1) / (2 + 2)


def _stream(rule, draws):
    """Run the rule on a scripted stream of solver outcomes: ``(samples read, reported value)``."""
    n = 0
    while (more := rule.next_round(int(sum(draws[:n])), n)) > 0:
        n += more
    return n, rule.value(int(sum(draws[:n])), n)


def test_scripted_streams_stop_where_the_reward_is_settled_and_report_the_full_reward_at_k():
    rule = AdaptiveRule("absolute_zero", samples=10, round_size=2, cost_per_sample=0.05)
    n, value = _stream(rule, [1] * 10)  # solved every time: 1 - p is near 0 whatever follows
    assert n < 10 and value <= 0.1
    # a split stream: after 8 draws (4 agree) the last two can move 1 - p only within [0.4, 0.6]: settled at 0.5
    n, value = _stream(rule, [0, 1] * 5)
    assert n == 8 and value == pytest.approx(0.5)
    for shape in ("band", "learnability", "absolute_zero"):  # at k samples the value is the fixed reward itself
        full = AdaptiveRule(shape, samples=10, round_size=2, cost_per_sample=0.0)
        for agree in range(11):
            assert full.value(agree, 10) == pytest.approx(pass_rate_reward(shape, agree, 10))
    never = AdaptiveRule("band", samples=10, round_size=2, cost_per_sample=0.0)  # free samples: always all 10
    assert _stream(never, [1] * 10)[0] == 10


def test_the_stopping_rule_is_the_best_of_all_policies_for_k_4():
    """Brute force over every deterministic stop/continue choice at the 10 states (a, n < 4), rounds of 1: no
    policy has a higher expected agreement minus cost under the uniform prior than the rule's.
    """
    k, cost, tol, shape = 4, 0.05, 0.1, "learnability"
    rule = AdaptiveRule(shape, samples=k, round_size=1, tolerance=tol, cost_per_sample=cost)
    states = [(a, n) for n in range(1, k) for a in range(n + 1)]

    def worth(stops):
        def value(a, n):  # expected (agreement - cost) from state (a, n) under the policy
            from qgen.passrate import _best_report

            if n == k or (n > 0 and stops[(a, n)]):
                return _best_report(shape, a, n, k, tol)[0]
            p = predictive(a, n, 1)
            return -cost + p[0] * value(a, n + 1) + p[1] * value(a + 1, n + 1)

        return value(0, 0)

    best = max(worth(dict(zip(states, choice))) for choice in itertools.product([False, True], repeat=len(states)))
    ours = worth({s: rule.next_round(*s) == 0 for s in states})
    assert ours == pytest.approx(best, abs=1e-12)


def test_solver_difficulty_samples_in_rounds_and_stops_settled_questions():
    solver = ScriptedSolver(["12", "12"], ["12", "12"])  # solved every time
    callback = SolverDifficulty(samples=10, mode="absolute_zero", adaptive=True, round_size=2)
    value, stats = score(callback, solver)
    assert solver.calls == [2, 2]  # settled after 4 of 10
    assert value == pytest.approx(callback.rule.value(4, 4)) and value <= 0.1 + 1e-6  # float32 rewards
    assert stats["solver_samples"] == 4 and stats["solver_pass_rate"] == 1.0
    split = ScriptedSolver(*[["12", "13"]] * 5)
    value, stats = score(SolverDifficulty(samples=10, mode="learnability", adaptive=True, round_size=2), split)
    assert split.calls == [2] * (len(split.calls)) and stats["solver_samples"] == 2 * len(split.calls)
    assert value == pytest.approx(pass_rate_reward("learnability", 5, 10), abs=0.1 + 1e-6)  # agrees with all 10
    with pytest.raises(ValueError, match="mode must be"):
        SolverDifficulty(mode="flat")
