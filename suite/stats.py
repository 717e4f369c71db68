"""Paired comparisons across seeds: the mean of per-seed differences (backbone − baseline) with a
Student-t confidence interval, the test a reviewer asks of "A beats B" when both ran the same seeds.

Pure functions over plain numbers; the t quantile is scipy's (scipy.stats.t.ppf)."""
import math
import statistics
from dataclasses import dataclass

from scipy import stats as _scipy_stats

LEVEL = 0.95
NOTE = ("Paired: mean of per-seed differences (backbone − baseline) over the seeds both ran, with a "
        "95% Student-t interval, mean ± t(0.975, n−1)·s/√n (s: sample std of the differences); "
        "* = the interval excludes 0; n=1 has no interval. Reported rows are never paired.")


@dataclass(frozen=True)
class Paired:
    mean: float            # mean difference
    std: "float | None"    # sample std of the differences (ddof=1); None for n=1
    n: int                 # seed-matched pairs
    low: "float | None"    # the interval; None for n=1
    high: "float | None"

    @property
    def excludes_zero(self):
        return self.low is not None and (self.low > 0 or self.high < 0)


def paired_difference(values, baseline, level=LEVEL):
    """Paired for {seed: value} of a backbone against {seed: value} of the baseline, over the seeds
    both have (None when they share none)."""
    seeds = sorted(set(values) & set(baseline), key=str)
    diffs = [values[s] - baseline[s] for s in seeds]
    return t_interval(diffs, level) if diffs else None


def t_interval(diffs, level=LEVEL):
    """Mean of `diffs` with its two-sided Student-t interval at `level` (n-1 degrees of freedom)."""
    n = len(diffs)
    mean = statistics.fmean(diffs)
    if n < 2:
        return Paired(mean, None, n, None, None)
    std = statistics.stdev(diffs)
    half = _scipy_stats.t.ppf(0.5 + level / 2, n - 1) * std / math.sqrt(n)
    return Paired(mean, std, n, mean - half, mean + half)


def format_paired(p, pm_open="[", pm_close="]", empty="—"):
    """'+0.5 [−0.3, +1.3] (n=3) *' (the * when the interval excludes 0)."""
    if p is None:
        return empty
    if p.low is None:
        return f"{p.mean:+.1f} (n={p.n})"
    mark = " *" if p.excludes_zero else ""
    return f"{p.mean:+.1f} {pm_open}{p.low:+.1f}, {p.high:+.1f}{pm_close} (n={p.n}){mark}"
