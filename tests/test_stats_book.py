"""bistochastic.stats (intervals, TOST) and the book's rounding helpers."""

import math

import numpy as np
import pytest
import torch

import bistochastic as bs
from bistochastic.book import round_sig, table


def test_mean_ci_matches_t_interval_by_hand():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    iv = bs.stats.mean_ci(x, 0.95)
    # t_{0.975, 3} = 3.182446305284263; sd = 1.2909944
    h = 3.182446305284263 * 1.2909944487358056 / 2.0
    assert iv.mean == pytest.approx(2.5)
    assert iv.lo == pytest.approx(2.5 - h, rel=1e-9) and iv.hi == pytest.approx(2.5 + h, rel=1e-9)
    assert iv.excludes(0.0) and not iv.excludes(2.0)


def test_mean_ci_coverage_is_nominal():
    rng = np.random.default_rng(0)
    hits = sum(not bs.stats.mean_ci(rng.normal(1.0, 2.0, 8)).excludes(1.0) for _ in range(2000))
    assert abs(hits / 2000 - 0.95) < 0.02  # binomial sd of the rate is 0.005


def test_paired_ci_is_ci_of_differences():
    x, y = [1.0, 2.0, 4.0], [0.5, 1.0, 3.0]
    assert bs.stats.paired_ci(x, y).mean == pytest.approx(bs.stats.mean_ci([0.5, 1.0, 1.0]).mean)
    with pytest.raises(ValueError, match="pair"):
        bs.stats.paired_ci([1.0, 2.0], [1.0, 2.0, 3.0])


def test_tost_equivalent_and_not():
    rng = np.random.default_rng(1)
    base = rng.normal(0, 1, 30)
    same = base + rng.normal(0, 0.01, 30)
    far = base + 0.5
    assert bs.stats.tost(same, base, margin=0.05).equivalent
    r = bs.stats.tost(far, base, margin=0.05)
    assert not r.equivalent and r.p > 0.5
    # TOST at alpha is the (1 - 2 alpha) interval inside the margin
    r2 = bs.stats.tost(same, base, margin=0.05, alpha=0.05)
    assert (-0.05 < r2.diff.lo and r2.diff.hi < 0.05) == r2.equivalent
    assert bs.stats.tost(same, base, margin=0.05, paired=False).diff.n == 30


@pytest.mark.parametrize("bad", [dict(margin=0.0), dict(margin=-1.0), dict(margin=float("nan")),
                                 dict(margin=0.1, alpha=0.6)])
def test_tost_refuses_bad_arguments(bad):
    with pytest.raises(ValueError, match="margin|alpha"):
        bs.stats.tost([1.0, 2.0], [1.0, 2.5], **bad)


def test_mean_ci_refuses_too_few_and_nonfinite():
    with pytest.raises(ValueError, match="x"):
        bs.stats.mean_ci([1.0])
    with pytest.raises(ValueError, match="non-finite"):
        bs.stats.mean_ci([1.0, float("nan")])


def test_round_sig_kills_last_digit_noise():
    a, b = -0.9999791154274781, -0.9999791154274782
    assert round_sig(a) == round_sig(b) == -1.0
    assert round_sig(0.000123456, 3) == 0.000123
    assert round_sig(123456.0, 2) == 120000.0
    assert round_sig(7) == 7 and round_sig(True) is True and round_sig("x") == "x"
    assert round_sig(np.float32(0.123456)) == 0.1235
    assert round_sig(torch.tensor(2.71828)) == 2.718
    assert round_sig([1.23456, {"k": 9.87654}]) == [1.235, {"k": 9.877}]
    assert math.isnan(round_sig(float("nan"))) and round_sig(float("inf")) == float("inf")
    with pytest.raises(TypeError, match="x"):
        round_sig(torch.ones(3))
    with pytest.raises(ValueError, match="sig"):
        round_sig(1.0, 0)


def test_table_rounds_and_renders_markdown():
    md = table([{"rule": "EPH-ASC", "acc": 0.912345678}, {"rule": "linear", "acc": 0.9}], sig=3)
    assert md.data.splitlines() == ["| rule | acc |", "|---|---|", "| EPH-ASC | 0.912 |", "| linear | 0.9 |"]
    with pytest.raises(ValueError, match="rows"):
        table([])


def test_first_crossing():
    fc = bs.stats.first_crossing
    assert fc([1, 10, 100], [0, 1, 2], 1.5) == pytest.approx(10 ** 1.5)
    assert fc([1, 2, 3], [0, 1, 2], 1.5, log_x=False) == pytest.approx(2.5)
    assert fc([1, 10], [0, 1], 5) == math.inf
    assert fc([1, 10], [3, 4], 1) == 1.0
    with pytest.raises(ValueError):
        fc([10, 1], [0, 1], 0.5)
    with pytest.raises(ValueError):
        fc([1, 2], [0, float("nan")], 0.5)


def test_first_crossing_stay():
    fc = bs.stats.first_crossing
    y = [2.0, 0.0, 0.0, 2.0, 3.0]  # an excursion at the start, then a lasting rise
    x = [1.0, 10.0, 100.0, 1000.0, 10000.0]
    assert fc(x, y, 1.0) == 1.0
    assert fc(x, y, 1.0, stay=True) == pytest.approx(10 ** 2.5)
    assert fc(x[:2], [2.0, 0.0], 1.0, stay=True) == math.inf
    assert fc(x[:2], [2.0, 3.0], 1.0, stay=True) == 1.0


def test_first_crossing_down_mirrors_up():
    fc = bs.stats.first_crossing
    x, y = [0.1, 1.0, 10.0, 100.0], [0.9, 0.8, 0.3, 0.1]
    assert fc(x, y, 0.5, direction="down") == pytest.approx(10 ** 0.6)
    assert fc(x, y, 0.5, direction="down") == fc(x, [-v for v in y], -0.5)
    assert fc(x, y, 0.05, direction="down") == math.inf
    with pytest.raises(ValueError, match="direction"):
        fc(x, y, 0.5, direction="sideways")
