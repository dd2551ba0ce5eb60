"""The stream relay: an optional front deployment that holds the client's connection while a
router replica serves the request (config `ray.stream_relay`).

Without it the router replica is the process that holds the client's connection (direct
ingress), or the one Serve's proxy streams from; when it dies, its streams are cut: the
socket is reset (direct), or Serve's proxy closes a response that has started without a
word (`send_http_response_on_exception` sends nothing once a response has started). The
relay is a small process with no state of its own that outlives the router replica, so::

    client ──HTTP──▶ relay (ingress) ──Serve handle, msgpack bytes──▶ router replica
                        │
                        ├─ router replica lost before the response started: the request is
                        │  sent again, to another router replica (the client saw nothing)
                        └─ lost after: an SSE stream ends with an OpenAI error event and
                           `data: [DONE]`; the tokens already sent stand

Per relayed request (states of `relay`)::

    READ_BODY ─▶ FORWARDED ─▶ STARTED ─▶ ENDED
        │ too big     │ replica lost    │ replica lost
        ▼             ▼                 ▼
       413      FORWARDED again     ERROR_EVENT (SSE) / connection closed (JSON)
               (at most `attempts`), then 503

The router replica runs its own ASGI app on the relayed request (`run_asgi`), so API keys,
admission, metrics and the abort on disconnect behave as with direct ingress. The cost is
one more hop per response message; messages that are ready together go as one batch. The
relay is off by default (docs/reliability.md, "Router replica loss").
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec

from cluster.wire import RelayedMessage, RelayedRequest

log = logging.getLogger("pdserve.relay")

_encode = msgspec.msgpack.Encoder().encode
_decode_request = msgspec.msgpack.Decoder(RelayedRequest).decode
_decode_batch = msgspec.msgpack.Decoder(list[RelayedMessage]).decode

ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]],
                   Awaitable[None]]


class RelayState(str, enum.Enum):
    READ_BODY = "read_body"
    FORWARDED = "forwarded"
    STARTED = "started"
    ENDED = "ended"
    ERROR_EVENT = "error_event"


# ---- router replica side --------------------------------------------------------------

async def run_asgi(app: ASGIApp, request_bytes: bytes) -> AsyncIterator[bytes]:
    """Runs `app` on one relayed request and yields its response as msgpack-encoded
    batches of `RelayedMessage`: whatever the app has sent by the time the caller asks
    for more goes as one batch. When the caller goes away (the relay's client
    disconnected, or the relay died) the app receives `http.disconnect`, as from a
    server, and aborts the request."""
    request = _decode_request(request_bytes)
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
             "http_version": request.http_version, "method": request.method,
             "scheme": request.scheme, "path": request.path, "raw_path": request.path.encode(),
             "query_string": request.query_string, "root_path": "",
             "headers": [(k, v) for k, v in request.headers],
             "client": request.client, "server": None, "state": {}}
    queue: asyncio.Queue[RelayedMessage | None] = asyncio.Queue()
    disconnected = asyncio.Event()
    body_given = False

    async def receive() -> dict:
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            queue.put_nowait(RelayedMessage("http.response.start", status=message["status"],
                                            headers=[(bytes(k), bytes(v)) for k, v in
                                                     message.get("headers", ())]))
        elif message["type"] == "http.response.body":
            queue.put_nowait(RelayedMessage("http.response.body",
                                            body=bytes(message.get("body", b"")),
                                            more_body=message.get("more_body", False)))

    async def serve_one() -> None:
        try:
            await app(scope, receive, send)
        finally:
            queue.put_nowait(None)

    task = asyncio.get_running_loop().create_task(serve_one())
    try:
        while True:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            is_end = batch[-1] is None
            messages = [m for m in batch if m is not None]
            if messages:
                yield _encode(messages)
            if is_end:
                break
        await task  # the app's own exception, if any
    finally:
        if not task.done():
            disconnected.set()  # the app's disconnect listener aborts the request
            done, _ = await asyncio.wait([task], timeout=5.0)
            if not done:
                task.cancel()


# ---- relay side -----------------------------------------------------------------------

def lost_stream_event() -> bytes:
    """What an SSE stream ends with when its router replica is lost after it started
    (the router's own error events have this form: router/generation.py)."""
    error = {"error": {"message": "the router replica serving this stream was lost; the "
                                  "tokens already sent stand, the rest was not generated",
                       "type": "service_unavailable", "param": None, "code": None}}
    return (f"data: {json.dumps(error, separators=(',', ':'))}\n\n"
            "data: [DONE]\n\n").encode()


def unavailable_body() -> bytes:
    return json.dumps({"error": {"message": "no router replica is available; retry later",
                                 "type": "service_unavailable", "param": None,
                                 "code": None}}).encode()


def too_large_body(limit: int) -> bytes:
    return json.dumps({"error": {"message": f"the request body exceeds {limit} bytes",
                                 "type": "invalid_request_error", "param": None,
                                 "code": None}}).encode()


class ClientGone(Exception):
    """The client disconnected before its request body was read."""


class RouterLost(Exception):
    """The router replica serving a relayed request is gone (it died, or Serve could not
    reach it)."""


Forward = Callable[[bytes], AsyncIterator[bytes]]


class Relay:
    """The relay's ASGI app. `forward(request_bytes)` streams a router replica's
    msgpack batches for one request and raises RouterLost when that replica is lost;
    `on_outcome(state)` counts how each request ended (ENDED, ERROR_EVENT, or
    FORWARDED for a 503 after every attempt)."""

    def __init__(self, forward: Forward, *, max_body_bytes: int, attempts: int = 3,
                 retry_backoff_s: float = 0.5,
                 on_outcome: Callable[[RelayState], None] = lambda state: None):
        self.forward = forward
        self.max_body_bytes = max_body_bytes
        self.attempts = attempts
        self.retry_backoff_s = retry_backoff_s
        self.on_outcome = on_outcome

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]],
                       send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].rsplit(".", 1)[-1]  # startup / shutdown
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
            await _respond(send, 413, too_large_body(self.max_body_bytes))
            return
        request = RelayedRequest(
            method=scope["method"], path=scope["path"],
            query_string=scope.get("query_string", b""),
            headers=[(bytes(k), bytes(v)) for k, v in scope.get("headers", ())],
            client=tuple(scope["client"]) if scope.get("client") else None,
            scheme=scope.get("scheme", "http"), http_version=scope.get("http_version", "1.1"),
            body=body)
        # The client may go away while the router works: stop forwarding then, which the
        # router replica sees as a disconnect (run_asgi) and aborts the request.
        relay = asyncio.get_running_loop().create_task(self._relay(_encode(request), send))
        watch = asyncio.get_running_loop().create_task(_until_disconnect(receive))
        try:
            await asyncio.wait([relay, watch], return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not relay.done():
                relay.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await relay

    async def _read_body(self, receive: Callable[[], Awaitable[dict]]) -> bytes | None:
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

    async def _relay(self, request_bytes: bytes, send: Callable[[dict], Awaitable[None]]) -> None:
        for attempt in range(self.attempts):
            start: RelayedMessage | None = None  # held until the first body message
            is_started = is_sse = False
            try:
                async for batch in self.forward(request_bytes):
                    for m in _decode_batch(batch):
                        if m.type == "http.response.start":
                            start = m
                            continue
                        if not is_started:
                            assert start is not None, "body before http.response.start"
                            await send({"type": "http.response.start", "status": start.status,
                                        "headers": start.headers})
                            is_started = True
                            is_sse = any(k.lower() == b"content-type" and
                                         v.startswith(b"text/event-stream")
                                         for k, v in start.headers)
                        await send({"type": "http.response.body", "body": m.body,
                                    "more_body": m.more_body})
                self.on_outcome(RelayState.ENDED)
                return
            except RouterLost as e:
                if not is_started:
                    # Nothing reached the client: the request goes to another replica.
                    log.warning("router replica lost before the response (attempt %d of %d): %s",
                                attempt + 1, self.attempts, e)
                    await asyncio.sleep(self.retry_backoff_s * (attempt + 1))
                    continue
                log.warning("router replica lost mid-response: %s", e)
                self.on_outcome(RelayState.ERROR_EVENT)
                # An SSE stream ends with an error event; a JSON body that had started (sent
                # whole by the router, so this is rare) can only be closed short.
                await send({"type": "http.response.body",
                            "body": lost_stream_event() if is_sse else b"", "more_body": False})
                return
        self.on_outcome(RelayState.FORWARDED)
        await _respond(send, 503, unavailable_body(), retry_after_s=1)


async def _until_disconnect(receive: Callable[[], Awaitable[dict]]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _respond(send: Callable[[dict], Awaitable[None]], status: int, body: bytes,
                   retry_after_s: int | None = None) -> None:
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    if retry_after_s is not None:
        headers.append((b"retry-after", str(retry_after_s).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def serve_forward(router_handle: Any) -> Forward:
    """`Relay.forward` over a Ray Serve handle to the router deployment's `relay` method.
    Ray's errors for a replica that died or cannot be reached become RouterLost."""
    from ray.exceptions import ActorUnavailableError, RayActorError

    async def forward(request_bytes: bytes) -> AsyncIterator[bytes]:
        stream = router_handle.options(stream=True).relay.remote(request_bytes)
        is_exhausted = False
        try:
            async for batch in stream:
                yield batch
            is_exhausted = True
        except (RayActorError, ActorUnavailableError) as e:
            raise RouterLost(type(e).__name__) from e
        finally:
            if not is_exhausted:
                stream.cancel()  # the router replica sees a disconnect and aborts

    return forward
