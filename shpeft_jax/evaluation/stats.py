"""Statistics over seeds: mean +- sd per method, and paired differences to a reference method.

On the small datasets of this project one run is noise (on the demo, 179 test images, one image
moves macro F1 by about half a point, and the seed alone moves it by several). A comparison is
therefore made over several seeds, and the seeds are *paired*: seed s of method A and seed s of
SH-PEFT share the cached pre-trained encoder, the data order, the head initialisation and the
scoring batches, so the per-seed difference d_s = A_s - SHPEFT_s removes what the two runs share.

For every method the module reports

  * the mean and the sample standard deviation (ddof = 1) of its scores over the seeds;
  * the mean paired difference to the reference, with a confidence interval, and the number of
    seeds where the method is better, equal, worse (`wins`, `ties`, `losses`).

Two intervals are offered (`interval=`):

  * "t" (the default): the paired Student t interval, mean(d) +- t_{1-a/2, n-1} sd(d) / sqrt(n),
    from `scipy.stats.ttest_rel(...).confidence_interval`; it assumes the differences are roughly
    normal, which is the usual assumption for a handful of seeds.
  * "bootstrap": the percentile bootstrap of mean(d) over resampled seeds
    (`scipy.stats.bootstrap`, seeded, so the interval is reproducible). With n seeds there are
    only C(2n-1, n) distinct resamples (126 for n = 5), so it is coarse for few seeds and tends to
    be narrower than the t interval; use it as a check, not as the headline.

Edge cases are explicit rather than silent: fewer than two paired seeds give no interval (NaN
bounds, `n` says why); identical differences on every seed (e.g. two configurations that train
the same weights) give a zero-width interval at that difference, not NaN; seeds present for one
method and not the other are refused with an error naming them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np

from shpeft_jax.errors import ConfigError

INTERVALS = ("t", "bootstrap")


@dataclasses.dataclass(frozen=True)
class Summary:
  """Mean and sample standard deviation (ddof = 1) of one method's scores over its seeds."""
  n: int
  mean: float
  sd: float     # NaN when n < 2: one run says nothing about the spread.

  def format(self, scale: float = 1.0, digits: int = 1) -> str:
    """'87.8 +- 3.8' (or '82.5' alone for one seed); `scale=100` turns fractions into %."""
    if self.n == 0:
      return ""
    if math.isnan(self.sd):
      return f"{scale * self.mean:.{digits}f}"
    return f"{scale * self.mean:.{digits}f} ± {scale * self.sd:.{digits}f}"


@dataclasses.dataclass(frozen=True)
class PairedDifference:
  """method - reference over the seeds both have; `ci_*` NaN when fewer than two seeds."""
  n: int
  mean: float
  sd: float
  ci_low: float
  ci_high: float
  confidence: float
  interval: str
  wins: int     # Seeds where method > reference.
  ties: int
  losses: int

  def format(self, scale: float = 1.0, digits: int = 1) -> str:
    """'+3.9 [-1.2, +9.0]' (or '+3.9' alone when there is no interval)."""
    if self.n == 0:
      return ""
    mean = f"{scale * self.mean:+.{digits}f}"
    if math.isnan(self.ci_low):
      return mean
    return f"{mean} [{scale * self.ci_low:+.{digits}f}, {scale * self.ci_high:+.{digits}f}]"

  @property
  def record(self) -> str:
    """'3-1-1' = wins-ties-losses."""
    return f"{self.wins}-{self.ties}-{self.losses}"


def _finite(values: Sequence[float]) -> np.ndarray:
  x = np.asarray(list(values), dtype=np.float64)
  if x.ndim != 1:
    raise ConfigError(f"Expected one score per seed (a flat list), got shape {x.shape}.")
  bad = ~np.isfinite(x)
  if bad.any():
    raise ConfigError(f"Non-finite score(s) {x[bad].tolist()} among {x.tolist()}: a run without "
                      "a result cannot be averaged; rerun it or leave its seed out.")
  return x


def summarize(values: Sequence[float]) -> Summary:
  """Mean and sd (ddof = 1) of one method's per-seed scores."""
  x = _finite(values)
  if x.size == 0:
    return Summary(0, math.nan, math.nan)
  sd = float(np.std(x, ddof=1)) if x.size > 1 else math.nan
  return Summary(int(x.size), float(np.mean(x)), sd)


def _paired_arrays(method: Mapping[int, float], reference: Mapping[int, float]
                   ) -> tuple[np.ndarray, np.ndarray]:
  only_m = sorted(set(method) - set(reference))
  only_r = sorted(set(reference) - set(method))
  if only_m or only_r:
    raise ConfigError(
        f"Paired comparison needs the same seeds for both methods; seeds {only_m} have no "
        f"reference run and seeds {only_r} have no run of the method. Run the missing seeds "
        "(a sweep resumes) or compare on the common ones.")
  seeds = sorted(method)
  return (_finite([method[s] for s in seeds]), _finite([reference[s] for s in seeds]))


def paired_difference(method: Mapping[int, float], reference: Mapping[int, float], *,
                      confidence: float = 0.95, interval: str = "t",
                      n_resamples: int = 9999, seed: int = 0) -> PairedDifference:
  """method - reference, paired by seed ({seed: score} each).

  `interval` is "t" (paired Student t) or "bootstrap" (percentile bootstrap of the mean
  difference, `n_resamples` resamples drawn with `seed`).
  """
  from scipy import stats  # pylint: disable=g-import-not-at-top
  if interval not in INTERVALS:
    raise ConfigError(f"Unknown interval {interval!r}; choose from {INTERVALS}.")
  if not 0.0 < confidence < 1.0:
    raise ConfigError(f"confidence must be in (0, 1), got {confidence}.")
  a, b = _paired_arrays(method, reference)
  d = a - b
  n = int(d.size)
  wins, ties, losses = int(np.sum(d > 0)), int(np.sum(d == 0)), int(np.sum(d < 0))
  nan = math.nan
  if n == 0:
    return PairedDifference(0, nan, nan, nan, nan, confidence, interval, 0, 0, 0)
  mean = float(np.mean(d))
  sd = float(np.std(d, ddof=1)) if n > 1 else nan
  if n < 2:
    lo = hi = nan
  elif np.all(d == d[0]):
    # No spread: every seed gives the same difference (scipy would return NaN bounds here).
    lo = hi = mean
  elif interval == "t":
    ci = stats.ttest_rel(a, b).confidence_interval(confidence_level=confidence)
    lo, hi = float(ci.low), float(ci.high)
  else:
    res = stats.bootstrap((d,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
                          method="percentile", rng=np.random.default_rng(seed))
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
  return PairedDifference(n, mean, sd, lo, hi, confidence, interval, wins, ties, losses)


def compare_methods(scores: Mapping[str, Mapping[int, float]], reference: str, *,
                    confidence: float = 0.95, interval: str = "t"
                    ) -> dict[str, dict[str, Summary | PairedDifference | None]]:
  """{method: {'summary': Summary, 'vs_reference': PairedDifference or None}} for every method.

  `scores` is {method: {seed: score}}; the reference's own row has `vs_reference` None. Without
  the reference in `scores` every `vs_reference` is None (nothing to pair with).
  """
  out = {}
  for name, per_seed in scores.items():
    diff = None
    if reference in scores and name != reference:
      diff = paired_difference(per_seed, scores[reference], confidence=confidence,
                               interval=interval)
    out[name] = {"summary": summarize([per_seed[s] for s in sorted(per_seed)]),
                 "vs_reference": diff}
  return out
