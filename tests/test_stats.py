"""Seed-blocked statistics (layergeo.stats) against brute force, hand formulas and cases with known answers."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats as sps

from layergeo import stats


# ---------------------------------------------------------------- Holm


def _holm_step_down(p: np.ndarray, alpha: float) -> np.ndarray:
    """Holm's procedure as printed: walk the sorted p-values, reject while p_(i) < alpha / (m - i + 1)."""
    order = np.argsort(p, kind="stable")
    rejected = np.zeros(len(p), bool)
    for i, index in enumerate(order):
        if p[index] >= alpha / (len(p) - i):
            break
        rejected[index] = True
    return rejected


def test_holm_matches_a_hand_computation():
    p = np.array([0.01, 0.04, 0.03, 0.005, np.nan])
    adjusted, levels = stats.holm(p)
    # sorted 0.005, 0.01, 0.03, 0.04 (m = 4): 4 x 0.005 = 0.02, 3 x 0.01 = 0.03, 2 x 0.03 = 0.06, max(0.06, 1 x 0.04) = 0.06
    np.testing.assert_allclose(adjusted[:4], [0.03, 0.06, 0.06, 0.02], rtol=1e-12)
    # 0.005 < 0.05/4 and 0.01 < 0.05/3 are rejected; 0.03 >= 0.05/2 stops: it and 0.04 are kept at level 0.05/2
    np.testing.assert_allclose(levels[:4], [0.05 / 3, 0.025, 0.025, 0.0125], rtol=1e-12)
    assert np.isnan(adjusted[4]) and np.isnan(levels[4])
    assert all(np.isnan(v).all() for v in stats.holm([np.nan, np.nan]))


@pytest.mark.parametrize("seed", range(5))
def test_holm_adjusted_p_is_the_smallest_alpha_at_which_the_step_down_rejects(seed):
    rng = np.random.default_rng(seed)
    p = np.concatenate([rng.uniform(0, 0.02, 4), rng.uniform(0, 1, 6)])
    adjusted, levels = stats.holm(p)
    for alpha in np.concatenate([adjusted * (1 - 1e-6), adjusted * (1 + 1e-6), [0.05, 0.1]]):   # either side of each
        if alpha >= 1:                                                # adjusted p is capped at 1
            continue
        # p_holm < alpha  <=>  rejected by the step-down at alpha
        np.testing.assert_array_equal(_holm_step_down(p, alpha), adjusted < alpha)
    np.testing.assert_array_equal(p < levels, _holm_step_down(p, 0.05))


# ---------------------------------------------------------------- paired t


def test_paired_t_and_its_interval_match_the_hand_formula():
    x = np.array([71.0, 68.5, 70.25, 73.0, 69.0])
    y = np.array([69.5, 68.0, 67.75, 70.5, 69.5])
    d = x - y
    n, mean, sd = len(d), d.mean(), d.std(ddof=1)
    se = sd / math.sqrt(n)
    t = mean / se
    row = stats.paired_t(x, y)
    assert row["n_seeds"] == 5 and row["mean_diff"] == pytest.approx(mean) and row["sd_diff"] == pytest.approx(sd)
    assert row["t"] == pytest.approx(t) and row["d_z"] == pytest.approx(mean / sd)
    assert row["p"] == pytest.approx(2 * sps.t.sf(abs(t), n - 1), rel=1e-10)
    for level in (0.95, 0.99, 0.9975):
        q = sps.t.ppf(1 - (1 - level) / 2, n - 1)
        low, high = stats.t_interval(x, y, level)
        assert (low, high) == pytest.approx((mean - q * se, mean + q * se), rel=1e-10)


def test_fewer_than_three_seeds_give_no_test_no_interval_and_no_call_and_leave_the_family():
    rng = np.random.default_rng(0)
    two = (np.array([70.0, 75.0]), np.array([60.0, 62.0]))            # +11.5 on both seeds: still no call
    five = (rng.normal(72, 1, 5), rng.normal(70, 1, 5))
    short, full = stats.compare_family([two, five])
    assert np.isnan(short["p"]) and np.isnan(short["ci_low"]) and short["answer"] == "no call"
    assert short["mean_diff"] == pytest.approx(11.5) and short["n_seeds"] == 2
    assert full["p_holm"] == pytest.approx(full["p"]) and full["ci_level"] == pytest.approx(0.95)   # a family of one


