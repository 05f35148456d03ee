"""Statistics over seeds, checked against hand computations that do not use scipy."""

import itertools
import math

import numpy as np
import pytest

from shpeft_jax.errors import ConfigError
from shpeft_jax.evaluation import stats


def _t_quantile_df2(p):
  # Student t with 2 degrees of freedom: F(t) = 1/2 + t / (2 sqrt(2 + t^2)), inverted by hand.
  a = 2 * p - 1
  return a * math.sqrt(2 / (1 - a * a))


def _t_quantile_brute(p, df):
  """t quantile by Simpson integration of the density and bisection (no scipy)."""
  c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
  pdf = lambda x: c * (1 + x * x / df) ** (-(df + 1) / 2)

  def cdf(t):  # 1/2 + integral_0^t pdf, Simpson with 2000 intervals.
    n, h = 2000, t / 2000
    s = pdf(0) + pdf(t) + sum((4 if i % 2 else 2) * pdf(i * h) for i in range(1, n))
    return 0.5 + s * h / 3

  lo, hi = 0.0, 50.0
  for _ in range(80):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
  return (lo + hi) / 2


def test_summary_mean_and_sample_sd():
  s = stats.summarize([0.80, 0.85, 0.90])
  assert s.n == 3
  assert s.mean == pytest.approx(0.85)
  # sum of squared deviations 0.0025 + 0 + 0.0025 = 0.005, / (n - 1) = 0.0025 -> sd 0.05.
  assert s.sd == pytest.approx(0.05)
  assert s.format(scale=100) == "85.0 ± 5.0"


def test_summary_one_seed_has_no_sd():
  s = stats.summarize([0.8245])
  assert (s.n, s.mean) == (1, 0.8245) and math.isnan(s.sd)
  assert s.format(scale=100, digits=2) == "82.45"
  assert stats.summarize([]).n == 0 and stats.summarize([]).format() == ""


def test_summary_refuses_non_finite():
  with pytest.raises(ConfigError, match="Non-finite"):
    stats.summarize([0.8, float("nan")])


def test_paired_t_interval_three_seeds_by_hand():
  method = {0: 0.80, 1: 0.85, 2: 0.90}
  ref = {0: 0.78, 1: 0.80, 2: 0.88}
  d = stats.paired_difference(method, ref)
  # d = (0.02, 0.05, 0.02): mean 0.03, sd sqrt((1e-4 + 4e-4 + 1e-4) / 2) = sqrt(3e-4), se = 0.01.
  half = _t_quantile_df2(0.975) * 0.01
  assert _t_quantile_df2(0.975) == pytest.approx(4.302652729911275)
  assert d.n == 3 and d.mean == pytest.approx(0.03) and d.sd == pytest.approx(math.sqrt(3e-4))
  assert (d.ci_low, d.ci_high) == (pytest.approx(0.03 - half), pytest.approx(0.03 + half))
  assert (d.wins, d.ties, d.losses) == (3, 0, 0) and d.record == "3-0-0"
  assert d.format(scale=100) == "+3.0 [-1.3, +7.3]"


def test_paired_t_interval_five_seeds_against_integrated_quantile():
  rng = np.random.default_rng(0)
  ref = rng.uniform(0.7, 0.9, 5)
  method = ref + np.array([0.03, -0.01, 0.05, 0.00, 0.02])
  d = stats.paired_difference(dict(enumerate(method)), dict(enumerate(ref)), confidence=0.90)
  diff = method - ref
  se = np.std(diff, ddof=1) / math.sqrt(5)
  q = _t_quantile_brute(0.95, 4)
  assert q == pytest.approx(2.131846786, abs=1e-6)  # printed t tables: 2.132
  assert d.ci_low == pytest.approx(diff.mean() - q * se, abs=1e-9)
  assert d.ci_high == pytest.approx(diff.mean() + q * se, abs=1e-9)
  # The "tie" on seed 3 is counted as a tie only if the floats are equal: ref + 0.0 == ref.
  assert (d.wins, d.ties, d.losses) == (3, 1, 1)


