"""Authenticated KV channels: no segment byte reaches a peer that cannot prove the
deployment secret, on the TCP transport and the dist transport; refusals are counted;
the secret is resolved config > environment > generated, and never logged or printed."""

from __future__ import annotations

import logging
import os
import queue
import socket
import stat
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import msgspec
import pytest
import torch
from torch.distributed import HashStore

from cluster import auth
from cluster.config import ConfigError, KVTransferSettings, dump_config, load_config
from cluster.wire import KVTransferError
from kvtransfer import auth as kv_auth
from kvtransfer.dist import DistTransport
from kvtransfer.staging import StagingSegment, list_segments
from kvtransfer.tcp import FetchRequest, TransferServer, fetch_segment
from tests.kvtransfer.conftest import wait_until

EPOCH = "epoch-auth"
SECRET = b"the-deployment-secret-0123456789"
OTHER = b"a-different-secret-9876543210abc"


@pytest.fixture
def server(tmp_path):
    producer_dir = tmp_path / "producer"
    producer_dir.mkdir()
    srv = TransferServer(producer_dir, EPOCH, host="127.0.0.1", timeout_s=1.0,
                         secret=SECRET).start()
    yield srv
    srv.close()


@pytest.fixture
def consumer_dir(tmp_path) -> Path:
    path = tmp_path / "consumer"
    path.mkdir()
    return path


def _listening_addresses(port: int) -> list[str]:
    """Local addresses listening on `port` (ss's fourth column: `*:port` is every interface)."""
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True,
                         check=True).stdout
    return [line.split()[3] for line in out.splitlines() if line.strip()]


# -- tcp -------------------------------------------------------------------------------------
def test_tcp_fetch_with_the_secret_works_and_a_wrong_key_gets_nothing(
        server, consumer_dir, make_segment, caplog):
    src, payload = make_segment("r1", staging_dir=server.staging_dir)
    before = kv_auth.REFUSALS.total()
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(KVTransferError, match="authentication failed.*refused our credentials"):
            fetch_segment("127.0.0.1", server.port, src.name, EPOCH, consumer_dir, 5.0,
                          secret=OTHER)
    assert server.refusals.counts == {"tcp": 1}
    assert kv_auth.REFUSALS.total() == before + 1  # the process-wide count too
    assert src.exists() and server.num_served == 0  # the producer still owns its KV
    assert list(consumer_dir.iterdir()) == []
    text = caplog.text
    assert "refused an unauthenticated KV tcp peer 127.0.0.1" in text
    assert SECRET.decode() not in text and OTHER.decode() not in text

    dest, nbytes = fetch_segment("127.0.0.1", server.port, src.name, EPOCH, consumer_dir, 5.0,
                                 secret=SECRET)
    seg = StagingSegment.open(dest)
    assert seg.nbytes == nbytes and seg.header.is_complete
    seg.close()
    assert wait_until(lambda: server.num_served == 1)


def test_a_refusal_is_counted_before_the_refused_client_hears_of_it(
        server, consumer_dir, make_segment, monkeypatch):
    """The count and the refusal race otherwise: a client (or test) reading the count
    right after its refusal found 0 (seen once in CI)."""
    src, _ = make_segment("r1", staging_dir=server.staging_dir)
    add = server.refusals.add

    def slow_add(*args):
        threading.Event().wait(0.3)  # a server thread descheduled while it counts
        add(*args)
    monkeypatch.setattr(server.refusals, "add", slow_add)
    with pytest.raises(KVTransferError, match="refused our credentials"):
        fetch_segment("127.0.0.1", server.port, src.name, EPOCH, consumer_dir, 5.0,
                      secret=OTHER)
    assert server.refusals.counts == {"tcp": 1}