def test_identical_arms_and_constant_gains():
    same = stats.compare_family([(np.array([60.0, 61.0, 62.0]),) * 2])[0]
    assert same["p"] == 1 and (same["ci_low"], same["ci_high"]) == (-math.inf, math.inf) and same["answer"] == "not distinguishable"
    # the same gain on every seed (a discrete metric: one example more each time): no variance for a t-test, so the
    # exact sign-flip test, checked against all 2^n flips; 3 seeds can never call it, 7 can
    for n, called in ((3, False), (7, True)):
        gain = stats.compare_family([(np.arange(n) + 60.5, np.arange(n) + 60.0)])[0]
        flips = np.array(list(itertools.product([-0.5, 0.5], repeat=n))).mean(axis=1)
        assert gain["p"] == pytest.approx(np.mean(np.abs(flips) >= 0.5)) == pytest.approx(2.0 ** (1 - n))
        assert np.isnan(gain["t"]) and np.isnan(gain["d_z"]) and gain["sd_diff"] == 0
        if called:
            assert (gain["ci_low"], gain["ci_high"], gain["answer"]) == (0.5, 0.5, "better")
        else:
            assert (gain["ci_low"], gain["ci_high"], gain["answer"]) == (-math.inf, math.inf, "not distinguishable")
    # accuracies are stored as 100 * correct / n: one example more on every seed differs in the 15th digit, and is
    # still the same difference (a t-test on the rounding noise gave p = 1e-26)
    n = 2225
    counts = np.array([1600.0, 1700.0, 1812.0])
    plus_one, base = 100 * ((counts + 1) / n), 100 * (counts / n)     # as layergeo.columns stores a fraction
    rounded = stats.compare_family([(plus_one, base)])[0]
    assert np.ptp(plus_one - base) > 0
    assert rounded["p"] == pytest.approx(0.25) and rounded["answer"] == "not distinguishable" and rounded["sd_diff"] == 0
    # inside a family, Holm still decides: 7 seeds' 2^-6 = 0.016 survives 2 comparisons, not 4
    lone = (np.arange(7) + 60.5, np.arange(7) + 60.0)
    noise = [(np.random.default_rng(k).normal(60, 1, 7), np.random.default_rng(k + 9).normal(60, 1, 7)) for k in range(3)]
    two = stats.compare_family([lone, noise[0]])[0]
    four = stats.compare_family([lone, *noise])[0]
    assert (two["answer"], four["answer"]) == ("better", "not distinguishable") and four["ci_low"] == -math.inf


@pytest.mark.parametrize("seed", range(3))
def test_holm_intervals_exclude_zero_exactly_when_holm_rejects(seed):
    rng = np.random.default_rng(seed)
    base = rng.normal(70, 3, size=5)
    pairs = [(base + effect + rng.normal(0, 1, 5), base) for effect in [0, 0, 0.5, 1, 1.5, 2, 3, 4, -2, -4]]
    rows = stats.compare_family(pairs)
    for row in rows:
        excludes = row["ci_low"] > 0 or row["ci_high"] < 0
        assert excludes == (row["p_holm"] < stats.ALPHA)
        assert row["answer"] == ("better" if row["ci_low"] > 0 else "worse" if row["ci_high"] < 0 else "not distinguishable")
    assert {row["answer"] for row in rows} >= {"better", "not distinguishable"}


def test_null_paired_t_rejects_at_its_level_and_holm_controls_the_familywise_rate():
    rng = np.random.default_rng(7)
    seeds = rng.normal(70, 3, size=(1000, 5))                        # shared seed effect: a block
    p = np.array([stats.paired_t(s + rng.normal(0, 1, 5), s + rng.normal(0, 1, 5))["p"] for s in seeds])
    assert 0.035 < np.mean(p < 0.05) < 0.065
    assert abs(np.mean(p < 0.5) - 0.5) < 0.05                         # roughly uniform, not only in the tail
    families = p.reshape(50, 20)                                     # 50 null tables of 20 comparisons
    any_rejected = np.mean([np.any(stats.holm(f)[0] < 0.05) for f in families])
    raw_any = np.mean((families < 0.05).any(1))
    assert any_rejected <= 0.1 and raw_any > 0.5                      # uncorrected, most null tables have a "call"


