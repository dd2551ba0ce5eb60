"""The worker channel: one long-lived connection per router-worker pair, many requests on it.

(Over ~350 lines on purpose: one wire protocol, its messages and both of its ends. Split,
the frame format and the two state machines that read it would live apart.)

Why: a per-token Ray streaming object (and a Ray call per prefill, abort and stats poll)
made the path around the engines cost more than the engines (issue 10: ~1,500 tokens/s on
two cores). vLLM's own front end talks to its engine core over one socket with msgpack for
the same reason. Here the router opens one TCP connection to each worker and multiplexes
every call and every token stream over it; Ray (core or Serve) is left with placement,
lifecycle, health and scaling, and nothing per request or per token goes through it.

Wire format: frames of a 4-byte big-endian length and a msgspec-msgpack body, typed by the
tagged structs below (no pickle; a frame that does not decode closes the connection).
With a deployment secret, each connection first runs the mutual HMAC challenge-response of
`cluster.auth` (label `CHANNEL_LABEL`): a peer that cannot prove the secret is refused,
counted (`ChannelServer.num_refused`) and disconnected before it can submit anything.

    router (ChannelClient)                         worker process (ChannelServer)
    ─ Prefill / ReleaseKV / Abort / Stats(call_id) ─▶ worker.<method>(...) in a task
    ◀──────────────────────────── Reply(call_id, result | error)
    ─ Generate(call_id, req) ────────────────────────▶ pump task over worker.generate(req)
    ◀── Deltas([(call_id, delta | end)...]) one frame per event-loop turn, all streams
    ─ Cancel(call_id) ───────────────────────────────▶ the pump is cancelled (engine abort)

Coalescing: every delta produced while the worker's event loop serves one engine step is
written in one frame. The client merges deltas a slow consumer has not yet taken (as
vLLM's RequestOutputCollector does), so a backlog costs one wake-up, not one per token.

Stream lifecycle (per call_id, on both ends)::

    OPEN ──delta with finish_reason──▶ FINISHED
      ├──End(error)──────────────────▶ FAILED     (the worker's generator raised)
      ├──client Cancel───────────────▶ CANCELLED  (pump cancelled: the engine aborts)
      └──connection lost─────────────▶ FAILED     (every open call fails at once)

When the worker sees its router's connection end, nobody will read what it still owes
that router: its streams and its prefill calls in flight are cancelled (the prefill
worker then releases what its engine staged), and a prefill answer not yet written has
its staged KV released (the router that gave up on a frozen prefill closed the channel,
and would otherwise leave the KV to the producer's lease).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import struct
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from cluster.auth import AuthError, client_handshake_async, server_handshake_async
from cluster.wire import EngineRequest, KVHandle, PrefillResult, TokenDelta, WorkerStats

log = logging.getLogger(__name__)

_LEN = struct.Struct(">I")
MAX_FRAME_BYTES = 64 * 1024 * 1024  # a frame larger than this is a protocol error
CONNECT_TIMEOUT_S = 10.0
CHANNEL_LABEL = b"pdserve-worker-channel/1"


# -- wire messages ------------------------------------------------------------------------
class Prefill(msgspec.Struct, frozen=True, tag="prefill", array_like=True):
    call_id: int
    req: EngineRequest


class ReleaseKV(msgspec.Struct, frozen=True, tag="release_kv", array_like=True):
    call_id: int
    handle: KVHandle


class Abort(msgspec.Struct, frozen=True, tag="abort", array_like=True):
    call_id: int
    request_id: str


class Stats(msgspec.Struct, frozen=True, tag="stats", array_like=True):
    call_id: int


class Generate(msgspec.Struct, frozen=True, tag="generate", array_like=True):
    call_id: int
    req: EngineRequest


class Cancel(msgspec.Struct, frozen=True, tag="cancel", array_like=True):
    call_id: int


ToWorker = Prefill | ReleaseKV | Abort | Stats | Generate | Cancel
_METHODS = {Prefill: "prefill", ReleaseKV: "release_kv", Abort: "abort", Stats: "stats"}


class Reply(msgspec.Struct, frozen=True, tag="reply", array_like=True):
    call_id: int
    prefill: PrefillResult | None = None
    stats: WorkerStats | None = None
    ok: bool | None = None
    error: str | None = None


class StreamItem(msgspec.Struct, frozen=True, array_like=True):
    call_id: int
    delta: TokenDelta | None = None  # None: the stream ended without a finish (see error)
    error: str | None = None


class Deltas(msgspec.Struct, frozen=True, tag="deltas", array_like=True):
    items: list[StreamItem]


ToRouter = Reply | Deltas


class ChannelError(RuntimeError):
    """The channel to a worker is gone or the worker answered with an error."""


class ChannelLost(ChannelError):
    """The connection itself failed (unreachable, closed, lost): the instance is gone, not
    the request refused. Retry and migration (router/recovery.py) act on this one only."""


class StreamState(enum.Enum):
    OPEN = "open"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"


def _frame(encoder: msgspec.msgpack.Encoder, msg: Any) -> bytes:
    body = encoder.encode(msg)
    return _LEN.pack(len(body)) + body


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    (size,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    if size > MAX_FRAME_BYTES:
        raise ChannelError(f"frame of {size} bytes exceeds {MAX_FRAME_BYTES}")
    return await reader.readexactly(size)


# -- worker side --------------------------------------------------------------------------
class ChannelServer:
    """Serves one worker object (`prefill`, `release_kv`, `abort`, `stats`, `generate`) to
    any number of router connections. Runs on the worker's own event loop."""

    def __init__(self, worker: Any, host: str = "127.0.0.1", port: int = 0,
                 secret: bytes | None = None, auth_timeout_s: float = CONNECT_TIMEOUT_S):
        self.worker = worker
        self.host = host
        self.port = port
        self._secret = secret
        self._auth_timeout_s = auth_timeout_s
        self.num_refused = 0  # connections that failed to prove the secret
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[_ServerConnection] = set()

    @property
    def num_active_requests(self) -> int:
        return sum(c.num_active for c in self._connections)

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        sock = self._server.sockets[0]
        self.port = sock.getsockname()[1]
        return f"{self.host}:{self.port}"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._secret is not None:
            try:
                await server_handshake_async(reader, writer, self._secret, CHANNEL_LABEL,
                                             self._auth_timeout_s)
            except (AuthError, ConnectionError) as e:
                self.num_refused += 1
                log.warning("worker channel refused %s: %s", writer.get_extra_info("peername"), e)
                writer.close()
                return
        conn = _ServerConnection(self.worker, reader, writer)
        self._connections.add(conn)
        try:
            await conn.run()
        finally:
            self._connections.discard(conn)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            await conn.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), timeout=5)
            self._server = None


