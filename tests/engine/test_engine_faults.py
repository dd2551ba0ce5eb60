"""KV-transfer faults with real vLLM engines: what the decode worker does when the KV it was
handed is gone, when the sender dies mid-transfer, when the acknowledgement is lost, and
when the request is cancelled while its KV is on the way.

Drives the shared deployment's workers directly (no router): a real prefill stages a real
segment, and the decode worker gets a handle to it, sometimes re-pointed at a fault-
injecting relay in front of the prefill's transfer server. Every case must end with the
outcome its policy defines (an error delta, or output identical to the colocated engine),
within the transfer timeout plus a margin (a hang guard, not a benchmark), and with no
staged segment left and the decode engine's KV cache back at its baseline.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from cluster import auth
from cluster.config import KVTransferSettings
from cluster.wire import (
    EngineRequest,
    KVHandle,
    PrefillResult,
    SamplingSpec,
    TokenDelta,
)
from kvtransfer.handle import decode_handle, encode_handle
from kvtransfer.staging import list_segments, reclaim_expired
from kvtransfer.tcp import _LEN, FETCHED_PREFIX, FetchReply, _recv_exact

pytestmark = pytest.mark.engine
MAX_TOKENS = 12
MARGIN_S = 15.0  # engine steps on a shared 2-core machine; generous on purpose


def _prompt(seed: str, n: int) -> tuple[int, ...]:
    # Token ids the tiny model's tokenizer knows (see test_engines_e2e.varied_prompts).
    rng = random.Random(seed)
    return (0, *(rng.randrange(6, 1800) for _ in range(n - 1)))


def _sampling(max_tokens: int) -> SamplingSpec:
    return SamplingSpec(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


async def _collect(deltas) -> list[TokenDelta]:
    return [d async for d in deltas]


def _tokens(deltas: list[TokenDelta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


class Case:
    """One request through the real prefill, ready to hand to the decode worker."""

    def __init__(self, live, prompt_len: int = 100):
        self.live = live
        self.prefill = live.workers["prefill"]
        self.decode = live.workers["decode"]
        self.request_id = f"fault-{uuid.uuid4().hex[:8]}"
        self.prompt = _prompt(self.request_id, prompt_len)
        self.result: PrefillResult = live.call(self.prefill.prefill(EngineRequest(
            request_id=self.request_id, prompt_token_ids=self.prompt,
            sampling=_sampling(MAX_TOKENS))))
        assert self.result.kv_handle is not None
        self.handle: KVHandle = self.result.kv_handle

    def expected(self) -> list[int]:
        """What the colocated engine generates after the prefill's first token."""
        coloc = self.live.workers["colocated"]
        deltas = self.live.call(_collect(coloc.generate(EngineRequest(
            request_id=f"{self.request_id}-coloc", prompt_token_ids=self.prompt,
            sampling=_sampling(MAX_TOKENS)))))
        tokens = _tokens(deltas)
        assert tokens[0] == self.result.first_token_id
        return tokens[1:]

    def decode_request(self, handle: KVHandle | None = None) -> EngineRequest:
        return EngineRequest(request_id=self.request_id,
                             prompt_token_ids=(*self.prompt, self.result.first_token_id),
                             sampling=_sampling(MAX_TOKENS - 1), kv_handle=handle or self.handle)

    def run_decode(self, handle: KVHandle | None = None) -> tuple[list[TokenDelta], float]:
        started = time.monotonic()
        deltas = self.live.call(_collect(self.decode.generate(self.decode_request(handle))))
        return deltas, time.monotonic() - started

    def expire_lease(self) -> int:
        """What the prefill's sweeper does once the lease has passed."""
        kv = self.prefill._kv
        return reclaim_expired(kv.staging_dir, kv.settings.lease_s, kv.engine_id,
                               now=time.time() + kv.settings.lease_s + 1)