def test_a_planted_five_point_gain_is_called_better_after_holm_when_seeds_agree():
    rng = np.random.default_rng(3)
    base = rng.normal(70, 3, size=5)                                 # seed effect sd 3, run noise sd 0.5
    pairs = [(base + (5 if i == 0 else 0) + rng.normal(0, 0.5, 5), base + rng.normal(0, 0.5, 5)) for i in range(20)]
    rows = stats.compare_family(pairs)
    assert rows[0]["answer"] == "better" and rows[0]["ci_low"] > 0 and rows[0]["ci_level"] == pytest.approx(1 - 0.05 / 20)
    assert all(row["answer"] == "not distinguishable" for row in rows[1:])
    # with 5 seeds and 20 comparisons the first test is at 0.05 / 20: a gain needs t > 6.76 (4 df), i.e. about three
    # times the sd of the differences; the same 5 points with differences of sd 2.5 (d_z 2) are not called
    d = np.array([2.0, 8.0, 5.0, 3.5, 6.5])                           # mean 5, sd 2.37
    noisy = stats.compare_family([(base + d, base)] + pairs[1:])[0]
    assert noisy["p"] < 0.05 and noisy["answer"] == "not distinguishable"


# ---------------------------------------------------------------- BCa


def _bca_enumerated(data: np.ndarray, statistic, level: float) -> tuple[float, float]:
    """BCa (Efron 1987; Efron & Tibshirani 14.3) over every bootstrap resample of the rows of ``data`` (n^n of them,
    equally likely); the bias correction counts resamples tied with the estimate as half below, as scipy does."""
    n = len(data)
    theta = statistic(data)
    boot = np.array([statistic(data[list(index)]) for index in itertools.product(range(n), repeat=n)])
    z0 = sps.norm.ppf((np.mean(boot < theta) + np.mean(boot <= theta)) / 2)
    jack = np.array([statistic(np.delete(data, i, axis=0)) for i in range(n)])
    u = jack.mean() - jack
    a = np.sum(u**3) / (6 * np.sum(u**2) ** 1.5)
    z = sps.norm.ppf([(1 - level) / 2, 1 - (1 - level) / 2])
    tails = sps.norm.cdf(z0 + (z0 + z) / (1 - a * (z0 + z)))
    return tuple(np.quantile(boot, tails))


def test_bca_interval_of_a_mean_matches_enumerated_bootstrap():
    d = np.array([1.5, -0.5, 3.0, 2.25, 0.75])
    for level in (0.95, 0.99):
        low, high = stats.bca_interval(d, level)
        want = _bca_enumerated(d, np.mean, level)
        assert (low, high) == pytest.approx(want, abs=0.08)           # 99,999 random resamples vs all 3,125
    assert all(np.isnan(stats.bca_interval(d[:4], 0.95)))            # below 5 seeds: none
    assert all(np.isnan(stats.bca_interval(np.ones(6), 0.95)))       # every difference equal: none


def test_spread_interval_resamples_whole_seeds():
    table = np.array([[70.0, 72.0, 69.0], [65.0, 68.0, 66.5], [71.0, 71.5, 68.0], [68.0, 71.0, 67.0],
                      [69.0, 70.5, 70.0]])                           # 5 seeds x 3
    result = stats.blocked_spread_test(table)
    want = _bca_enumerated(table, lambda rows: np.ptp(rows.mean(0)), 0.95)   # 5^5 = 3,125 seed resamples
    assert result["spread"] == pytest.approx(2.5)                    # means 68.6, 70.6, 68.1
    assert (result["spread_ci_low"], result["spread_ci_high"]) == pytest.approx(want, abs=0.1)
    below = stats.blocked_spread_test(table[:4])                     # 4 seeds: 35 distinct resamples, no interval
    assert below["spread"] == pytest.approx(3.0) and np.isnan(below["spread_ci_low"]) and np.isnan(below["spread_ci_high"])


# ---------------------------------------------------------------- strategies differ: within-seed tests


def _spread(table: np.ndarray) -> float:
    return float(np.ptp(table.mean(0)))


