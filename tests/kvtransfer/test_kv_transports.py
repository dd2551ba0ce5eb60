"""KV transports behind the lazy registry: what gets imported when, how a transport is chosen
per (prefill, decode) pair, and byte-exact delivery over shm, tcp and dist (gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path

import msgspec
import pytest
from pydantic import ValidationError

from cluster.config import KVTransferSettings
from cluster.wire import KVHandle, KVTransferError
from kvtransfer.connector import PARAM_NUM_TOKENS, PARAM_SEGMENT
from kvtransfer.handle import (
    TransferDescriptor,
    decode_handle,
    encode_handle,
    local_node_id,
)
from kvtransfer.service import ConsumerService, ProducerService
from kvtransfer.staging import HEADER_BYTES, StagingSegment, segment_nbytes
from kvtransfer.transport import DistFetchTransport, TransportRegistry, get_transport
from tests.kvtransfer.conftest import wait_until

ROOT = Path(__file__).resolve().parents[2]
OTHER_NODE = "another-host/0000-boot"


# -- the registry ------------------------------------------------------------------------
def test_importing_the_registry_imports_no_backend_until_one_is_used():
    """kvtransfer.transport pulls in neither torch nor a backend module; the cuda_ipc
    module is imported by the first lookup of its name, and dist's by its first fetch."""
    code = textwrap.dedent("""
        import sys
        import kvtransfer.transport as t
        print(sorted(m for m in ("torch", "kvtransfer.dist", "kvtransfer.cuda_ipc") if m in sys.modules))
        t.get_transport("dist")
        print("kvtransfer.dist" in sys.modules)
        t.get_transport("cuda_ipc")
        print("kvtransfer.cuda_ipc" in sys.modules)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:3] == ["[]", "False", "True"]


def test_unknown_transport_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown KV transport 'pigeon'; known: cuda_ipc, "
                                         r"dist, shm, tcp"):
        get_transport("pigeon")


def test_registration_checks_targets_and_refuses_silent_overrides():
    registry = TransportRegistry({"shm": "kvtransfer.transport:ShmTransport"})
    with pytest.raises(ValueError, match="package.module:factory"):
        registry.register("rdma", "kvtransfer.rdma.RdmaTransport")  # no ":"
    with pytest.raises(ValueError, match="already registered"):
        registry.register("shm", "kvtransfer.transport:TcpTransport")
    registry.register("shm", "kvtransfer.transport:TcpTransport", replace=True)
    assert registry.get("shm") is get_transport("tcp")
    registry.register("broken", "no_such_module_for_pdserve:Transport")
    with pytest.raises(ImportError, match="KV transport 'broken': cannot load"):
        registry.get("broken")


PLUGIN = '''
from pathlib import Path

FETCHES = []  # (transport name, segment path) per fetch, in order


class _Fake:
    is_local = False

    def __init__(self, settings, consumer_id):
        self.consumer_id = consumer_id

    def fetch(self, desc, dest_dir, timeout_s):
        FETCHES.append((self.name, desc.segment_path))
        return Path(desc.segment_path), 123

    def close(self):
        pass


class FakeShm(_Fake):
    name = "shm"
    is_local = True


class FakeTcp(_Fake):
    name = "tcp"
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """A plug-in module on sys.path, not yet imported: fakes that record their fetches."""
    name = f"pdserve_fake_transports_{os.getpid()}"
    plugin_dir = tmp_path / "plugins"
    plugin_dir.mkdir()
    (plugin_dir / f"{name}.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(plugin_dir))
    yield name
    sys.modules.pop(name, None)


def test_a_plugin_is_imported_on_first_use(plugin):
    registry = TransportRegistry()
    registry.register("loopback", f"{plugin}:FakeTcp")
    assert plugin not in sys.modules
    factory = registry.get("loopback")
    assert plugin in sys.modules and factory is sys.modules[plugin].FakeTcp
    assert registry.get("loopback") is factory
    assert "loopback" in registry.names()


def _handle(segment_path: str, node_id: str) -> KVHandle:
    return encode_handle(TransferDescriptor(
        segment_path=segment_path, num_tokens=40, node_id=node_id, tcp_host="127.0.0.1",
        tcp_port=1, producer_id="prefill-9", producer_epoch="e0"))


@pytest.mark.parametrize(("setting", "expected_local", "expected_remote"), [
    ("auto", "shm", "tcp"),  # by node id, per handle
    ("tcp", "tcp", "tcp"),  # explicit names force a transport, whatever the node ids say
    ("shm", "shm", "shm"),
])
def test_transport_is_chosen_per_handle(plugin, tmp_path, setting, expected_local, expected_remote):
    registry = TransportRegistry({"shm": f"{plugin}:FakeShm", "tcp": f"{plugin}:FakeTcp"})
    consumer = ConsumerService(KVTransferSettings(transport=setting, staging_dir=tmp_path),
                               transports=registry)
    same_host, other_host = _handle("/seg/a", local_node_id()), _handle("/seg/b", OTHER_NODE)

    assert consumer.transport_for(same_host) == expected_local
    assert consumer.transport_for(other_host) == expected_remote
    a, b = consumer.materialize(same_host), consumer.materialize(other_host)

    assert sys.modules[plugin].FETCHES == [(expected_local, "/seg/a"), (expected_remote, "/seg/b")]
    assert (a.stat.transport, b.stat.transport) == (expected_local, expected_remote)
    assert a.stat.num_bytes == 123 and a.kv_transfer_params == {PARAM_SEGMENT: "/seg/a",
                                                                PARAM_NUM_TOKENS: 40}


def test_a_local_transport_failing_on_another_nodes_handle_says_why(tmp_path):
    consumer = ConsumerService(KVTransferSettings(transport="shm", staging_dir=tmp_path))
    with pytest.raises(KVTransferError, match=f"comes from node {OTHER_NODE}"):
        consumer.materialize(_handle(str(tmp_path / "pdserve-kv-gone"), OTHER_NODE))


def test_cuda_ipc_is_registered_but_not_selectable_yet(tmp_path):
    with pytest.raises(KVTransferError, match="'cuda_ipc' is not selectable yet"):
        ConsumerService(KVTransferSettings(transport="cuda_ipc", staging_dir=tmp_path))


def test_dist_needs_a_rendezvous_store():
    with pytest.raises(ValidationError, match="transport 'dist' needs dist_store_host"):
        KVTransferSettings(transport="dist")
    with pytest.raises(ValidationError, match="together"):
        KVTransferSettings(dist_store_host="127.0.0.1")
    with pytest.raises(KVTransferError, match="needs kv_transfer.dist_store_host"):
        DistFetchTransport(KVTransferSettings(), "d0")  # direct use, past the config check


# -- delivery through the registry -------------------------------------------------------
def _stage(producer: ProducerService, make_segment, request_id: str, slack_bytes: int = 0
           ) -> tuple[KVHandle, bytes]:
    """Stage a segment; with `slack_bytes`, its file is that much larger than the segment
    (as a recycled pool file is). Returns the handle and the segment's bytes."""
    path, _ = make_segment(request_id, engine_id=producer.engine_id, staging_dir=producer.staging_dir)
    segment = path.read_bytes()
    if slack_bytes:
        os.truncate(path, len(segment) + slack_bytes)
    handle = producer.handle_for({PARAM_SEGMENT: str(path), PARAM_NUM_TOKENS: 40})
    assert handle is not None
    return handle, segment


def _segment_bytes(path: Path) -> bytes:
    """The segment's layout and payload: what must arrive unchanged (the header's pool
    field names where the file goes back to, which differs per side)."""
    seg = StagingSegment.open(path)
    try:
        assert seg.header.is_complete
        return msgspec.msgpack.encode(seg.header.layout) + bytes(seg.buffer()[HEADER_BYTES:])
    finally:
        seg.close()


@pytest.mark.parametrize("name", ["shm", "tcp"])
@pytest.mark.parametrize("slack_bytes", [0, 64 << 10])
def test_shm_and_tcp_deliver_the_segment_byte_exact(producer, make_segment, tmp_path, name,
                                                    slack_bytes):
    handle, segment = _stage(producer, make_segment, "r1", slack_bytes)
    inbox = tmp_path / "consumer"
    inbox.mkdir()
    transport = get_transport(name)(KVTransferSettings(staging_dir=inbox), "decode-0")

    path, nbytes = transport.fetch(decode_handle(handle), inbox, 5.0)

    seg = StagingSegment.open(path)
    layout = seg.header.layout
    seg.close()
    assert nbytes == len(segment) == segment_nbytes(layout)  # the header's count, not the file's
    assert path.stat().st_size > nbytes or not slack_bytes or name == "tcp"
    assert _segment_bytes(path) == _layout_and_payload(segment)
    assert path.parent == (producer.staging_dir if name == "shm" else inbox)
    if name == "tcp":
        # Received into a file of this consumer's own pool, which the load gives it back to.
        pool_dir = Path(StagingSegment.open(path).header.pool_dir)
        assert pool_dir.parent == inbox and pool_dir.is_dir()


def _layout_and_payload(segment: bytes) -> bytes:
    header = StagingSegment._read_header(segment[:HEADER_BYTES], Path("staged"))
    return msgspec.msgpack.encode(header.layout) + segment[HEADER_BYTES:]


# -- dist over gloo, both services in this process ------------------------------------------
@pytest.fixture
def rendezvous():
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                     timeout=timedelta(seconds=30))
    yield {"dist_store_host": "127.0.0.1", "dist_store_port": store.port}


