"""The one validated configuration tree of a pdserve deployment.

Every component receives only its own sub-tree: the router gets `RouterConfig` and
`SLOConfig`, each worker gets its `PoolConfig` and the `KVTransferSettings`, the
launcher reads the whole `ServeConfig`. Configs come from a YAML file, CLI flags, or
both (flags win); anything invalid fails at start-up with a message naming the field.

(Over ~350 lines on purpose: one tree, one file. Each sub-config is a short pydantic model
of described, validated fields; split across files, the cross-field validators and the
"each component gets its own sub-tree" rule would have to be read in several places.)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from cluster.auth import MASKED, check_secret

Mode = Literal["disaggregated", "colocated", "auto"]
Role = Literal["prefill", "decode", "colocated"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    path: Path | None = Field(
        None,
        description="Local Hugging Face-format model directory (config.json, safetensors, "
        "tokenizer). Unset: the embedded tiny model, built locally on first use.",
    )
    embedded: Literal["tiny", "small"] = Field(
        "tiny",
        description="Which embedded model to serve when `path` is unset: `tiny` (fast, for "
        "tests) or `small` (~78M parameters; prefill interference is visible on a CPU).",
    )
    served_model_name: str | None = Field(
        None, description="Name clients pass as `model`; defaults to the directory name."
    )
    max_model_len: int | None = Field(
        None, gt=0, description="Context length (prompt + output tokens); defaults to the model's."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight and activation dtype passed to vLLM."
    )
    block_size: int | None = Field(
        None, gt=0,
        description="KV-cache block size in tokens, the same in both pools; unset: the engine's "
        "default (the CPU backend needs a multiple of 32).",
    )
    seed: int = Field(0, description="Engine seed.")


class PoolConfig(_Strict):
    num_instances: int = Field(1, ge=0, description="Number of engine instances in this pool.")
    tensor_parallel_size: int = Field(1, ge=1, description="Tensor-parallel degree per instance.")
    pipeline_parallel_size: int = Field(1, ge=1, description="Pipeline-parallel degree per instance.")
    num_cpus: float = Field(1.0, ge=0, description="Ray CPUs reserved per instance.")
    num_gpus: float = Field(0.0, ge=0, description="Ray GPUs reserved per instance (0 on CPU).")
    cpu_cores: list[list[int]] | None = Field(
        None,
        description="CPU backend only: the cores each instance's threads are bound to, one list "
        "per instance (e.g. [[0], [1]]). Unset: vLLM's own default.",
    )
    cpu_nice: int | None = Field(
        None, ge=-20, le=19,
        description="Niceness of this pool's engine processes (every thread). E.g. 10 for "
        "a prefill pool that shares its cores with the front end (ray.front_end_cores), so "
        "that routing and token streaming are not queued behind a long prefill. Unset: the "
        "niceness Ray gives its workers.",
    )
    kv_cache_gib: int = Field(
        1, ge=1, description="CPU backend only: KV-cache space per instance in whole GiB."
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="GPU backend only: share of GPU memory vLLM may use."
    )
    max_num_seqs: int = Field(128, ge=1, description="Most sequences one engine step may hold.")
    max_num_batched_tokens: int | None = Field(
        None, ge=1, description="Token budget of one engine step; defaults to vLLM's."
    )
    enable_prefix_caching: bool = Field(True, description="Reuse KV of shared prompt prefixes.")
    node_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Ray Serve: custom Ray resources each instance asks of its node (in the "
        "first bundle of its placement group), so that only nodes offering them host this pool, "
        "e.g. {pdserve_prefill_node: 0.01}. How `placement.affinity` is enacted across nodes.",
    )
    node_labels: dict[str, str] = Field(
        default_factory=dict,
        description="Ray Serve: Ray node labels every bundle of an instance must match (a label "
        "selector), e.g. {ray.io/accelerator-type: H100}.",
    )

    @model_validator(mode="after")
    def _cores_match_instances(self) -> "PoolConfig":
        if self.cpu_cores is not None:
            if len(self.cpu_cores) != self.num_instances:
                raise ValueError(
                    f"cpu_cores has {len(self.cpu_cores)} entries but num_instances is "
                    f"{self.num_instances}; give one core list per instance"
                )
            if any(not cores or min(cores) < 0 for cores in self.cpu_cores):
                raise ValueError("every cpu_cores entry must be a non-empty list of core ids >= 0")
        return self


class KVTransferSettings(_Strict):
    transport: Literal["auto", "shm", "tcp", "dist", "cuda_ipc"] = Field(
        "auto",
        description="How decode reads a prefill's KV, per (prefill, decode) pair: `auto` uses "
        "shared memory when both ends share a host, else TCP; `shm` reads the segment in place "
        "(same host only); `tcp` pulls it from the prefill node's transfer server (any host); "
        "`dist` pulls it over a torch.distributed pair group (gloo or NCCL, `dist_backend`) "
        "through the rendezvous store `dist_store_host`:`dist_store_port`; `cuda_ipc` maps "
        "the prefill's device staging arena from a decode on the same host and copies device "
        "to device (CUDA engines; see docs/kvtransfer.md for what is wired in).",
    )
    on_failure: Literal["recompute", "fail"] = Field(
        "fail",
        description="When KV cannot be loaded on decode: recompute the prompt there, or fail the "
        "request with an error. Output is never computed on incomplete KV.",
    )
    lease_s: float = Field(
        120.0, gt=0, description="Staged KV not claimed by a decode within this time is reclaimed."
    )
    connect_timeout_s: float = Field(5.0, gt=0, description="TCP connect/read timeout.")
    advertise_host: str | None = Field(
        None,
        description="Address decode instances use to reach this node's TCP transfer server; "
        "defaults to the Ray node IP.",
    )
    bind_host: str | None = Field(
        None,
        description="Address the TCP transfer server listens on; defaults to the node's own "
        "address (the Ray node IP), never every interface unless set to 0.0.0.0 here.",
    )
    secret: SecretStr | None = Field(
        None,
        description="Per-deployment secret (at least 16 bytes) that every KV transfer "
        "connection proves with an HMAC challenge-response before a byte of KV moves. Unset: "
        "the environment variable PDSERVE_KV_SECRET, else a secret generated once per user "
        "and host (enough for a one-host deployment; hosts of a multi-host deployment must "
        "share one). Never printed or logged.",
    )
    staging_dir: Path | None = Field(
        None,
        description="Where staged KV segments live; defaults to /dev/shm (falls back to the "
        "system temp dir).",
    )
    staging_pool_gib: float = Field(
        1.0,
        ge=0,
        description="Idle staging files each prefill keeps for reuse (GiB of /dev/shm). A "
        "recycled file has its pages resident and mapped on both sides, so staging and loading "
        "it run at memcpy speed instead of paying a page fault per 4 KiB; 0 turns recycling "
        "off.",
    )
    layerwise: bool = Field(
        True,
        description="Stage each layer's KV as soon as the prefill computes it (vLLM's "
        "save_kv_layer), overlapping the copy with the forward; false stages every layer "
        "after the forward.",
    )
    checksums: Literal["crc32", "xxh3_64"] | None = Field(
        None,
        description="Checksum every staged block on prefill and verify it on decode before "
        "loading; a damaged block takes the on_failure path. xxh3_64 needs the xxhash "
        "package on both ends.",
    )
    device_staging_gib: float = Field(
        0.5,
        ge=0,
        description="CUDA engines only: GPU memory each prefill reserves as its device "
        "staging arena, where each layer's KV is gathered on the device (on a side stream, "
        "after the layer's compute) for transport `cuda_ipc` or `dist` over NCCL. The arena is "
        "bounded: a request that does not fit takes the host path. It comes out of the "
        "engine's gpu_memory_utilization share (see kvtransfer.memory). Used where "
        "`device_path` puts the prefill's staging on the device.",
    )
    device_path: Literal["auto", "off", "force"] = Field(
        "auto",
        description="Where a prefill's connector stages KV. auto: in the device staging arena "
        "when the engine's KV cache is on a GPU and the transport moves device memory "
        "(`cuda_ipc`, `dist`, or `auto` with a rendezvous store), else in host segments (CPU "
        "engines: always host); off: always host segments; force: the device path whatever "
        "device the cache is on, CPU included (tests: the arena in host memory, moved over "
        "`dist` with gloo). A request that does not fit in the arena takes the host path.",
    )
    dist_store_host: str | None = Field(
        None,
        description="Host of the torch.distributed TCPStore that prefill and decode instances "
        "rendezvous through for transport `dist` (the launcher hosts it). When set, a prefill "
        "also answers `dist` fetches.",
    )
    dist_store_port: int | None = Field(
        None, ge=1, le=65535, description="Port of that rendezvous store."
    )
    dist_backend: Literal["gloo", "nccl"] = Field(
        "gloo",
        description="torch.distributed backend of transport `dist`: gloo (CPU tensors, any "
        "host) or nccl (GPU tensors; NVLink or RDMA where present). Prefill and decode must "
        "agree.",
    )

    @field_validator("secret")
    @classmethod
    def _usable_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            check_secret(value.get_secret_value())
        return value

    @model_validator(mode="after")
    def _dist_needs_a_store(self) -> KVTransferSettings:
        if (self.dist_store_host is None) != (self.dist_store_port is None):
            raise ValueError("set dist_store_host and dist_store_port together")
        if self.transport == "dist" and self.dist_store_host is None:
            raise ValueError("transport 'dist' needs dist_store_host and dist_store_port: the "
                             "torch.distributed store where prefill and decode meet")
        return self


class SLOConfig(_Strict):
    ttft_s: float = Field(1.0, gt=0, description="Time-to-first-token SLO in seconds.")
    tpot_s: float = Field(0.1, gt=0, description="Time-per-output-token SLO in seconds.")
    attainment: float = Field(
        0.9, gt=0, le=1, description="Share of requests that must meet both SLOs."
    )


class RouterConfig(_Strict):
    host: str = Field("127.0.0.1", description="Address the HTTP router listens on.")
    port: int = Field(8000, ge=0, le=65535, description="Port the HTTP router listens on.")
    prefill_policy: Literal["least_prompt_tokens", "round_robin"] = Field(
        "least_prompt_tokens", description="How a prefill (or colocated) instance is chosen."
    )
    decode_policy: Literal["most_free_kv", "round_robin"] = Field(
        "most_free_kv", description="How a decode instance is chosen."
    )
    stats_interval_s: float = Field(
        0.25, gt=0, description="How often worker load (queues, KV usage) is polled."
    )
    max_pending_requests: int = Field(
        4096, ge=1, description="Requests in flight beyond which new ones get HTTP 503."
    )
    prefix_aware_routing: bool = Field(
        True, description="Prefer the instance believed to hold the prompt's prefix in its KV "
        "cache, weighed against the prompt tokens queued on it (router/prefix.py).",
    )
    local_prefill_max_tokens: int = Field(
        0, ge=0, description="Conditional disaggregation: a request whose prompt has at most this "
        "many tokens not cached on its decode instance is prefilled there instead of on the "
        "prefill pool. 0 turns this rule off.",
    )
    local_prefill_queue_tokens: int | None = Field(
        None, ge=1, description="Conditional disaggregation: when the least-loaded prefill instance "
        "has at least this many prompt tokens queued and the decode instance has fewer than this "
        "many (this prompt included) and room in its KV cache, prefill on the decode instance. "
        "Unset turns this rule off.",
    )
    api_key: SecretStr | None = Field(
        None,
        description="API key clients must send as `Authorization: Bearer <key>` on /v1/*; "
        "unset: the environment variable PDSERVE_API_KEY, else no authentication. /health "
        "stays open; /metrics and /dashboard need the key unless `open_metrics`. Never "
        "printed or logged.",
    )
    open_metrics: bool = Field(
        False,
        description="With an API key set, still serve /metrics and /dashboard without it (for "
        "a Prometheus that cannot send a bearer token).",
    )
    max_request_body_bytes: int = Field(
        8 * 1024**2, ge=1024, description="Request bodies larger than this get HTTP 413."
    )
    max_queued_requests: int = Field(
        1024,
        ge=1,
        description="Requests admitted whose prompt is not yet computed (router-side queue, "
        "all prefill instances together); past it new requests get HTTP 429 at once.",
    )
    ttft_reject_factor: float | None = Field(
        10.0,
        gt=0,
        description="Reject with HTTP 429 when the TTFT predicted from the queue (queued "
        "prompt tokens over measured prefill throughput) exceeds this many times the TTFT "
        "SLO; null: only the queue bound rejects.",
    )
    prefill_max_attempts: int = Field(
        3, ge=1, le=10,
        description="Prefill attempts per request: a prefill whose instance fails (connection "
        "lost, stalled) before the first token is retried on another prefill instance up to "
        "this many attempts in all (router/recovery.py). 1 turns retries off.",
    )
    retry_backoff_base_s: float = Field(
        0.05, gt=0, description="Backoff before prefill retry n: uniform(0, min(cap, base * 2^(n-1))).",
    )
    retry_backoff_cap_s: float = Field(
        1.0, gt=0, description="Upper bound of one prefill retry backoff.",
    )
    breaker_failure_threshold: int = Field(
        3, ge=1,
        description="Consecutive instance faults (retries, migrations) after which an instance's "
        "circuit breaker opens: routing skips it for `breaker_open_s`, then lets one trial through.",
    )
    breaker_open_s: float = Field(
        5.0, gt=0, description="How long an open circuit breaker keeps its instance out of routing.",
    )
    migration_limit: int = Field(
        2, ge=0,
        description="How many times one request may move to another decode (or colocated) instance "
        "after its instance failed mid-stream; the stream continues from the tokens the client "
        "already has (prompt + those tokens, recomputed). 0 turns migration off: the stream "
        "ends with an error event.",
    )
    stream_stall_timeout_s: float | None = Field(
        30.0, gt=0,
        description="A worker that owes a request output and gives none for this long is treated "
        "as failed (migration or retry if allowed, else a clean error). Measured from the "
        "stream's last delta while its worker is decoding; while a prompt is being computed "
        "(no delta yet: a long prefill is legitimate) it fires only once the instance also "
        "fails its stats poll. null: no stall timeout.",
    )

    @model_validator(mode="after")
    def _backoff_cap_covers_base(self) -> "RouterConfig":
        if self.retry_backoff_cap_s < self.retry_backoff_base_s:
            raise ValueError("retry_backoff_cap_s must be at least retry_backoff_base_s")
        return self

    @field_validator("api_key")
    @classmethod
    def _usable_api_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            key = value.get_secret_value()
            if key == MASKED:
                raise ValueError("is a masked value (as --print-config shows secrets); give the "
                                 "real key")
            if not key or key != key.strip():
                raise ValueError("must be non-empty, without surrounding whitespace")
        return value


class RayConfig(_Strict):
    address: str | None = Field(
        None, description="Existing Ray cluster address; unset starts a local Ray instance."
    )
    namespace: str = Field("pdserve", description="Ray namespace of the deployment's actors.")
    object_store_memory_bytes: int = Field(
        256 * 1024**2, gt=0, description="Object store size of a local Ray instance."
    )
    app_name: str = Field(
        "pdserve", min_length=1, description="Ray Serve application name of the deployment."
    )
    router_replicas: int = Field(
        1, ge=1, description="Ray Serve: replicas of the router (HTTP ingress) deployment."
    )
    stream_relay: bool = Field(
        False,
        description="Ray Serve: a relay deployment (router_replicas replicas) holds the "
        "client connections on router.port and forwards each request to a router replica. A "
        "router replica lost mid-stream then ends its SSE streams with an OpenAI error event "
        "and `data: [DONE]` instead of a cut connection, and a request it had not answered "
        "goes to another router replica. Costs one more hop per response message "
        "(docs/reliability.md, 'Router replica loss').",
    )
    engine_in_router: bool | None = Field(
        None,
        description="Ray Serve, colocated mode: the router replica runs one colocated instance "
        "in its own process, as vLLM's API server runs its engine's client, so each token "
        "reaches the client without a hop between processes; the other colocated instances "
        "run as engine replicas (docs/serve.md, 'The engine in the router'). Needs one "
        "router replica. Unset: `pdserve serve` turns it on for one colocated instance on a "
        "CPU host where it starts Ray itself, and off elsewhere.",
    )
    health_check_period_s: float = Field(
        2.0, gt=0, description="Ray Serve: how often each replica's engine is health-checked."
    )
    health_check_timeout_s: float = Field(
        30.0, gt=0, description="Ray Serve: a health check unanswered this long fails the replica."
    )
    drain_timeout_s: float = Field(
        60.0, gt=0,
        description="Ray Serve: a replica being removed (scale-down, redeploy) takes no new "
        "requests and waits at most this long for the ones it holds before it stops.",
    )
    front_end_cores: list[int] | None = Field(
        None,
        description="CPU host with a local Ray: the cores pdserve's front end runs on (the "
        "router and worker replicas, Serve's controller, Ray's own processes). Engines run "
        "on their pool's cpu_cores, so a core that is in no front_end_cores list belongs to "
        "its engines alone. Unset: pdserve chooses (docs/serve.md, 'CPU layout').",
    )

    control_plane_nice: int | None = Field(
        10, ge=0, le=19,
        description="CPU host with a local Ray and a pinned front end, Serve runtime (not "
        "`--runtime actors`): the niceness `pdserve serve` gives Ray's and Serve's own processes (GCS, raylet, agents, the Serve "
        "controller and proxy, the registry) once the application is up, so that their "
        "periodic work yields the front end's cores to the router and the engines' "
        "schedulers. null leaves them at Ray's settings (docs/serve.md, 'CPU layout').",
    )

    @field_validator("front_end_cores")
    @classmethod
    def _cores(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or min(value) < 0):
            raise ValueError("front_end_cores must be a non-empty list of core ids >= 0")
        return value

    @model_validator(mode="after")
    def _front_end_cores_need_a_local_ray(self) -> "RayConfig":
        if self.front_end_cores is not None and self.address is not None:
            raise ValueError("front_end_cores pins the Ray that pdserve starts itself; with "
                             "address set, pin each node's `ray start` instead (e.g. taskset)")
        return self


class PlacementConfig(_Strict):
    affinity: Literal["any", "high", "low"] = Field(
        "any",
        description="Where prefill and decode instances run relative to each other. `high`: a "
        "prefill and the decodes it feeds share a node (KV over shared memory or NVLink): both "
        "pools ask for the same `node_resources`/`node_labels`, which each node offers for one "
        "prefill and its decodes. `low`: the pools run on different nodes (KV over TCP): they "
        "ask for different node resources or labels. `any`: Ray Serve's default spread.",
    )
    bundle_strategy: Literal["STRICT_PACK", "PACK"] = Field(
        "STRICT_PACK",
        description="Placement-group strategy of one instance's bundles (one bundle per "
        "tensor/pipeline-parallel worker): STRICT_PACK keeps an instance on one node.",
    )


class ReplanBounds(_Strict):
    min_instances: int = Field(1, ge=1, description="Fewest instances the loop keeps in this pool.")
    max_instances: int = Field(8, ge=1, description="Most instances the loop asks for in this pool.")


class ReplanConfig(_Strict):
    """The online re-planning loop in the router (pdserve/replanner.py, docs/planner.md)."""

    enabled: bool = Field(False, description="Run the loop in the router (Ray Serve application).")
    observe_only: bool = Field(
        True, description="Decide and report (metrics, dashboard), never resize a pool.")
    plan_config: Path | None = Field(
        None, description="The `pdserve plan --config` YAML the deployment was planned with: its "
        "profile, cluster and engine settings size the pools; the SLO and the workload are "
        "the live ones. Required when enabled.")
    interval_s: float = Field(60.0, gt=0, description="Seconds between two sizing decisions.")
    window_s: float = Field(60.0, gt=0, description="Seconds of live traffic each decision reads.")
    tick_s: float = Field(5.0, gt=0, description="Seconds between two looks at the live figures.")
    min_requests: int = Field(50, ge=1, description="Requests a window needs before it sizes.")
    headroom: float = Field(1.1, ge=1.0, le=3.0, description="Size for this many times the rate.")
    max_units: int | None = Field(
        None, ge=2, description="Units (GPUs or cores) both pools may use; unset: the plan "
        "config's budget.")
    prefill: ReplanBounds = Field(default_factory=ReplanBounds)
    decode: ReplanBounds = Field(default_factory=ReplanBounds)

    @model_validator(mode="after")
    def _usable(self) -> "ReplanConfig":
        if self.enabled and self.plan_config is None:
            raise ValueError("replan.enabled needs replan.plan_config (a pdserve plan YAML)")
        for name, b in (("prefill", self.prefill), ("decode", self.decode)):
            if b.min_instances > b.max_instances:
                raise ValueError(f"replan.{name}: min_instances must be <= max_instances")
        return self


class PlannerConfig(_Strict):
    """Mode auto: `pdserve serve` asks the planner for the mode, the pools and the front
    end's cores on the CPU host it starts (pdserve/auto_mode.py, docs/planner.md)."""

    workload: Path | None = Field(
        None, description="The workload to plan for: a workload file (cluster/workload_schema.py, "
        "the file `pdserve bench --workload` sends). Unset: the lengths of vLLM's benchmark "
        "defaults, 1,024-token prompts and 128-token outputs.",
    )
    profile: Path | None = Field(
        None, description="Latency profile of one engine on one core (`pdserve profile`). "
        "Unset: the profile pdserve ships for an embedded model; required for a model directory.",
    )
    kv_cache_gib: int = Field(1, ge=1, description="KV-cache space of every instance it starts, GiB.")
    front_end_cpu_ms: float = Field(
        12.0, gt=0, description="CPU milliseconds the front end spends per request (the "
        "planner's `front_end.cpu_ms_per_request`; measured on the tiny model, 2 cores).",
    )
    front_end_cpu_ms_per_token: float = Field(
        0.0, ge=0, description="CPU milliseconds the front end spends per output token.")
    shared_core_step_ms: float = Field(
        2.4, ge=0, description="Extra milliseconds per engine iteration where engines share "
        "cores with the front end (the planner's `front_end.shared_core_step_ms`; measured).",
    )
    scheduler_poll_share: float = Field(
        0.4, ge=0, le=4, description="What an engine scheduler's busy-polling costs an engine "
        "computing on the same core (the planner's `front_end.scheduler_poll_share`; measured "
        "on the small model, 2 cores).",
    )


