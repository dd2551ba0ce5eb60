"""The online re-planning loop on a running deployment: the imperative shell around the pure
core in `cluster.planner.online` (STYLE.md, principle 7).

    snapshot_from_router(deps, now)   live figures of the router's last window -> TrafficSnapshot
    Replanner.observe(snapshot)       (pure) one sizing decision per interval -> effects
    ScalingActuator                   applies the effects to the deployment:
      ServeActuator                   a Ray Serve application's pools, through Serve's
                                      external-scaler API (what `pdserve scale` calls)
      PoolActuator                    an in-process router's pool (fake or local workers)
    ReplanTask                        the asyncio loop in the router's process: tick, act,
                                      and record every decision in the router's metrics
                                      (`pdserve_replan_*`) and dashboard
    replan_task(config, deps, act)    the loop of a serve config's `replan` section (None when
                                      it is off); the Serve application's router starts it

The loop runs where the live figures are: in the router process, which holds the request
traces (lengths, TTFT, TPOT of every request that ended in the window) and the pool (every
instance, its state and its requests in flight). It never blocks the event loop on a
sizing: the co-simulation runs in a worker thread.

Draining: a shrinking decision drains first. `PoolActuator` marks the instance draining
(routing sends it nothing new) and removes it once a later snapshot shows it idle, as the
core asks. Serve chooses which replica of a pool leaves and drains it itself before it
stops it (the pools' graceful shutdown), so `ServeActuator.drain` lowers the pool's
replica count and `remove` has nothing left to do.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from cluster.planner.online import (AddInstances, DrainInstance, Effect, InstanceStatus, Replanner,
                                    ReplanSettings, Role, TrafficSnapshot)
from router.metrics import request_latencies

if TYPE_CHECKING:
    from cluster.config import ServeConfig
    from router.deps import RouterDeps
    from router.pool import WorkerClient, WorkerPool

log = logging.getLogger(__name__)

DEFAULT_WINDOW_S = 30.0
MAX_LENGTH_SAMPLE = 2000  # newest requests of the window the sizer co-simulates


def _output_estimate(median_out: int | None, max_tokens: int | None) -> int | None:
    """A request in flight: the window's median output, at most its own limit."""
    known = [x for x in (median_out, max_tokens) if x is not None]
    return min(known) if known else None