def _exact_within_seed_p(table: np.ndarray) -> float:
    """Share of all (k!)^n within-seed relabellings whose spread is at least the observed one."""
    observed = _spread(table)
    perms = list(itertools.permutations(range(table.shape[1])))
    hits = [_spread(np.array([row[list(p)] for row, p in zip(table, ps)])) >= observed * (1 - 1e-12)
            for ps in itertools.product(perms, repeat=len(table))]
    return float(np.mean(hits))


@pytest.mark.parametrize("seed", range(3))
def test_within_seed_permutation_p_equals_the_enumeration_of_all_relabellings(seed):
    rng = np.random.default_rng(seed)
    table = rng.normal(70, 3, size=(3, 1)) + np.array([0.0, 0.5, 1.5]) + rng.normal(0, 1, size=(3, 3))  # 3 seeds x 3
    result = stats.blocked_spread_test(table)
    assert result["permutations"] == 216                            # (3!)^3: every relabelling, exact
    assert result["spread"] == pytest.approx(_spread(table))
    assert result["p_permutation"] == pytest.approx(_exact_within_seed_p(table), abs=1e-12)


def test_drawn_within_seed_relabellings_approach_the_exact_p():
    rng = np.random.default_rng(4)
    table = rng.normal(70, 3, size=(5, 1)) + np.array([0.0, 0.8, 1.6]) + rng.normal(0, 1, size=(5, 3))  # 6^5 = 7,776
    result = stats.blocked_spread_test(table, resamples=4_000)
    assert result["permutations"] == 4_000
    assert result["p_permutation"] == pytest.approx(_exact_within_seed_p(table), abs=0.025)


def test_blocking_finds_a_consistent_gap_that_shuffling_across_seeds_misses():
    rng = np.random.default_rng(5)
    table = rng.normal(70, 8, size=(5, 1)) + np.array([0.0, 0.0, 2.0, 2.0]) + rng.normal(0, 0.3, size=(5, 4))
    blocked = stats.blocked_spread_test(table)
    assert blocked["p_permutation"] < 0.01 and blocked["friedman_p"] < 0.05
    across = sps.permutation_test(tuple(table.T), stats.spread_statistic, permutation_type="independent",
                                  alternative="greater", rng=np.random.default_rng(0))
    assert across.pvalue > 0.3                                       # the old test: seed noise swamps the gap


def test_friedman_matches_the_rank_formula():
    rng = np.random.default_rng(6)
    table = rng.normal(size=(6, 4))                                  # no ties
    n, k = table.shape
    ranks = np.argsort(np.argsort(table, axis=1), axis=1) + 1
    chi2 = 12 / (n * k * (k + 1)) * np.sum(ranks.sum(0) ** 2) - 3 * n * (k + 1)
    result = stats.blocked_spread_test(table)
    assert result["friedman_chi2"] == pytest.approx(chi2)
    assert result["friedman_p"] == pytest.approx(sps.chi2.sf(chi2, k - 1))


def test_identical_strategies_give_a_roughly_uniform_p_and_a_planted_gap_is_found():
    rng = np.random.default_rng(8)
    null = [stats.blocked_spread_test(rng.normal(70, 3, size=(5, 1)) + rng.normal(0, 1, size=(5, 5)), resamples=999)
            for _ in range(300)]
    p = np.array([r["p_permutation"] for r in null])
    friedman = np.array([r["friedman_p"] for r in null])
    assert 0.02 < np.mean(p < 0.05) < 0.09 and abs(np.mean(p < 0.5) - 0.5) < 0.08
    assert np.mean(friedman < 0.05) < 0.09
    assert np.mean([r["spread"] for r in null]) == pytest.approx(np.mean([r["null_spread_mean"] for r in null]), rel=0.1)
    gap = rng.normal(70, 3, size=(5, 1)) + np.array([0.0, 0.0, 0.0, 0.0, 5.0]) + rng.normal(0, 1, size=(5, 5))
    planted = stats.blocked_spread_test(gap)
    assert planted["p_permutation"] < 0.001 and planted["friedman_p"] < 0.05
    assert planted["spread_ci_low"] > planted["null_spread_mean"]


def test_identical_columns_give_spread_zero_and_p_one():
    table = np.tile([[60.0], [61.0], [62.0]], (1, 4))
    result = stats.blocked_spread_test(table)
    assert result["spread"] == 0 and result["p_permutation"] == 1
    assert np.isnan(result["friedman_p"]) and np.isnan(result["spread_ci_low"])