# Pool fields that mode auto decides; a config that sets one of them chooses its own pools.
_AUTO_POOL_FIELDS = ("num_instances", "tensor_parallel_size", "pipeline_parallel_size",
                     "cpu_cores", "kv_cache_gib", "max_num_seqs", "max_num_batched_tokens")


class ServeConfig(_Strict):
    mode: Mode = Field(
        "disaggregated", description="Disaggregated P/D pools, colocated instances, or auto: "
        "`pdserve serve` plans the mode and the pools for the SLO and workload on the CPU host it "
        "starts (the `planner` section).")
    model: ModelConfig = Field(default_factory=ModelConfig)
    prefill: PoolConfig = Field(default_factory=PoolConfig)
    decode: PoolConfig = Field(default_factory=PoolConfig)
    colocated: PoolConfig = Field(default_factory=PoolConfig)
    kv_transfer: KVTransferSettings = Field(default_factory=KVTransferSettings)
    slo: SLOConfig = Field(default_factory=SLOConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    placement: PlacementConfig = Field(default_factory=PlacementConfig)
    replan: ReplanConfig = Field(default_factory=ReplanConfig)
    planner: PlannerConfig = Field(default_factory=PlannerConfig)

    @model_validator(mode="after")
    def _pools_present(self) -> "ServeConfig":
        if self.mode == "auto":
            return self._auto_leaves_pools_alone()
        if self.planner != PlannerConfig():
            raise ValueError("planner: these settings are for mode auto; this config's mode is "
                             f"{self.mode}")
        if self.mode == "disaggregated":
            if self.prefill.num_instances < 1 or self.decode.num_instances < 1:
                raise ValueError(
                    "disaggregated mode needs prefill.num_instances >= 1 and "
                    "decode.num_instances >= 1"
                )
        elif self.colocated.num_instances < 1:
            raise ValueError("colocated mode needs colocated.num_instances >= 1")
        p, d = self.prefill, self.decode
        same_nodes = p.node_resources.keys() == d.node_resources.keys() and p.node_labels == d.node_labels
        if self.mode == "disaggregated" and self.placement.affinity == "high" and not same_nodes:
            raise ValueError("placement.affinity 'high' puts prefill and decode on the same nodes: "
                             "give both pools the same node_resources keys and node_labels")
        if self.mode == "disaggregated" and self.placement.affinity == "low" and same_nodes \
                and (p.node_resources or p.node_labels):
            raise ValueError("placement.affinity 'low' puts prefill and decode on different "
                             "nodes: give the pools different node_resources or node_labels")
        if self.ray.engine_in_router and self.mode != "colocated":
            raise ValueError("ray.engine_in_router runs a colocated instance in the router: it "
                             "needs mode colocated")
        if self.ray.engine_in_router and self.ray.router_replicas != 1:
            raise ValueError("ray.engine_in_router needs ray.router_replicas 1 (the router "
                             "replica is an engine instance)")
        if self.replan.enabled and self.mode != "disaggregated":
            raise ValueError("replan sizes prefill and decode pools: it needs mode disaggregated")
        if self.replan.enabled and self.ray.router_replicas != 1:
            raise ValueError("replan runs in the router and reads its traffic: it needs "
                             "ray.router_replicas 1 (each replica sees only its share)")
        return self

    def _auto_leaves_pools_alone(self) -> "ServeConfig":
        default = PoolConfig()
        for role in ("prefill", "decode", "colocated"):
            pool = getattr(self, role)
            chosen = [f"{role}.{f}" for f in _AUTO_POOL_FIELDS if getattr(pool, f) != getattr(default, f)]
            if chosen:
                raise ValueError(f"mode auto chooses the pools: {', '.join(chosen)} belong to mode "
                                 "disaggregated or colocated (planner.kv_cache_gib sizes the KV cache)")
        if self.replan.enabled:
            raise ValueError("replan resizes a disaggregated deployment: give mode disaggregated "
                             "(`pdserve serve --mode auto --print-config` shows the plan to start from)")
        if self.ray.address is not None:
            raise ValueError("mode auto plans the CPU host `pdserve serve` starts Ray on; for a "
                             "running cluster (ray.address) plan with `pdserve plan` and serve its config")
        return self

    def pools(self) -> dict[Role, PoolConfig]:
        """The pools this mode runs, by role."""
        if self.mode == "auto":
            raise ValueError("mode auto has no pools until `pdserve serve` plans them")
        if self.mode == "disaggregated":
            return {"prefill": self.prefill, "decode": self.decode}
        return {"colocated": self.colocated}

    def running_pools(self) -> list[PoolConfig]:
        """The pools of this mode that have at least one instance."""
        return [p for p in self.pools().values() if p.num_instances > 0]

    def pinned_engine_cores(self) -> set[int] | None:
        """Every core some engine instance is pinned to (`cpu_cores`); None when an
        instance is not pinned (it may run anywhere)."""
        pools = self.running_pools()
        if any(p.cpu_cores is None for p in pools):
            return None
        return {c for p in pools for cores in p.cpu_cores or () for c in cores}


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the offending field."""


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {where}: {e['msg']}")
    return "invalid pdserve config:\n" + "\n".join(lines)


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# Secrets may come from the environment (between the YAML file and CLI flags in precedence),
# so they need not sit in a file or on a command line.
ENV_SECRETS = {"PDSERVE_API_KEY": ("router", "api_key"), "PDSERVE_KV_SECRET": ("kv_transfer", "secret")}


def _from_environment() -> dict[str, Any]:
    found: dict[str, Any] = {}
    for var, (section, key) in ENV_SECRETS.items():
        value = os.environ.get(var)
        if value:
            found.setdefault(section, {})[key] = value
    return found


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> ServeConfig:
    """Read a YAML file (optional), apply nested `overrides` (e.g. from CLI flags), validate."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"config file not found: {path}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        data = loaded
    data = _deep_merge(data, _from_environment())
    data = _deep_merge(data, overrides or {})
    try:
        return ServeConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e)) from e


def dump_config(config: ServeConfig) -> str:
    """YAML text that `load_config` reads back to an equal config."""
    return yaml.safe_dump(config.model_dump(mode="json", exclude_none=True), sort_keys=False)