def test_dist_delivers_segments_and_refusals_through_the_services(rendezvous, make_segment,
                                                                   tmp_path):
    staging, inbox = tmp_path / "producer", tmp_path / "consumer"
    staging.mkdir()
    inbox.mkdir()
    producer = ProducerService("prefill-0", KVTransferSettings(
        staging_dir=staging, connect_timeout_s=10, **rendezvous), "127.0.0.1")
    consumer = ConsumerService(KVTransferSettings(
        transport="dist", staging_dir=inbox, connect_timeout_s=10, **rendezvous), "decode-0")
    try:
        for request_id in ("r1", "r2"):  # the second reuses the pair's group
            handle, segment = _stage(producer, make_segment, request_id)
            kv = consumer.materialize(handle)
            local = Path(kv.kv_transfer_params[PARAM_SEGMENT])
            assert local.parent == inbox and _segment_bytes(local) == _layout_and_payload(segment)
            assert kv.stat.transport == "dist" and kv.stat.num_bytes == len(segment)
            assert wait_until(lambda: producer.num_staged() == 0)  # acked: producer let go

        handle, _ = _stage(producer, make_segment, "r3")
        producer.release(handle)
        with pytest.raises(KVTransferError, match="refused"):
            consumer.materialize(handle)
        assert not [p.name for p in inbox.iterdir() if "r3" in p.name]  # no partial copy

        handle, segment = _stage(producer, make_segment, "r4")  # the group survived the refusal
        kv = consumer.materialize(handle)
        assert (_segment_bytes(Path(kv.kv_transfer_params[PARAM_SEGMENT]))
                == _layout_and_payload(segment))
    finally:
        consumer.close()
        producer.close()

