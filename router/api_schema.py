"""What the OpenAPI schema declares beyond the request models: every error status a route
can answer (all in OpenAI's error format), the headers that come with 401 and 429, and the
`text/event-stream` body of streamed answers. Routes pass these as `responses=`, so
clients and fuzzers (schemathesis, tests/router/test_fuzz.py) can hold pdserve to them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorDetail


_DESCRIPTIONS = {
    400: "Malformed or unsupported input, or a prompt that does not fit the context",
    401: "Missing or wrong API key (`Authorization: Bearer <key>`)",
    404: "Unknown model, or no such request trace",
    413: "Request body over `router.max_request_body_bytes`",
    429: "Overloaded: the queue is full or the predicted time to first token is far over the SLO",
    500: "A worker failed the request",
    503: "No worker can take the request (none ready, or too many in flight)",
}
_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}},
    429: {"Retry-After": {"description": "Seconds until a retry is likely to be admitted",
                          "schema": {"type": "integer", "minimum": 1}}},
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        out[status] = {"model": ErrorResponse, "description": _DESCRIPTIONS[status]}
        if status in _HEADERS:
            out[status]["headers"] = _HEADERS[status]
    return out


# A generation endpoint: one JSON body, or (stream: true) server-sent events ending in
# `data: [DONE]`; every error the router, its guard and the admission controller produce.
GENERATION: dict[int | str, dict[str, Any]] = {
    200: {"description": "The answer: a JSON body, or with `stream: true` server-sent events "
                         "ending in `data: [DONE]`",
          "content": {"application/json": {}, "text/event-stream": {}}},
    **errors(400, 401, 404, 413, 429, 500, 503),
}
HEALTH = errors(503)
GUARDED = errors(401)  # reads behind the API key
TRACE = errors(401, 404)
METRICS: dict[int | str, dict[str, Any]] = {
    200: {"description": "Prometheus text exposition", "content": {"text/plain": {}}},
    **errors(401),
}
