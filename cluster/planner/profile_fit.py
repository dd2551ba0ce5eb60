"""Least-squares fit of latency-profile coefficients from measured iterations.

`pdserve profile` times real engine iterations and calls `fit_profile`, which returns one
`{model: {tp: entry}}` entry in the format `latency_model` reads:

    prefill sample  (prompt lengths l_i of one batch, ms)   ->  a + b*sum(l) + c*sum(l^2)
    decode sample   (context lengths s_j of one batch, ms)  ->  a + b*sum(s+1) + c*B

Decode samples are split at `threshold` (batch size) and fitted separately; a regime with
too few samples to determine three coefficients reuses the other regime's fit, so a
profile measured only at small batches still extrapolates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from .latency_model import Coefficients, LatencyProfile

MIN_SAMPLES_PER_FIT = 3


@dataclass(frozen=True)
class PrefillSample:
    """One measured prefill iteration."""

    input_lens: tuple[int, ...]  # prompt length of each request in the batch
    time_ms: float


@dataclass(frozen=True)
class DecodeSample:
    """One measured decode step."""

    context_lens: tuple[int, ...]  # tokens already in KV for each request in the batch
    time_ms: float


SampleLike = PrefillSample | DecodeSample | tuple[Sequence[int], float]


def _as_pairs(samples: Iterable[SampleLike], what: str) -> list[tuple[list[int], float]]:
    pairs = []
    for i, s in enumerate(samples):
        if isinstance(s, PrefillSample):
            lens, t = list(s.input_lens), s.time_ms
        elif isinstance(s, DecodeSample):
            lens, t = list(s.context_lens), s.time_ms
        else:
            try:
                raw_lens, t = s
                lens = [int(x) for x in raw_lens]
                t = float(t)
            except (TypeError, ValueError):
                raise ValueError(
                    f"{what} sample {i} must be (lengths, time_ms) or a {what.title()}Sample"
                ) from None
        if not lens or min(lens) < 0 or not np.isfinite(t) or t < 0:
            raise ValueError(f"{what} sample {i}: need >= 1 non-negative length and time_ms >= 0")
        pairs.append((lens, float(t)))
    return pairs


def _least_squares(features: np.ndarray, times_ms: np.ndarray, what: str) -> Coefficients:
    # features: [N, 3]. Columns span ~1 to ~1e7, so scale them to unit norm before solving.
    if features.shape[0] < MIN_SAMPLES_PER_FIT:
        raise ValueError(f"{what}: need at least {MIN_SAMPLES_PER_FIT} samples, got {features.shape[0]}")
    scale = np.linalg.norm(features, axis=0)
    scale[scale == 0] = 1.0
    coef, _, rank, _ = np.linalg.lstsq(features / scale, times_ms, rcond=None)
    if rank < features.shape[1]:
        raise ValueError(
            f"{what}: samples do not determine all three coefficients; vary the batch "
            "composition (number of requests and their lengths)"
        )
    a, b, c = (coef / scale).tolist()
    return (a, b, c)


def fit_prefill(samples: Iterable[PrefillSample | tuple[Sequence[int], float]]) -> Coefficients:
    """[a, b, c] of `a + b*sum(l) + c*sum(l^2)` (ms) by least squares."""
    pairs = _as_pairs(samples, "prefill")
    x = np.array([[1.0, sum(l), sum(v * v for v in l)] for l, _ in pairs]).reshape(-1, 3)
    y = np.array([t for _, t in pairs])
    return _least_squares(x, y, "prefill fit")


def _decode_features(pairs: list[tuple[list[int], float]]) -> tuple[np.ndarray, np.ndarray]:
    x = np.array([[1.0, sum(s) + len(s), float(len(s))] for s, _ in pairs]).reshape(-1, 3)
    y = np.array([t for _, t in pairs])
    return x, y


def fit_decode(
    samples: Iterable[DecodeSample | tuple[Sequence[int], float]], threshold: int = 95
) -> tuple[Coefficients, Coefficients]:
    """(small-batch, large-batch) [a, b, c] of `a + b*sum(s+1) + c*B` (ms)."""
    pairs = _as_pairs(samples, "decode")
    small = [p for p in pairs if len(p[0]) < threshold]
    large = [p for p in pairs if len(p[0]) >= threshold]
    fits: dict[str, Coefficients] = {}
    for name, group in (("small", small), ("large", large)):
        if len(group) >= MIN_SAMPLES_PER_FIT:
            try:
                fits[name] = _least_squares(*_decode_features(group), f"decode fit ({name} batch)")
            except ValueError:
                pass  # degenerate regime (e.g. one batch size only): fall back below
    if not fits:
        # Neither regime alone determines a fit; one fit over everything is the best we have.
        coef = _least_squares(*_decode_features(pairs), "decode fit")
        return coef, coef
    return fits.get("small", fits.get("large")), fits.get("large", fits.get("small"))


def fit_profile(
    prefill_samples: Iterable[PrefillSample | tuple[Sequence[int], float]],
    decode_samples: Iterable[DecodeSample | tuple[Sequence[int], float]],
    threshold: int = 95,
    hardware: str | None = None,
    kv_bytes_per_token: int | None = None,
    kv_capacity_tokens: int | None = None,
    whole_iterations: bool = False,
) -> dict:
    """One profile entry (the value under `{model: {tp: ...}}`), validated, as plain JSON.
    `whole_iterations`: the samples time whole engine iterations (`LatencyProfile`)."""
    small, large = fit_decode(decode_samples, threshold)
    profile = LatencyProfile(
        prefill=fit_prefill(prefill_samples),
        decoding_smallbs=small,
        decoding_largebs=large,
        decoding_large_small_bs_threshold=threshold,
        hardware=hardware,
        kv_bytes_per_token=kv_bytes_per_token,
        kv_capacity_tokens=kv_capacity_tokens,
        whole_iterations=whole_iterations,
    )
    return profile.model_dump(mode="json", exclude_none=True)


def profile_document(model: str, entries_by_tp: dict[int, dict]) -> dict:
    """The whole profile file for one model: `{model: {"tp": entry}}`."""
    return {model: {str(tp): entry for tp, entry in sorted(entries_by_tp.items())}}