def test_tcp_client_without_the_handshake_gets_no_segment_byte(server, make_segment):
    """The pre-authentication protocol (a bare fetch request) is refused before the server
    even reads the request: all the client ever receives is the challenge and DENIED."""
    src, payload = make_segment("r1", staging_dir=server.staging_dir)
    received = bytearray()
    request = msgspec.msgpack.encode(FetchRequest(segment_name=src.name, producer_epoch=EPOCH))
    frame = len(request).to_bytes(4, "little") + request
    assert len(frame) <= auth.RESPONSE_BYTES
    with socket.create_connection(("127.0.0.1", server.port), timeout=5.0) as sock:
        # The old protocol's request, padded to the size of a response, so the server reads
        # all we sent (it closes cleanly rather than resetting unread data).
        sock.sendall(frame.ljust(auth.RESPONSE_BYTES, b"\0"))
        while chunk := sock.recv(65536):
            received += chunk
    assert bytes(received[:len(auth.MAGIC)]) == auth.MAGIC
    assert len(received) == auth.CHALLENGE_BYTES + auth.VERDICT_BYTES
    assert bytes(received[auth.CHALLENGE_BYTES:]) == auth.DENIED_VERDICT
    assert payload[:64] not in bytes(received)
    assert wait_until(lambda: server.refusals.counts.get("tcp") == 1)
    assert src.exists()


def test_tcp_client_that_never_authenticates_is_dropped_within_the_timeout(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=5.0) as sock:
        assert sock.recv(auth.CHALLENGE_BYTES).startswith(auth.MAGIC)
        assert wait_until(lambda: server.refusals.counts.get("tcp") == 1, timeout_s=5.0)
        assert sock.recv(1) == b""  # the server closed its end
    assert server.num_active == 0


