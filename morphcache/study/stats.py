"""Seed statistics for the study: mean, standard deviation and a Student-t 95% interval, unpaired and paired.

A run's accuracy varies with its seed (initialization, data order, masks). Over ``n`` seeds the study reports the
mean, the sample standard deviation (``ddof=1``) and the two-sided 95% confidence interval of the mean,
``mean +- t_{0.975, n-1} * std / sqrt(n)`` (Student 1908). A comparison between two settings uses paired
differences: run ``i`` of both settings shares seed ``i`` and hence its data order and masks, so the interval is
computed over the per-seed differences ``a_i - b_i`` (the paired t-interval), which removes the between-seed
variance the two settings share. With one value the interval is undefined (reported as None).
"""

from __future__ import annotations

import math
from typing import Sequence

from morphcache.errors import ConfigError

CONFIDENCE = 0.95


def t_quantile(df: int, confidence: float = CONFIDENCE) -> float:
    """Two-sided Student-t critical value ``t_{(1+confidence)/2, df}`` (e.g. 12.706 for df 1, 4.303 for df 2)."""
    if df < 1:
        raise ConfigError(f"a t-interval needs at least 1 degree of freedom, got {df}")
    from scipy.stats import t

    return float(t.ppf(0.5 + confidence / 2.0, df))


def describe(values: Sequence[float], confidence: float = CONFIDENCE) -> dict:
    """``{n, mean, std, ci_low, ci_high, half_width, values}`` of ``values`` (std with ``ddof=1``; the interval
    fields are None for fewer than 2 values). Non-finite values are rejected."""
    vals = [float(v) for v in values]
    if not vals:
        raise ConfigError("no values to describe")
    if not all(math.isfinite(v) for v in vals):
        raise ConfigError(f"non-finite values {vals}; a run failed to produce an accuracy")
    n = len(vals)
    mean = sum(vals) / n
    out = {"n": n, "mean": mean, "std": None, "ci_low": None, "ci_high": None, "half_width": None, "values": vals}
    if n >= 2:
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
        half = t_quantile(n - 1, confidence) * std / math.sqrt(n)
        out.update(std=std, ci_low=mean - half, ci_high=mean + half, half_width=half)
    return out


def paired_difference(a: dict[int, float], b: dict[int, float], confidence: float = CONFIDENCE) -> dict:
    """Paired differences ``a[s] - b[s]`` over the seeds ``s`` present in both (dicts seed -> value).

    Returns :func:`describe` of the differences plus ``seeds`` and ``excludes_zero`` (True when the interval lies
    entirely above or below 0; None with fewer than 2 pairs). Raises ConfigError when no seed is shared.
    """
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ConfigError(f"no shared seeds to pair: {sorted(a)} vs {sorted(b)}")
    out = describe([a[s] - b[s] for s in seeds], confidence)
    out["seeds"] = seeds
    lo, hi = out["ci_low"], out["ci_high"]
    out["excludes_zero"] = None if lo is None else bool(lo > 0 or hi < 0)
    return out


def format_interval(d: dict, digits: int = 2) -> str:
    """``"81.23 +- 0.45 (n=3)"``: mean and 95% half-width (``"81.23 (n=1)"`` without an interval)."""
    if d.get("half_width") is None:
        return f"{d['mean']:.{digits}f} (n={d['n']})"
    return f"{d['mean']:.{digits}f} ± {d['half_width']:.{digits}f} (n={d['n']})"
