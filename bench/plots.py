"""PNG plots of benchmark results.

Figures are built with `matplotlib.figure.Figure` and the Agg canvas directly, never
through pyplot, so no global backend is chosen, no display is needed and nothing leaks
between plots. matplotlib is imported when a plot is drawn, not at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np


def _new_figure(width_in: float = 6.4, height_in: float = 4.2):  # -> matplotlib Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_in, height_in), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def plot_attainment_vs_rate(
    series: Mapping[str, Sequence[tuple[float, float]]],
    attainment_target: float,
    path: Path,
    goodputs_rps: Mapping[str, float] | None = None,
) -> None:
    """One line per deployment: SLO attainment (%) against offered rate (req/s)."""
    figure = _new_figure()
    axes = figure.add_subplot()
    for label, points in series.items():
        ordered = sorted(points)
        line, = axes.plot([r for r, _ in ordered], [a * 100 for _, a in ordered],
                          marker="o", label=label)
        if goodputs_rps and goodputs_rps.get(label):
            axes.axvline(goodputs_rps[label], color=line.get_color(), linestyle=":", linewidth=1)
    axes.axhline(attainment_target * 100, color="grey", linestyle="--", linewidth=1,
                 label=f"target {attainment_target * 100:g}%")
    axes.set_xlabel("request rate (req/s)")
    axes.set_ylabel("SLO attainment (%)")
    axes.set_ylim(-2, 102)
    axes.grid(True, alpha=0.3)
    axes.legend()
    axes.set_title("SLO attainment vs rate (dotted: goodput)")
    figure.savefig(path, dpi=120)


def plot_cdf(
    series: Mapping[str, Sequence[float]],
    slo_s: float,
    metric: str,
    path: Path,
    title: str = "",
) -> None:
    """Empirical CDFs of a latency (seconds, drawn in ms) with the SLO as a vertical line."""
    figure = _new_figure()
    axes = figure.add_subplot()
    for label, values in series.items():
        if len(values) == 0:
            continue
        ordered = np.sort(np.asarray(values, dtype=float)) * 1e3
        fractions = np.arange(1, len(ordered) + 1) / len(ordered)
        axes.step(ordered, fractions, where="post", label=f"{label} (n={len(ordered)})")
    axes.axvline(slo_s * 1e3, color="grey", linestyle="--", linewidth=1,
                 label=f"SLO {slo_s * 1e3:g} ms")
    axes.set_xlabel(f"{metric} (ms)")
    axes.set_ylabel("fraction of requests")
    axes.set_ylim(0, 1.01)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower right")
    axes.set_title(title or f"{metric} CDF")
    figure.savefig(path, dpi=120)
