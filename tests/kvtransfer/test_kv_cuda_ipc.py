"""CUDA IPC: descriptors are plain msgpack; without CUDA the module imports and refuses
host tensors; on a GPU, a copy from another process's buffer is byte-exact, waits for that
process's writes, and the benchmark reports every size. GPU tests skip without CUDA."""

from __future__ import annotations

from multiprocessing.connection import Connection

import msgspec
import pytest
import torch

from kvtransfer.cuda_ipc import (
    CudaIpcDescriptor,
    LentTensor,
    bench_cuda_ipc,
    copy_from,
    export_tensor,
)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DESC = CudaIpcDescriptor(
    device_index=0, nbytes=1 << 20, buffer_offset=512, mem_handle=bytes(range(64)),
    storage_nbytes=2 << 20, storage_offset=4096, ref_counter_handle=b"/torch_123_456_0",
    ref_counter_offset=3, event_handle=bytes(64), is_event_sync_required=True)


def test_descriptor_crosses_processes_as_plain_msgpack():
    raw = msgspec.msgpack.encode(DESC)
    assert msgspec.msgpack.decode(raw, type=CudaIpcDescriptor) == DESC
    fields = msgspec.msgpack.decode(raw)  # untyped: only ints, bytes and bools, no objects
    assert {type(v) for v in fields.values()} <= {int, bytes, bool}


def test_host_tensors_are_refused_before_any_cuda_call():
    host = torch.zeros(DESC.nbytes, dtype=torch.uint8)
    with pytest.raises(ValueError, match="uint8 CUDA tensor"):
        export_tensor(host)
    with pytest.raises(ValueError, match="uint8 CUDA tensor"):
        copy_from(DESC, host)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_bench_says_it_needs_cuda():
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        bench_cuda_ipc([64 << 10])


# -- on a GPU ----------------------------------------------------------------------------
NBYTES = 16 << 20


def _pattern(nbytes: int, device: str = "cpu") -> torch.Tensor:
    return (torch.arange(nbytes, dtype=torch.int64, device=device) * 7 % 251).to(torch.uint8)


def _late_writer(conn: Connection, nbytes: int) -> None:
    """Producer process: its write lands only after a long kernel, and it lends the buffer
    without synchronizing, so only the IPC event orders the consumer's copy after it."""
    torch.cuda.set_device(0)
    buf = torch.zeros(nbytes, dtype=torch.uint8, device="cuda")
    torch.cuda._sleep(1 << 29)  # ~0.3 s of GPU time on the current stream
    buf.copy_(_pattern(nbytes, "cuda"))
    lent = LentTensor(buf)
    conn.send_bytes(msgspec.msgpack.encode(lent.descriptor))
    assert conn.recv_bytes() == b"ack"
    lent.release()
    conn.send_bytes(b"released")


@pytest.mark.gpu
@requires_cuda
def test_copy_from_another_process_is_byte_exact_and_waits_for_its_writes():
    ctx = torch.multiprocessing.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    producer = ctx.Process(target=_late_writer, args=(child_conn, NBYTES), daemon=True)
    producer.start()
    try:
        assert conn.poll(120), "the producer lent nothing"
        desc = msgspec.msgpack.decode(conn.recv_bytes(), type=CudaIpcDescriptor)
        assert desc.nbytes == NBYTES
        out = torch.zeros(NBYTES, dtype=torch.uint8, device="cuda")
        copy_from(desc, out)
        conn.send_bytes(b"ack")
        assert torch.equal(out.cpu(), _pattern(NBYTES))
        assert conn.poll(60) and conn.recv_bytes() == b"released"
    finally:
        producer.join(timeout=30)
        if producer.is_alive():
            producer.terminate()
    assert producer.exitcode == 0


@pytest.mark.gpu
@requires_cuda
def test_bench_reports_every_size():
    sizes = [64 << 10, 1 << 20]
    rows = bench_cuda_ipc(sizes, iters=3, trials=2)
    assert [r["size_bytes"] for r in rows] == sizes
    assert all(r["d2d_gbps"] > 0 and r["ipc_gbps"] > 0 and r["ipc_open_ms"] >= 0 for r in rows)
