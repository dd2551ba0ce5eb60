"""Typed messages that cross process boundaries (router <-> workers, worker <-> worker).

Frozen msgspec structs, separate from any component's mutable internal state. The KV
handle is opaque here: only `kvtransfer` reads its bytes.
"""

from __future__ import annotations

import enum
from typing import Literal

import msgspec

FinishReason = Literal["stop", "length", "abort", "error"]
# How a request's prompt KV was obtained: moved from prefill, recomputed by decode after a
# failed transfer, computed by a colocated instance, computed by the decode instance itself
# (conditional disaggregation), or not needed (the request ended at its first token).
ServedBy = Literal["transferred", "recomputed", "colocated", "local_prefill", "prefill_only"]


class LifecycleEvent(str, enum.Enum):
    """Names of the timestamps in a request's trace (`RequestTrace.events`)."""

    QUEUED = "queued"
    PREFILLING = "prefilling"
    PREFILL_START = "prefill_start"  # worker clock: the engine took the prompt
    PREFILL_END = "prefill_end"
    RETRYING = "retrying"  # first time: a prefill instance failed, another is tried
    HANDOFF = "handoff"
    DECODING = "decoding"
    GENERATING = "generating"
    MIGRATING = "migrating"  # first time: the stream's instance failed, it moves on
    FIRST_TOKEN = "first_token"
    DECODE_FIRST_TOKEN = "decode_first_token"
    FINISHED = "finished"
    ABORTED = "aborted"
    FAILED = "failed"
    FINISH = "finish"  # the front end sent the last byte


class KVTransferError(RuntimeError):
    """KV could not be moved or loaded; the message says which segment and why."""


class WorkerUnavailable(RuntimeError):
    """No worker of a needed role can take the request right now."""


class StructuredSpec(msgspec.Struct, frozen=True):
    """One structured-output constraint (vLLM's `StructuredOutputsParams`): exactly one of
    the constraint fields is set."""

    json: str | None = None  # a JSON schema, serialized
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None  # EBNF / Lark, as vLLM's backends read it
    json_object: bool | None = None
    structural_tag: str | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None


class SamplingSpec(msgspec.Struct, frozen=True):
    """The sampling parameters pdserve forwards to an engine."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: disabled
    min_p: float = 0.0
    seed: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias)
    allowed_token_ids: tuple[int, ...] | None = None
    bad_words: tuple[str, ...] = ()
    # Logprobs of the sampled token plus this many alternatives per output token
    # (None: no logprobs).
    num_logprobs: int | None = None
    structured: StructuredSpec | None = None
    stream_interval: int | None = None

    @property
    def depends_on_output(self) -> bool:
        """Whether sampling a token depends on the output tokens before it (not just on the
        prompt + output sequence as one context): penalties over output tokens, multi-token
        bad words, a grammar's state. Decode must then see prefill's first token as output,
        not as prompt."""
        return (self.frequency_penalty != 0.0 or self.presence_penalty != 0.0
                or bool(self.bad_words) or self.structured is not None)


class TokenLogprob(msgspec.Struct, frozen=True, array_like=True):
    """One output token's logprob, its rank in the vocabulary (1 = most likely) and the
    top alternatives as (token id, logprob), most likely first."""

    token_id: int
    logprob: float
    rank: int
    top: tuple[tuple[int, float], ...] = ()


class KVHandle(msgspec.Struct, frozen=True):
    """Where a prefill left a request's KV. Opaque outside `kvtransfer`: `data` is a
    msgpack `kvtransfer.handle.TransferDescriptor` (segment, node, transfer server, epoch)."""

    producer_id: str  # instance id of the prefill worker that owns the staged KV
    data: bytes


class EngineRequest(msgspec.Struct, frozen=True):
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingSpec
    # Decode only: the prefill's KV for prompt_token_ids[:-1]; the last id is prefill's
    # first output token, which decode computes (and only it) before sampling on.
    kv_handle: KVHandle | None = None
    # Prefill only: how many decodes will load this prompt's KV (n > 1 choices). The
    # prefill then returns that many claims on one staged segment (`PrefillResult.kv_claims`).
    num_kv_claims: int = 1


class PrefillResult(msgspec.Struct, frozen=True):
    request_id: str
    first_token_id: int
    # "abort" when the request was aborted while its prefill ran (the router had given up;
    # no KV is handed over), else None. The prefill never sets it for a request that ends at
    # its first token (EOS, stop id, max_tokens == 1): the router decides that itself from
    # first_token_id and the request's sampling (`Handoff._ends_at_first_token`).
    finish_reason: FinishReason | None
    kv_handle: KVHandle | None
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens served from prefill's own prefix cache
    prefill_start_s: float  # wall clock (time.time()) on the worker
    prefill_end_s: float
    first_token_logprob: TokenLogprob | None = None  # when sampling.num_logprobs is set
    # With num_kv_claims > 1: one handle per claim on the staged segment (kv_handle is
    # then None); each is consumed, released or reclaimed on its own.
    kv_claims: tuple[KVHandle, ...] = ()


class TokenDelta(msgspec.Struct, frozen=True):
    """New output tokens from a decode or colocated worker, in order."""

    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    # Set on the first delta of a request: how its prompt KV was obtained.
    served_by: ServedBy | None = None
    num_prompt_tokens_computed: int | None = None
    kv_load_s: float | None = None
    error: str | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per token id, when requested


class TransferStat(msgspec.Struct, frozen=True):
    """One KV movement, as seen by the side that performed it."""

    # What moved the bytes: a fetch record names the transport that brought the segment to
    # the decode's host (shm, tcp, dist); the connector's save and load records name the
    # staging medium they copied through (shm: host staging; cuda_ipc: a device arena).
    transport: Literal["shm", "tcp", "dist", "cuda_ipc"]
    direction: Literal["save", "load", "fetch"]
    num_bytes: int
    duration_s: float
    outcome: Literal["ok", "failed", "expired"]
    request_id: str | None = None  # the engine request id, when the record is about one
    error: str | None = None  # why it failed (outcome "failed"), as the side that saw it


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
    block_size: int = 0  # the engine's KV block size in tokens; 0 until the engine is up
    is_draining: bool = False  # finishing what it holds; routing sends it nothing new
    transfers: tuple[TransferStat, ...] = ()  # since the previous poll

