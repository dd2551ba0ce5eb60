"""Online re-planning: a pure core that turns live-traffic snapshots into scaling decisions.

    replanner = Replanner(settings, sizer)
    effects = replanner.observe(snapshot)     # pure given its own state; no I/O

Each `TrafficSnapshot` carries what the running deployment measured over the last window:
arrival rate, a sample of (prompt, output) lengths from the request traces, attainment,
measured mean TTFT/TPOT, and every instance with its state and in-flight requests.

Per tick, every `interval_s`, or sooner when the attainment collapses (it met its target at
the last decision and has fallen `early_margin` below it since, over a window of one
deployment: a workload shift should not wait out the interval):

1. `sizer(snapshot, correction)` returns the pool sizes (prefill, decode) the live traffic
   needs: by default `PoolSizer`, the planner's co-simulation at the observed rate
   (times `headroom`, plus any backlog to clear within an interval) over the observed
   lengths, with the deployment's own parallel configurations; only instance counts
   change online.
2. The sizes are clamped to each pool's [min, max] and to the unit budget (prefill and
   decode compete for it: a change of the prefill:decode ratio is ONE decision with both
   targets, never two autoscalers pulling against each other).
3. A `ScalingDecision` records the targets and the reason. In observe-only mode nothing
   else happens; otherwise it yields effects: `AddInstances` for growth, and for shrinkage
   `DrainInstance` first (the instances with the fewest requests in flight); a drained
   instance is removed (`RemoveInstance`) only once a later snapshot shows it idle.

Correction factors: the sizer also predicts the current deployment's mean TTFT/TPOT at the
observed rate; measured / predicted (clamped) scales the latency profile of the next sizing,
so a deployment slower than its profile (shared CPUs, a noisy neighbour) is sized for what
it really does. The ratio measures the step-time model only where latency is mostly service
time, so it is learnt only from a window that

- saw one deployment: no change of the serving instances since the window began (a window
  that straddles a resize holds the backlog of the old sizes, which the new ones are then
  blamed for);
- is not overloaded on both sides: when the deployment misses its attainment target and
  the model also predicts it to (`Sizing.predicted_overloaded`), both latencies are mostly
  queueing and their ratio grows with how long the backlog has built, not with the
  profile's error. Overloaded on one side only, the model is wrong in the direction the
  ratio says, by less than the ratio: the step limit below makes that a bounded move;

and it moves by at most `max_correction_step` per window, within `max_correction`. The
imperative shell that reads metrics and calls the deployment's scaling interface is
`ReplanLoop` with a `ScalingActuator`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Literal, Protocol, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

Role = Literal["prefill", "decode"]


class PoolBounds(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    min_instances: int = Field(1, ge=1, description="Fewest instances the loop keeps.")
    max_instances: int = Field(8, ge=1, description="Most instances the loop creates.")

    @model_validator(mode="after")
    def _ordered(self) -> "PoolBounds":
        if self.min_instances > self.max_instances:
            raise ValueError("min_instances must be <= max_instances")
        return self


class ReplanSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    observe_only: bool = Field(True, description="Decide and report, never act.")
    interval_s: float = Field(60.0, gt=0, description="Seconds between two sizing decisions.")
    prefill: PoolBounds = Field(default_factory=PoolBounds)
    decode: PoolBounds = Field(default_factory=PoolBounds)
    max_units: int = Field(8, ge=2, description="Units (GPUs or cores) both pools may use.")
    prefill_units_per_instance: int = Field(1, ge=1, description="tp x pp of a prefill instance.")
    decode_units_per_instance: int = Field(1, ge=1, description="tp x pp of a decode instance.")
    min_requests: int = Field(50, ge=1, description="Requests a window needs before it sizes.")
    headroom: float = Field(1.1, ge=1.0, le=3.0, description="Size for this many times the rate.")
    max_correction: float = Field(4.0, ge=1.0, description="Largest measured/predicted factor used.")
    max_correction_step: float = Field(
        1.5, ge=1.0, description="Most the correction factor moves (up or down, as a ratio) per window.")
    early_margin: float | None = Field(
        0.1, gt=0, le=1, description="Size before the interval is up when the attainment, at or "
        "above its target at the last decision, falls this far below it (a workload shift); "
        "None: only every interval.")


@dataclass(frozen=True)
class InstanceStatus:
    instance_id: str
    role: Role
    state: Literal["serving", "draining"]
    num_in_flight: int


@dataclass(frozen=True)
class TrafficSnapshot:
    time_s: float
    window_s: float  # the figures below cover (time_s - window_s, time_s]
    arrival_rate_rps: float
    input_lens: tuple[int, ...]  # sample of the window's requests
    output_lens: tuple[int, ...]
    attainment: float
    attainment_target: float  # the SLO's: the share of requests the deployment must serve in time
    mean_ttft_s: float
    mean_tpot_s: float
    instances: tuple[InstanceStatus, ...]

    def serving(self, role: Role) -> list[InstanceStatus]:
        return [i for i in self.instances if i.role == role and i.state == "serving"]


@dataclass(frozen=True)
class Sizing:
    """What the sizer found: pool sizes for the traffic, and its prediction for the
    deployment as it runs now (for the correction factors)."""

    num_prefill: int
    num_decode: int
    predicted_ttft_s: float
    predicted_tpot_s: float
    # The current deployment misses the SLO at the observed rate in the model's own
    # account: its predicted latencies are queueing, not service (no correction learnt).
    predicted_overloaded: bool
    note: str = ""


# sizer(snapshot, latency correction factor) -> Sizing
Sizer = Callable[[TrafficSnapshot, float], Sizing]


@dataclass(frozen=True)
class AddInstances:
    role: Role
    count: int


@dataclass(frozen=True)
class DrainInstance:
    role: Role
    instance_id: str


@dataclass(frozen=True)
class RemoveInstance:
    role: Role
    instance_id: str


Effect = Union[AddInstances, DrainInstance, RemoveInstance]


@dataclass(frozen=True)
class ScalingDecision:
    time_s: float
    action: Literal["hold", "resize"]
    num_prefill: tuple[int, int]  # (current, target)
    num_decode: tuple[int, int]
    reason: str
    correction: float
    applied: bool  # False in observe-only mode


@dataclass
class Replanner:
    """The pure core. `observe` is deterministic given the snapshots it has seen."""

    settings: ReplanSettings
    sizer: Sizer
    decisions: list[ScalingDecision] = field(default_factory=list)
    _last_sizing_s: float | None = None
    _correction: float = 1.0
    _draining: dict[str, Role] = field(default_factory=dict)
    _serving_ids: frozenset[str] | None = None
    _changed_s: float | None = None  # when the serving instances last changed
    _last_attainment: float | None = None  # measured at the last sizing

    def observe(self, snap: TrafficSnapshot) -> list[Effect]:
        effects: list[Effect] = self._finish_drains(snap)
        serving = frozenset(i.instance_id for i in snap.instances if i.state == "serving")
        if self._serving_ids is not None and serving != self._serving_ids:
            self._changed_s = snap.time_s
        self._serving_ids = serving
        s = self.settings
        due = self._last_sizing_s is None or snap.time_s - self._last_sizing_s >= s.interval_s
        if not due and not self._collapsed(snap):
            return effects
        self._last_sizing_s = snap.time_s
        cur_p, cur_d = len(snap.serving("prefill")), len(snap.serving("decode"))
        if len(snap.input_lens) < s.min_requests:
            self._decide(snap, "hold", (cur_p, cur_p), (cur_d, cur_d),
                         f"{len(snap.input_lens)} requests in the window (< {s.min_requests}): "
                         "too few to size on")
            return effects
        sizing = self.sizer(snap, self._correction)
        self._last_attainment = snap.attainment
        self._correction, learnt = self._update_correction(snap, sizing)
        target_p, target_d, why = self._clamp(sizing.num_prefill, sizing.num_decode)
        reason = (f"{snap.arrival_rate_rps:.2f} req/s observed (sized for x{s.headroom:g}), "
                  f"attainment {100 * snap.attainment:.1f}%, needs {sizing.num_prefill} prefill + "
                  f"{sizing.num_decode} decode{why}; measured/predicted latency x{self._correction:.2f}"
                  f" ({learnt})" + (f"; {sizing.note}" if sizing.note else ""))
        if (target_p, target_d) == (cur_p, cur_d):
            self._decide(snap, "hold", (cur_p, target_p), (cur_d, target_d), reason)
            return effects
        self._decide(snap, "resize", (cur_p, target_p), (cur_d, target_d), reason)
        if s.observe_only:
            return effects
        self._changed_s = snap.time_s  # the deployment changes from now on
        for role, cur, target in (("prefill", cur_p, target_p), ("decode", cur_d, target_d)):
            if target > cur:
                effects.append(AddInstances(role, target - cur))
            elif target < cur:
                idle_first = sorted(snap.serving(role), key=lambda i: (i.num_in_flight, i.instance_id))
                for inst in idle_first[: cur - target]:
                    self._draining[inst.instance_id] = role
                    effects.append(DrainInstance(role, inst.instance_id))
        return effects

    def _collapsed(self, snap: TrafficSnapshot) -> bool:
        """Between intervals: the attainment met its target at the last decision and has
        fallen `early_margin` below it since, over a full window of one deployment (a window
        that spans a resize holds the old sizes' backlog, which the resize already answers)."""
        m = self.settings.early_margin
        return (m is not None and self._last_attainment is not None
                and self._last_attainment >= snap.attainment_target
                and snap.attainment < snap.attainment_target - m
                and len(snap.input_lens) >= self.settings.min_requests
                and (self._changed_s is None or snap.time_s - snap.window_s >= self._changed_s))

    def _finish_drains(self, snap: TrafficSnapshot) -> list[Effect]:
        """Remove draining instances once they are idle (drain before remove)."""
        out: list[Effect] = []
        for inst in snap.instances:
            if inst.instance_id in self._draining and inst.state == "draining" and inst.num_in_flight == 0:
                out.append(RemoveInstance(self._draining.pop(inst.instance_id), inst.instance_id))
        return out

    def _clamp(self, n_p: int, n_d: int) -> tuple[int, int, str]:
        s = self.settings
        p = min(max(n_p, s.prefill.min_instances), s.prefill.max_instances)
        d = min(max(n_d, s.decode.min_instances), s.decode.max_instances)
        notes = []
        if (p, d) != (n_p, n_d):
            notes.append("clamped to the pool bounds")
        cut = False
        # Over the unit budget: shrink the pool with more units than its share of the need.
        while p * s.prefill_units_per_instance + d * s.decode_units_per_instance > s.max_units:
            share_p = n_p * s.prefill_units_per_instance
            share_d = n_d * s.decode_units_per_instance
            if (p > s.prefill.min_instances
                    and (p * s.prefill_units_per_instance / max(share_p, 1)
                         >= d * s.decode_units_per_instance / max(share_d, 1)
                         or d <= s.decode.min_instances)):
                p -= 1
            elif d > s.decode.min_instances:
                d -= 1
            else:
                break
            cut = True
        if cut:
            notes.append(f"cut to the unit budget of {s.max_units}")
        return p, d, (" (" + ", ".join(notes) + ")") if notes else ""

    def _update_correction(self, snap: TrafficSnapshot, sizing: Sizing) -> tuple[float, str]:
        """measured / predicted mean latency of the current deployment, stepped and clamped,
        and why it was or was not learnt from this window (module docstring)."""
        if self._changed_s is not None and snap.time_s - snap.window_s < self._changed_s:
            return self._correction, "kept: the window spans a resize"
        if sizing.predicted_overloaded and snap.attainment < snap.attainment_target:
            return self._correction, "kept: overloaded, measured and predicted latencies are queueing"
        ratios = [m / p for m, p in ((snap.mean_ttft_s, sizing.predicted_ttft_s),
                                     (snap.mean_tpot_s, sizing.predicted_tpot_s))
                  if p > 0 and m > 0 and p != float("inf")]
        if not ratios:
            return self._correction, "kept: nothing measured"
        s = self.settings
        step = min(max(max(ratios), 1.0 / s.max_correction_step), s.max_correction_step)
        ratio = step * self._correction  # predictions were made with the old factor
        return min(max(ratio, 1.0 / s.max_correction), s.max_correction), "learnt"

    def _decide(self, snap, action, p, d, reason) -> None:
        self.decisions.append(ScalingDecision(snap.time_s, action, p, d, reason, self._correction,
                                              applied=action == "resize" and not self.settings.observe_only))


class ScalingActuator(Protocol):
    """The deployment's scaling interface (the Serve deployment's elastic pools implement it).

    `add` starts instances of a pool; `drain` stops routing new requests to one instance and
    lets its in-flight requests finish; `remove` stops an idle drained instance."""

    def add(self, role: Role, count: int) -> None: ...

    def drain(self, role: Role, instance_id: str) -> None: ...

    def remove(self, role: Role, instance_id: str) -> None: ...


@dataclass
class ReplanLoop:
    """The imperative shell: read a snapshot, run the core, apply its effects."""

    replanner: Replanner
    read_snapshot: Callable[[], TrafficSnapshot]
    actuator: ScalingActuator

    def tick(self) -> list[Effect]:
        effects = self.replanner.observe(self.read_snapshot())
        for e in effects:
            if isinstance(e, AddInstances):
                self.actuator.add(e.role, e.count)
            elif isinstance(e, DrainInstance):
                self.actuator.drain(e.role, e.instance_id)
            else:
                self.actuator.remove(e.role, e.instance_id)
        return effects


class PoolSizer:
    """The default sizer: the planner's co-simulation with the deployment's parallel
    configurations fixed, at the observed rate x headroom over the observed lengths.

    Fewest units first: for every (n_p, n_d) within the bounds, cheapest first (ties:
    the most balanced), the first whose co-simulated attainment meets the SLO wins."""

    def __init__(self, problem, prefill_config, decode_config, settings: ReplanSettings,
                 num_requests: int = 600):
        self.problem = problem
        self.prefill_config, self.decode_config = prefill_config, decode_config
        self.settings = settings
        self.num_requests = num_requests

    def __call__(self, snap: TrafficSnapshot, correction: float) -> Sizing:
        from .plans import Plan
        from .problem import scale_profile
        from .search import _Search
        from .workload import SampleLengths

        req = self.problem.request
        workload = req.workload.model_copy(update={"lengths": SampleLengths(
            input_lens=snap.input_lens, output_lens=snap.output_lens)})
        search = req.search.model_copy(update={"num_requests": self.num_requests, "num_seeds": 1})
        request = req.model_copy(update={"workload": workload, "search": search})
        profiles = {tp: scale_profile(p, max(correction, 1e-3)) for tp, p in self.problem.profiles.items()}
        problem = replace(self.problem, request=request, profiles=profiles)
        s = _Search(problem)
        rate = max(snap.arrival_rate_rps, 1e-3)
        cur = Plan("high_node_affinity", self.prefill_config, max(len(snap.serving("prefill")), 1),
                   self.decode_config, max(len(snap.serving("decode")), 1))
        now = s.judge(cur).measure(rate)
        st = self.settings
        options = sorted(
            ((n_p, n_d) for n_p in range(st.prefill.min_instances, st.prefill.max_instances + 1)
             for n_d in range(st.decode.min_instances, st.decode.max_instances + 1)),
            key=lambda c: (c[0] * self.prefill_config.num_gpus + c[1] * self.decode_config.num_gpus,
                           abs(c[0] - c[1]), c))
        within = [(n_p, n_d) for n_p, n_d in options
                  if n_p * st.prefill_units_per_instance + n_d * st.decode_units_per_instance <= st.max_units
                  and s.feasible_layout(replace(cur, num_prefill=n_p, num_decode=n_d))]
        slo = request.slo
        overloaded = now.attainment < slo.attainment
        # A backlog (after a shift the old sizes could not serve) is work on top of the
        # arrivals: requests in flight beyond what the deployment holds at this rate when
        # every request meets the SLO (Little's law) must be cleared within one interval,
        # so the sizing rate carries them as extra arrivals of the same lengths.
        mean_output = sum(snap.output_lens) / len(snap.output_lens) if snap.output_lens else 1.0
        in_slo = rate * (slo.ttft_s + slo.tpot_s * max(mean_output - 1.0, 0.0))
        backlog = max(0.0, sum(i.num_in_flight for i in snap.instances) - in_slo)
        sizing_rate = rate * st.headroom + backlog / st.interval_s
        note = f"backlog of {backlog:.0f} requests" if backlog >= 1 else ""
        for n_p, n_d in within:
            if s.passes(replace(cur, num_prefill=n_p, num_decode=n_d), sizing_rate):
                return Sizing(n_p, n_d, now.mean_ttft_s, now.mean_tpot_s, overloaded, note=note)
        if not within:
            n_p, n_d = st.prefill.min_instances, st.decode.min_instances
            return Sizing(n_p, n_d, now.mean_ttft_s, now.mean_tpot_s, overloaded,
                          note="no size within the bounds fits the unit budget")

        # Nothing within the budget meets the SLO: the size that comes closest, not the
        # largest size cut down to the budget, which need not be the best split of it.
        # Closest: highest co-simulated attainment at the observed rate; among equal ones
        # (typically all 0% when overloaded) the one whose worse phase is least over its
        # target (mean TTFT / ttft_s vs mean TPOT / tpot_s), which gives the units to the
        # starved phase; then more units (short of the SLO, a unit left idle helps nobody).
        def closeness(c: tuple[int, int]) -> tuple[float, float, int]:
            m = s.judge(replace(cur, num_prefill=c[0], num_decode=c[1])).measure(rate)
            over = max(m.mean_ttft_s / slo.ttft_s, m.mean_tpot_s / slo.tpot_s)
            return (m.attainment, -over, c[0] * st.prefill_units_per_instance
                    + c[1] * st.decode_units_per_instance)

        best = max(within, key=closeness)
        return Sizing(best[0], best[1], now.mean_ttft_s, now.mean_tpot_s, overloaded,
                      note="; ".join(filter(None, (
                          note, "no size within the budget meets the SLO: the one closest to it"))))
