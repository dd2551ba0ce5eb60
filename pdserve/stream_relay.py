"""The stream relay: an optional front deployment that holds the client's connection while a
router replica serves the request (config `ray.stream_relay`).

Without it the router replica is the process that holds the client's connection (direct
ingress), or the one Serve's proxy streams from; when it dies, its streams are cut: the
socket is reset (direct), or Serve's proxy closes a response that has started without a
word (`send_http_response_on_exception` sends nothing once a response has started). The
relay is a small process with no state of its own that outlives the router replica::

    client ──HTTP──▶ relay (ingress) ──HTTP, kept-alive connections──▶ router replica
                        │      └─ Serve handle: which replica (its private address)
                        ├─ router replica lost before the response started: the request is
                        │  sent again, to another router replica (the client saw nothing)
                        └─ lost after: an SSE stream ends with an OpenAI error event and
                           `data: [DONE]`; the tokens already sent stand

The response streams over a plain HTTP connection from the router replica's own server
on the node's address; the relay learns those addresses from Serve (`RouterChooser`) and
sends each request to the one with the fewest requests in flight. The first version streamed through the Serve handle itself: one Ray
streaming item per token cost +1.3 ms p50 TPOT at 1 req/s and collapsed to 0.17x goodput
at 32 req/s on the tiny model (bench/results/stream-relay-cpu-2core).

Per relayed request (`Relay._relay`)::

    READ_BODY ─▶ FORWARDED ─▶ STARTED ─▶ ENDED
        │ too big     │ replica lost    │ replica lost
        ▼             ▼                 ▼
       413      FORWARDED again     ERROR_EVENT (SSE) / connection closed (JSON)
               (at most `attempts`), then 503 (UNAVAILABLE)

The router replica serves the relayed request with its own app, so API keys, admission,
metrics and the abort on disconnect behave as with direct ingress.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx

log = logging.getLogger("pdserve.relay")

Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]
# Headers that belong to one connection, not to the request or response (RFC 9110 7.6.1).
# A request's length and host are set again for the next hop; a response keeps its
# content-length (every byte is relayed, so a body cut short shows as such).
HOP_BY_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer",
              b"upgrade", b"proxy-connection"}
REQUEST_ONLY_DROPPED = HOP_BY_HOP | {b"content-length", b"host"}


class RelayOutcome(str, enum.Enum):
    ENDED = "ended"  # the router's response went through whole
    ERROR_EVENT = "error_event"  # the router was lost mid-response
    UNAVAILABLE = "unavailable"  # no router answered after every attempt: 503


class ClientGone(Exception):
    """The client disconnected before its request body was read."""


class RouterLost(Exception):
    """The router replica serving a relayed request is gone (it died, or could not be
    reached)."""


class RouterResponse:
    """A router replica's response as it arrives: its head, then its body chunks."""

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]],
                 chunks: AsyncIterator[bytes]):
        self.status = status
        self.headers = headers
        self.chunks = chunks

    @property
    def is_sse(self) -> bool:
        return any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                   for k, v in self.headers)


# forward(scope, body) is an async context manager that yields the router's response;
# it raises RouterLost when the replica is lost, before or during the response.
Forward = Callable[[dict, bytes], contextlib.AbstractAsyncContextManager[RouterResponse]]


def lost_stream_event() -> bytes:
    """What an SSE stream ends with when its router replica is lost after it started
    (the router's own error events have this form: router/generation.py)."""
    error = {"error": {"message": "the router replica serving this stream was lost; the "
                                  "tokens already sent stand, the rest was not generated",
                       "type": "service_unavailable", "param": None, "code": None}}
    return (f"data: {json.dumps(error, separators=(',', ':'))}\n\n"
            "data: [DONE]\n\n").encode()


def _error_body(message: str, type_: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": None,
                                 "code": None}}).encode()


