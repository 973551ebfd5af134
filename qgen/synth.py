"""Generator of the bundled question bank in ``data/``: templated problems whose answers are computed.

Every template is written for this project. Each draws its numbers from a seeded RNG and computes the
answer and a short worked solution, so a template also yields natural *condition variants* of itself
(the same problem with other conditions), which is what the SFT task mixture needs.

Regenerate with ``python -m qgen.synth --out data`` (deterministic for a given ``--seed``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
from collections.abc import Callable
from fractions import Fraction

Template = Callable[[random.Random], dict]


def _frac(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else f"\\frac{{{x.numerator}}}{{{x.denominator}}}"


def _p(x: int) -> str:
    """A number as a factor: negatives in parentheses."""
    return f"({x})" if x < 0 else str(x)


def _mcq(rng: random.Random, correct: str, wrong: list[str]) -> tuple[dict[str, str], str]:
    """Shuffle the correct value among three distinct distractors; return options and the answer letter."""
    values = [correct] + [w for w in dict.fromkeys(wrong) if w != correct][:3]
    rng.shuffle(values)
    options = dict(zip("ABCD", values))
    return options, next(k for k, v in options.items() if v == correct)


# ---------------------------------------------------------------------------------------- Chinese (gaokao)


def zh_arith_seq(rng: random.Random) -> dict:
    a1, d, n = rng.randint(-5, 9), rng.choice([2, 3, 4, 5, -2, -3]), rng.randint(8, 15)
    a3, a6 = a1 + 2 * d, a1 + 5 * d
    s_n = n * a1 + n * (n - 1) // 2 * d
    return dict(
        subject="数学", qtype="fill_blank", level="中档", knowledge=["等差数列", "数列求和"],
        question=f"已知等差数列 $\\{{a_n\\}}$ 满足 $a_3={a3}$，$a_6={a6}$，则其前 ${n}$ 项和 $S_{{{n}}}=$______。",
        answer=str(s_n),
        analysis=(f"设公差为 $d$，因为 $a_6-a_3=3d={a6 - a3}$，所以 $d={d}$，$a_1=a_3-2d={a1}$。"
                  f"故 $S_{{{n}}}={n}a_1+\\frac{{{n}\\times{n - 1}}}{{2}}d={s_n}$。"),
    )  # fmt: skip


def zh_geo_seq(rng: random.Random) -> dict:
    a1, q, k = rng.randint(1, 4), rng.choice([2, 3]), rng.randint(4, 6)
    a2, a4 = a1 * q, a1 * q**3
    s_k = a1 * (q**k - 1) // (q - 1)
    options, letter = _mcq(rng, str(s_k), [str(s_k - a1), str(a1 * q**k), str(s_k + a1 * q), str(s_k * q)])
    return dict(
        subject="数学", qtype="mcq", level="基础", knowledge=["等比数列", "数列求和"],
        question=f"在各项均为正数的等比数列 $\\{{a_n\\}}$ 中，$a_2={a2}$，$a_4={a4}$，则 $S_{k}=$（　　）",
        options=options, answer=letter,
        analysis=(f"设公比为 $q$，因为 $q^2=\\frac{{a_4}}{{a_2}}={q * q}$ 且 $q>0$，所以 $q={q}$，$a_1={a1}$。"
                  f"故 $S_{k}=\\frac{{{a1}({q}^{k}-1)}}{{{q}-1}}={s_k}$，选 {letter}。"),
    )  # fmt: skip


def zh_complex(rng: random.Random) -> dict:
    a, b, c, d = (rng.choice([x for x in range(-4, 5) if x]) for _ in range(4))
    re_, im = a * c - b * d, a * d + b * c
    correct = f"{re_}{'+' if im >= 0 else '-'}{abs(im)}i"
    wrong = [
        f"{a * c + b * d}{'+' if im >= 0 else '-'}{abs(im)}i",
        f"{re_}{'-' if im >= 0 else '+'}{abs(im)}i",
        f"{im}{'+' if re_ >= 0 else '-'}{abs(re_)}i",
        f"{-re_}{'+' if im >= 0 else '-'}{abs(im)}i",
    ]
    options, letter = _mcq(rng, correct, wrong)
    z1 = f"{a}{'+' if b > 0 else '-'}{abs(b)}i"
    z2 = f"{c}{'+' if d > 0 else '-'}{abs(d)}i"
    return dict(
        subject="数学", qtype="mcq", level="基础", knowledge=["复数的乘法运算"],
        question=f"设复数 $z_1={z1}$，$z_2={z2}$，则 $z_1z_2=$（　　）", options=options, answer=letter,
        analysis=(f"$z_1z_2=({z1})({z2})={a * c}+({a * d})i+({b * c})i+({b * d})i^2$，"
                  f"因为 $i^2=-1$，所以 $z_1z_2={correct}$，故选 {letter}。"),
    )  # fmt: skip


def zh_sets(rng: random.Random) -> dict:
    lo, hi = rng.randint(-3, 1), rng.randint(3, 6)
    m = rng.randint(lo + 1, hi - 1)
    inter = [x for x in range(lo, hi + 1) if x > m]
    correct = "\\{" + ",".join(map(str, inter)) + "\\}"
    wrong = [
        "\\{" + ",".join(map(str, [x for x in range(lo, hi + 1) if x >= m])) + "\\}",
        "\\{" + ",".join(map(str, [x for x in range(lo, hi + 1) if x < m])) + "\\}",
        "\\{" + ",".join(map(str, inter[:-1] or [m])) + "\\}",
        "\\{" + ",".join(map(str, [m] + inter)) + "\\}",
    ]
    options, letter = _mcq(rng, correct, wrong)
    return dict(
        subject="数学", qtype="mcq", level="基础", knowledge=["集合的交集", "一元一次不等式"],
        question=(f"已知集合 $A=\\{{x\\in\\mathbb{{Z}}\\mid {lo}\\le x\\le {hi}\\}}$，"
                  f"$B=\\{{x\\mid x{-m:+d}>0\\}}$，则 $A\\cap B=$（　　）"),
        options=options, answer=letter,
        analysis=f"由 $x{-m:+d}>0$ 得 $x>{m}$，所以 $A\\cap B$ 由 $A$ 中大于 ${m}$ 的整数组成，即 ${correct}$，故选 {letter}。",
    )  # fmt: skip


def zh_quadratic_max(rng: random.Random) -> dict:
    h, k, a = rng.randint(-3, 3), rng.randint(-5, 8), rng.choice([1, 2])
    lo, hi = h - rng.randint(1, 3), h + rng.randint(2, 4)
    b, c = -2 * a * h, a * h * h + k

    def f(x: int) -> int:
        return a * x * x + b * x + c

    best = max(f(lo), f(hi))
    return dict(
        subject="数学", qtype="fill_blank", level="中档", knowledge=["二次函数", "函数的最值"],
        question=f"函数 $f(x)={a if a > 1 else ''}x^2{b:+d}x{c:+d}$ 在区间 $[{lo},{hi}]$ 上的最大值为______。",
        answer=str(best),
        analysis=(f"因为 $f(x)={a if a > 1 else ''}(x{-h:+d})^2{k:+d}$，图象开口向上，对称轴为 $x={h}$，"
                  f"所以最大值在区间端点取得。又 $f({lo})={f(lo)}$，$f({hi})={f(hi)}$，故最大值为 ${best}$。"),
    )  # fmt: skip


def zh_vector_dot(rng: random.Random) -> dict:
    a1, a2, b1, b2 = (rng.randint(-4, 5) for _ in range(4))
    lam = rng.randint(1, 3)
    dot = a1 * (a1 + lam * b1) + a2 * (a2 + lam * b2)
    return dict(
        subject="数学", qtype="fill_blank", level="基础", knowledge=["平面向量的数量积", "向量的坐标运算"],
        question=f"已知向量 $\\vec a=({a1},{a2})$，$\\vec b=({b1},{b2})$，则 $\\vec a\\cdot(\\vec a+{lam}\\vec b)=$______。",
        answer=str(dot),
        analysis=(f"因为 $\\vec a+{lam}\\vec b=({a1 + lam * b1},{a2 + lam * b2})$，"
                  f"所以 $\\vec a\\cdot(\\vec a+{lam}\\vec b)={_p(a1)}\\times{_p(a1 + lam * b1)}+{_p(a2)}\\times{_p(a2 + lam * b2)}={dot}$。"),
    )  # fmt: skip


def zh_probability(rng: random.Random) -> dict:
    red, white = rng.randint(2, 5), rng.randint(2, 5)
    total = red + white
    p = Fraction(red * (red - 1) + white * (white - 1), total * (total - 1))
    return dict(
        subject="数学", qtype="fill_blank", level="中档", knowledge=["古典概型", "组合数"],
        question=f"袋中有 ${red}$ 个红球和 ${white}$ 个白球，这些球除颜色外完全相同。从中任取 $2$ 个球，则取出的两球颜色相同的概率为______。",
        answer=f"${_frac(p)}$",
        analysis=(f"从 ${total}$ 个球中任取 $2$ 个，共有 $C_{{{total}}}^2={total * (total - 1) // 2}$ 种取法；"
                  f"两球同色的取法有 $C_{{{red}}}^2+C_{{{white}}}^2={red * (red - 1) // 2 + white * (white - 1) // 2}$ 种。"
                  f"所以所求概率为 ${_frac(p)}$。"),
    )  # fmt: skip


def zh_tangent(rng: random.Random) -> dict:
    a, b, x0 = rng.randint(1, 3), rng.randint(-4, 4), rng.randint(-2, 2)
    y0 = a * x0**3 + b * x0
    slope = 3 * a * x0 * x0 + b
    intercept = y0 - slope * x0
    return dict(
        subject="数学", qtype="fill_blank", level="中档", knowledge=["导数的几何意义", "切线方程"],
        question=f"曲线 $y={a if a > 1 else ''}x^3{b:+d}x$ 在点 $({x0},{y0})$ 处的切线方程为______。",
        answer=f"$y={slope}x{intercept:+d}$",
        analysis=(f"因为 $y'={3 * a}x^2{b:+d}$，所以切线斜率 $k={slope}$。"
                  f"故切线方程为 $y-({y0})={slope}(x-({x0}))$，即 $y={slope}x{intercept:+d}$。"),
    )  # fmt: skip


def zh_trig(rng: random.Random) -> dict:
    (p, q, r) = rng.choice([(3, 4, 5), (5, 12, 13), (8, 15, 17), (7, 24, 25)])
    sin_v, cos_v = Fraction(p, r), Fraction(q, r)
    sin2 = 2 * sin_v * cos_v
    options, letter = _mcq(
        rng,
        f"${_frac(sin2)}$",
        [
            f"${_frac(sin_v * cos_v)}$",
            f"${_frac(-sin2)}$",
            f"${_frac(cos_v * cos_v - sin_v * sin_v)}$",
            f"${_frac(2 * sin_v)}$",
        ],
    )
    return dict(
        subject="数学", qtype="mcq", level="基础", knowledge=["同角三角函数关系", "二倍角公式"],
        question=f"已知 $\\alpha$ 为锐角，且 $\\sin\\alpha=\\frac{{{p}}}{{{r}}}$，则 $\\sin2\\alpha=$（　　）",
        options=options, answer=letter,
        analysis=(f"因为 $\\alpha$ 为锐角，所以 $\\cos\\alpha=\\sqrt{{1-\\sin^2\\alpha}}=\\frac{{{q}}}{{{r}}}$。"
                  f"故 $\\sin2\\alpha=2\\sin\\alpha\\cos\\alpha={_frac(sin2)}$，选 {letter}。"),
    )  # fmt: skip


def zh_circle(rng: random.Random) -> dict:
    a, b, r = rng.randint(-3, 3), rng.randint(-3, 3), rng.randint(2, 5)
    d, e, f = -2 * a, -2 * b, a * a + b * b - r * r
    return dict(
        subject="数学", qtype="fill_blank", level="基础", knowledge=["圆的一般方程", "配方法"],
        question=f"圆 $x^2+y^2{d:+d}x{e:+d}y{f:+d}=0$ 的半径为______。",
        answer=str(r),
        analysis=f"配方得 $(x{-a:+d})^2+(y{-b:+d})^2={r * r}$，所以圆心为 $({a},{b})$，半径为 ${r}$。",
    )  # fmt: skip


def zh_arrangement(rng: random.Random) -> dict:
    n = rng.randint(4, 6)
    total = math.factorial(n) - 2 * math.factorial(n - 1)
    return dict(
        subject="数学", qtype="fill_blank", level="中档", knowledge=["排列", "间接法"],
        question=f"${n}$ 名同学站成一排照相，其中甲不站在排头也不站在排尾，则不同的站法共有______种。",
        answer=str(total),
        analysis=(f"先考虑全部排列，共 $A_{{{n}}}^{{{n}}}={math.factorial(n)}$ 种；甲站排头或排尾各有 ${math.factorial(n - 1)}$ 种。"
                  f"因此满足条件的站法有 ${math.factorial(n)}-2\\times{math.factorial(n - 1)}={total}$ 种。"),
    )  # fmt: skip


def zh_physics_motion(rng: random.Random) -> dict:
    v0, a, t = rng.randint(2, 10), rng.randint(1, 4), rng.randint(2, 6)
    s = v0 * t + Fraction(a * t * t, 2)
    return dict(
        subject="物理", qtype="fill_blank", level="基础", knowledge=["匀变速直线运动", "位移公式"],
        question=f"一物体以 ${v0}\\,\\mathrm{{m/s}}$ 的初速度做匀加速直线运动，加速度为 ${a}\\,\\mathrm{{m/s^2}}$，则前 ${t}\\,\\mathrm{{s}}$ 内的位移为______$\\mathrm{{m}}$。",
        answer=_frac(s),
        analysis=f"由位移公式 $x=v_0t+\\frac12at^2={v0}\\times{t}+\\frac12\\times{a}\\times{t}^2={_frac(s)}$，故位移为 ${_frac(s)}\\,\\mathrm{{m}}$。",
    )  # fmt: skip


# ----------------------------------------------------------------------------------- English (competition)


def en_remainder(rng: random.Random) -> dict:
    base, exp = rng.choice([2, 3, 7]), rng.randint(20, 99)
    mod = rng.choice([m for m in (5, 7, 9, 11, 13) if math.gcd(m, base) == 1])
    ans = pow(base, exp, mod)
    order = next(k for k in range(1, mod + 1) if pow(base, k, mod) == 1)
    return dict(
        subject="Number Theory", qtype="problem", level="Level 2", knowledge=["modular arithmetic", "cyclicity"],
        question=f"What is the remainder when ${base}^{{{exp}}}$ is divided by ${mod}$?",
        answer=str(ans),
        analysis=(f"The powers of ${base}$ modulo ${mod}$ repeat with period ${order}$, since ${base}^{{{order}}}\\equiv 1 \\pmod{{{mod}}}$. "
                  f"Because ${exp} = {order}\\cdot{exp // order} + {exp % order}$, we have ${base}^{{{exp}}} \\equiv {base}^{{{exp % order}}} \\equiv {ans}$. "
                  f"Therefore the remainder is $\\boxed{{{ans}}}$."),
    )  # fmt: skip


def en_divisors(rng: random.Random) -> dict:
    p, q = rng.sample([2, 3, 5, 7], 2)
    a, b = rng.randint(1, 4), rng.randint(1, 3)
    n = p**a * q**b
    count = (a + 1) * (b + 1)
    return dict(
        subject="Number Theory", qtype="problem", level="Level 2", knowledge=["divisor counting", "prime factorization"],
        question=f"How many positive divisors does ${n}$ have?",
        answer=str(count),
        analysis=(f"Since ${n} = {p}^{{{a}}}\\cdot {q}^{{{b}}}$, every divisor has the form ${p}^i {q}^j$ with "
                  f"$0\\le i\\le {a}$ and $0\\le j\\le {b}$. Hence there are $({a}+1)({b}+1) = \\boxed{{{count}}}$ divisors."),
    )  # fmt: skip


def en_vieta(rng: random.Random) -> dict:
    r1, r2 = rng.randint(-6, 6), rng.randint(-6, 6)
    s, p = r1 + r2, r1 * r2
    value = s * s - 2 * p
    return dict(
        subject="Algebra", qtype="problem", level="Level 3", knowledge=["Vieta's formulas", "symmetric sums"],
        question=f"Let $r$ and $s$ be the roots of $x^2 {-s:+d}x {p:+d} = 0$. Find $r^2 + s^2$.",
        answer=str(value),
        analysis=(f"By Vieta's formulas $r+s={s}$ and $rs={p}$. Since $r^2+s^2=(r+s)^2-2rs$, "
                  f"we get $r^2+s^2={s * s}-({2 * p})=\\boxed{{{value}}}$."),
    )  # fmt: skip


def en_grid_paths(rng: random.Random) -> dict:
    w, h = rng.randint(2, 6), rng.randint(2, 5)
    ans = math.comb(w + h, h)
    return dict(
        subject="Counting & Probability", qtype="problem", level="Level 2", knowledge=["lattice paths", "binomial coefficients"],
        question=f"A token moves on a grid from $(0,0)$ to $({w},{h})$, each move one unit right or one unit up. How many different paths are there?",
        answer=str(ans),
        analysis=(f"Every path consists of ${w}$ right moves and ${h}$ up moves in some order, so a path is determined by "
                  f"choosing which ${h}$ of the ${w + h}$ moves go up. Therefore there are $\\binom{{{w + h}}}{{{h}}}=\\boxed{{{ans}}}$ paths."),
    )  # fmt: skip


def en_dice(rng: random.Random) -> dict:
    target = rng.randint(3, 11)
    ways = sum(1 for a in range(1, 7) for b in range(1, 7) if a + b == target)
    p = Fraction(ways, 36)
    options, letter = _mcq(
        rng,
        f"${_frac(p)}$",
        [
            f"${_frac(Fraction(ways + 1, 36))}$",
            f"${_frac(Fraction(ways, 12))}$",
            f"${_frac(Fraction(max(ways - 1, 1), 36))}$",
            f"${_frac(Fraction(ways, 6))}$",
        ],
    )
    return dict(
        subject="Counting & Probability", qtype="single_choice", level="Level 1", knowledge=["probability", "dice"],
        question=f"A pair of fair cubes with faces numbered 1 to 6 is thrown. Find the chance that the two top faces add up to ${target}$.",
        options=options, answer=letter,
        analysis=(f"There are $36$ equally likely outcomes. The pairs with sum ${target}$ are counted directly: there are ${ways}$ of them. "
                  f"Hence the probability is $\\frac{{{ways}}}{{36}}={_frac(p)}$, so the answer is {letter}."),
    )  # fmt: skip


def en_triangle_area(rng: random.Random) -> dict:
    pts = [(rng.randint(-5, 5), rng.randint(-5, 5)) for _ in range(3)]
    (x1, y1), (x2, y2), (x3, y3) = pts
    twice = abs(x1 * (y2 - y3) + x2 * (y3 - y1) + x3 * (y1 - y2))
    if twice == 0:
        return en_triangle_area(rng)
    area = Fraction(twice, 2)
    return dict(
        subject="Geometry", qtype="problem", level="Level 3", knowledge=["shoelace formula", "coordinate geometry"],
        question=f"Find the area of the triangle with vertices $({x1},{y1})$, $({x2},{y2})$ and $({x3},{y3})$.",
        answer=_frac(area),
        analysis=(f"By the shoelace formula the area is $\\frac12|x_1(y_2-y_3)+x_2(y_3-y_1)+x_3(y_1-y_2)| = \\frac12\\cdot{twice}$. "
                  f"Therefore the area is $\\boxed{{{_frac(area)}}}$."),
    )  # fmt: skip


def en_series(rng: random.Random) -> dict:
    a, d, n = rng.randint(1, 9), rng.randint(2, 7), rng.randint(10, 30)
    last = a + (n - 1) * d
    total = n * (a + last) // 2
    return dict(
        subject="Algebra", qtype="problem", level="Level 2", knowledge=["arithmetic series"],
        question=f"Compute the sum $ {a} + {a + d} + {a + 2 * d} + \\cdots + {last}$.",
        answer=str(total),
        analysis=(f"The terms form an arithmetic sequence with first term ${a}$ and common difference ${d}$, so there are "
                  f"$\\frac{{{last}-{a}}}{{{d}}}+1={n}$ terms. Hence the sum is $\\frac{{{n}({a}+{last})}}{{2}}=\\boxed{{{total}}}$."),
    )  # fmt: skip


def en_lcm_gcd(rng: random.Random) -> dict:
    g = rng.randint(2, 9)
    a, b = rng.sample([x for x in range(2, 12)], 2)
    while math.gcd(a, b) != 1:
        a, b = rng.sample([x for x in range(2, 12)], 2)
    m, n = g * a, g * b
    lcm = m * n // math.gcd(m, n)
    return dict(
        subject="Number Theory", qtype="problem", level="Level 2", knowledge=["gcd and lcm"],
        question=f"What is the sum of the greatest common divisor and the least common multiple of ${m}$ and ${n}$?",
        answer=str(g + lcm),
        analysis=(f"We have ${m}={g}\\cdot{a}$ and ${n}={g}\\cdot{b}$ with $\\gcd({a},{b})=1$, hence $\\gcd({m},{n})={g}$. "
                  f"Since $\\gcd\\cdot\\operatorname{{lcm}}={m}\\cdot{n}$, the lcm is ${lcm}$. Therefore the sum is $\\boxed{{{g + lcm}}}$."),
    )  # fmt: skip


def en_digit_sum(rng: random.Random) -> dict:
    k = rng.randint(2, 4)
    lo, hi = 10 ** (k - 1), 10**k
    target = rng.randint(3, 9 * k - 6)
    count = sum(1 for x in range(lo, hi) if sum(map(int, str(x))) == target)
    return dict(
        subject="Counting & Probability", qtype="problem", level="Level 4", knowledge=["digit sums", "casework"],
        question=f"Count the positive integers with exactly ${k}$ digits whose digit total equals ${target}$.",
        answer=str(count),
        analysis=(f"Write the number as digits $d_1\\cdots d_{k}$ with $1\\le d_1\\le 9$ and $0\\le d_i\\le 9$ otherwise. "
                  f"Counting the solutions of $d_1+\\cdots+d_{k}={target}$ under these bounds (stars and bars with "
                  f"inclusion-exclusion on the digits exceeding $9$) gives $\\boxed{{{count}}}$."),
    )  # fmt: skip


def en_percent(rng: random.Random) -> dict:
    price, up, down = rng.choice([40, 50, 80, 120, 200]), rng.choice([10, 20, 25, 50]), rng.choice([10, 20, 25, 40])
    final = Fraction(price * (100 + up) * (100 - down), 10000)
    return dict(
        subject="Prealgebra", qtype="problem", level="Level 1", knowledge=["percent change"],
        question=f"A jacket costs ${price}$ dollars. Its price is raised by ${up}\\%$ and then the new price is lowered by ${down}\\%$. What is the final price, in dollars?",
        answer=_frac(final),
        analysis=(f"After the increase the price is ${price}\\cdot{Fraction(100 + up, 100)}$; after the decrease it is multiplied by "
                  f"${Fraction(100 - down, 100)}$. Therefore the final price is $\\boxed{{{_frac(final)}}}$ dollars."),
    )  # fmt: skip


ZH_TEMPLATES: list[Template] = [zh_arith_seq, zh_geo_seq, zh_complex, zh_sets, zh_quadratic_max, zh_vector_dot,
                                zh_probability, zh_tangent, zh_trig, zh_circle, zh_arrangement, zh_physics_motion]  # fmt: skip
EN_TEMPLATES: list[Template] = [en_remainder, en_divisors, en_vieta, en_grid_paths, en_dice, en_triangle_area,
                                en_series, en_lcm_gcd, en_digit_sum, en_percent]  # fmt: skip


def generate(templates: list[Template], per_template: int, seed: int, language: str, source: str) -> list[dict]:
    """``per_template`` distinct instances of each template (duplicate question texts are redrawn)."""
    rng = random.Random(seed)
    out, seen = [], set()
    for template in templates:
        made, tries = 0, 0
        while made < per_template and tries < per_template * 20:
            tries += 1
            rec = template(rng)
            if rec["question"] in seen:
                continue
            seen.add(rec["question"])
            made += 1
            out.append(dict(id=f"{source}/{template.__name__}/{made}", language=language, **rec))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data")
    parser.add_argument("--per-template", type=int, default=40)
    parser.add_argument("--seed", type=int, default=2024)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    banks = {
        "gaokao_zh.jsonl": generate(ZH_TEMPLATES, args.per_template, args.seed, "zh", "qgen-gaokao"),
        "competition_en.jsonl": generate(EN_TEMPLATES, args.per_template, args.seed + 1, "en", "qgen-competition"),
    }
    for name, records in banks.items():
        with open(os.path.join(args.out, name), "w", encoding="utf-8") as fh:
            for rec in records:
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        print(f"wrote {len(records)} records to {os.path.join(args.out, name)}")


if __name__ == "__main__":
    main()