def test_tcp_client_refuses_a_rogue_server_before_sending_its_request(consumer_dir):
    """A listener that does not know the secret (it answers ACCEPTED with a made-up proof)
    never learns which segment the client wanted, and the client keeps no file."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    seen = bytearray()

    def rogue() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(auth.challenge())
            seen.extend(conn.recv(auth.RESPONSE_BYTES))
            conn.sendall(auth.ACCEPTED + os.urandom(auth.MAC_BYTES))
            conn.settimeout(2.0)
            try:
                while chunk := conn.recv(65536):
                    seen.extend(chunk)
            except OSError:
                pass

    thread = threading.Thread(target=rogue)
    thread.start()
    try:
        with pytest.raises(KVTransferError, match="failed to prove the deployment secret"):
            fetch_segment("127.0.0.1", port, "pdserve-kv-p0-r1", EPOCH, consumer_dir, 5.0,
                          secret=SECRET)
    finally:
        thread.join()
        listener.close()
    assert len(seen) == auth.RESPONSE_BYTES  # only the proof: no fetch request followed
    assert b"pdserve-kv-p0-r1" not in bytes(seen)
    assert list(consumer_dir.iterdir()) == []


def test_proofs_are_bound_to_their_nonces_and_channel():
    frame = auth.challenge()
    response, expected = auth.respond(SECRET, b"chan-a", frame)
    verdict = auth.judge(SECRET, b"chan-a", frame, response)
    assert verdict is not None
    auth.check_verdict(verdict, expected)
    assert auth.judge(SECRET, b"chan-b", frame, response) is None  # another channel's proof
    assert auth.judge(SECRET, b"chan-a", auth.challenge(), response) is None  # a replay
    assert auth.judge(OTHER, b"chan-a", frame, response) is None
    with pytest.raises(auth.AuthError):
        auth.respond(SECRET, b"chan-a", b"HTTP/1.1 400 Bad Request\r\n" + bytes(14))


# -- dist ------------------------------------------------------------------------------------
class _Work:
    def wait(self) -> None:
        pass


class QueueGroup:
    """A two-rank 'process group' over in-memory queues: exercises DistTransport's framing
    and handshake without gloo (the gloo path runs in test_kv_dist with real processes)."""

    def __init__(self, links: dict[int, queue.Queue], rank: int):
        self.links, self.rank = links, rank

    def send(self, tensors, peer, tag):
        self.links[peer].put(tensors[0].clone())
        return _Work()

    def recv(self, tensors, peer, tag):
        got = self.links[self.rank].get(timeout=5)
        tensors[0].copy_(got[: tensors[0].numel()])
        return _Work()

    def shutdown(self) -> None:
        pass


def _pair(secret_prefill: bytes, secret_decode: bytes):
    store = HashStore()
    store.set_timeout(timedelta(seconds=5))
    links = {0: queue.Queue(), 1: queue.Queue()}
    factory = lambda _store, rank, _size, _timeout: QueueGroup(links, rank)  # noqa: E731
    prefill = DistTransport("p0", "prefill", store, group_factory=factory, timeout_s=5,
                            secret=secret_prefill)
    decode = DistTransport("d0", "decode", store, group_factory=factory, timeout_s=5,
                           secret=secret_decode)
    return prefill, decode


def _transfer(prefill: DistTransport, decode: DistTransport, src: Path, dest: Path):
    errors: dict[str, Exception] = {}

    def run(name, fn):
        try:
            fn()
        except Exception as e:  # collected and checked by the test
            errors[name] = e

    threads = [threading.Thread(target=run, args=("prefill", lambda: prefill.send_segment("d0", "t1", src))),
               threading.Thread(target=run, args=("decode", lambda: decode.recv_segment("p0", "t1", dest)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return errors


def test_dist_segment_moves_only_after_both_ends_prove_the_secret(tmp_path, make_segment):
    src, payload = make_segment("r1")
    prefill, decode = _pair(SECRET, SECRET)
    assert _transfer(prefill, decode, src, tmp_path / "copy") == {}
    assert (tmp_path / "copy").exists() and not src.exists()


def test_dist_decode_with_a_wrong_key_is_refused_and_counted(tmp_path, make_segment):
    src, payload = make_segment("r1")
    prefill, decode = _pair(SECRET, OTHER)
    before = kv_auth.REFUSALS.counts.get("dist", 0)
    errors = _transfer(prefill, decode, src, tmp_path / "copy")
    assert "authentication failed" in str(errors["prefill"])
    assert "refused our credentials" in str(errors["decode"])
    assert kv_auth.REFUSALS.counts.get("dist", 0) == before + 1
    assert src.exists() and not (tmp_path / "copy").exists()


def test_dist_decode_refuses_a_prefill_with_a_wrong_key(tmp_path, make_segment):
    src, payload = make_segment("r1")
    prefill, decode = _pair(OTHER, SECRET)
    errors = _transfer(prefill, decode, src, tmp_path / "copy")
    assert errors and "decode" in errors
    assert not (tmp_path / "copy").exists()


def test_dist_responder_drops_forged_and_replayed_fetch_requests(tmp_path):
    """The store is open to anyone who reaches it: an unsigned, wrongly signed or replayed
    request never reaches a sender thread."""
    from kvtransfer.dist_channel import DistFetchRequest, DistResponder, _queue_key, connect_store, host_store

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = KVTransferSettings(dist_store_host="127.0.0.1", dist_store_port=port,
                                  connect_timeout_s=0.5, secret=SECRET.decode())
    store = host_store(settings, "127.0.0.1", 5.0)
    responder = DistResponder(settings, "p0-e1", tmp_path)
    try:
        client = connect_store(settings, 5.0)
        name = "pdserve-kv-p0-e1-r1"
        forged = [DistFetchRequest(name, "d0", "t1"),
                  DistFetchRequest(name, "d0", "t2", mac=kv_auth.sign_request(OTHER, name, "d0", "t2")),
                  DistFetchRequest(name, "d0", "t3", mac=kv_auth.sign_request(SECRET, name, "d0", "t9"))]
        signed = DistFetchRequest(name, "d0", "t4", mac=kv_auth.sign_request(SECRET, name, "d0", "t4"))
        for msg in forged + [signed, signed]:
            client.queue_push(_queue_key("p0-e1"), msgspec.msgpack.encode(msg))
        assert wait_until(lambda: responder.num_refused == 4)  # three forged, one replay
        # The one genuine request was tried (its decode never came: a failed send).
        assert wait_until(lambda: responder.num_failed == 1, timeout_s=10)
    finally:
        responder.close()
        del store


def test_rendezvous_store_listens_on_the_given_address_only():
    from kvtransfer.dist_channel import host_store

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = KVTransferSettings(dist_store_host="127.0.0.1", dist_store_port=port)
    store = host_store(settings, "127.0.0.1", 5.0)
    try:
        assert _listening_addresses(port) == [f"127.0.0.1:{port}"]
    finally:
        del store


# -- the secret --------------------------------------------------------------------------------
def test_secret_comes_from_config_then_environment_then_a_generated_file(tmp_path, monkeypatch):
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(kv_auth.ENV_SECRET, raising=False)
    generated = kv_auth.kv_secret(KVTransferSettings())
    path = tmp_path / "cache" / auth.SECRET_FILE
    assert path.read_bytes() == generated and len(generated) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert kv_auth.kv_secret(KVTransferSettings()) == generated  # stable

    monkeypatch.setenv(kv_auth.ENV_SECRET, "from-the-environment-1234")
    assert kv_auth.kv_secret(KVTransferSettings()) == b"from-the-environment-1234"
    configured = KVTransferSettings(secret="from-the-config-file-5678")
    assert kv_auth.kv_secret(configured) == b"from-the-config-file-5678"


def test_concurrent_first_use_agrees_on_one_generated_secret(tmp_path):
    env = {**os.environ, "PDSERVE_CACHE_DIR": str(tmp_path)}
    env.pop(kv_auth.ENV_SECRET, None)
    code = "from kvtransfer.auth import kv_secret; print(kv_secret().decode())"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              text=True, cwd=Path(__file__).parents[2]) for _ in range(4)]
    secrets = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert len(secrets) == 1 and (tmp_path / auth.SECRET_FILE).read_text() == secrets.pop()
    assert [p.name for p in tmp_path.iterdir()] == [auth.SECRET_FILE]  # no temp files left


def test_secret_is_never_printed_and_a_masked_one_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(kv_auth.ENV_SECRET, "environment-secret-abcdef")
    monkeypatch.setenv("PDSERVE_API_KEY", "environment-api-key-1")
    config = load_config()
    assert config.kv_transfer.secret.get_secret_value() == "environment-secret-abcdef"
    assert config.router.api_key.get_secret_value() == "environment-api-key-1"
    printed = dump_config(config) + repr(config) + str(config)
    assert "environment-secret-abcdef" not in printed and "environment-api-key-1" not in printed
    monkeypatch.delenv(kv_auth.ENV_SECRET)
    monkeypatch.delenv("PDSERVE_API_KEY")
    masked = tmp_path / "printed.yaml"
    masked.write_text(dump_config(config))
    with pytest.raises(ConfigError, match="kv_transfer.secret.*masked value"):
        load_config(masked)
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        load_config(overrides={"kv_transfer": {"secret": "short"}})


def test_transfer_server_listens_on_the_node_address_not_every_interface(producer):
    port = producer._server.port
    assert _listening_addresses(port) == [f"127.0.0.1:{port}"]
    assert list_segments(producer.staging_dir) == []


def test_a_deployment_gets_one_fresh_secret_unless_one_is_given(monkeypatch):
    monkeypatch.delenv(kv_auth.ENV_SECRET, raising=False)
    first = kv_auth.with_deployment_secret(KVTransferSettings())
    second = kv_auth.with_deployment_secret(KVTransferSettings())
    assert kv_auth.kv_secret(first) != kv_auth.kv_secret(second)  # per deployment
    assert len(kv_auth.kv_secret(first)) == 64
    assert kv_auth.with_deployment_secret(first) is first  # given: kept
    monkeypatch.setenv(kv_auth.ENV_SECRET, "shared-by-the-operator-123")
    assert kv_auth.kv_secret(kv_auth.with_deployment_secret(KVTransferSettings())) == \
        b"shared-by-the-operator-123"
