import math

import pytest

from sspo.errors import SSPOError
from sspo.evaluation.scorers.stats import interval, mean_ci, t_quantile


@pytest.mark.parametrize("df,table", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (10, 2.2281), (30, 2.0423), (1000, 1.9623)])
def test_t_quantile_matches_the_table(df, table):
    assert t_quantile(0.975, df) == pytest.approx(table, abs=1e-4)


def test_t_quantile_tends_to_the_normal():
    assert t_quantile(0.975, 1e7) == pytest.approx(1.959964, abs=1e-5)
    assert t_quantile(0.5, 7) == pytest.approx(0.0, abs=1e-9)


def test_mean_ci_by_hand():
    out = mean_ci([1.0, 2.0, 3.0, 4.0])
    half = 3.182446 * math.sqrt(5 / 3) / 2  # t_{0.975, 3} * sd / sqrt(n)
    assert out["n"] == 4 and out["mean"] == 2.5
    assert out["ci95_low"] == pytest.approx(2.5 - half, abs=1e-5)
    assert out["ci95_high"] == pytest.approx(2.5 + half, abs=1e-5)


def test_mean_ci_edge_cases():
    one = mean_ci([3.0])
    assert one["mean"] == 3.0 and math.isnan(one["ci95_low"]) and one["n"] == 1
    constant = mean_ci([2.0] * 10)
    assert constant["ci95_low"] == constant["ci95_high"] == 2.0
    with pytest.raises(SSPOError, match="no values"):
        mean_ci([])


def test_mean_ci_crossed_by_hand():
    from sspo.evaluation.scorers.stats import mean_ci_crossed, t_quantile

    # Run means 7/3, 14/3 and prompt means 2, 3.5, 5 around 3.5; residuals +-1/6, -+1/3, +-1/6.
    got = mean_ci_crossed([[1.0, 2.0, 4.0], [3.0, 5.0, 6.0]])
    ms_run, ms_prompt, ms_residual = 3 * 2 * (7 / 6) ** 2 / 1, 2 * (1.5**2 + 0 + 1.5**2) / 2, (4 / 36 + 2 / 9) / 2  # 49/6, 9/2, 1/6
    total = ms_run + ms_prompt - ms_residual  # 12.5: the residual counted once
    df = total**2 / (ms_run**2 / 1 + ms_prompt**2 / 2 + ms_residual**2 / 2)
    assert got["mean"] == pytest.approx(3.5)
    assert got["ci95_high"] - got["mean"] == pytest.approx(t_quantile(0.975, df) * math.sqrt(total / 6))
    assert got["n"] == 6 and got["runs"] == 2
    # All spread in the residual (run and prompt means equal): its mean square alone, not a zero width.
    crossed = mean_ci_crossed([[1.0, 5.0], [5.0, 1.0]])
    assert crossed["ci95_high"] - crossed["mean"] == pytest.approx(t_quantile(0.975, 1) * math.sqrt(16 / 4))
    one = mean_ci_crossed([[1.0, 2.0, 3.0]])  # one run: over prompts only
    assert one["mean"] == pytest.approx(2.0) and one["runs"] == 1
    one_prompt = mean_ci_crossed([[1.0], [2.0], [4.0]])  # one prompt: over runs only
    assert one_prompt == mean_ci([1.0, 2.0, 4.0]) | {"runs": 3}
    assert mean_ci_crossed([[0.5, 0.5], [0.5, 0.5]])["ci95_low"] == pytest.approx(0.5)
    # no spread between runs: the prompts' own interval
    assert mean_ci_crossed([[1.0, 2.0, 3.0]] * 4)["ci95_high"] == pytest.approx(mean_ci([1.0, 2.0, 3.0])["ci95_high"])
    with pytest.raises(SSPOError):
        mean_ci_crossed([[1.0, 2.0], [1.0]])


def test_mean_ci_pooled_by_hand():
    from sspo.evaluation.scorers.stats import mean_ci_crossed, mean_ci_pooled

    # The cell-by-cell average of a and b is the table of test_mean_ci_crossed_by_hand: its interval.
    a, b = [[0.0, 2.0, 5.0], [3.0, 4.0, 6.0]], [[2.0, 2.0, 3.0], [3.0, 6.0, 6.0]]
    got = mean_ci_pooled([a, b])
    assert got == mean_ci_crossed([[1.0, 2.0, 4.0], [3.0, 5.0, 6.0]]) | {"tables": 2}
    # A prompt that does the same in both tables is one prompt, not two draws: pooling a table with
    # itself gives its own interval, where treating the copies as independent would narrow it by sqrt(2).
    assert mean_ci_pooled([a, a]) | {"tables": 1} == mean_ci_crossed(a) | {"tables": 1}
    with pytest.raises(SSPOError, match="no tables"):
        mean_ci_pooled([])
    with pytest.raises(SSPOError, match="the same runs and prompts"):
        mean_ci_pooled([a, [[1.0, 2.0, 3.0]]])
    with pytest.raises(SSPOError, match="the same runs and prompts"):
        mean_ci_pooled([a, [[1.0, 2.0, 3.0], [1.0, 2.0]]])


def test_an_interval_prints_as_the_reports_show_it():
    stats = {"mean": 0.0244, "ci95_low": -0.0091, "ci95_high": 0.0381}
    assert interval(stats) == "0.024 [-0.009, 0.038]"
    assert interval(stats, signed=True) == "+0.024 [-0.009, +0.038]"
