"""The profiler's grid and its fit check: which batch shapes `pdserve profile` times, the
timing loop over them (`measure_grid`, against any `StepTimer`), and how well the fitted
latency model reproduces what was measured. Pure: no engine, no vLLM (tests drive it with a
fake timer); the real engine is `cluster/profile_engine.py`, the command `cluster/profiler.py`.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from cluster.planner.latency_model import LatencyProfile
from cluster.planner.profile_fit import DecodeSample, PrefillSample


class InputError(ValueError):
    """Profiler input that cannot be used; the message is one line."""


@dataclass(frozen=True)
class ProfileGrid:
    """Which batch shapes to time. Shapes above the token caps are skipped."""

    prefill_lens: tuple[int, ...] = (64, 128, 256, 384, 512, 768, 1024, 1536, 2048)
    prefill_batch_sizes: tuple[int, ...] = (1, 2, 4)
    prefill_max_batch_tokens: int = 4096  # the serving prefill budget: larger batches split
    decode_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    decode_context_lens: tuple[int, ...] = (128, 512, 1024, 2048)
    decode_max_batch_tokens: int = 16384  # each decode shape first prefills B*C tokens
    decode_steps: int = 16
    repeats: int = 3

    def validate(self) -> None:
        for name in ("prefill_lens", "prefill_batch_sizes", "decode_batch_sizes", "decode_context_lens"):
            values = getattr(self, name)
            if not values or min(values) < 1:
                raise InputError(f"--{name.replace('_', '-')} needs positive integers, got {list(values)}")
        for name in ("prefill_max_batch_tokens", "decode_max_batch_tokens", "decode_steps", "repeats"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if len(self.prefill_shapes()) < 3:
            raise InputError("the prefill grid has fewer than 3 shapes under --prefill-max-batch-tokens; "
                             "a fit of 3 coefficients needs more")
        if len(self.decode_shapes()) < 3:
            raise InputError("the decode grid has fewer than 3 shapes under --decode-max-batch-tokens; "
                             "a fit of 3 coefficients needs more")

    def prefill_shapes(self) -> list[tuple[int, ...]]:
        """Prompt lengths of each prefill batch (equal lengths within a batch)."""
        return [(length,) * batch for length in sorted(set(self.prefill_lens))
                for batch in sorted(set(self.prefill_batch_sizes))
                if length * batch <= self.prefill_max_batch_tokens]

    def decode_shapes(self) -> list[tuple[int, int]]:
        """(batch size, prompt length) of each decode point."""
        return [(batch, context) for batch in sorted(set(self.decode_batch_sizes))
                for context in sorted(set(self.decode_context_lens))
                if batch * context <= self.decode_max_batch_tokens]

    def max_context(self) -> int:
        """Longest prompt + output of any request the grid submits."""
        return max(max(self.prefill_lens) + 1,
                   max(c for _, c in self.decode_shapes()) + self.decode_steps + 1)


class StepTimer(Protocol):
    """Times engine iterations of given shapes (the real engine, or a test's function)."""

    def time_prefill(self, input_lens: Sequence[int]) -> float:
        """Milliseconds of ONE prefill iteration over prompts of these lengths."""
        ...

    def time_decode(self, batch_size: int, context_len: int, num_steps: int) -> list[float]:
        """Milliseconds of each of `num_steps` decode steps of `batch_size` requests whose
        prompts have `context_len` tokens; step k (0-based) has `context_len + k` tokens in KV."""
        ...


# ------------------------------------------------------------------- measuring and fitting

@dataclass(frozen=True)
class Measurements:
    prefill: list[PrefillSample]
    decode: list[DecodeSample]
    prefill_runs_ms: list[list[float]]  # [shape] -> every repeat's time, aligned with `prefill`
    decode_runs_ms: list[list[float]]  # [shape] -> every repeat's median step, aligned with `decode`


def measure_grid(grid: ProfileGrid, timer: StepTimer,
                 progress: Callable[[str], None] = lambda _: None) -> Measurements:
    """One sample per grid shape: the fastest of `repeats` runs.

    The minimum, not the mean: on a shared host, other processes only ever add time to an
    iteration, so the fastest run is the closest to the engine's own cost (timeit's rule).
    Within a decode run the median step is taken first (a burst rarely covers a whole run).
    """
    prefill_shapes, decode_shapes = grid.prefill_shapes(), grid.decode_shapes()
    prefill_runs: dict[tuple[int, ...], list[float]] = {s: [] for s in prefill_shapes}
    decode_runs: dict[tuple[int, int], list[tuple[float, int]]] = {s: [] for s in decode_shapes}
    for round_index in range(grid.repeats):
        for lens in prefill_shapes:
            prefill_runs[lens].append(timer.time_prefill(lens))
        for batch, context in decode_shapes:
            steps = timer.time_decode(batch, context, grid.decode_steps)
            if steps:  # (median step ms, its index: the context grew by that many tokens)
                median_ms = statistics.median_low(steps)
                decode_runs[(batch, context)].append((median_ms, steps.index(median_ms)))
        progress(f"round {round_index + 1}/{grid.repeats}: {len(prefill_shapes)} prefill shapes, "
                 f"{len(decode_shapes)} decode points")
    prefill = [PrefillSample(lens, min(prefill_runs[lens])) for lens in prefill_shapes]
    decode, decode_runs_ms = [], []
    for (batch, context), runs in decode_runs.items():
        if not runs:
            progress(f"decode B={batch} C={context}: no clean decode step in any run, skipped")
            continue
        ms, middle = min(runs)
        decode.append(DecodeSample((context + middle,) * batch, ms))
        decode_runs_ms.append([m for m, _ in runs])
    return Measurements(prefill, decode, [prefill_runs[s] for s in prefill_shapes], decode_runs_ms)


@dataclass(frozen=True)
class FitQuality:
    """How well one fitted formula explains its samples."""

    r_squared: float
    mean_abs_error_pct: float
    max_abs_error_pct: float
    rows: tuple[tuple[str, float, float], ...]  # (shape, measured ms, predicted ms)


def fit_quality(labels_measured_predicted: list[tuple[str, float, float]]) -> FitQuality:
    measured = [m for _, m, _ in labels_measured_predicted]
    mean = sum(measured) / len(measured)
    total = sum((m - mean) ** 2 for m in measured)
    residual = sum((m - p) ** 2 for _, m, p in labels_measured_predicted)
    errors = [abs(p - m) / m * 100 if m > 0 else 0.0 for _, m, p in labels_measured_predicted]
    return FitQuality(r_squared=1 - residual / total if total > 0 else 1.0,
                      mean_abs_error_pct=sum(errors) / len(errors), max_abs_error_pct=max(errors),
                      rows=tuple(labels_measured_predicted))


def assess_fit(entry: dict, data: Measurements) -> tuple[FitQuality, FitQuality]:
    """(prefill, decode) fit quality of a fitted entry against the samples it came from."""
    profile = LatencyProfile.model_validate(entry)
    prefill = [(f"{len(s.input_lens)} x {s.input_lens[0]}", s.time_ms, profile.prefill_ms(s.input_lens))
               for s in data.prefill]
    decode = [(f"B={len(s.context_lens)} ctx={s.context_lens[0]}", s.time_ms,
               profile.decode_ms(s.context_lens)) for s in data.decode]
    return fit_quality(prefill), fit_quality(decode)


def _slowest_vs_fastest(runs_ms: list[float]) -> str:
    return f"{max(runs_ms) / min(runs_ms):.2f}x" if min(runs_ms) > 0 else "-"


def render_fit_report(entry: dict, quality: tuple[FitQuality, FitQuality], data: Measurements) -> str:
    """Coefficients, R^2 and residuals per formula, and every shape: measured (fastest run),
    fitted, error, and slowest/fastest run (how much interference the runs saw)."""
    lines = []
    for name, q, coefficients, formula, runs in (
        ("prefill", quality[0], entry["prefill"], "a + b*sum(l) + c*sum(l^2)", data.prefill_runs_ms),
        ("decode", quality[1], entry["decoding_smallbs"], "a + b*sum(ctx+1) + c*B", data.decode_runs_ms),
    ):
        a, b, c = coefficients
        lines.append(f"{name}: ms = {formula}, a={a:.4g} b={b:.4g} c={c:.4g}")
        lines.append(f"  R^2 {q.r_squared:.4f}; |residual| mean {q.mean_abs_error_pct:.1f}%, "
                     f"max {q.max_abs_error_pct:.1f}% over {len(q.rows)} shapes")
        lines.append(f"  {'shape':<18} {'measured ms':>12} {'fit ms':>10} {'error':>8} {'runs max/min':>13}")
        for (label, measured, predicted), shape_runs in zip(q.rows, runs):
            error = (predicted - measured) / measured * 100 if measured > 0 else 0.0
            lines.append(f"  {label:<18} {measured:>12.2f} {predicted:>10.2f} {error:>+7.1f}% "
                         f"{_slowest_vs_fastest(shape_runs):>13}")
    return "\n".join(lines)
