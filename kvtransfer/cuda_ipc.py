"""CUDA IPC: lend a GPU buffer to another process on the same host, with no copy through host memory.

Status: written against torch 2.13's CUDA IPC (the calls `torch.multiprocessing` makes to
pass CUDA tensors between processes), but **not yet run on a GPU**: its GPU tests skip
without CUDA. The device path lends arena slabs with it (`device_transfer.py`); on the
host staging path `transport: cuda_ipc` fails at start-up saying why (`make_transport`).

One lent buffer (a 1-d uint8 CUDA tensor), one borrower::

    producer                                         consumer
    write the buffer (on its current stream)
    lent = LentTensor(buf) ──descriptor (msgpack)──▶ copy_from(desc, out):
                                                        open: the current stream waits for the
                                                              producer's writes (CUDA event)
                                                        out.copy_(shared)   device to device
                                                        synchronize, unmap, give torch's
                                                        borrower count back
                           ◀──ack (caller's channel)──
    lent.release()   the buffer is the producer's again (reuse or free it)

Ownership. From `LentTensor(buf)` until the consumer's ack the producer neither writes nor
frees the buffer. A descriptor is opened exactly once: torch counts one borrower per
export, and each open gives one back when it closes, so a second open would let the
producer's allocator reuse the memory under the first. A consumer that never opens a
descriptor leaves the block allocated (torch's "limbo") until the producer exits.

Ordering. Exporting records a CUDA event on the producer's current stream (inside
`_share_cuda_`; past torch's cap on interprocess events it synchronizes that stream
instead), and opening makes the consumer's current stream wait for that event. The
consumer's copy, issued on that same stream, therefore starts after every write the
producer had issued on its current stream before exporting. Writes issued on another
stream: pass it as `LentTensor(buf, stream=...)`.

Constraints: the same host (the descriptor names a CUDA IPC handle and torch's shared-memory
ref-counter file, both host-local), the same device index in both processes (the same
CUDA_VISIBLE_DEVICES), and the consumer copies into a tensor on that device.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator, Sequence
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, NoReturn

import msgspec
import torch

from cluster.wire import KVTransferError

if TYPE_CHECKING:  # typing only: the GPU harness runs where pydantic may be missing
    from cluster.config import KVTransferSettings

DEFAULT_BENCH_SIZES = tuple(64 << 10 << (2 * i) for i in range(7))  # 64 KiB .. 256 MiB, x4


class CudaIpcDescriptor(msgspec.Struct, frozen=True):
    """A producer's CUDA uint8 buffer as another process on this host opens it: what torch's
    `UntypedStorage._share_cuda_()` returns for the buffer's storage, plus the buffer's place
    in that storage."""

    device_index: int
    nbytes: int  # the buffer
    buffer_offset: int  # where the buffer starts in the storage, bytes
    mem_handle: bytes  # cudaIpcMemHandle_t of the cudaMalloc block holding the storage
    storage_nbytes: int
    storage_offset: int  # where the storage starts in that block, bytes
    ref_counter_handle: bytes  # torch's shared-memory file counting the storage's borrowers
    ref_counter_offset: int
    event_handle: bytes  # cudaIpcEventHandle_t recorded after the producer's writes
    is_event_sync_required: bool  # False: torch synchronized the producer's stream instead


def _check_buffer(t: torch.Tensor, what: str) -> None:
    if t.device.type != "cuda" or t.dtype != torch.uint8 or t.dim() != 1 or not t.is_contiguous():
        raise ValueError(f"{what} must be a contiguous 1-d uint8 CUDA tensor, got "
                         f"{t.dtype} {tuple(t.shape)} on {t.device}")
    if t.numel() == 0:
        raise ValueError(f"{what} is empty")


# ----------------------------------------------------------------------------- producer
def export_tensor(buf: torch.Tensor, stream: torch.cuda.Stream | None = None) -> CudaIpcDescriptor:
    """Describe `buf` for one consumer process. Call after its writes were issued on the
    current stream (or on `stream`); the consumer's reads wait for them."""
    _check_buffer(buf, "buf")
    if stream is not None:  # the event torch records below must also cover `stream`'s writes
        torch.cuda.current_stream(buf.device).wait_stream(stream)
    with torch.cuda.device(buf.device):
        (device_index, mem_handle, storage_nbytes, storage_offset, ref_counter_handle,
         ref_counter_offset, event_handle, event_sync_required) = buf.untyped_storage()._share_cuda_()
    return CudaIpcDescriptor(
        device_index=device_index, nbytes=buf.numel(), buffer_offset=buf.storage_offset(),
        mem_handle=mem_handle, storage_nbytes=storage_nbytes, storage_offset=storage_offset,
        ref_counter_handle=ref_counter_handle, ref_counter_offset=ref_counter_offset,
        event_handle=event_handle, is_event_sync_required=bool(event_sync_required))


