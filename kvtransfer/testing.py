"""Test doubles that ship with kvtransfer: drive the connector and the services without an engine.

Used by the tests (tests/kvtransfer), the transfer benchmark (bench/transfer_bench.py) and
the vLLM-free harness, the way vLLM and SGLang ship their fake connectors and backends:

- `make_connector(role, staging_dir, engine_id, block_size)`: a `PdserveConnector` half
  built from a stand-in of the two vLLM config fields it reads.
- `paged_caches(...)`: per-layer paged KV tensors, blocks at dim 0.
- `run_save_step` / `run_load_step`: what vLLM's model runner does around one forward.
- Stand-ins of the scheduler objects the scheduler half reads (`new_request`,
  `cached_requests`, `scheduler_output`, `engine_request`, `allocated_blocks`,
  `finished_request`).
- `LoopbackTransport`: a transport that delivers a producer's segment on this host by
  copying it into the consumer's staging dir (every byte moves, nothing over a network),
  with injectable failures; register it in a `TransportRegistry` to test services.
- `StallingTransport`: the loopback transport that, while the stall switch is on, sends
  half a segment and then nothing (a sender frozen mid-segment), so the consumer's wait
  runs into its timeout; the switch (`TRANSFER_STALL_SWITCH`: an environment variable
  naming a file, on while the file exists) can be flipped from another process at a
  precise moment (bench/faults.py's `stall-transfer`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cluster.config import KVTransferSettings
from cluster.wire import KVTransferError
from kvtransfer.handle import TransferDescriptor
from kvtransfer.params import CONNECTOR_MODULE, CONNECTOR_NAME
from kvtransfer.segment import StagingSegment
from kvtransfer.tcp import fetched_path

if TYPE_CHECKING:
    from kvtransfer.connector import PdserveConnector
    from kvtransfer.metadata import LoadSpec, PdserveConnectorMetadata


# ------------------------------------------------------------------ the connector, no engine
@dataclass(frozen=True)
class CacheConfigStandIn:
    block_size: int


@dataclass(frozen=True)
class VllmConfigStandIn:
    """The two fields of vLLM's VllmConfig that `PdserveConnector.__init__` (and
    `KVConnectorBase_V1.__init__`) read."""

    kv_transfer_config: Any  # vllm.config.KVTransferConfig
    cache_config: CacheConfigStandIn


def make_connector(role: str, staging_dir: Path, engine_id: str, block_size: int,
                   half: str = "worker", **extra: Any) -> PdserveConnector:
    """One half ("worker" or "scheduler") of a connector in `role` ("kv_producer" or
    "kv_consumer"); `extra` goes into kv_connector_extra_config (lease_s 60 unless given)."""
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from kvtransfer.connector import PdserveConnector

    config = VllmConfigStandIn(
        kv_transfer_config=KVTransferConfig(
            kv_connector=CONNECTOR_NAME, kv_connector_module_path=CONNECTOR_MODULE,
            kv_role=role, engine_id=engine_id,
            kv_connector_extra_config={"staging_dir": str(staging_dir), "lease_s": 60, **extra}),
        cache_config=CacheConfigStandIn(block_size=block_size))
    role_half = KVConnectorRole.SCHEDULER if half == "scheduler" else KVConnectorRole.WORKER
    return PdserveConnector(config, role_half, kv_cache_config=None)


def paged_caches(layer_names: Sequence[str], num_blocks: int, block_shape: Sequence[int],
                 fill: str = "zeros", dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """One [num_blocks, *block_shape] tensor per layer: "random" (torch.randn) or "zeros"."""
    make = torch.randn if fill == "random" else torch.zeros
    return {name: make(num_blocks, *block_shape, dtype=dtype, device=device)
            for name in layer_names}


def run_save_step(worker: PdserveConnector, caches: dict[str, torch.Tensor],
                  meta: PdserveConnectorMetadata) -> None:
    """What vLLM's model runner does around one forward pass on the prefill."""
    worker.bind_connector_metadata(meta)
    worker.start_load_kv(None)
    for name, kv in caches.items():  # each layer, as soon as it is computed
        worker.save_kv_layer(name, kv, attn_metadata=None)
    worker.wait_for_save()
    worker.clear_connector_metadata()


def run_load_step(worker: PdserveConnector, *loads: LoadSpec) -> None:
    """A decode step whose metadata carries `loads`."""
    from kvtransfer.metadata import PdserveConnectorMetadata

    worker.bind_connector_metadata(PdserveConnectorMetadata(loads=list(loads)))
    worker.start_load_kv(None)
    worker.clear_connector_metadata()


# ------------------------------------------------------------------ scheduler stand-ins
@dataclass
class NewRequestStandIn:
    req_id: str
    prompt_token_ids: list[int]
    block_ids: tuple[list[int], ...]
    num_computed_tokens: int = 0
    sampling_params: Any = None  # vLLM's SamplingParams (kv_transfer_params in extra_args)


@dataclass
class CachedRequestsStandIn:
    req_ids: list[str] = field(default_factory=list)
    new_block_ids: list[tuple[list[int], ...] | None] = field(default_factory=list)
    resumed_req_ids: set[str] = field(default_factory=set)
    num_computed_tokens: list[int] = field(default_factory=list)


@dataclass
class SchedulerOutputStandIn:
    scheduled_new_reqs: list[NewRequestStandIn] = field(default_factory=list)
    scheduled_cached_reqs: CachedRequestsStandIn = field(default_factory=CachedRequestsStandIn)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)