@contextlib.contextmanager
def decode_settings(live, **changes) -> Iterator[KVTransferSettings]:
    """Change the live decode worker's transfer settings for one test."""
    decode = live.workers["decode"]
    saved = decode._kv.settings
    decode._kv.settings = KVTransferSettings(**{**saved.model_dump(), **changes})
    try:
        yield decode._kv.settings
    finally:
        decode._kv.settings = saved


def _wait_until(predicate, timeout_s: float, what=lambda: "") -> float:
    """Seconds until `predicate()` holds; fails after `timeout_s`, showing `what()`."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout_s, f"timed out waiting: {what()}"
        time.sleep(0.02)
    return time.monotonic() - started


def _wait_no_segments(live, timeout_s: float) -> float:
    return _wait_until(lambda: list_segments(live.staging_dir) == [], timeout_s,
                       lambda: f"left behind: {[p.name for p in list_segments(live.staging_dir)]}")


def assert_nothing_leaked(live) -> None:
    """No staged segment on either side, and both engines' KV caches back to empty."""
    assert list_segments(live.staging_dir) == [], "staged KV left behind"
    decode, prefill = live.workers["decode"], live.workers["prefill"]
    deadline = time.monotonic() + 30
    while True:
        # The engines report usage after each step: run one on the decode engine.
        live.call(_collect(decode.generate(EngineRequest(
            request_id=f"settle-{uuid.uuid4().hex[:8]}", prompt_token_ids=(0, 7, 8),
            sampling=_sampling(2)))))
        d, p = live.call(decode.stats()), live.call(prefill.stats())
        if d.kv_cache_usage == 0.0 and p.kv_cache_usage == 0.0:
            break
        assert time.monotonic() < deadline, (
            f"KV blocks not returned: decode {d.kv_cache_usage}, prefill {p.kv_cache_usage}")
        time.sleep(0.2)
    assert p.num_staged_segments == 0


def _report(case: str, seconds: float) -> None:
    print(f"\nfault timing | {case} | {seconds:.3f} s")


@pytest.fixture
def hang_guard_s(live_engines) -> float:
    return live_engines.workers["decode"]._kv.settings.connect_timeout_s + MARGIN_S


# ------------------------------------------------------------------------- KV gone
@pytest.mark.parametrize("policy", ["fail", "recompute"])
def test_kv_released_before_decode(live_engines, hang_guard_s, policy):
    """The producer released the segment (or its lease expired) before the decode came."""
    case = Case(live_engines)
    expected = case.expected() if policy == "recompute" else None
    assert live_engines.call(case.prefill.release_kv(case.handle)) is True
    with decode_settings(live_engines, on_failure=policy):
        deltas, seconds = case.run_decode()
    _report(f"KV gone before decode, policy {policy}", seconds)
    assert seconds < hang_guard_s
    if policy == "fail":
        assert len(deltas) == 1 and deltas[0].finish_reason == "error"
        assert "KV transfer failed" in deltas[0].error and "gone" in deltas[0].error
        assert deltas[0].token_ids == ()
    else:
        assert deltas[0].served_by == "recomputed"
        assert deltas[0].num_prompt_tokens_computed == len(case.prompt) + 1
        assert _tokens(deltas) == expected
    assert_nothing_leaked(live_engines)