class LentTensor:
    """A producer's buffer lent to one consumer: `descriptor` goes to it; `release` after
    its ack."""

    def __init__(self, buf: torch.Tensor, stream: torch.cuda.Stream | None = None):
        self.descriptor = export_tensor(buf, stream)
        self._buf: torch.Tensor | None = buf  # keeps the block ours until the ack

    def release(self) -> None:
        """The consumer acked: drop our hold and let torch free blocks whose borrowers are
        all done (the caller may still use its own reference to the buffer)."""
        self._buf = None
        torch.cuda.ipc_collect()


# ----------------------------------------------------------------------------- consumer
def _open(desc: CudaIpcDescriptor) -> torch.Tensor:
    """Map the producer's buffer: [nbytes] uint8 on cuda:device_index. The current stream
    waits for the producer's event. The caller drops the tensor to unmap it."""
    if desc.nbytes <= 0 or desc.buffer_offset < 0 or desc.buffer_offset + desc.nbytes > desc.storage_nbytes:
        raise ValueError(f"descriptor of {desc.nbytes} bytes at {desc.buffer_offset} does not fit "
                         f"its {desc.storage_nbytes}-byte storage")
    torch.cuda.init()
    storage = torch.UntypedStorage._new_shared_cuda(
        desc.device_index, desc.mem_handle, desc.storage_nbytes, desc.storage_offset,
        desc.ref_counter_handle, desc.ref_counter_offset, desc.event_handle,
        desc.is_event_sync_required)
    device = torch.device("cuda", desc.device_index)
    return torch.empty(0, dtype=torch.uint8, device=device).set_(
        storage, desc.buffer_offset, (desc.nbytes,), (1,))


def copy_from(desc: CudaIpcDescriptor, out: torch.Tensor) -> None:
    """Copy the lent buffer into `out` (this process's [nbytes] uint8 tensor on the same
    device), device to device. Returns once the copy has finished and the mapping is
    released; then the consumer may ack."""
    _check_buffer(out, "out")
    if out.numel() != desc.nbytes or out.device.index != desc.device_index:
        raise ValueError(f"out is {out.numel()} bytes on {out.device}; the descriptor is "
                         f"{desc.nbytes} bytes on cuda:{desc.device_index}")
    with torch.cuda.device(out.device):
        shared = _open(desc)  # [nbytes]; the current stream now waits for the producer's writes
        try:
            out.copy_(shared)  # on that same stream, so after the wait
        finally:
            # Finished before unmapping and before torch tells the producer we are done.
            torch.cuda.current_stream().synchronize()
            del shared  # the only reference: unmaps and gives the borrower count back


@contextlib.contextmanager
def open_lent(desc: CudaIpcDescriptor) -> Iterator[torch.Tensor]:
    """Map the lent buffer for the duration of the block ([nbytes] uint8 on its device), for
    a consumer that reads it in place (e.g. scatters heads out of it) instead of copying it
    whole. On exit the current stream is synchronized and the mapping released; then the
    consumer may ack. Opens the descriptor, so it may be used once (see the module doc)."""
    with torch.cuda.device(desc.device_index):
        shared = _open(desc)  # the current stream now waits for the producer's writes
        try:
            yield shared
        finally:
            torch.cuda.current_stream().synchronize()
            del shared


def make_transport(settings: KVTransferSettings, consumer_id: str) -> NoReturn:
    """The registry's factory for `cuda_ipc` on the host path: refused, because host staging
    has no device buffer to lend. The device path lends arena slabs directly
    (`device_transfer.lend_over_ipc` / `load_from_ipc`), which the vLLM connector does not
    drive yet (docs/kvtransfer.md, "GPU data path")."""
    raise KVTransferError(
        "transport 'cuda_ipc' is not selectable yet (host staging path): the connector "
        "stages KV in /dev/shm segments, so there is no GPU buffer to lend. The device path "
        "(kvtransfer/device_staging.py, device_transfer.py) lends device arena slabs; the vLLM "
        "connector does not drive it yet. Use shm, tcp or dist.")


# ----------------------------------------------------------------------------- benchmark
class _Lend(msgspec.Struct, frozen=True, tag="lend"):
    nbytes: int


