"""The router's front door: API keys, request-body limits, and overload rejections.

`install(app, deps)` wires all three into the FastAPI app:

- **API keys** (`router.api_key`, or `PDSERVE_API_KEY` through the config loader). Clients
  send ``Authorization: Bearer <key>``; the key is compared in constant time (digests of
  both, so not even its length leaks) and a missing or wrong key gets 401 in OpenAI's error
  format with ``WWW-Authenticate: Bearer``. Path policy, deny by default:

  | path | key needed |
  | --- | --- |
  | ``/health`` | never: load balancers and orchestrators probe it, and it says only ready or not |
  | ``/metrics``, ``/dashboard*`` | yes, unless ``router.open_metrics`` (a Prometheus without a token) |
  | everything else (``/v1/*``, ``/openapi.json``, ``/docs``) | yes |

  With no key configured nothing is checked (a local deployment on 127.0.0.1).
- **Body size**: a body over ``router.max_request_body_bytes`` gets 413 without being read
  (from Content-Length) or as soon as the streamed bytes pass the limit (chunked bodies).
- **Errors in one format**: the framework's own errors (unparseable or non-UTF-8 body,
  unknown path, wrong method) are answered in OpenAI's format like every other error.
- **Overload**: `admit` runs `router.admission` for a tokenized request and raises
  `Overloaded`, answered as 429 with ``Retry-After``.

- **Slow clients**: `read_timeout_protocol` is uvicorn's HTTP/1.1 protocol with a deadline
  for reading each request (headers and body). uvicorn alone waits forever for a client
  that trickles its headers a byte at a time (slowloris); the launcher passes it as
  uvicorn's ``http=``.

Every rejection is counted by reason (``pdserve_requests_rejected_total{reason}``).
A pure ASGI middleware, not Starlette's BaseHTTPMiddleware: streaming responses pass
through untouched.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import TYPE_CHECKING, Any

from router import openai_protocol as oai
from router.admission import Admission, Rejection, Ticket
from router.tokenizer import TokenizerError

if TYPE_CHECKING:
    from fastapi import FastAPI

    from router.deps import RouterDeps

OPEN_PATHS = frozenset({"/health"})
METRICS_PREFIXES = ("/metrics", "/dashboard")
REJECTION_REASONS = ("unauthorized", "body_too_large", "queue_full", "ttft_slo")
DRAIN_CAP_BYTES = 64 * 1024**2  # past this a rejected body is not read: the connection closes


class Overloaded(oai.OpenAIError):
    """HTTP 429: the admission controller turned the request away."""

    def __init__(self, rejection: Rejection):
        super().__init__(429, rejection.message, "rate_limit_error", code=rejection.reason)
        self.retry_after_s = rejection.retry_after_s


def admit(deps: RouterDeps, num_prompt_tokens: int) -> Ticket:
    """Admission for one tokenized request: its queue ticket, or Overloaded (counted)."""
    views = deps.pool.prefill or deps.pool.colocated  # where prompts are computed
    rejection = deps.admission.decide(views, num_prompt_tokens, time.time())
    if rejection is not None:
        deps.metrics.record_rejection(rejection.reason)
        raise Overloaded(rejection)
    return deps.admission.admit()


def install(app: FastAPI, deps: RouterDeps) -> None:
    from fastapi import Request
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    config = deps.config
    key = config.api_key.get_secret_value().encode() if config.api_key is not None else None
    app.add_middleware(Guard, api_key=key, open_metrics=config.open_metrics,
                       max_body_bytes=config.max_request_body_bytes,
                       on_reject=deps.metrics.record_rejection)

    @app.exception_handler(Overloaded)
    async def _overloaded(_req: Request, exc: Overloaded):
        return JSONResponse(exc.body(), status_code=429,
                            headers={"Retry-After": str(exc.retry_after_s)})

    @app.exception_handler(TokenizerError)
    async def _untokenizable(_req: Request, exc: TokenizerError):
        """Text the tokenizer refuses (not valid Unicode, a broken chat template) is the
        request's fault: 400, wherever in a handler it surfaced."""
        return JSONResponse(oai.OpenAIError(400, str(exc)).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _framework_error(_req: Request, exc: StarletteHTTPException):
        """The framework's own errors (a body that is not JSON or not UTF-8, an unknown path,
        a wrong method) in OpenAI's format too, not as {"detail": ...}."""
        err = oai.OpenAIError(exc.status_code, str(exc.detail),
                              "NotFoundError" if exc.status_code == 404 else "invalid_request_error")
        return JSONResponse(err.body(), status_code=exc.status_code, headers=exc.headers)



class Guard:
    """ASGI middleware: API key, then body size, then the app."""

    def __init__(self, app: Any, *, api_key: bytes | None, open_metrics: bool,
                 max_body_bytes: int, on_reject: Any):
        self.app = app
        self._key_digest = hashlib.sha256(api_key).digest() if api_key is not None else None
        self.open_metrics = open_metrics
        self.max_body_bytes = max_body_bytes
        self.on_reject = on_reject

    def needs_key(self, path: str) -> bool:
        if self._key_digest is None or path in OPEN_PATHS:
            return False
        return not (self.open_metrics and path.startswith(METRICS_PREFIXES))

    def is_authorized(self, headers: list[tuple[bytes, bytes]]) -> bool:
        assert self._key_digest is not None
        values = [v for k, v in headers if k.lower() == b"authorization"]
        if len(values) != 1:
            return False
        scheme, _, token = values[0].strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        return hmac.compare_digest(hashlib.sha256(token.strip()).digest(), self._key_digest)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers", [])
        if self.needs_key(scope.get("path", "")) and not self.is_authorized(headers):
            self.on_reject("unauthorized")
            await _drain(receive, self.max_body_bytes)  # so the client reads the 401
            await _send_error(send, oai.OpenAIError(
                401, "Invalid or missing API key: send it as `Authorization: Bearer <key>`.",
                code="invalid_api_key"), {"WWW-Authenticate": "Bearer"})
            return
        lengths = [v for k, v in headers if k.lower() == b"content-length"]
        if lengths:
            try:
                declared = int(lengths[0])
            except ValueError:
                await _send_error(send, oai.OpenAIError(400, "malformed Content-Length header"))
                return
            if declared > self.max_body_bytes:
                self.on_reject("body_too_large")
                await _drain(receive)
                await _send_error(send, self._too_large(), {"Connection": "close"})
                return
        await self._limited(scope, receive, send)

    def _too_large(self) -> oai.OpenAIError:
        return oai.OpenAIError(413, f"the request body exceeds {self.max_body_bytes} bytes",
                               code="request_too_large")

    async def _limited(self, scope: dict, receive: Any, send: Any) -> None:
        """Run the app, answering 413 if a streamed body grows past the limit; the app then
        sees the client as gone and its own response is dropped."""
        received = 0
        state = {"rejected": False, "started": False}

        async def limited_receive() -> dict:
            nonlocal received
            if state["rejected"]:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes and not state["started"]:
                    state["rejected"] = True
                    self.on_reject("body_too_large")
                    if message.get("more_body", False):
                        await _drain(receive)
                    await _send_error(send, self._too_large(), {"Connection": "close"})
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict) -> None:
            if state["rejected"]:
                return
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        await self.app(scope, limited_receive, guarded_send)