# ------------------------------------------------------------------------ the relay
class Relay:
    """A man in the middle between the decode and the prefill's transfer server for one
    fetch: passes the protocol through and injects one fault.

    - ``sender_dies``: forwards half the payload, then closes both connections.
    - ``pause``: forwards half the payload, sets `paused`, waits for `resume`, goes on.
    - ``stall``: forwards half the payload, sets `paused`, then forwards nothing more
      (connections open) until `resume`; then closes both.
    - ``drop_ack``: forwards everything but the consumer's ack, then closes both.
    """

    def __init__(self, handle: KVHandle, fault: str):
        self.fault = fault
        self._upstream_port = decode_handle(handle).tcp_port  # the prefill's server
        self.paused = threading.Event()
        self.resume = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def handle_for(self, handle: KVHandle) -> KVHandle:
        desc = decode_handle(handle)
        return encode_handle(msgspec.structs.replace(desc, tcp_host="127.0.0.1",
                                                     tcp_port=self.port))

    def _run(self) -> None:
        client, _ = self._listener.accept()
        with client, socket.create_connection(("127.0.0.1", self._upstream_port)) as up:
            client.settimeout(60)
            up.settimeout(60)
            # Relay the authentication handshake (challenge, response, verdict) untouched.
            client.sendall(_recv_exact(up, auth.CHALLENGE_BYTES))
            up.sendall(_recv_exact(client, auth.RESPONSE_BYTES))
            client.sendall(_recv_exact(up, auth.VERDICT_BYTES))
            up.sendall(_recv_frame(client))
            reply_frame = _recv_frame(up)
            client.sendall(reply_frame)
            reply = msgspec.msgpack.decode(reply_frame[_LEN.size:], type=FetchReply)
            if not reply.ok:
                return
            half = reply.nbytes // 2
            client.sendall(_recv_exact(up, half))
            if self.fault == "sender_dies":
                return
            if self.fault in ("pause", "stall"):
                self.paused.set()
                self.resume.wait(60)
                if self.fault == "stall":
                    return
            client.sendall(_recv_exact(up, reply.nbytes - half + 1))  # the rest + verdict
            ack = _recv_exact(client, 1)
            if self.fault != "drop_ack":
                up.sendall(ack)

    def close(self) -> None:
        self.resume.set()
        self._thread.join(timeout=10)
        self._listener.close()


def _recv_frame(sock: socket.socket) -> bytes:
    """One length-prefixed message, with its length."""
    head = _recv_exact(sock, _LEN.size)
    (length,) = _LEN.unpack(head)
    return head + _recv_exact(sock, length)


@pytest.fixture
def relay():
    made: list[Relay] = []

    def make(handle: KVHandle, fault: str) -> Relay:
        made.append(Relay(handle, fault))
        return made[-1]

    yield make
    for r in made:
        r.close()


# ------------------------------------------------------------------ sender dies
@pytest.mark.parametrize("policy", ["fail", "recompute"])
def test_sender_dies_mid_transfer(live_engines, hang_guard_s, relay, policy):
    """The producer's end goes away after half the bytes (transport tcp): the decode fails
    the request or recomputes it, keeps no partial copy, and the producer's segment (never
    acknowledged) goes with its lease."""
    case = Case(live_engines)
    expected = case.expected() if policy == "recompute" else None
    dying = relay(case.handle, "sender_dies")
    with decode_settings(live_engines, on_failure=policy, transport="tcp"):
        deltas, seconds = case.run_decode(dying.handle_for(case.handle))
    _report(f"sender dies mid-transfer, policy {policy}", seconds)
    assert seconds < hang_guard_s
    if policy == "fail":
        assert len(deltas) == 1 and deltas[0].finish_reason == "error"
        assert "KV transfer failed" in deltas[0].error and "closed" in deltas[0].error
    else:
        assert deltas[0].served_by == "recomputed"
        assert _tokens(deltas) == expected
    # Only the producer's own segment is left, and its lease takes it back.
    assert list_segments(live_engines.staging_dir) == [
        Path(decode_handle(case.handle).segment_path)]
    assert case.expire_lease() == 1
    assert_nothing_leaked(live_engines)


