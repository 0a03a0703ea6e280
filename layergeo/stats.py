"""Seed-blocked statistics for comparing distillation strategies (scipy does every test and resampling).

Runs that share a seed share the training subset, the data order and the random draws, so a seed is a
block: every comparison here is within seeds.

- Paired comparisons (strategy vs a reference, same seed): the paired t-test (``scipy.stats.ttest_rel``)
  and its t interval, Holm-corrected over the comparisons of one table (one metric), with Cohen's d_z
  (mean difference / sd of the differences) and, from ``BCA_MIN_SEEDS`` seeds on, a BCa bootstrap
  interval (``scipy.stats.bootstrap``) at the same level as a cross-check. Fewer than ``MIN_SEEDS``
  seeds give no test and no interval (a t interval from 2 seeds has 1 degree of freedom: 12.7 sd wide
  at 95%), so no call. When every seed gives the same difference the t-test is undefined (sd 0; a discrete
  metric makes this happen: one dev example more on each of 3 seeds), so that comparison takes the exact
  sign-flip test instead (``scipy.stats.permutation_test``, one sample: p = 2^(1 - n) for a non-zero
  difference, 1 for zero) and its interval is that test inverted: the difference alone where 2^(1 - n) is
  below the level's alpha, unbounded otherwise (up to 5 seeds at the 5% level: 3 seeds give p = 0.25).
- Holm (``statsmodels.stats.multitest.multipletests``): adjusted p_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)).
  Its intervals: Holm tests the i-th smallest p at level alpha / (m - i + 1) and stops at the first
  hypothesis it keeps (rank r + 1 after r rejections), keeping that one and all after it at level
  alpha / (m - r). Each interval is the t interval at 1 - (the level its hypothesis was tested at), so
  it excludes 0 exactly when the Holm-adjusted p is below alpha (a two-sided t interval at 1 - a
  excludes 0 iff p < a). These step-down intervals match Holm's decisions; they are not simultaneous
  intervals (Bonferroni's 1 - alpha / m ones would be, and are at least as wide).
- "Strategies differ" in a (seeds x strategies) table: Friedman's test (``scipy.stats.friedmanchisquare``)
  and a within-seed permutation test (``scipy.stats.permutation_test``, ``permutation_type='samples'``:
  the strategy labels are permuted within each seed, (k!)^n relabellings, exact when that is at most
  ``RESAMPLES``) of the spread, max - min of the strategy means; the spread's interval is a BCa bootstrap
  over seeds (whole seeds resampled, ``paired=True``), from ``BCA_MIN_SEEDS`` seeds on.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import stats
from statsmodels.stats.multitest import multipletests

ALPHA = 0.05
MIN_SEEDS = 3          # paired t test and interval from 3 seeds on (2 degrees of freedom)
BCA_MIN_SEEDS = 5      # below 5 seeds a seed bootstrap has at most 35 distinct resamples: no BCa interval
RESAMPLES = 99_999
RNG_SEED = 0


def holm(pvalues, alpha: float = ALPHA) -> tuple[np.ndarray, np.ndarray]:
    """Holm step-down over the finite entries of ``pvalues`` (NaN ones are no hypothesis of the family).

    Returns (adjusted p, test level): the Holm-adjusted p of each hypothesis and the level Holm tested it
    at (alpha / (m - i + 1) for the i-th smallest p up to the first hypothesis kept, alpha / (m - r) for
    that one and every later one after r rejections). NaN where the input is NaN.
    """
    p = np.asarray(pvalues, dtype=float)
    adjusted, levels = np.full(p.shape, np.nan), np.full(p.shape, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    m = len(finite)
    if not m:
        return adjusted, levels
    rejected_at, adjusted[finite], _, _ = multipletests(p[finite], alpha=alpha, method="holm")
    order = finite[np.argsort(p[finite], kind="stable")]
    multipliers = m - np.arange(m)                                  # m, m - 1, ..., 1
    rejected = rejected_at[np.argsort(p[finite], kind="stable")]
    r = m if rejected.all() else int(np.argmin(rejected))          # rejections before the first kept hypothesis
    levels[order] = alpha / multipliers[np.minimum(np.arange(m), r)]
    return adjusted, levels


def paired_t(x, y) -> dict:
    """Paired t-test of x - y (same seeds, aligned): n, mean and sd of the differences, d_z, t, two-sided p.

    Fewer than ``MIN_SEEDS`` pairs: p is NaN (no test). Every difference equal (``same_difference``): sd 0, so
    d_z and t are undefined (NaN) and p is the exact sign-flip test's (``sign_flip_p``).
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    diff = x - y
    n = len(diff)
    mean = float(diff.mean()) if n else math.nan
    sd = 0.0 if same_difference(diff) else float(diff.std(ddof=1)) if n > 1 else math.nan
    row = {"n_seeds": n, "mean_diff": mean, "sd_diff": sd, "d_z": mean / sd if sd > 0 else math.nan,
           "t": math.nan, "p": math.nan}
    if n < MIN_SEEDS:
        return row
    if sd == 0:
        return row | {"p": sign_flip_p(diff)}
    test = stats.ttest_rel(x, y)
    return row | {"t": float(test.statistic), "p": float(test.pvalue)}


