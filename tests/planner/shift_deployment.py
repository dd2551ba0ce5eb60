"""A workload shift on a deployment that the re-planning loop resizes, against a static
deployment of the same size (issue 16's end-to-end run), on fake workers with modelled
latencies behind the real router.

    python -m tests.planner.shift_deployment --phase-s 40      # the comparison, printed

Workers: `ModelledPrefill` runs one prompt at a time (FIFO) for `prefill_latency_s` of the
profile below; `ModelledDecode` emits each token of a request after one decode step of the
profile at the instance's current batch (its requests in flight), which is continuous
batching seen from one request. The planner sizes with the same profile (`fake_problem`),
so its predictions are about the deployment that runs, and its correction factor covers
the rest (asyncio, the router).

Workload (one rate, two phases): short prompts with long outputs (decode-bound: needs 3
decodes), then long prompts with short outputs (prefill-bound: needs 3 prefills), on a
budget of 4 instances. A static 2 + 2 fails each phase's SLO on one side; the loop moves
to 1 + 3, then 3 + 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from cluster import slo as slo_math
from cluster.config import RouterConfig, ServeConfig, SLOConfig
from cluster.planner.inputs import PlanRequest
from cluster.planner.latency_model import EngineTiming, LatencyProfile
from cluster.planner.online import PoolBounds, PoolSizer, Replanner, ReplanSettings
from cluster.planner.plans import ParallelConfig
from cluster.planner.problem import build_problem
from cluster.tiny_model import ensure_tiny_model
from pdserve.replanner import PoolActuator, ReplanTask
from router.build import build_router
from router.metrics import request_latencies
from router.tokenizer import ModelTokenizer
from tests.fakes import FakeDecodeWorker, FakePrefillWorker, serving

# ms: prefill a + b*L (+ c*L^2); decode step a + b*(context + B) + c*B
PROFILE = LatencyProfile(prefill=(5.0, 0.1, 0.0), decoding_smallbs=(8.0, 0.0, 1.5),
                         decoding_largebs=(8.0, 0.0, 1.5), decoding_large_small_bs_threshold=10_000)
SLO = SLOConfig(ttft_s=0.4, tpot_s=0.025, attainment=0.9)
RATE_RPS = 14.0
PHASES = (("short prompts, long outputs", 32, 64), ("long prompts, short outputs", 1024, 8))
MAX_UNITS = 4


class ModelledPrefill(FakePrefillWorker):
    def __init__(self, instance_id: str, timing: EngineTiming):
        super().__init__(instance_id)
        self.timing = timing
        self.is_draining = False
        self._one_at_a_time = asyncio.Lock()  # FIFO: waiters wake in arrival order
        self.num_queued = 0

    async def prefill(self, req):
        self.num_queued += 1
        async with self._one_at_a_time:
            self.num_queued -= 1
            n = len(req.prompt_token_ids)
            self.delay_s = self.timing.prefill_latency_s(n, n * n)
            return await super().prefill(req)

    async def stats(self):
        s = await super().stats()
        return type(s)(**{**{f: getattr(s, f) for f in s.__struct_fields__},
                          "num_waiting_reqs": self.num_queued, "is_draining": self.is_draining})


class ModelledDecode(FakeDecodeWorker):
    def __init__(self, instance_id: str, prefills: list, timing: EngineTiming):
        super().__init__(instance_id, prefills=prefills)
        self.timing = timing
        self.is_draining = False

    @property
    def token_delay_s(self) -> float:  # one step at the current batch
        return self.timing.decode_step_s(max(1, len(self.active)), 0)

    @token_delay_s.setter
    def token_delay_s(self, _value: float) -> None:
        pass  # the step time follows the batch

    async def stats(self):
        s = await super().stats()
        return type(s)(**{**{f: getattr(s, f) for f in s.__struct_fields__},
                          "is_draining": self.is_draining})


def fake_problem(workdir: Path):
    """The planning problem of the fake deployment: the tiny model, PROFILE, one node of
    MAX_UNITS units, the engine settings the fakes behave like."""
    model = ensure_tiny_model("tiny")
    name = "pdserve-tiny"
    profile_path = workdir / "fake-profile.json"
    profile_path.write_text(json.dumps({name: {"1": PROFILE.model_dump(mode="json")}}))
    return build_problem(PlanRequest.model_validate({
        "model": str(model), "profile": str(profile_path), "profile_model": name,
        "slo": SLO.model_dump(),
        "workload": {"lengths": {"kind": "fixed", "input_len": 32, "output_len": 64}},
        "cluster": {"num_nodes": 1, "gpus_per_node": MAX_UNITS},
        "engine": {"framework_overhead": False, "prefill_token_budget": 1024}}))


@dataclass
class PhaseResult:
    name: str
    num_requests: int
    attainment: float
    ttft_met: float
    tpot_met: float
    sizes: str  # prefill+decode serving at the end of the phase


def _judge(traces, start: float, end: float) -> tuple[int, float, float, float]:
    n = met = ttft_ok = tpot_ok = 0
    for t in traces:
        if not start <= t.arrival_s < end:
            continue
        ttft, tpot, _ = request_latencies(t)
        n += 1
        met += slo_math.meets_slo(ttft, tpot, SLO)
        ttft_ok += slo_math.meets_ttft(ttft, SLO)
        tpot_ok += slo_math.meets_tpot(tpot, SLO) and ttft is not None
    return n, met / max(n, 1), ttft_ok / max(n, 1), tpot_ok / max(n, 1)


def serving_sizes(pool) -> tuple[int, int]:
    """(prefills, decodes) that routing may pick now (a draining instance is not one)."""
    views = [v for v in pool.all() if v.is_available]
    return sum(v.role == "prefill" for v in views), sum(v.role == "decode" for v in views)


async def run_deployment(replan: bool, phase_s: float, workdir: Path, seed: int = 0,
                         interval_s: float = 6.0, window_s: float = 8.0,
                         timeline: list | None = None) -> tuple[list[PhaseResult], list]:
    """Serve both phases on 2 prefills + 2 decodes; with `replan`, the loop resizes them.
    `timeline`, if given, receives (time, prefills, decodes) serving, sampled every 0.1 s
    from the start of the load until the loop stops."""
    import numpy as np

    timing = EngineTiming(PROFILE)
    prefills: list = []

    def make_client(role, instance_id):
        if role == "prefill":
            worker = ModelledPrefill(instance_id, timing)
            prefills.append(worker)
            return worker
        return ModelledDecode(instance_id, prefills, timing)

    initial_p = [make_client("prefill", f"prefill-{i}") for i in range(2)]
    initial_d = [make_client("decode", f"decode-{i}") for i in range(2)]
    config = ServeConfig(mode="disaggregated", slo=SLO, router=RouterConfig(stats_interval_s=0.05),
                         prefill={"num_instances": 2}, decode={"num_instances": 2})
    app, deps = build_router(config, ModelTokenizer(ensure_tiny_model("tiny")), "pdserve-tiny",
                             prefill=initial_p, decode=initial_d)
    task = None
    if replan:
        settings = ReplanSettings(observe_only=False, interval_s=interval_s, max_units=MAX_UNITS,
                                  prefill=PoolBounds(min_instances=1, max_instances=3),
                                  decode=PoolBounds(min_instances=1, max_instances=3),
                                  min_requests=40, headroom=1.1)
        sizer = PoolSizer(fake_problem(workdir), ParallelConfig(1, 1), ParallelConfig(1, 1), settings,
                          num_requests=400)
        actuator = PoolActuator(deps.pool, make_client,
                                lambda client, on: setattr(client, "is_draining", on))
        task = ReplanTask(deps, Replanner(settings, sizer), actuator, tick_s=1.0, window_s=window_s)
    rng = np.random.default_rng(seed)
    results: list[PhaseResult] = []
    async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=120) as client:
        if task is not None:
            task.start()
        pending: set[asyncio.Task] = set()

        async def sample() -> None:
            while True:
                timeline.append((time.time(), *serving_sizes(deps.pool)))
                await asyncio.sleep(0.1)

        sampler = asyncio.create_task(sample()) if timeline is not None else None

        async def one(prompt_len: int, output_len: int) -> None:
            body = {"model": "pdserve-tiny", "prompt": [int(x) for x in rng.integers(10, 900, prompt_len)],
                    "max_tokens": output_len, "ignore_eos": True}
            try:
                await client.post("/v1/completions", json=body)
            except httpx.HTTPError:
                pass  # counted as a miss by the router's trace, if it got that far

        bounds = []
        for name, prompt_len, output_len in PHASES:
            start = time.time()
            t = start
            while t < start + phase_s:
                t += rng.exponential(1.0 / RATE_RPS)
                delay = t - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                job = asyncio.create_task(one(prompt_len, output_len))
                pending.add(job)
                job.add_done_callback(pending.discard)
            bounds.append((name, start, start + phase_s))
            num_p, num_d = serving_sizes(deps.pool)
            results.append(PhaseResult(name, 0, 0.0, 0.0, 0.0, f"{num_p}P+{num_d}D"))
        await asyncio.gather(*pending)
        if task is not None:
            await task.stop()
        if sampler is not None:
            await asyncio.sleep(0.3)  # a drain is seen at the router's next stats poll (0.05 s)
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
            timeline.append((time.time(), *serving_sizes(deps.pool)))
    traces = list(deps.traces.values())
    for i, (name, start, end) in enumerate(bounds):
        n, att, ttft_ok, tpot_ok = _judge(traces, start, end)
        results[i] = PhaseResult(name, n, att, ttft_ok, tpot_ok, results[i].sizes)
    decisions = list(task.replanner.decisions) if task is not None else []
    return results, decisions


def compare(phase_s: float) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        static, _ = asyncio.run(run_deployment(False, phase_s, Path(tmp)))
        loop, decisions = asyncio.run(run_deployment(True, phase_s, Path(tmp)))
    lines = [f"rate {RATE_RPS} req/s, SLO TTFT {SLO.ttft_s} s / TPOT {SLO.tpot_s} s, "
             f"{phase_s:.0f} s per phase, budget {MAX_UNITS} instances",
             f"{'phase':<30} {'static 2P+2D':>22} {'re-planned':>30}"]
    for s, r in zip(static, loop):
        lines.append(f"{s.name:<30} {100 * s.attainment:6.1f}% (n={s.num_requests:4d})      "
                     f"{100 * r.attainment:6.1f}% (n={r.num_requests:4d}, end {r.sizes})")
        lines.append(f"{'':<30}   TTFT met {100 * s.ttft_met:5.1f}%, TPOT met {100 * s.tpot_met:5.1f}%"
                     f"   TTFT met {100 * r.ttft_met:5.1f}%, TPOT met {100 * r.tpot_met:5.1f}%")
    lines.append("decisions of the loop:")
    for d in decisions:
        lines.append(f"  {d.action:<6} P {d.num_prefill[0]}->{d.num_prefill[1]}, "
                     f"D {d.num_decode[0]}->{d.num_decode[1]}: {d.reason}")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phase-s", type=float, default=40.0)
    print(compare(parser.parse_args().phase_s))