# ---------------------------------------------------------------------- lost ack
def test_lost_ack_decode_uses_its_complete_copy(live_engines, hang_guard_s, relay):
    """The ack never reaches the producer: the decode's copy is complete and its own, so the
    request is served from the transferred KV; the producer keeps its segment until its
    lease, and each side frees only its own file."""
    case = Case(live_engines)
    expected = case.expected()
    lossy = relay(case.handle, "drop_ack")
    with decode_settings(live_engines, transport="tcp"):
        deltas, seconds = case.run_decode(lossy.handle_for(case.handle))
    _report("ack lost, decode served from its copy", seconds)
    assert seconds < hang_guard_s
    assert deltas[0].served_by == "transferred"
    assert deltas[0].num_prompt_tokens_computed == 1
    assert _tokens(deltas) == expected
    assert len(list_segments(live_engines.staging_dir)) == 1  # the producer's, unacknowledged
    assert case.expire_lease() == 1
    assert_nothing_leaked(live_engines)


# ------------------------------------------------------------ cancelled mid-transfer
async def _cancel_when_paused(decode, req: EngineRequest, paused: threading.Event) -> float:
    task = asyncio.ensure_future(_collect(decode.generate(req)))
    assert await asyncio.to_thread(paused.wait, 30), "the fetch never reached the relay"
    task.cancel()
    cancelled_at = time.monotonic()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return cancelled_at


@pytest.mark.parametrize("then", ["completes", "stalls"])
def test_decode_cancelled_mid_transfer_leaks_nothing(live_engines, hang_guard_s, relay, then):
    """The decode side goes away while the KV is on the wire (the client left; at engine
    level a receiver that dies mid-load looks the same). The fetch thread cannot be
    interrupted: if the transfer then completes, the producer lets go on the ack and the
    decode worker discards the copy as it lands; if it stalls, the fetch times out, leaves
    no partial copy, and the producer's segment goes with its lease."""
    case = Case(live_engines)
    fault = relay(case.handle, "pause" if then == "completes" else "stall")
    with decode_settings(live_engines, transport="tcp") as settings:
        cancelled_at = live_engines.call(_cancel_when_paused(
            case.decode, case.decode_request(fault.handle_for(case.handle)), fault.paused))
        if then == "completes":
            fault.resume.set()
            seconds = _wait_no_segments(live_engines, hang_guard_s)
        else:
            # The orphaned fetch holds a partial copy until it gives up; then only the
            # producer's unacknowledged segment is left.
            def fetched() -> list[str]:
                return [p.name for p in list_segments(live_engines.staging_dir)
                        if p.name.startswith(FETCHED_PREFIX)]

            _wait_until(lambda: fetched() != [], 10, lambda: "the fetch never started")
            _wait_until(lambda: fetched() == [], settings.connect_timeout_s + MARGIN_S, fetched)
            seconds = time.monotonic() - cancelled_at
            assert seconds >= settings.connect_timeout_s * 0.5  # it was the fetch timeout
            assert seconds < hang_guard_s
            fault.resume.set()
            assert case.expire_lease() == 1
    _report(f"decode cancelled mid-transfer, transfer {then} -> nothing left", seconds)
    assert_nothing_leaked(live_engines)


@pytest.mark.parametrize("delay_s", [0.0, 0.001, 0.003, 0.006])
def test_decode_cancelled_around_the_load_leaks_nothing(live_engines, delay_s):
    """Same host (shm): cancel the decode request at different points between receiving
    the handle and its first token. Wherever the cancellation lands (before, during or
    after the engine's load), the segment is consumed or removed and no block leaks."""
    case = Case(live_engines)
    received: list[TokenDelta] = []

    async def consume() -> None:
        async for delta in case.decode.generate(case.decode_request()):
            received.append(delta)

    async def cancel_after_delay() -> None:
        task = asyncio.ensure_future(consume())
        await asyncio.sleep(delay_s)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    live_engines.call(cancel_after_delay())
    seconds = _wait_no_segments(live_engines, 10)
    _report(f"decode cancelled {delay_s * 1000:.0f} ms after the handle ({len(received)} "
            f"deltas out) -> nothing left", seconds)
    assert_nothing_leaked(live_engines)
