"""The one definition of TPOT and of meeting the SLO, shared by the router's metrics, the
benchmark's metrics and the planner's simulator, so that a served, a measured and a
predicted attainment are the same quantity.

- TTFT: first token time - arrival.
- TPOT: mean time per output token after the first, (last token - first token) /
  (num_output_tokens - 1). A one-token answer has no TPOT (None; the planner's arrays
  carry 0) and meets any TPOT SLO.
- A request meets the SLO when it finished, TTFT <= slo.ttft_s and its TPOT (if any)
  <= slo.tpot_s. Attainment is the share of requests that meet it.

Pure: no I/O, no engine, no HTTP. The `*_array` forms are the same definitions over numpy
arrays (the planner judges thousands of simulated requests at once).
"""

from __future__ import annotations

import numpy as np

from cluster.config import SLOConfig


def tpot_s(first_token_s: float, last_token_s: float, num_output_tokens: int) -> float | None:
    """Mean seconds per output token after the first; None with fewer than two tokens.
    Times may be absolute or relative to the arrival (only their difference counts)."""
    if num_output_tokens < 2:
        return None
    return (last_token_s - first_token_s) / (num_output_tokens - 1)


def meets_ttft(ttft_s: float | None, slo: SLOConfig) -> bool:
    return ttft_s is not None and ttft_s <= slo.ttft_s


def meets_tpot(tpot: float | None, slo: SLOConfig) -> bool:
    return tpot is None or tpot <= slo.tpot_s


def meets_slo(ttft_s: float | None, tpot: float | None, slo: SLOConfig) -> bool:
    """A finished request's verdict (an unfinished one has ttft_s None or never finished:
    callers pass ttft_s=None for requests that failed)."""
    return meets_ttft(ttft_s, slo) and meets_tpot(tpot, slo)


def tpot_s_array(first_token_s: np.ndarray, last_token_s: np.ndarray,
                 num_output_tokens: np.ndarray) -> np.ndarray:
    """`tpot_s` per request; 0 for one-token outputs, inf where a time is inf (unfinished)."""
    multi = num_output_tokens >= 2
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = np.where(multi, (last_token_s - first_token_s) / np.maximum(num_output_tokens - 1, 1), 0.0)
    return np.where(np.isnan(tpot), np.inf, tpot)


def meets_slo_array(ttft_s: np.ndarray, tpot: np.ndarray, slo: SLOConfig) -> np.ndarray:
    """`meets_slo` per request (unfinished requests carry inf and fail)."""
    return (ttft_s <= slo.ttft_s) & (tpot <= slo.tpot_s)


def attainment(meets: np.ndarray) -> float:
    """Share of requests meeting the SLO; 1 for no requests (nothing was missed)."""
    return float(np.mean(meets)) if len(meets) else 1.0
