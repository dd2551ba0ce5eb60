"""What the connector's scheduler half asks its worker half to save or load, per request.

Plain frozen dataclasses, vLLM-free, so the worker half (`worker_side.py`,
`device_connector.py`) runs where vLLM is not installed (the GPU check's machine);
`metadata.PdserveConnectorMetadata` carries lists of them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SaveSpec:
    request_id: str
    segment_path: str
    block_ids: tuple[int, ...]  # all of the request's blocks so far
    first_block: int  # first block whose bytes change this step
    end_token: int  # prompt tokens computed once this step ends
    num_prompt_tokens: int
    host_only: bool = False  # n > 1: staged in a segment, never in a device slab


@dataclass(frozen=True)
class LoadSpec:
    request_id: str
    segment_path: str
    dst_block_ids: tuple[int, ...]  # decode blocks to fill, in prompt order
    first_block: int  # index of dst_block_ids[0] within the segment
    slab: bytes | None = None  # the device path: a msgpack SlabTicket (no segment file then)
    slab_transport: str | None = None  # "cuda_ipc" or "dist"