def test_one_seed_gives_no_interval():
  d = stats.paired_difference({7: 0.9}, {7: 0.85})
  assert d.n == 1 and d.mean == pytest.approx(0.05)
  assert math.isnan(d.sd) and math.isnan(d.ci_low) and math.isnan(d.ci_high)
  assert d.wins == 1 and d.format(scale=100) == "+5.0"


def test_identical_runs_give_a_zero_width_interval():
  # Two configurations that train the same weights (e.g. SH-PEFT and lambda = 1) tie on every seed.
  runs = {0: 0.82, 1: 0.91, 2: 0.88}
  for interval in stats.INTERVALS:
    d = stats.paired_difference(runs, dict(runs), interval=interval)
    assert (d.mean, d.ci_low, d.ci_high) == (0.0, 0.0, 0.0)
    assert (d.wins, d.ties, d.losses) == (0, 3, 0)


def test_constant_nonzero_difference_is_that_difference():
  d = stats.paired_difference({0: 0.5, 1: 0.6}, {0: 0.4, 1: 0.5})
  assert d.ci_low == pytest.approx(0.1) and d.ci_high == pytest.approx(0.1)


def test_bootstrap_interval_matches_exact_enumeration():
  # With 4 seeds the bootstrap distribution of the mean has 4^4 equally likely ordered resamples;
  # enumerate them all and take the percentiles by hand.
  ref = {s: 0.8 for s in range(4)}
  diffs = [0.00, 0.01, 0.04, 0.10]
  method = {s: 0.8 + x for s, x in enumerate(diffs)}
  means = sorted(sum(diffs[i] for i in idx) / 4 for idx in itertools.product(range(4), repeat=4))
  exact_lo, exact_hi = np.percentile(means, [2.5, 97.5])
  d = stats.paired_difference(method, ref, interval="bootstrap", n_resamples=50_000, seed=1)
  # Monte Carlo with 50k resamples against the exact distribution: within one atom (0.0025).
  assert d.ci_low == pytest.approx(exact_lo, abs=0.0026)
  assert d.ci_high == pytest.approx(exact_hi, abs=0.0026)
  assert d.interval == "bootstrap" and d.mean == pytest.approx(np.mean(diffs))
  # Seeded: the same call gives the same interval.
  again = stats.paired_difference(method, ref, interval="bootstrap", n_resamples=50_000, seed=1)
  assert (again.ci_low, again.ci_high) == (d.ci_low, d.ci_high)


def test_mismatched_seeds_are_refused_by_name():
  with pytest.raises(ConfigError, match=r"seeds \[2\] have no reference run"):
    stats.paired_difference({0: 0.8, 1: 0.8, 2: 0.9}, {0: 0.7, 1: 0.7})


def test_bad_arguments():
  with pytest.raises(ConfigError, match="Unknown interval"):
    stats.paired_difference({0: 1.0}, {0: 1.0}, interval="z")
  with pytest.raises(ConfigError, match="confidence"):
    stats.paired_difference({0: 1.0}, {0: 1.0}, confidence=95)


def test_compare_methods_pairs_every_method_with_the_reference():
  scores = {"shpeft": {0: 0.80, 1: 0.85, 2: 0.90},
            "random": {0: 0.82, 1: 0.80, 2: 0.95},
            "full": {0: 0.90, 1: 0.90, 2: 0.90}}
  out = stats.compare_methods(scores, "shpeft")
  assert out["shpeft"]["vs_reference"] is None
  assert out["random"]["summary"].mean == pytest.approx((0.82 + 0.80 + 0.95) / 3)
  r = out["random"]["vs_reference"]
  assert (r.wins, r.ties, r.losses) == (2, 0, 1)
  assert r.mean == pytest.approx((0.02 - 0.05 + 0.05) / 3)
  assert out["full"]["vs_reference"].mean == pytest.approx(0.05)
  no_ref = stats.compare_methods({"full": {0: 0.9}}, "shpeft")
  assert no_ref["full"]["vs_reference"] is None