@dataclass
class EngineRequestStandIn:
    request_id: str
    prompt_token_ids: list[int]
    kv_transfer_params: dict[str, Any] | None = None
    num_computed_tokens: int = 0
    status: Any = None  # vllm.v1.request.RequestStatus


@dataclass
class AllocatedBlocksStandIn:
    block_ids: list[int]

    def get_block_ids(self) -> tuple[list[int], ...]:
        return (list(self.block_ids),)


@dataclass
class ConnectorOutputStandIn:
    invalid_block_ids: set[int] = field(default_factory=set)


def new_request(req_id: str, num_prompt_tokens: int, block_ids: Sequence[int],
                num_computed_tokens: int = 0) -> NewRequestStandIn:
    return NewRequestStandIn(req_id, list(range(num_prompt_tokens)), (list(block_ids),),
                             num_computed_tokens)


def cached_requests(*rows: tuple[str, Sequence[int] | None, int],
                    resumed: Sequence[str] = ()) -> CachedRequestsStandIn:
    """rows: (request id, newly allocated block ids or None, tokens computed so far)."""
    return CachedRequestsStandIn(
        req_ids=[r[0] for r in rows],
        new_block_ids=[(list(r[1]),) if r[1] is not None else None for r in rows],
        resumed_req_ids=set(resumed), num_computed_tokens=[r[2] for r in rows])


def scheduler_output(new_reqs: Sequence[NewRequestStandIn] = (),
                     cached: CachedRequestsStandIn | None = None,
                     num_scheduled: dict[str, int] | None = None) -> SchedulerOutputStandIn:
    return SchedulerOutputStandIn(list(new_reqs), cached or CachedRequestsStandIn(),
                                  dict(num_scheduled or {}))


def engine_request(request_id: str, num_prompt_tokens: int,
                   kv_transfer_params: dict[str, Any] | None = None) -> EngineRequestStandIn:
    return EngineRequestStandIn(request_id, list(range(num_prompt_tokens)), kv_transfer_params)


def finished_request(request_id: str, num_computed_tokens: int, status: Any,
                     kv_transfer_params: dict[str, Any] | None = None) -> EngineRequestStandIn:
    return EngineRequestStandIn(request_id, [], kv_transfer_params, num_computed_tokens, status)


def allocated_blocks(block_ids: Sequence[int]) -> AllocatedBlocksStandIn:
    return AllocatedBlocksStandIn(list(block_ids))


# ------------------------------------------------------------------ a loopback transport
class LoopbackTransport:
    """Delivers a segment staged on this host by copying it into the consumer's staging
    dir, as a network transport would (the copy is the consumer's, the producer's segment
    is recycled after the "ack"). `fail_next` makes the next fetches raise."""

    name = "loopback"
    is_local = False

    def __init__(self, settings: KVTransferSettings, consumer_id: str):
        self.consumer_id = consumer_id
        self.num_fetched = 0
        self.fail_next = 0

    def fetch(self, desc: TransferDescriptor, dest_dir: Path, timeout_s: float) -> tuple[Path, int]:
        if self.fail_next > 0:
            self.fail_next -= 1
            raise KVTransferError("loopback transport: injected failure")
        src = Path(desc.segment_path)
        try:
            seg = StagingSegment.open(src)
        except KVTransferError as e:
            raise KVTransferError(f"loopback: {e}") from e
        try:
            if not seg.header.is_complete:
                raise KVTransferError(f"loopback: segment {src.name} is not complete")
            nbytes = seg.nbytes
            dest = fetched_path(dest_dir, src.name)
            with open(dest, "wb") as f:
                f.write(seg.buffer())
        finally:
            seg.close()
        copy = StagingSegment.open(dest)
        copy.adopt(None)  # the copy is the consumer's: unlinked once loaded
        copy.close()
        seg = StagingSegment.open(src)
        seg.recycle()  # acked: the producer lets go
        self.num_fetched += 1
        return dest, nbytes

    def close(self) -> None:
        pass



# ------------------------------------------------------------------ a transfer stalled mid-segment
TRANSFER_STALL_SWITCH = "PDSERVE_TEST_TRANSFER_STALL"


def transfer_stall_requested() -> bool:
    """The stall switch is on: `$PDSERVE_TEST_TRANSFER_STALL` names a file that exists."""
    switch = os.environ.get(TRANSFER_STALL_SWITCH)
    return bool(switch) and Path(switch).exists()


class StallingTransport(LoopbackTransport):
    """`LoopbackTransport` that, while `transfer_stall_requested()`, writes the first half
    of the segment into the consumer's copy and then receives nothing more: after
    `timeout_s` without a byte it fails as a network transport does (KVTransferError, the
    partial copy removed, the producer keeps its segment for its lease)."""

    name = "stalling"

    def __init__(self, settings: KVTransferSettings, consumer_id: str):
        super().__init__(settings, consumer_id)
        self.num_stalled = 0

    def fetch(self, desc: TransferDescriptor, dest_dir: Path, timeout_s: float) -> tuple[Path, int]:
        if not transfer_stall_requested():
            return super().fetch(desc, dest_dir, timeout_s)
        src = Path(desc.segment_path)
        dest = fetched_path(dest_dir, src.name)
        seg = StagingSegment.open(src)
        try:
            half = bytes(seg.buffer()[: seg.nbytes // 2])
            with open(dest, "wb") as f:
                f.write(half)
        finally:
            seg.close()
        self.num_stalled += 1
        try:
            time.sleep(timeout_s)  # no byte arrives: the consumer's read deadline passes
            raise KVTransferError(f"stalling: no bytes for {timeout_s} s after "
                                  f"{len(half)} of {len(half) * 2} (segment {src.name})")
        finally:
            dest.unlink(missing_ok=True)
