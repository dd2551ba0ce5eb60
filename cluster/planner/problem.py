"""A planning problem with every input loaded: the imperative shell's hand-off to the pure search.

`build_problem(request)` reads the profile, the model shape and the optional capacity table
(the only file I/O of planning; the length CSV is read when traces are made). Everything
after that is a pure function of the `PlanningProblem`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .colocated import ColocatedPool, ColocatedScheduler
from .decode_pool import DecodePool
from .front_end import EffectAt, FrontEndLoad
from .inputs import PlanRequest
from .latency_model import EngineTiming, LatencyProfile, ProfileError, load_profiles
from .model_shape import ModelShape, kv_capacity_tokens, load_capacity_table, load_model_shape
from .plans import ParallelConfig
from .prefill_pool import PrefillPool
from .workload import length_summary


@dataclass(frozen=True)
class PlanningProblem:
    request: PlanRequest
    shape: ModelShape
    profile_model: str  # key of the model in the profile file
    profiles: dict[int, LatencyProfile]  # by tensor-parallel degree
    kv_bytes_per_token: int
    capacity_table: dict[tuple[int, int], int] | None = None
    lengths: dict[str, float] = field(default_factory=dict)  # length_summary of the workload
    colocated_profiles: dict[int, LatencyProfile] | None = None  # None: same as `profiles`

    def timing(self, config: ParallelConfig) -> EngineTiming:
        e = self.request.engine
        return EngineTiming(self.profiles[config.tp], config.pp, e.framework_overhead,
                            e.pipeline_stage_fixed_cost)

    def front_end_effect(self, engine_units: int, prefill_units: int = 0) -> EffectAt | None:
        """The front end's effect at each rate on a deployment of `engine_units` engine
        units, `prefill_units` of them prefill instances' (`front_end.py`), or None where it
        is not modelled or, in the with_prefill layout, where no prefill instance is judged
        (the decode phase alone). "auto" reads as shared: `search` splits it into one
        problem per layout first."""
        fe = self.request.front_end
        if not fe.modelled:
            return None
        load = FrontEndLoad(fe.cpu_ms_per_request / 1000.0, fe.cpu_ms_per_output_token / 1000.0,
                            self.lengths["output_mean"])
        if fe.layout == "reserved":
            return load.reserved(fe.reserved_cores)
        if fe.layout == "with_prefill":
            # Every engine's scheduler runs on the front end's cores, here the prefill ones.
            return (load.with_prefill(prefill_units, 1.0 + fe.scheduler_poll_share * engine_units / prefill_units)
                    if prefill_units else None)
        return load.shared(engine_units)

    def kv_capacity(self, config: ParallelConfig) -> int:
        """KV tokens of one instance: capacity table > measured (profile, pp 1) > computed."""
        if self.capacity_table is not None:
            return self.capacity_table.get((config.tp, config.pp), 0)
        measured = self.profiles[config.tp].kv_capacity_tokens if config.tp in self.profiles else None
        if measured is not None and config.pp == 1:
            return measured
        c = self.request.cluster
        if c.device == "cpu":
            # vLLM's CPU backend gives the KV cache exactly its space; weights live outside it.
            block_bytes = self.kv_bytes_per_token * self.request.engine.block_size
            return int(c.gpu_memory_bytes // block_bytes) * self.request.engine.block_size
        # The device staging arena comes out of the same share (kvtransfer/memory.py).
        utilization = c.gpu_memory_utilization - c.device_staging_gib * 2**30 / c.gpu_memory_bytes
        return kv_capacity_tokens(self.shape, config.tp, config.pp, c.gpu_memory_bytes,
                                  utilization, self.request.engine.block_size)

    def exclusion(self, config: ParallelConfig) -> str | None:
        """Why an instance of this shape cannot serve, or None."""
        if config.tp not in self.profiles:
            return f"no latency profile for TP{config.tp}"
        if self.request.cluster.device == "cpu" and config.num_gpus > 1:
            return "a CPU instance runs on one core (TP1 x PP1)"
        if self.shape.num_attention_heads % config.tp:
            return f"{self.shape.num_attention_heads} attention heads do not split over TP{config.tp}"
        if config.tp > self.request.cluster.gpus_per_node:
            return "tensor parallelism would span nodes"
        capacity = self.kv_capacity(config)
        if capacity <= 0:
            return "weights do not fit in GPU memory"
        if capacity < self.lengths["input_max"]:
            return f"KV cache ({capacity} tokens) is smaller than the longest prompt"
        return None

    def prefill_pool(self, config: ParallelConfig, num_instances: int, scale: float = 1.0) -> PrefillPool:
        """`scale`: every prefill iteration that many times its profiled time (a front end
        sharing the prefill instances' cores, `FrontEndEffect.prefill_scale`)."""
        timing = self.timing(config)
        if scale != 1.0:
            timing = replace(timing, profile=scale_profile(timing.profile, scale))
        return PrefillPool(num_instances, timing, self.request.engine.prefill_token_budget)

    def decode_pool(self, config: ParallelConfig, num_instances: int) -> DecodePool:
        e = self.request.engine
        return DecodePool(num_instances, self.timing(config), self.kv_capacity(config),
                          e.max_num_seqs, e.decode_memory, e.block_size, e.prefill_token_budget,
                          e.admission_watermark,
                          self.kv_bytes_per_token / (e.kv_load_gb_s * 1e9) if e.kv_load_gb_s else 0.0)

    def colocated_tps(self) -> list[int]:
        return sorted(self.colocated_profiles if self.colocated_profiles is not None else self.profiles)

    def colocated_pool(self, tp: int, num_instances: int, scheduler: ColocatedScheduler,
                       pp: int = 1) -> ColocatedPool:
        """Colocated instances of TP `tp` x PP `pp` (pp lanes per instance)."""
        config = ParallelConfig(tp, pp)
        e = self.request.engine
        profiles = self.colocated_profiles if self.colocated_profiles is not None else self.profiles
        # A lane's iteration crosses every stage: unpipelined time, with every stage's fixed
        # cost when stages pay it each (EngineTiming.stage_fixed_cost).
        stages = pp if e.pipeline_stage_fixed_cost == "per_stage" else 1
        lane = map_iteration_coefficients(profiles[tp], lambda c: (stages * c[0],) + c[1:])
        timing = EngineTiming(lane, 1, e.framework_overhead)
        return ColocatedPool(num_instances, timing, self.kv_capacity(config), scheduler,
                             e.prefill_token_budget, e.max_num_seqs, pp, e.decode_memory,
                             e.block_size, e.admission_watermark)


def map_iteration_coefficients(profile: LatencyProfile, f) -> LatencyProfile:
    """The profile with `f` applied to the coefficient tuple of each iteration kind
    (prefill and both decode regimes)."""
    return profile.model_copy(update={
        name: tuple(f(tuple(getattr(profile, name))))
        for name in ("prefill", "decoding_smallbs", "decoding_largebs")})


def scale_profile(profile: LatencyProfile, scale: float) -> LatencyProfile:
    """Every iteration `scale` times slower (`engine.iteration_time_scale`)."""
    if scale == 1.0:
        return profile
    return map_iteration_coefficients(profile, lambda c: tuple(scale * x for x in c))


def add_step_cost(profile: LatencyProfile, ms: float) -> LatencyProfile:
    """Every iteration `ms` milliseconds longer (`front_end.shared_core_step_ms`)."""
    if ms == 0.0:
        return profile
    return map_iteration_coefficients(profile, lambda c: (c[0] + ms,) + c[1:])


def for_front_end_layout(problem: PlanningProblem, layout: str) -> PlanningProblem:
    """The problem with one front-end layout (`PlanRequest.with_front_end_layout`); in the
    shared layout every iteration takes `1 + front_end.scheduler_poll_share` times its
    profiled time (one scheduler per engine core) and `front_end.shared_core_step_ms` more
    (with_prefill slows its prefill instances alone, through the judge:
    `FrontEndLoad.with_prefill`)."""
    request = problem.request.with_front_end_layout(layout)
    fe = request.front_end
    shared = layout == "shared"
    step_ms = fe.shared_core_step_ms if shared else 0.0
    scale = 1.0 + fe.scheduler_poll_share if shared else 1.0

    def slower(profiles):
        return None if profiles is None else {
            tp: add_step_cost(scale_profile(p, scale), step_ms) for tp, p in profiles.items()}

    return replace(problem, request=request, profiles=slower(problem.profiles),
                   colocated_profiles=slower(problem.colocated_profiles))


def build_problem(request: PlanRequest) -> PlanningProblem:
    """Load what the request names. Raises ValueError subclasses with readable messages."""
    shape = load_model_shape(request.model)
    table = load_profiles(request.profile)
    key = request.profile_model
    if key is None:
        if request.model in table.models():
            key = request.model
        elif len(table.models()) == 1:
            key = table.models()[0]
        else:
            raise ProfileError(
                f"profile {request.profile} has no entry for {request.model} (it has "
                f"{table.models()}); measure this model with `pdserve profile` (another model's "
                f"profile would plan with the wrong latencies), or set profile_model only if one "
                f"of these entries is this same model under another name"
            )
    scale = request.engine.iteration_time_scale
    profiles = {tp: scale_profile(table.get(key, tp), scale) for tp in table.tensor_parallel_sizes(key)}
    measured_kv = {p.kv_bytes_per_token for p in profiles.values() if p.kv_bytes_per_token}
    kv_bytes = measured_kv.pop() if len(measured_kv) == 1 else shape.kv_bytes_per_token
    capacity = (load_capacity_table(request.kv_capacity_csv, key)
                if request.kv_capacity_csv is not None else None)
    colocated = None
    if request.colocated_profile is not None:
        other = load_profiles(request.colocated_profile)
        colocated = {tp: scale_profile(other.get(key, tp), scale) for tp in other.tensor_parallel_sizes(key)}
    return PlanningProblem(
        request=request, shape=shape, profile_model=key, profiles=profiles,
        kv_bytes_per_token=kv_bytes, capacity_table=capacity,
        lengths=length_summary(request.workload.lengths, request.search.seed),
        colocated_profiles=colocated,
    )
