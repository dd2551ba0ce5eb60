"""Typed messages that cross process boundaries (router <-> workers, worker <-> worker).

Frozen msgspec structs, separate from any component's mutable internal state. The KV
handle is opaque here: only `kvtransfer` reads its bytes.
"""

from __future__ import annotations

from typing import Literal

import msgspec

FinishReason = Literal["stop", "length", "abort", "error"]
ServedBy = Literal["transferred", "recomputed", "colocated", "prefill_only"]


class KVTransferError(RuntimeError):
    """KV could not be moved or loaded; the message says which segment and why."""


class WorkerUnavailable(RuntimeError):
    """No worker of a needed role can take the request right now."""


class SamplingSpec(msgspec.Struct, frozen=True):
    """The sampling parameters pdserve forwards to an engine."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: disabled
    seed: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()


class KVHandle(msgspec.Struct, frozen=True):
    """Where a prefill left a request's KV. Opaque outside `kvtransfer`."""

    producer_id: str  # instance id of the prefill worker that owns the staged KV
    data: bytes


class EngineRequest(msgspec.Struct, frozen=True):
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingSpec
    # Decode only: the prefill's KV for prompt_token_ids[:-1]; the last id is prefill's
    # first output token, which decode computes (and only it) before sampling on.
    kv_handle: KVHandle | None = None


class PrefillResult(msgspec.Struct, frozen=True):
    request_id: str
    first_token_id: int
    # Set when the request ended at its first token (EOS, stop id, or max_tokens == 1).
    finish_reason: FinishReason | None
    kv_handle: KVHandle | None
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens served from prefill's own prefix cache
    prefill_start_s: float  # wall clock (time.time()) on the worker
    prefill_end_s: float


class TokenDelta(msgspec.Struct, frozen=True):
    """New output tokens from a decode or colocated worker, in order."""

    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    # Set on the first delta of a request: how its prompt KV was obtained.
    served_by: ServedBy | None = None
    num_prompt_tokens_computed: int | None = None
    kv_load_s: float | None = None
    error: str | None = None


class TransferStat(msgspec.Struct, frozen=True):
    """One KV movement, as seen by the side that performed it."""

    transport: Literal["shm", "tcp", "dist", "cuda_ipc", "local"]
    direction: Literal["save", "load", "fetch"]
    num_bytes: int
    duration_s: float
    outcome: Literal["ok", "failed", "expired"]


class WorkerStats(msgspec.Struct, frozen=True):
    """A worker's load, polled by the router for routing and metrics."""

    instance_id: str
    role: Literal["prefill", "decode", "colocated"]
    is_ready: bool
    num_running_reqs: int
    num_waiting_reqs: int
    kv_cache_usage: float  # 0..1 share of KV blocks in use
    num_kv_blocks: int
    queued_prompt_tokens: int = 0  # prompt tokens accepted and not yet prefilled
    num_staged_segments: int = 0  # prefill: KV segments staged and not yet claimed
    transfers: tuple[TransferStat, ...] = ()  # since the previous poll
