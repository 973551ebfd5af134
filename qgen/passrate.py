"""Rewards from a solver's pass rate, and when to stop sampling the solver.

A solver answers a question ``n`` times, ``a`` of them reaching the stated answer; ``p = a / n``. Each shape is
multiplied by validity ``1[a >= 1]`` (no solver sample reaching the stated answer is the signature of a wrong or
unsolvable question):

- ``band`` (R-Zero, Huang et al. 2025): ``1 - 2 |p - 1/2|``, highest for questions solved half the time;
- ``learnability`` (the proposer reward of prime-rl's verifier environments): ``4 p (1 - p)``, the variance of
  one attempt, scaled to 1 at ``p = 1/2``;
- ``absolute_zero`` (Absolute Zero, Zhao et al. 2025): ``1 - p``, and 0 when ``p = 0``.

**Adaptive sampling** (:class:`AdaptiveRule`). The reference decision is the reward of ``k`` samples (``k = 10``).
Sampling in rounds, the rule stops as soon as the reward it can report already agrees with the reward all
``k`` samples would give (within ``tolerance``) with high enough probability to be worth no more samples: the
pass rate's posterior is Beta(a + 1, n - a + 1) (uniform prior), the rest of the ``k`` samples follow its
Beta-binomial predictive, and the stopping rule is the Bayes-optimal one of a small dynamic programme over the
states ``(a, n)``: at each state it stops when the probability of agreement of the best reportable value is at
least what continuing would give, less ``cost_per_sample`` for each sample a round draws. The reported value
is that best one (the centre of the most probable ``2 x tolerance`` window of final rewards), not
``shape(a / n)``. ``benchmarks/solver_sampling.py`` measures the agreement and the samples saved.
"""

from __future__ import annotations

from functools import lru_cache
from math import comb, exp, lgamma

SHAPES = ("band", "learnability", "absolute_zero")


def shape_value(shape: str, p: float) -> float:
    """The shape at pass rate ``p`` (validity not applied)."""
    if shape == "band":
        return 1.0 - 2.0 * abs(p - 0.5)
    if shape == "learnability":
        return 4.0 * p * (1.0 - p)
    if shape == "absolute_zero":
        return 1.0 - p
    raise ValueError(f"unknown pass-rate shape {shape!r}; one of {', '.join(SHAPES)}")


def pass_rate_reward(shape: str, agree: int, n: int) -> float:
    """``1[agree >= 1] * shape(agree / n)``; 0 with no samples."""
    if n <= 0 or agree <= 0:
        return 0.0
    return shape_value(shape, agree / n)


def _log_beta(a: float, b: float) -> float:
    return lgamma(a) + lgamma(b) - lgamma(a + b)


def predictive(agree: int, n: int, more: int) -> list[float]:
    """P(k of ``more`` further samples agree | ``agree`` of ``n`` did), k = 0..more (Beta(1, 1) prior)."""
    a, b = agree + 1, n - agree + 1
    return [comb(more, k) * exp(_log_beta(k + a, more - k + b) - _log_beta(a, b)) for k in range(more + 1)]


class AdaptiveRule:
    """When to stop sampling the solver (see the module docstring).

    Args:
        shape: the reward shape (:data:`SHAPES`).
        samples: ``k``, the fixed number of samples the rule stands in for (and its maximum).
        round_size: samples drawn per round (one request of that many samples per question).
        tolerance: agreement means ``|reported - reward of k samples| <= tolerance``.
        cost_per_sample: probability of agreement one more sample must be worth.
    """

    def __init__(self, shape: str = "learnability", samples: int = 10, round_size: int = 2, tolerance: float = 0.1,
                 cost_per_sample: float = 0.05):  # fmt: skip
        if shape not in SHAPES:
            raise ValueError(f"unknown pass-rate shape {shape!r}; one of {', '.join(SHAPES)}")
        if samples < 1 or round_size < 1 or tolerance < 0 or cost_per_sample < 0:
            raise ValueError("AdaptiveRule: need samples >= 1, round_size >= 1, tolerance >= 0, cost_per_sample >= 0")
        self.shape, self.samples, self.round_size = shape, samples, round_size
        self.tolerance, self.cost = tolerance, cost_per_sample
        self._plan = _plan(shape, samples, round_size, tolerance, cost_per_sample)

    def next_round(self, agree: int, n: int) -> int:
        """Samples to draw next for a question at ``agree`` of ``n`` (0: settled)."""
        return 0 if self._plan[(agree, n)][0] else min(self.round_size, self.samples - n)

    def value(self, agree: int, n: int) -> float:
        """The reward reported for a question settled at ``agree`` of ``n``."""
        return self._plan[(agree, n)][1]


def _best_report(shape: str, agree: int, n: int, k: int, tolerance: float) -> tuple[float, float]:
    """``(probability of agreement, value)`` of the best value to report at ``(agree, n)``."""
    finals = [pass_rate_reward(shape, agree + j, k) for j in range(k - n + 1)]
    weights = predictive(agree, n, k - n)
    mean = sum(w * f for w, f in zip(weights, finals))
    best, value = -1.0, 0.0
    for centre in {min(max(f + d, 0.0), 1.0) for f in finals for d in (-tolerance, 0.0, tolerance)}:
        mass = sum(w for w, f in zip(weights, finals) if abs(f - centre) <= tolerance + 1e-12)
        # the most probable window; of equally probable ones, the centre nearest the expected reward
        if mass > best + 1e-12 or (abs(mass - best) <= 1e-12 and abs(centre - mean) < abs(value - mean)):
            best, value = mass, centre
    return best, value


@lru_cache(maxsize=32)
def _plan(shape: str, k: int, round_size: int, tolerance: float,
          cost: float) -> dict[tuple[int, int], tuple[bool, float]]:  # fmt: skip
    """``(agree, n) -> (stop, reported value)`` for every reachable state, by backward induction."""
    worth: dict[tuple[int, int], float] = {}
    plan: dict[tuple[int, int], tuple[bool, float]] = {}
    for n in range(k, -1, -1):
        for agree in range(n + 1):
            stop_worth, value = _best_report(shape, agree, n, k, tolerance) if n else (-1.0, 0.0)
            if n == k:
                worth[(agree, n)], plan[(agree, n)] = stop_worth, (True, value)
                continue
            draw = min(round_size, k - n)
            go = -cost * draw + sum(p * worth[(agree + j, n + draw)] for j, p in enumerate(predictive(agree, n, draw)))
            if n > 0 and stop_worth >= go:
                worth[(agree, n)], plan[(agree, n)] = stop_worth, (True, value)
            else:
                worth[(agree, n)], plan[(agree, n)] = go, (False, value)
    return plan