def same_difference(diff) -> bool:
    """Every seed gives the same difference, up to float rounding (a metric stored as 100 * correct / n makes
    'one example more on every seed' differ in the 15th digit); False below 2 seeds."""
    diff = np.asarray(diff, dtype=float)
    return len(diff) > 1 and bool(np.ptp(diff) <= 1e-9 * max(1.0, float(np.abs(diff).max())))


def sign_flip_p(diff) -> float:
    """Exact two-sided sign-flip test of mean(diff) = 0 over seeds (``scipy.stats.permutation_test`` with one
    sample: each seed's difference keeps or flips its sign, all 2^n ways)."""
    diff = np.asarray(diff, dtype=float)
    return float(stats.permutation_test((diff,), np.mean, permutation_type="samples", n_resamples=np.inf).pvalue)


def t_interval(x, y, level: float) -> tuple[float, float]:
    """The paired t interval of mean(x - y) at ``level`` (``ttest_rel(...).confidence_interval``); when every
    difference is equal, the exact sign-flip test inverted: every shift but the difference itself leaves all of
    them on one side (two-sided p = 2^(1 - n)), so the interval is that difference alone if 2^(1 - n) < 1 - level
    and unbounded otherwise (always up to 5 seeds at Holm's levels, which are at most 0.05)."""
    diff = np.asarray(x, dtype=float) - np.asarray(y, dtype=float)
    if len(diff) < MIN_SEEDS or not np.isfinite(level):
        return math.nan, math.nan
    if same_difference(diff):
        p_any_other_shift = sign_flip_p(np.ones(len(diff)))
        mean = float(diff.mean())
        return (mean, mean) if p_any_other_shift < 1 - level else (-math.inf, math.inf)
    ci = stats.ttest_rel(x, y).confidence_interval(confidence_level=level)
    return float(ci.low), float(ci.high)


def bca_interval(diff, level: float, seed: int = RNG_SEED) -> tuple[float, float]:
    """BCa bootstrap interval of the mean of ``diff`` over seeds at ``level``; NaN below ``BCA_MIN_SEEDS``
    seeds or when every difference is equal (scipy's BCa is then undefined)."""
    diff = np.asarray(diff, dtype=float)
    if len(diff) < BCA_MIN_SEEDS or not np.isfinite(level) or same_difference(diff):
        return math.nan, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ci = stats.bootstrap((diff,), np.mean, confidence_level=level, method="BCa", n_resamples=RESAMPLES,
                             rng=np.random.default_rng(seed)).confidence_interval
    return float(ci.low), float(ci.high)


def answer(low: float, high: float) -> str:
    """'better' / 'worse' only when the interval excludes 0; 'no call' without an interval (NaN; an unbounded
    one is an interval)."""
    if np.isnan(low) or np.isnan(high):
        return "no call"
    return "better" if low > 0 else "worse" if high < 0 else "not distinguishable"