class Relay:
    """The relay's ASGI app. `on_outcome` counts how each request ended."""

    def __init__(self, forward: Forward, *, max_body_bytes: int, attempts: int = 3,
                 retry_backoff_s: float = 0.5,
                 on_outcome: Callable[[RelayOutcome], None] = lambda outcome: None):
        self.forward = forward
        self.max_body_bytes = max_body_bytes
        self.attempts = attempts
        self.retry_backoff_s = retry_backoff_s
        self.on_outcome = on_outcome

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                kind = (await receive())["type"].rsplit(".", 1)[-1]  # startup / shutdown
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        if scope["type"] != "http":
            return
        try:
            body = await self._read_body(receive)
        except ClientGone:
            return
        if body is None:
            await _respond(send, 413, _error_body(
                f"the request body exceeds {self.max_body_bytes} bytes", "invalid_request_error"))
            return
        # The client may go away while the router works: stop relaying then; the router
        # replica sees its connection close and aborts the request.
        loop = asyncio.get_running_loop()
        relay = loop.create_task(self._relay(scope, body, send))
        watch = loop.create_task(_until_disconnect(receive))
        try:
            await asyncio.wait([relay, watch], return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not relay.done():
                relay.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await relay

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body, or None when it is over the limit."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _relay(self, scope: dict, body: bytes, send: Send) -> None:
        for attempt in range(self.attempts):
            is_started = is_sse = False
            try:
                async with self.forward(scope, body) as response:
                    headers = [(k, v) for k, v in response.headers if k.lower() not in HOP_BY_HOP]
                    is_sse = response.is_sse
                    async for chunk in response.chunks:
                        if not is_started:
                            # The head goes out with the first body bytes: until then the
                            # request can still go to another replica unseen.
                            await send({"type": "http.response.start",
                                        "status": response.status, "headers": headers})
                            is_started = True
                        await send({"type": "http.response.body", "body": chunk,
                                    "more_body": True})
                if not is_started:
                    await send({"type": "http.response.start", "status": response.status,
                                "headers": headers})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                self.on_outcome(RelayOutcome.ENDED)
                return
            except RouterLost as e:
                if not is_started:
                    log.warning("router replica lost before the response (attempt %d of %d): %s",
                                attempt + 1, self.attempts, e)
                    await asyncio.sleep(self.retry_backoff_s * (attempt + 1))
                    continue
                log.warning("router replica lost mid-response: %s", e)
                self.on_outcome(RelayOutcome.ERROR_EVENT)
                # An SSE stream ends with an error event; a JSON body that had started (the
                # router sends those whole, so this is rare) can only be closed short.
                await send({"type": "http.response.body",
                            "body": lost_stream_event() if is_sse else b"", "more_body": False})
                return
        self.on_outcome(RelayOutcome.UNAVAILABLE)
        await _respond(send, 503, _error_body("no router replica is available; retry later",
                                              "service_unavailable"), retry_after_s=1)


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _respond(send: Send, status: int, body: bytes, retry_after_s: int | None = None) -> None:
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    if retry_after_s is not None:
        headers.append((b"retry-after", str(retry_after_s).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class RouterChooser:
    """Which router replica serves the next request: the known one with the fewest
    requests in flight through this relay. Replicas are learnt from `ask()` (Serve's
    choice of a live replica, which answers with its own address): on every request
    while fewer than `expected` are known, and otherwise once per `refresh_s`, so a
    replaced or added replica is found without a Ray call per request. A replica the
    relay lost is forgotten at once."""

    def __init__(self, ask: Callable[[], Awaitable[str]], expected: int,
                 refresh_s: float = 5.0, clock: Callable[[], float] | None = None):
        import time

        self.ask = ask
        self.expected = expected
        self.refresh_s = refresh_s
        self.clock = clock or time.monotonic
        self.in_flight: dict[str, int] = {}
        self._asked_at = float("-inf")

    async def choose(self) -> str:
        now = self.clock()
        if len(self.in_flight) < self.expected or now - self._asked_at >= self.refresh_s:
            self._asked_at = now
            try:
                self.in_flight.setdefault(await self.ask(), 0)
            except RouterLost:
                if not self.in_flight:
                    raise
        url = min(self.in_flight, key=self.in_flight.__getitem__)
        self.in_flight[url] += 1
        return url

    def done(self, url: str) -> None:
        if url in self.in_flight:
            self.in_flight[url] -= 1

    def lost(self, url: str) -> None:
        self.in_flight.pop(url, None)


def http_forward(client: httpx.AsyncClient, routers: RouterChooser) -> Forward:
    """`Relay.forward` over HTTP: the request streams to the router replica `routers`
    chooses, over `client`'s kept-alive connections. A refused connection, or one that
    ends before the response does, is RouterLost (and that replica is forgotten)."""

    @contextlib.asynccontextmanager
    async def forward(scope: dict, body: bytes) -> AsyncIterator[RouterResponse]:
        base = await routers.choose()
        try:
            query = scope.get("query_string", b"")
            url = base + scope["path"] + ("?" + query.decode("latin-1") if query else "")
            headers = [(k, v) for k, v in scope.get("headers", ())
                       if k.lower() not in REQUEST_ONLY_DROPPED]
            request = client.build_request(scope["method"], url, headers=headers, content=body)
            try:
                response = await client.send(request, stream=True)
            except httpx.TransportError as e:
                raise RouterLost(f"{base}: {type(e).__name__}") from e

            async def chunks() -> AsyncIterator[bytes]:
                try:
                    async for chunk in response.aiter_raw():
                        yield chunk
                except httpx.TransportError as e:  # the connection ended before the response
                    raise RouterLost(f"{base}: {type(e).__name__}") from e

            try:
                yield RouterResponse(response.status_code, response.headers.raw, chunks())
            finally:
                await response.aclose()
        except RouterLost:
            routers.lost(base)
            raise
        finally:
            routers.done(base)

    return forward


def serve_router_asker(router_handle: Any) -> Callable[[], Awaitable[str]]:
    """Asks Serve for a live router replica: its `address` method answers with the
    replica's own server. Ray's errors for a replica that died or cannot be reached are
    RouterLost."""
    from ray.exceptions import ActorUnavailableError, RayActorError

    async def ask() -> str:
        try:
            return await router_handle.address.remote()
        except (RayActorError, ActorUnavailableError) as e:
            raise RouterLost(type(e).__name__) from e

    return ask


def relay_client() -> httpx.AsyncClient:
    """The relay's connections to the router replicas: kept alive, no read timeout (a
    stream lasts as long as its answer; the router has its own stall timeout)."""
    return httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0),
                             limits=httpx.Limits(max_connections=None,
                                                 max_keepalive_connections=256))
