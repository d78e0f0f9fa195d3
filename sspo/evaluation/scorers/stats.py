"""Mean and Student-t 95% confidence interval of per-prompt scores, with no scipy dependency."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from sspo.errors import SSPOError


def mean_ci(values: Iterable[float]) -> dict[str, float | int]:
    """``{"mean", "ci95_low", "ci95_high", "n"}``; the interval is NaN for a single value.

    A t-interval rather than a bootstrap: exact for the mean of independent scores, and deterministic.
    """
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        raise SSPOError("mean_ci: no values (did the prompt set or the generation produce nothing?)")
    mean = math.fsum(xs) / n
    if n == 1:
        return {"mean": mean, "ci95_low": math.nan, "ci95_high": math.nan, "n": 1}
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(0.975, n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "ci95_low": mean - half, "ci95_high": mean + half, "n": n}


def interval(stats: dict, signed: bool = False) -> str:
    """``mean [low, high]`` to three decimals, as the reports print a 95% CI; ``signed`` shows a
    difference's signs (+0.024 [+0.009, +0.038])."""
    form = "+.3f" if signed else ".3f"
    return f"{stats['mean']:{form}} [{stats['ci95_low']:{form}}, {stats['ci95_high']:{form}}]"


def mean_ci_crossed(values: Sequence[Sequence[float]]) -> dict[str, float | int]:
    """Mean and 95% CI of a ``[runs][prompts]`` table (training seeds x prompts, or their paired
    differences), where both the runs and the prompts are samples.

    The two-way crossed model ``y = mu + run + prompt + residual`` gives the mean the variance
    ``var_run / R + var_prompt / P + var_residual / (R P)``, estimated from the ANOVA mean squares
    as ``(MS_run + MS_prompt - MS_residual) / (R P)`` (the run and prompt means' spreads each hold
    the residual once: their plain sum would count it twice), with Satterthwaite's degrees of
    freedom. Each mean square alone estimates at most that numerator (no component is negative):
    where chance makes the numerator smaller than the largest of them, that one is taken. One run: the interval is over prompts
    alone; one prompt: over runs alone. With 2 runs the interval covers less than 95% when runs
    differ much (``scripts/ci-coverage``): a claim needs MIN_DECIDING_RUNS.
    """
    rows = [[float(v) for v in row] for row in values]
    runs, prompts = len(rows), len(rows[0]) if rows else 0
    if not runs or not prompts or any(len(row) != prompts for row in rows):
        raise SSPOError("mean_ci_crossed: needs a non-empty table with the same prompts in every run")
    if runs == 1:
        return mean_ci(rows[0]) | {"runs": 1}
    if prompts == 1:
        return mean_ci([row[0] for row in rows]) | {"runs": runs}
    run_means = [math.fsum(row) / prompts for row in rows]
    prompt_means = [math.fsum(row[j] for row in rows) / runs for j in range(prompts)]
    mean = math.fsum(run_means) / runs
    ms_run = prompts * math.fsum((m - mean) ** 2 for m in run_means) / (runs - 1)
    ms_prompt = runs * math.fsum((m - mean) ** 2 for m in prompt_means) / (prompts - 1)
    ms_residual = math.fsum((rows[i][j] - run_means[i] - prompt_means[j] + mean) ** 2 for i in range(runs) for j in range(prompts)) / (
        (runs - 1) * (prompts - 1))
    terms = [(ms_run, runs - 1), (ms_prompt, prompts - 1), (-ms_residual, (runs - 1) * (prompts - 1))]
    total = ms_run + ms_prompt - ms_residual
    floor = max((ms_run, runs - 1), (ms_prompt, prompts - 1), (ms_residual, (runs - 1) * (prompts - 1)))
    if total < floor[0]:
        total, terms = floor[0], [floor]
    if total <= 0:
        return {"mean": mean, "ci95_low": mean, "ci95_high": mean, "n": runs * prompts, "runs": runs}
    # A negative term can pull Satterthwaite's df below every positive term's (0.4 on a 2x2 table): not below the smallest of those.
    df = max(total**2 / math.fsum(ms**2 / dof for ms, dof in terms), min(dof for ms, dof in terms if ms > 0))
    half = t_quantile(0.975, df) * math.sqrt(total / (runs * prompts))
    return {"mean": mean, "ci95_low": mean - half, "ci95_high": mean + half, "n": runs * prompts, "runs": runs}


def mean_ci_pooled(tables: Sequence[Sequence[Sequence[float]]]) -> dict[str, float | int]:
    """Mean and 95% CI of the equal-weight average of ``[runs][prompts]`` tables that share their
    runs' training seeds and their prompts (one effect measured in several levels of one world, each
    trained on the same seeds and scored on the same prompts): the tables are averaged cell by cell
    and the average's crossed interval taken (:func:`mean_ci_crossed`), so that what a prompt or a
    seed does in every table counts once, not as independent draws, which would narrow the interval.
    It speaks of these tables, not of others like them."""
    if not tables:
        raise SSPOError("mean_ci_pooled: no tables")
    shape = (len(tables[0]), len(tables[0][0]) if tables[0] else 0)
    if any((len(table), len(table[0]) if table else 0) != shape or any(len(row) != shape[1] for row in table) for table in tables):
        raise SSPOError("mean_ci_pooled: every table needs the same runs and prompts (the same training seeds, the same prompts)")
    average = [[math.fsum(float(table[i][j]) for table in tables) / len(tables) for j in range(shape[1])] for i in range(shape[0])]
    return mean_ci_crossed(average) | {"tables": len(tables)}


# Training seeds a crossed interval needs to decide a claim about a method: one run's interval is over
# prompts alone (it speaks of that run), and over 2 it covers ~88% when runs differ (scripts/ci-coverage).
MIN_DECIDING_RUNS = 3


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile (p in [0.5, 1)) of Student's t with ``df`` degrees of freedom, by bisection."""
    if not 0.5 <= p < 1:
        raise ValueError(f"p must be in [0.5, 1), got {p}")
    tail = 2 * (1 - p)  # two-sided: P(|T| > t) = I_{df / (df + t^2)}(df / 2, 1 / 2)

    def two_sided(t: float) -> float:
        return _betainc(df / 2, 0.5, df / (df + t * t))

    lo, hi = 0.0, 1.0
    while two_sided(hi) > tail:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if two_sided(mid) > tail else (lo, mid)
    return (lo + hi) / 2


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) (Numerical Recipes' continued fraction, Lentz's method)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below this point: use the symmetry
        return 1.0 - front * _beta_fraction(b, a, 1 - x) / b
    return front * _beta_fraction(a, b, x) / a


def _beta_fraction(a: float, b: float, x: float) -> float:
    tiny = 1e-300

    def guard(v: float) -> float:
        return v if abs(v) > tiny else tiny

    c, d = 1.0, 1.0 / guard(1 - (a + b) * x / (a + 1))
    result = d
    for m in range(1, 500):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 / guard(1 + numerator * d)
            c = guard(1 + numerator / c)
            result *= c * d
        if abs(c * d - 1) < 1e-15:
            break
    return result