def compare_family(pairs: list[tuple[np.ndarray, np.ndarray]], alpha: float = ALPHA) -> list[dict]:
    """Paired comparisons of one family (one table, one metric), Holm-corrected together.

    ``pairs``: (strategy values, reference values) per comparison, aligned by seed. One dict per pair:
    n_seeds, mean_diff, sd_diff, d_z, t, p, p_holm, ci_level, ci_low, ci_high (Holm-consistent paired t
    interval, or the inverted sign-flip one where every seed gives the same difference), bca_low, bca_high
    (BCa at the same level), answer.
    """
    rows = [paired_t(x, y) for x, y in pairs]
    adjusted, levels = holm([row["p"] for row in rows], alpha)
    out = []
    for (x, y), row, p_holm, level in zip(pairs, rows, adjusted, levels):
        low, high = t_interval(x, y, 1 - level)
        bca_low, bca_high = bca_interval(np.asarray(x, float) - np.asarray(y, float), 1 - level)
        out.append(row | {"p_holm": float(p_holm), "ci_level": float(1 - level), "ci_low": low, "ci_high": high,
                          "bca_low": bca_low, "bca_high": bca_high, "answer": answer(low, high)})
    return out


def spread_statistic(*samples, axis: int = -1):
    """Max - min of the sample means (vectorized over ``axis``, as scipy's resampling calls it)."""
    means = np.stack([np.mean(sample, axis=axis) for sample in samples])
    return means.max(0) - means.min(0)


def blocked_spread_test(table, seed: int = RNG_SEED, resamples: int = RESAMPLES, level: float = 0.95) -> dict:
    """Do the strategies (columns) of a seeds x strategies ``table`` differ, seed by seed?

    Returns n_seeds, n_strategies, spread (max - min of the column means), spread_ci_low/high (BCa
    bootstrap over whole seeds; NaN below ``BCA_MIN_SEEDS`` seeds, where resampling seeds gives too few
    distinct tables for an interval, or when no seed differs), friedman_chi2 and
    friedman_p, p_permutation (within-seed relabelling of the spread, one-sided: spread at least as large)
    permutations (the number drawn, or the exact count when every relabelling was enumerated) and
    null_spread_mean (the mean spread over those relabellings: what seed noise alone gives, since the
    spread of sample means is above 0 even when the strategies are the same).
    """
    table = np.asarray(table, dtype=float)
    n, k = table.shape
    samples = tuple(table.T)
    row = {"n_seeds": n, "n_strategies": k, "spread": float(spread_statistic(*samples)), "spread_ci_low": math.nan,
           "spread_ci_high": math.nan, "friedman_chi2": math.nan, "friedman_p": math.nan, "p_permutation": math.nan,
           "permutations": 0, "null_spread_mean": math.nan}
    if n < 2 or k < 2:
        return row
    exact = math.factorial(k) ** n
    test = stats.permutation_test(samples, spread_statistic, permutation_type="samples", alternative="greater",
                                  n_resamples=resamples, vectorized=True, rng=np.random.default_rng(seed))
    row |= {"p_permutation": float(test.pvalue), "permutations": exact if exact <= resamples else resamples,
            "null_spread_mean": float(np.mean(test.null_distribution))}
    if k >= 3 and np.ptp(table, axis=1).any():
        friedman = stats.friedmanchisquare(*samples)
        row |= {"friedman_chi2": float(friedman.statistic), "friedman_p": float(friedman.pvalue)}
    if n >= BCA_MIN_SEEDS and np.ptp(table, axis=1).any():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ci = stats.bootstrap(samples, spread_statistic, paired=True, vectorized=True, confidence_level=level,
                                 method="BCa", n_resamples=resamples, rng=np.random.default_rng(seed)).confidence_interval
        row |= {"spread_ci_low": float(ci.low), "spread_ci_high": float(ci.high)}
    return row
