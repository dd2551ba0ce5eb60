"""The planner's validated input tree (`PlanRequest`), read from YAML and/or CLI flags.

    model, profile, profile_model, kv_capacity_csv
    slo:      ttft_s, tpot_s, attainment            (cluster.config.SLOConfig)
    workload: lengths {kind: fixed|uniform|lognormal|csv, ...}, arrival {process, cv}, rate
    cluster:  num_nodes, gpus_per_node, gpu_memory_gib, bandwidths, max_gpus
    engine:   prefill_token_budget, max_num_seqs, first_token_source, ...
    front_end: cpu_ms_per_request, cpu_ms_per_output_token, layout, reserved_cores (CPU hosts)
    search:   placements, max_pipeline_parallel, num_requests, num_seeds, seed, ...
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster.config import SLOConfig

from cluster.workload_schema import WorkloadFile

from .plans import Placement
from .workload import ArrivalSpec, LengthSpec  # noqa: F401 (part of this module's vocabulary)

GIB = 1024**3
GB = 1e9


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClusterSpec(_Strict):
    device: Literal["gpu", "cpu"] = Field(
        "gpu",
        description="gpu: a unit is one GPU. cpu: a unit is one CPU core running one TP1 x PP1 "
        "instance on vLLM's CPU backend, pinned to its own core; `gpu_memory_gib` is then that "
        "instance's KV-cache space (the pool's kv_cache_gib, whole GiB) and the intra-node "
        "bandwidth is shared memory's.",
    )
    num_nodes: int = Field(1, ge=1, description="Nodes in the cluster.")
    gpus_per_node: int = Field(8, ge=1, description="GPUs per node.")
    gpu_memory_gib: float = Field(80.0, gt=0, description="Memory of one GPU in GiB.")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="Share of GPU memory the engine may use (weights + KV)."
    )
    device_staging_gib: float = Field(
        0.0, ge=0, description="GPU memory each instance gives the KV transfer's device staging "
        "arena (kv_transfer.device_staging_gib where the device path is on), out of the "
        "gpu_memory_utilization share: the computed KV capacity is net of it."
    )
    intra_node_bandwidth_gb_s: float = Field(
        300.0, gt=0, description="GPU-to-GPU bandwidth inside a node per GPU pair, GB/s (NVLink)."
    )
    inter_node_bandwidth_gb_s: float = Field(
        25.0, gt=0, description="Network bandwidth of one node's NIC, GB/s, shared by its transfers."
    )
    transfer_latency_ms: float = Field(0.0, ge=0, description="Fixed cost of one KV transfer, ms.")
    max_gpus: int | None = Field(
        None, ge=1, description="GPU budget; defaults to every GPU of the cluster."
    )

    @model_validator(mode="after")
    def _budget_fits(self) -> "ClusterSpec":
        if self.max_gpus is not None and self.max_gpus > self.total_gpus:
            raise ValueError(f"max_gpus {self.max_gpus} exceeds the cluster's {self.total_gpus} GPUs")
        if self.device == "cpu" and (self.gpu_memory_gib < 1 or not self.gpu_memory_gib.is_integer()):
            raise ValueError(f"with device cpu, gpu_memory_gib is the KV-cache space per core in "
                             f"whole GiB (>= 1), got {self.gpu_memory_gib:g}")
        return self

    @property
    def unit_name(self) -> str:
        """What one unit of the budget is, for reports: "GPU" or "core"."""
        return "GPU" if self.device == "gpu" else "core"

    @property
    def total_gpus(self) -> int:
        return self.num_nodes * self.gpus_per_node

    @property
    def gpu_budget(self) -> int:
        return self.max_gpus if self.max_gpus is not None else self.total_gpus

    @property
    def gpu_memory_bytes(self) -> float:
        return self.gpu_memory_gib * GIB


# The workload file's schema (`cluster.workload_schema`), which `pdserve bench` reads too.
WorkloadSpec = WorkloadFile


class EngineModelSpec(_Strict):
    prefill_token_budget: int = Field(
        4096, ge=1, description="Tokens per iteration (vLLM's max_num_batched_tokens): bounds a "
        "prefill batch's prompt tokens and a decode step's sequences."
    )
    max_num_seqs: int = Field(128, ge=1, description="Most requests in one decode batch (vLLM's "
                              "max_num_seqs).")
    block_size: int = Field(16, ge=1, description="KV-cache block size in tokens.")
    first_token_source: Literal["prefill", "decode"] = Field(
        "prefill",
        description="prefill: the prefill instance streams the first token (KV transfer delays "
        "the second token and counts in TPOT); decode: the first token is released when its KV "
        "lands on a decode instance (transfer and decode admission count in TTFT).",
    )
    framework_overhead: bool = Field(
        True, description="Add DistServe's per-iteration framework overhead (2 ms + 0.1 us per "
        "context token on the first stage). The published A100 profiles exclude it; replaying "
        "DistServe's real traces needs it (docs/planner.md, 'Fidelity')."
    )
    decode_memory: Literal["paged", "reserve"] = Field(
        "paged", description="paged: decode (and colocated) instances allocate KV as tokens "
        "are generated and preempt the newest request (recompute) when the cache runs out, as "
        "vLLM and DistServe do; reserve: admission reserves prompt + output up front (never "
        "preempts, pessimistic)."
    )
    admission_watermark: float = Field(
        0.01, ge=0, lt=0.5, description="Share of the decode KV cache kept free when admitting "
        "a request (vLLM's watermark), so new admissions do not preempt at once."
    )
    kv_load_gb_s: float | None = Field(
        None, gt=0, description="Effective GB/s at which a decode instance loads a request's KV "
        "inside its step loop, stalling that step for every running request (DistServe's decode "
        "engine migrates KV between steps: 50 GB/s fits its A100 traces). Unset: loading "
        "overlaps decode steps; only the request itself waits for its transfer."
    )
    pipeline_stage_fixed_cost: Literal["per_stage", "split"] = Field(
        "split", description="split: the whole iteration divides by the stage count "
        "(DistServe's simulator; real DistServe decode PP2 TPOTs match it, docs/planner.md "
        "'Fidelity'); per_stage: every pipeline stage pays the profile's whole fixed "
        "per-iteration cost (kernel launches, scheduling)."
    )
    iteration_time_scale: float = Field(
        1.0, ge=1.0, le=10.0,
        description="Multiply every profiled iteration time by this: a measured factor for "
        "whatever makes served iterations slower than profiled ones. On a CPU host, model the "
        "front end's share of the cores with `front_end` instead (docs/planner.md, 'The front "
        "end on a CPU host'); the two cannot be combined.",
    )


class FrontEndSpec(_Strict):
    """The serving path outside the engines on a CPU host (`front_end.py`)."""

    cpu_ms_per_request: float = Field(
        0.0, ge=0, description="CPU milliseconds the front end (router, worker replicas, Ray, "
        "the engines' scheduler processes) spends per request, measured with `python -m "
        "bench.profile_run serve`. 0 (the default): not modelled, as on a GPU host, where "
        "host cores the engines do not use carry it.",
    )
    cpu_ms_per_output_token: float = Field(
        0.0, ge=0, description="CPU milliseconds the front end spends per output token.")
    layout: Literal["shared", "reserved", "with_prefill", "auto"] = Field(
        "auto", description="shared: the front end runs on the engines' cores and slows them; "
        "reserved: it has `reserved_cores` cores of its own, out of the budget "
        "(`ray.front_end_cores`); with_prefill: it runs on the prefill instances' cores and "
        "slows only them, the decode instances keep their cores (disaggregated plans only); "
        "auto: plan every layout and keep the one with the most goodput (max goodput) or the "
        "fewest cores (a target rate).",
    )
    reserved_cores: int = Field(1, ge=1, description="Cores a reserved front end takes.")
    shared_core_step_ms: float = Field(
        0.0, ge=0, description="Extra milliseconds every engine iteration takes in the shared "
        "layout, where an engine's scheduler process has no core of its own: vLLM's CPU engine "
        "hands each step between its scheduler and model-runner processes, which busy-poll, so "
        "where they share a core each step waits for the other's time slice. Measured on the "
        "tiny model on 2 cores: ~2.4 ms (docs/planner.md, 'The front end on a CPU host').",
    )

    scheduler_poll_share: float = Field(
        0.0, ge=0.0, le=4.0, description="What one engine's scheduler process costs an engine "
        "that computes on the same core: vLLM's CPU engine runs its scheduler beside the front "
        "end (on the front end's cores and its own) and it busy-polls while its engine "
        "computes. An engine whose core hosts `k` schedulers takes `1 + share x k` times its "
        "profiled time: k = 1 in the shared layout (a scheduler per engine core), (P + D) / P "
        "on the prefill cores of with_prefill, 0 for engines on cores of their own. Measured "
        "on an idle deployment as served over profiled prefill time (docs/planner.md, 'The "
        "front end on a CPU host').",
    )

    @property
    def modelled(self) -> bool:
        return self.cpu_ms_per_request > 0 or self.cpu_ms_per_output_token > 0

    @model_validator(mode="after")
    def _no_setting_ignored(self) -> "FrontEndSpec":
        if not self.modelled:
            unused = [name for name, on in (("layout", self.layout != "auto"),
                                            ("reserved_cores", self.reserved_cores != 1),
                                            ("shared_core_step_ms", self.shared_core_step_ms != 0),
                                            ("scheduler_poll_share", self.scheduler_poll_share != 0))
                      if on]
            if unused:
                raise ValueError(f"front_end.{', front_end.'.join(unused)} need the front end's "
                                 "cost: set cpu_ms_per_request or cpu_ms_per_output_token")
        elif self.layout in ("shared", "with_prefill") and self.reserved_cores != 1:
            raise ValueError(f"front_end.reserved_cores applies to layout reserved or auto, not {self.layout}")
        elif self.layout in ("reserved", "with_prefill") and self.shared_core_step_ms != 0:
            raise ValueError(f"front_end.shared_core_step_ms applies to layout shared or auto, not {self.layout}")
        elif self.layout == "reserved" and self.scheduler_poll_share != 0:
            raise ValueError("front_end.scheduler_poll_share applies to layouts that share cores, not reserved")
        return self


class SearchSpec(_Strict):
    placements: tuple[Placement, ...] = Field(
        ("high_node_affinity", "low_node_affinity"), min_length=1, description="Placement algorithms to try."
    )
    max_pipeline_parallel: int = Field(8, ge=1, description="Largest pipeline degree per phase.")
    num_requests: int = Field(
        3000, ge=50, description="Requests per simulated trace (scaled up with instance count)."
    )
    num_seeds: int = Field(
        3, ge=1, le=16, description="Independent traces per evaluation; every one must pass."
    )
    seed: int = Field(0, ge=0, description="Base seed; the same seed gives the same plan.")
    num_verify: int = Field(
        4, ge=1, description="Configurations co-simulated in full after the per-phase pruning."
    )
    exhaustive: bool = Field(
        False, description="Check every instance count of every configuration pair by "
        "co-simulation (slow; the reference the default search is tested against)."
    )
    rel_tol: float = Field(0.03, gt=0, lt=0.5, description="Relative precision of goodput bisection.")
    compare_colocated: bool = Field(
        False, description="Also report the best colocated (vLLM-style) deployment for contrast."
    )
    workers: int | None = Field(
        None, ge=1, description="Processes for the search's independent simulations (per-phase "
        "goodputs, colocated baselines, the report's measurements). Unset: the cores this "
        "process may use. The plan does not depend on it; a process with threads running "
        "searches in one process (no fork under threads)."
    )


class PlanRequest(_Strict):
    model: str = Field(
        description="Local model directory with config.json, or a reference model name "
        "(facebook/opt-13b, facebook/opt-66b, facebook/opt-175b)."
    )
    profile: Path = Field(description="Latency profile JSON (DistServe format).")
    profile_model: str | None = Field(
        None, description="Key of the model in the profile; defaults to the model name, or the "
        "profile's only model."
    )
    colocated_profile: Path | None = Field(
        None, description="Profile of the colocated baseline's engine (e.g. DistServe's vLLM "
        "profile); defaults to `profile`. Used only with search.compare_colocated."
    )
    kv_capacity_csv: Path | None = Field(
        None, description="Optional model,tp,pp,max_num_tokens table overriding computed KV capacity."
    )
    slo: SLOConfig = Field(default_factory=SLOConfig, description="Latency targets.")
    workload: WorkloadSpec
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)
    engine: EngineModelSpec = Field(default_factory=EngineModelSpec)
    front_end: FrontEndSpec = Field(default_factory=FrontEndSpec)
    search: SearchSpec = Field(default_factory=SearchSpec)

    @model_validator(mode="after")
    def _front_end_fits(self) -> "PlanRequest":
        fe, c = self.front_end, self.cluster
        if not fe.modelled:
            return self
        if c.device != "cpu":
            raise ValueError("front_end models a CPU host's serving path (cluster.device: cpu); "
                             "on GPUs the host cores carry it")
        if c.num_nodes != 1:
            raise ValueError("front_end is modelled on one node (cluster.num_nodes: 1): the front "
                             "end runs on one host, and would slow only that host's engines")
        if self.engine.iteration_time_scale != 1.0:
            raise ValueError("front_end and engine.iteration_time_scale both account for the "
                             "front end's CPU; set one of them")
        if fe.layout == "with_prefill" and self.search.compare_colocated:
            raise ValueError("front_end.layout with_prefill plans disaggregated deployments only "
                             "(a colocated engine sharing the front end's cores is layout shared); "
                             "use layout auto to compare them")
        if fe.layout in ("reserved", "auto") and fe.reserved_cores >= c.gpu_budget:
            raise ValueError(f"front_end.reserved_cores ({fe.reserved_cores}) leaves no core of the "
                             f"{c.gpu_budget}-core budget to the engines")
        return self

    def with_front_end_layout(self, layout: Literal["shared", "reserved", "with_prefill", "auto"]
                              ) -> "PlanRequest":
        """This request with one front-end layout; a reserved front end's cores leave the
        engines' budget and node (they are the node's first cores). The with_prefill layout
        plans disaggregated deployments only, so it compares no colocated baseline."""
        fe = self.front_end.model_copy(update={"layout": layout})
        if layout == "with_prefill":
            search = self.search.model_copy(update={"compare_colocated": False})
            return self.model_copy(update={"front_end": fe, "search": search})
        if layout != "reserved" or not fe.modelled:
            return self.model_copy(update={"front_end": fe})
        k, c = fe.reserved_cores, self.cluster
        cluster = c.model_copy(update={"gpus_per_node": c.gpus_per_node - k,
                                       "max_gpus": c.gpu_budget - k})
        return self.model_copy(update={"front_end": fe, "cluster": cluster})

    @property
    def bytes_per_s(self) -> tuple[float, float]:
        """(intra-node per GPU pair, inter-node per NIC) in bytes/s."""
        return self.cluster.intra_node_bandwidth_gb_s * GB, self.cluster.inter_node_bandwidth_gb_s * GB