def snapshot_from_router(deps: "RouterDeps", now: float | None = None,
                         window_s: float = DEFAULT_WINDOW_S,
                         min_sample: int = ReplanSettings.model_fields["min_requests"].default,
                         ) -> TrafficSnapshot:
    """What the router saw over the last `window_s` seconds.

    Arrival rate: requests that arrived in the window / its length (the first window is as
    long as the oldest trace). Attainment and mean TTFT/TPOT: requests that ended in the
    window (`cluster.slo` definitions). Length sample, the traffic as it is now: the
    (prompt, output) token counts of the requests that arrived in the newest half of the
    window, those still in flight included (after a shift, what ends first is the old
    traffic, and in an overload the new requests are the ones still queued), when they are
    `min_sample` or more; a request in flight counts its prompt and, for its output, the
    median output of the requests that ended in the window, at most its `max_tokens`.
    Fewer than that: the requests that ended in the window and also arrived in it, or all
    that ended in the window when those are under half of them (requests longer than the
    window).
    Instances: every pool member, `draining` once its stats say so, else `serving`, with
    the router's own count of its requests in flight.
    """
    from cluster import slo as slo_math

    now = time.time() if now is None else now
    start = now - window_s
    arrived = 0
    oldest = now
    ins: list[int] = []
    outs: list[int] = []
    new_ins: list[int] = []  # of those, the ones that arrived in the window
    new_outs: list[int] = []
    # Newest half window: (prompt, output; None in flight, max_tokens)
    recent: list[tuple[int, int | None, int | None]] = []
    recent_start = now - window_s / 2
    met = 0
    ttfts: list[float] = []
    tpots: list[float] = []
    for trace in reversed(deps.traces.values()):  # newest first
        if trace.arrival_s >= start:
            arrived += 1
            oldest = min(oldest, trace.arrival_s)
        finish = trace.events.get("finish")
        if trace.arrival_s >= recent_start and len(recent) < MAX_LENGTH_SAMPLE:
            if finish is None and not trace.state.is_final:
                recent.append((max(1, trace.num_prompt_tokens), None, trace.max_tokens))
            elif trace.num_output_tokens >= 1:
                recent.append((max(1, trace.num_prompt_tokens), trace.num_output_tokens, None))
        if finish is None or finish < start or len(ins) >= MAX_LENGTH_SAMPLE:
            if trace.arrival_s < start - 10 * window_s:
                break  # ordered by arrival: nothing older can have ended in the window
            continue
        ttft, tpot, _ = request_latencies(trace)
        if ttft is None or trace.num_output_tokens < 1:
            continue  # failed before its first token: no lengths to learn from
        ins.append(max(1, trace.num_prompt_tokens))
        outs.append(trace.num_output_tokens)
        if trace.arrival_s >= start:
            new_ins.append(ins[-1])
            new_outs.append(outs[-1])
        ttfts.append(ttft)
        tpots.append(tpot or 0.0)
        met += slo_math.meets_slo(ttft, tpot or 0.0, deps.slo)
    span = max(1.0, min(window_s, now - oldest)) if arrived else window_s
    # A starting instance (not polled yet) counts as serving: it will be, and sizing must
    # not ask for it twice.
    instances = tuple(
        InstanceStatus(v.instance_id, v.role,
                       "draining" if v.stats is not None and v.stats.is_draining else "serving",
                       v.inflight_requests)
        for v in deps.pool.all() if v.role in ("prefill", "decode"))
    sample_ins, sample_outs = (new_ins, new_outs) if 2 * len(new_ins) >= len(ins) else (ins, outs)
    if len(recent) >= max(min_sample, 1):
        median_out = sorted(outs)[len(outs) // 2] if outs else None
        estimates = [(prompt, out if out is not None else _output_estimate(median_out, limit))
                     for prompt, out, limit in recent]
        sample_ins = [prompt for prompt, out in estimates if out is not None]
        sample_outs = [out for _, out in estimates if out is not None]
    return TrafficSnapshot(
        time_s=now, window_s=window_s, arrival_rate_rps=arrived / span, input_lens=tuple(sample_ins),
        output_lens=tuple(sample_outs), attainment=met / len(ins) if ins else 1.0,
        attainment_target=deps.slo.attainment,
        mean_ttft_s=sum(ttfts) / len(ttfts) if ttfts else 0.0,
        mean_tpot_s=sum(tpots) / len(tpots) if tpots else 0.0,
        instances=instances)


class ServeActuator:
    """A Ray Serve application's pools, resized through Serve's external-scaler API (the
    application is deployed with `external_scaler_enabled=True`, `pdserve.serving.deploy`).

    `set_replicas(role, n)` is the one call into Serve; the default asks the Serve
    controller for `n` replicas of deployment `role` (what `pdserve scale` does, without
    waiting for the replicas: the loop sees them join in its next snapshots). Without
    `initial` counts, a pool's count is read from Serve's status the first time it changes
    (the router replica is built without pool sizes, so that a resize does not restart it).
    Its calls wait on Serve's controller (`blocking`): the loop makes them off the event loop."""

    blocking = True

    def __init__(self, app_name: str, initial: dict[Role, int] | None = None,
                 set_replicas: Callable[[Role, int], None] | None = None,
                 get_replicas: Callable[[Role], int] | None = None):
        self.app_name = app_name
        self.replicas: dict[Role, int] = dict(initial or {})
        self._set = set_replicas or self._serve_set_replicas
        self._get = get_replicas or self._serve_replicas

    def _serve_replicas(self, role: Role) -> int:
        from ray import serve

        states = serve.status().applications[self.app_name].deployments[role].replica_states
        return sum(n for state, n in states.items() if str(state).split(".")[-1] != "STOPPING")

    def _count(self, role: Role) -> int:
        if role not in self.replicas:
            self.replicas[role] = self._get(role)
        return self.replicas[role]

    def _serve_set_replicas(self, role: Role, num_instances: int) -> None:
        import ray
        from ray.serve._private.common import DeploymentID
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        ray.get(controller.update_deployment_replicas.remote(
            DeploymentID(name=role, app_name=self.app_name), num_instances))

    def add(self, role: Role, count: int) -> None:
        self.replicas[role] = self._count(role) + count
        self._set(role, self.replicas[role])

    def drain(self, role: Role, instance_id: str) -> None:
        # Serve picks the replica that leaves and drains it (graceful shutdown) before it
        # stops it; the router's pool forgets it once it is gone.
        self.replicas[role] = max(0, self._count(role) - 1)
        self._set(role, self.replicas[role])

    def remove(self, role: Role, instance_id: str) -> None:
        pass  # Serve removed it after its drain


class PoolActuator:
    """An in-process router's pool: `make_client(role, instance_id)` starts an instance,
    `set_draining(client, True)` makes its stats say it is draining (routing then sends it
    nothing new), and a drained instance leaves the pool once idle."""

    def __init__(self, pool: "WorkerPool", make_client: Callable[[Role, str], "WorkerClient"],
                 set_draining: Callable[["WorkerClient", bool], None]):
        self.pool = pool
        self.make_client = make_client
        self.set_draining = set_draining
        self._next_index: dict[str, int] = {}

    def _new_id(self, role: Role) -> str:
        taken = {v.instance_id for v in self.pool.all()}
        i = self._next_index.get(role, 0)
        while f"{role}-{i}" in taken:
            i += 1
        self._next_index[role] = i + 1
        return f"{role}-{i}"

    def add(self, role: Role, count: int) -> None:
        for _ in range(count):
            self.pool.add(self.make_client(role, self._new_id(role)), role)

    def drain(self, role: Role, instance_id: str) -> None:
        view = next((v for v in self.pool.all() if v.instance_id == instance_id), None)
        if view is not None:
            self.set_draining(view.client, True)  # routing sees it at the next stats poll

    def remove(self, role: Role, instance_id: str) -> None:
        self.pool.remove(instance_id)


def apply_effects(actuator, effects: list[Effect]) -> None:
    for e in effects:
        if isinstance(e, AddInstances):
            actuator.add(e.role, e.count)
        elif isinstance(e, DrainInstance):
            actuator.drain(e.role, e.instance_id)
        else:
            actuator.remove(e.role, e.instance_id)


@dataclass
class ReplanTask:
    """The loop in the router's process: every `tick_s`, a snapshot of the router's last
    window goes to the core; its effects go to the actuator; each new decision is recorded
    in the router's metrics (`Metrics.record_replan`: `/metrics` and the dashboard)."""

    deps: "RouterDeps"
    replanner: Replanner
    actuator: object  # a cluster.planner.online.ScalingActuator
    tick_s: float = 1.0
    window_s: float = DEFAULT_WINDOW_S
    clock: Callable[[], float] = time.time
    _task: asyncio.Task | None = field(default=None, init=False)
    _ticking: bool = field(default=False, init=False)
    _stopping: bool = field(default=False, init=False)

    async def tick(self) -> list[Effect]:
        snap = snapshot_from_router(self.deps, self.clock(), self.window_s,
                                    self.replanner.settings.min_requests)
        seen = len(self.replanner.decisions)
        # The sizing co-simulates: off the event loop, which keeps serving meanwhile.
        effects = await asyncio.to_thread(self.replanner.observe, snap)
        if getattr(self.actuator, "blocking", False):
            await asyncio.to_thread(apply_effects, self.actuator, effects)
        else:
            apply_effects(self.actuator, effects)
        for decision in self.replanner.decisions[seen:]:
            self.deps.metrics.record_replan(decision)
            log.info("replan %s: prefill %d->%d, decode %d->%d: %s", decision.action,
                     *decision.num_prefill, *decision.num_decode, decision.reason)
        return effects

    async def run(self) -> None:
        while not self._stopping:
            self._ticking = True
            try:
                await self.tick()
            except Exception:  # a failed tick must not end the loop (next tick retries)
                log.exception("replan tick failed")
            finally:
                self._ticking = False
            if self._stopping:
                break
            await asyncio.sleep(self.tick_s)

    def start(self) -> None:
        self._stopping = False
        self._task = asyncio.get_running_loop().create_task(self.run(), name="pdserve-replan")

    async def stop(self) -> None:
        """Stop the loop. A tick in flight finishes first: its decision is already recorded
        once its sizing returns, so cancelling it then would leave a resize decided and
        never applied."""
        if self._task is not None:
            self._stopping = True
            if not self._ticking:
                self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None


def replan_task(config: "ServeConfig", deps: "RouterDeps", actuator: object) -> ReplanTask | None:
    """The loop that `config.replan` asks for, over the router `deps`, acting through
    `actuator`; None when `replan.enabled` is off. The sizer plans with the plan config's
    profile, cluster and engine settings, the deployment's SLO and its pools' parallel
    configurations (only instance counts change online). Raises ValueError (one line) for a
    plan config that cannot be read."""
    from pathlib import Path

    import yaml
    from pydantic import ValidationError

    from cluster.planner.inputs import PlanRequest
    from cluster.planner.online import PoolBounds, PoolSizer
    from cluster.planner.plans import ParallelConfig
    from cluster.planner.problem import build_problem

    rc = config.replan
    if not rc.enabled:
        return None
    path = Path(rc.plan_config)
    try:
        data = yaml.safe_load(path.read_text()) or {}
        request = PlanRequest.model_validate({**data, "slo": config.slo.model_dump()})
    except (OSError, yaml.YAMLError, ValidationError) as e:
        raise ValueError(f"replan.plan_config {path}: {' '.join(str(e).split())[:300]}") from None
    problem = build_problem(request)
    configs = {role: ParallelConfig(config.pools()[role].tensor_parallel_size,
                                    config.pools()[role].pipeline_parallel_size)
               for role in ("prefill", "decode")}
    settings = ReplanSettings(
        observe_only=rc.observe_only, interval_s=rc.interval_s,
        prefill=PoolBounds(**rc.prefill.model_dump()), decode=PoolBounds(**rc.decode.model_dump()),
        max_units=rc.max_units or request.cluster.gpu_budget,
        prefill_units_per_instance=configs["prefill"].num_gpus,
        decode_units_per_instance=configs["decode"].num_gpus,
        min_requests=rc.min_requests, headroom=rc.headroom)
    sizer = PoolSizer(problem, configs["prefill"], configs["decode"], settings)
    return ReplanTask(deps, Replanner(settings, sizer), actuator, tick_s=rc.tick_s, window_s=rc.window_s)