class _Returned(msgspec.Struct, frozen=True, tag="returned"):
    pass


class _Stop(msgspec.Struct, frozen=True, tag="stop"):
    pass


def _fill_value(nbytes: int) -> int:
    return 1 + nbytes % 251  # nonzero and per size: a stale or unwritten buffer shows


def _bench_producer(conn: Connection, device_index: int) -> None:
    """The bench's other process: lends a freshly written buffer of each size asked for."""
    device = torch.device("cuda", device_index)
    torch.cuda.set_device(device)
    decoder = msgspec.msgpack.Decoder(_Lend | _Returned | _Stop)
    lent: LentTensor | None = None
    while True:
        msg = decoder.decode(conn.recv_bytes())
        if isinstance(msg, _Lend):
            buf = torch.full((msg.nbytes,), _fill_value(msg.nbytes), dtype=torch.uint8, device=device)
            lent = LentTensor(buf)  # after the fill was issued on the current stream
            del buf
            conn.send_bytes(msgspec.msgpack.encode(lent.descriptor))
        elif isinstance(msg, _Returned) and lent is not None:
            lent.release()
            lent = None
        elif isinstance(msg, _Stop):
            return


def _seconds_per_copy(src: torch.Tensor, out: torch.Tensor, iters: int, trials: int) -> float:
    """Median over `trials` batches of `iters` back-to-back copies, timed with CUDA events."""
    out.copy_(src)  # warm-up
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            out.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / iters)
    return statistics.median(times)


def bench_cuda_ipc(sizes: Sequence[int] = DEFAULT_BENCH_SIZES, iters: int = 20, trials: int = 5,
                   device_index: int = 0, timeout_s: float = 120.0) -> list[dict[str, float]]:
    """Bandwidth of a device-to-device copy of each size: within one process, and from
    another process's buffer through CUDA IPC. One row per size, keys:

    size_bytes; d2d_gbps (same process); ipc_gbps (from the lent buffer, mapping reused
    across copies); ipc_open_ms (opening the descriptor: map the block, wait for the
    producer's event); ipc_x_d2d (ipc_gbps / d2d_gbps).

    GB/s = bytes copied / s / 1e9. The producer is a spawned child process; descriptors and
    acks cross a pipe as msgpack bytes. Raises RuntimeError without CUDA, or when the IPC
    copy delivers other bytes than the producer wrote.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("bench_cuda_ipc needs a CUDA device")
    ctx = torch.multiprocessing.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    producer = ctx.Process(target=_bench_producer, args=(child_conn, device_index), daemon=True)
    producer.start()
    child_conn.close()
    device = torch.device("cuda", device_index)
    rows: list[dict[str, float]] = []
    try:
        with torch.cuda.device(device):
            for nbytes in sizes:
                local = torch.full((nbytes,), 7, dtype=torch.uint8, device=device)
                out = torch.empty(nbytes, dtype=torch.uint8, device=device)
                d2d_s = _seconds_per_copy(local, out, iters, trials)
                del local
                conn.send_bytes(msgspec.msgpack.encode(_Lend(nbytes=nbytes)))
                if not conn.poll(timeout_s):
                    raise RuntimeError(f"the producer process did not lend {nbytes} bytes")
                desc = msgspec.msgpack.decode(conn.recv_bytes(), type=CudaIpcDescriptor)
                started = time.perf_counter()
                shared = _open(desc)  # [nbytes]
                torch.cuda.current_stream().synchronize()
                open_s = time.perf_counter() - started
                try:
                    ipc_s = _seconds_per_copy(shared, out, iters, trials)
                finally:
                    torch.cuda.current_stream().synchronize()
                    del shared
                conn.send_bytes(msgspec.msgpack.encode(_Returned()))
                if not bool((out == _fill_value(nbytes)).all()):
                    raise RuntimeError(f"cuda_ipc copy of {nbytes} bytes delivered wrong bytes")
                rows.append({"size_bytes": nbytes, "d2d_gbps": nbytes / d2d_s / 1e9,
                             "ipc_gbps": nbytes / ipc_s / 1e9, "ipc_open_ms": open_s * 1e3,
                             "ipc_x_d2d": d2d_s / ipc_s})
    finally:
        try:
            conn.send_bytes(msgspec.msgpack.encode(_Stop()))
        except OSError:
            pass  # the producer is gone already
        producer.join(timeout=10)
        if producer.is_alive():
            producer.terminate()
        conn.close()
    return rows
