"""Shared vocabulary of synthetic request lengths, read by `pdserve plan` and `pdserve bench`.

A log-normal length law is given by its **mean** (what a user measures: tokens per request)
and `sigma`, the standard deviation of log(length); its log-mean is then
`mu = ln(mean) - sigma^2 / 2` (its median is `exp(mu)`). The planner also accepts a median
(`mu = ln(median)`); both tools convert through `lognormal_mu`, so a plan's predicted and a
benchmark's measured goodput are for the same lengths when the same numbers are given.
"""

from __future__ import annotations

import math


def lognormal_mu(sigma: float, *, mean: float | None = None, median: float | None = None) -> float:
    """Log-mean of a log-normal length law given exactly one of its mean or median."""
    if (mean is None) == (median is None):
        raise ValueError("give exactly one of mean or median")
    if sigma < 0 or not math.isfinite(sigma):
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma}")
    value = mean if mean is not None else median
    if value is None or value <= 0:
        raise ValueError(f"a log-normal length needs a mean/median > 0, got {value}")
    return math.log(value) - (sigma**2 / 2 if mean is not None else 0.0)