async def _drain(receive: Any, cap_bytes: int = DRAIN_CAP_BYTES) -> None:
    """Read and drop the rest of a rejected body (up to `cap_bytes`), so the client,
    which sends its whole body before it reads, gets the error instead of a reset."""
    drained = 0
    while drained < cap_bytes:
        message = await receive()
        if message["type"] != "http.request":
            return
        drained += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


async def _send_error(send: Any, err: oai.OpenAIError, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(err.body()).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": err.status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


REQUEST_READ_TIMEOUT_S = 30.0


def read_timeout_protocol(timeout_s: float = REQUEST_READ_TIMEOUT_S) -> type:
    """uvicorn's h11 protocol class, closing a connection whose request (headers and body)
    is not read in full within `timeout_s` of the connection opening or of the previous
    response ending. Pass as ``uvicorn.Config(..., http=read_timeout_protocol())``."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class ReadTimeoutH11Protocol(H11Protocol):
        _deadline: Any = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()  # the next request on a kept-alive connection

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete \
                    and not self.cycle.more_body:
                self._disarm()  # the whole request is in

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            if not self.transport.is_closing():
                self._deadline = self.loop.call_later(timeout_s, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            reading = self.cycle is None or self.cycle.response_complete or self.cycle.more_body
            if reading and not self.transport.is_closing():
                self.transport.close()

    return ReadTimeoutH11Protocol