class _ServerConnection:
    def __init__(self, worker: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.worker = worker
        self.reader = reader
        self.writer = writer
        self._decoder = msgspec.msgpack.Decoder(ToWorker)
        self._encoder = msgspec.msgpack.Encoder()
        self._pumps: dict[int, asyncio.Task] = {}
        self._unary: set[asyncio.Task] = set()
        self._prefills: set[asyncio.Task] = set()  # unary Prefill calls in flight
        self._pending: list[StreamItem] = []
        self._replies: list[Reply] = []
        self._has_output = asyncio.Event()
        self._flusher: asyncio.Task | None = None
        self._closed = False

    @property
    def num_active(self) -> int:
        return len(self._pumps) + len(self._unary)

    async def run(self) -> None:
        self._flusher = asyncio.get_running_loop().create_task(self._flush_forever())
        try:
            while True:
                msg = self._decoder.decode(await _read_frame(self.reader))
                self._dispatch(msg)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the router went away: cancel what it had asked for
        except (msgspec.DecodeError, ChannelError) as e:
            log.warning("closing a worker channel after a bad frame: %s", e)
        finally:
            await self.close()

    def _dispatch(self, msg: ToWorker) -> None:
        loop = asyncio.get_running_loop()
        if isinstance(msg, Generate):
            self._pumps[msg.call_id] = loop.create_task(self._pump(msg.call_id, msg.req))
        elif isinstance(msg, Cancel):
            pump = self._pumps.pop(msg.call_id, None)
            if pump is not None:
                pump.cancel()
        else:
            task = loop.create_task(self._call(msg))
            self._unary.add(task)
            task.add_done_callback(self._unary.discard)
            if isinstance(msg, Prefill):
                self._prefills.add(task)
                task.add_done_callback(self._prefills.discard)

    async def _call(self, msg: ToWorker) -> None:
        method = getattr(self.worker, _METHODS[type(msg)], None)
        try:
            if method is None:
                raise ChannelError(f"a {type(self.worker).__name__} does not serve "
                                   f"{_METHODS[type(msg)]}")
            if isinstance(msg, Prefill):
                reply = Reply(msg.call_id, prefill=await method(msg.req))
            elif isinstance(msg, ReleaseKV):
                reply = Reply(msg.call_id, ok=bool(await method(msg.handle)))
            elif isinstance(msg, Abort):
                await method(msg.request_id)
                reply = Reply(msg.call_id, ok=True)
            else:
                reply = Reply(msg.call_id, stats=await method())
        except Exception as e:
            reply = Reply(msg.call_id, error=f"{type(e).__name__}: {e}")
        self._replies.append(reply)
        self._has_output.set()

    async def _pump(self, call_id: int, req: EngineRequest) -> None:
        try:
            async with contextlib.aclosing(self.worker.generate(req)) as deltas:
                async for delta in deltas:
                    self._pending.append(StreamItem(call_id, delta))
                    self._has_output.set()
                    if delta.finish_reason is not None:
                        return
            self._pending.append(StreamItem(call_id, None, "the worker ended the stream early"))
        except asyncio.CancelledError:
            return  # the router cancelled: it expects nothing more
        except Exception as e:
            self._pending.append(StreamItem(call_id, None, f"{type(e).__name__}: {e}"))
        finally:
            self._pumps.pop(call_id, None)
            self._has_output.set()

    async def _flush_forever(self) -> None:
        """One frame per event-loop turn: wait for output, let every task made ready by the
        same engine step run (one `sleep(0)`), then write all of it at once."""
        try:
            while True:
                await self._has_output.wait()
                await asyncio.sleep(0)
                self._has_output.clear()
                frames = []
                if self._replies:
                    replies, self._replies = self._replies, []
                    frames.extend(_frame(self._encoder, r) for r in replies)
                if self._pending:
                    items, self._pending = self._pending, []
                    frames.append(_frame(self._encoder, Deltas(items)))
                if frames:
                    self.writer.write(b"".join(frames))
                    await self.writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for pump in list(self._pumps.values()):
            pump.cancel()
        self._pumps.clear()
        for prefill in list(self._prefills):
            prefill.cancel()
        if self._flusher is not None:
            self._flusher.cancel()
        unsent, self._replies = self._replies, []
        for reply in unsent:  # answers the router will never read: nobody claims their KV
            if reply.prefill is not None:
                for handle in (reply.prefill.kv_handle, *reply.prefill.kv_claims):
                    if handle is not None:
                        with contextlib.suppress(Exception):
                            await self.worker.release_kv(handle)
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


# -- router side --------------------------------------------------------------------------
class _Stream:
    """One generate call's deltas, merged while the consumer is behind."""

    __slots__ = ("pending", "waiter", "state", "error", "is_lost")

    def __init__(self) -> None:
        self.pending: collections.deque[TokenDelta] = collections.deque()
        self.waiter: asyncio.Future | None = None
        self.state = StreamState.OPEN
        self.error: str | None = None
        self.is_lost = False  # failed because the connection went, not by the worker's word

    def put(self, item: StreamItem) -> None:
        if item.delta is None:
            self.state = StreamState.FAILED
            self.error = item.error or "stream failed"
        else:
            delta = item.delta
            if self.pending and _mergeable(self.pending[-1], delta):
                delta = _merge(self.pending.pop(), delta)
            self.pending.append(delta)
        self._wake()

    def fail(self, error: str) -> None:
        if self.state == StreamState.OPEN:
            self.state = StreamState.FAILED
            self.error = error
            self.is_lost = True
            self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


def _mergeable(a: TokenDelta, b: TokenDelta) -> bool:
    # The first delta carries how the prompt was served; keep it separate. Errors too.
    return (a.finish_reason is None and a.error is None and b.error is None
            and b.served_by is None and a.served_by is None)


def _merge(a: TokenDelta, b: TokenDelta) -> TokenDelta:
    return msgspec.structs.replace(b, token_ids=a.token_ids + b.token_ids)


class ChannelClient:
    """The router's end of one worker's channel. Connects on first use (on the loop that
    uses it) and again after the connection was lost."""

    def __init__(self, address: str, connect_timeout_s: float = CONNECT_TIMEOUT_S,
                 secret: bytes | None = None):
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"worker channel address {address!r} is not host:port")
        self.address = address
        self._host, self._port = host.strip("[]"), int(port)
        self._connect_timeout_s = connect_timeout_s
        self._secret = secret
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(ToRouter)
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None
        self._connecting: asyncio.Lock | None = None
        self._next_id = 0
        self._calls: dict[int, asyncio.Future] = {}
        self._streams: dict[int, _Stream] = {}

    @property
    def is_connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    @property
    def num_open(self) -> int:
        """Calls awaiting their reply and streams not yet ended on this channel."""
        return len(self._calls) + len(self._streams)

    async def _connection(self) -> asyncio.StreamWriter:
        if self.is_connected:
            return self._writer  # type: ignore[return-value]
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if not self.is_connected:
                try:
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection(self._host, self._port), self._connect_timeout_s)
                except (OSError, asyncio.TimeoutError) as e:
                    raise ChannelLost(f"cannot reach the worker channel at {self.address}: "
                                       f"{e or type(e).__name__}") from e
                if self._secret is not None:
                    try:
                        await client_handshake_async(reader, writer, self._secret, CHANNEL_LABEL,
                                                     self._connect_timeout_s)
                    except (AuthError, ConnectionError) as e:
                        writer.close()
                        raise ChannelLost(f"worker channel at {self.address}: {e}") from e
                self._writer = writer
                self._reader_task = asyncio.get_running_loop().create_task(self._read_forever(reader))
        return self._writer  # type: ignore[return-value]

    async def _read_forever(self, reader: asyncio.StreamReader) -> None:
        reason = "the worker closed its channel"
        try:
            while True:
                msg = self._decoder.decode(await _read_frame(reader))
                if isinstance(msg, Deltas):
                    for item in msg.items:
                        stream = self._streams.get(item.call_id)
                        if stream is not None:
                            stream.put(item)
                else:
                    fut = self._calls.pop(msg.call_id, None)
                    if fut is not None and not fut.done():
                        fut.set_result(msg)
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            reason = f"the channel to {self.address} was lost ({type(e).__name__})"
        except (msgspec.DecodeError, ChannelError) as e:
            reason = f"bad frame from {self.address}: {e}"
        except asyncio.CancelledError:
            reason = "the channel was closed"
        finally:
            self._drop(reason)

    def _drop(self, reason: str) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        calls, self._calls = self._calls, {}
        for fut in calls.values():
            if not fut.done():
                fut.set_exception(ChannelLost(reason))
        for stream in self._streams.values():
            stream.fail(reason)

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    async def _call(self, make) -> Reply:
        writer = await self._connection()
        call_id = self._new_id()
        fut = asyncio.get_running_loop().create_future()
        self._calls[call_id] = fut
        writer.write(_frame(self._encoder, make(call_id)))
        try:
            reply: Reply = await fut
        finally:
            self._calls.pop(call_id, None)
        if reply.error is not None:
            raise ChannelError(reply.error)
        return reply

    # -- the worker protocols (router.pool) ---------------------------------------------
    async def prefill(self, req: EngineRequest) -> PrefillResult:
        reply = await self._call(lambda i: Prefill(i, req))
        assert reply.prefill is not None
        return reply.prefill

    async def release_kv(self, handle: KVHandle) -> bool:
        return bool((await self._call(lambda i: ReleaseKV(i, handle))).ok)

    async def abort(self, request_id: str) -> None:
        await self._call(lambda i: Abort(i, request_id))

    async def stats(self) -> WorkerStats:
        reply = await self._call(Stats)
        assert reply.stats is not None
        return reply.stats

    async def generate(self, req: EngineRequest) -> AsyncIterator[TokenDelta]:
        writer = await self._connection()
        call_id = self._new_id()
        stream = _Stream()
        self._streams[call_id] = stream
        writer.write(_frame(self._encoder, Generate(call_id, req)))
        loop = asyncio.get_running_loop()
        try:
            while True:
                while stream.pending:
                    delta = stream.pending.popleft()
                    yield delta
                    if delta.finish_reason is not None:
                        stream.state = StreamState.FINISHED
                        return
                if stream.state != StreamState.OPEN:
                    raise (ChannelLost if stream.is_lost else ChannelError)(stream.error or "stream ended")
                stream.waiter = loop.create_future()
                await stream.waiter
                stream.waiter = None
        finally:
            self._streams.pop(call_id, None)
            if stream.state == StreamState.OPEN:
                stream.state = StreamState.CANCELLED
                if self.is_connected:
                    self._writer.write(_frame(self._encoder, Cancel(call_id)))  # type: ignore[union-attr]

    async def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(BaseException):
                await self._reader_task
            self._reader_task = None
        self._drop("the channel was closed")


class WorkerChannelClient(ChannelClient):
    """A channel client with the identity router.pool expects (`instance_id`, `role`)."""

    def __init__(self, address: str, instance_id: str, role: str, **kwargs: Any):
        super().__init__(address, **kwargs)
        self.instance_id = instance_id
        self.role = role
