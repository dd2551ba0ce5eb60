"""The OpenAI-compatible HTTP front end of pdserve.

Endpoints: POST /v1/completions, POST /v1/chat/completions (streaming SSE ending in
``data: [DONE]``, or one JSON body), GET /v1/models, GET /health, GET /metrics (Prometheus
text), GET /v1/requests/{id}/trace (a request's lifecycle events, for debugging).

Errors use OpenAI's format ``{"error": {"message", "type", "param", "code"}}``: 400 for
malformed or unsupported input and prompts that do not fit the context, 404 for an unknown
model, 503 when no worker can take the request. A streaming request is started only once
its first token exists, so failures before that still get a proper status code.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from cluster.config import RouterConfig, SLOConfig
from cluster.wire import SamplingSpec, WorkerUnavailable
from router import openai_protocol as oai
from router.dashboard import dashboard_routes
from router.handoff import Handoff, RequestFailed, RequestTrace
from router.metrics import Metrics
from router.output_text import OutputText
from router.pool import WorkerPool
from router.tokenizer import ModelTokenizer, TokenizerError

log = logging.getLogger(__name__)
MAX_TRACES = 10_000


@dataclass
class RouterDeps:
    config: RouterConfig
    slo: SLOConfig
    model_name: str
    tokenizer: ModelTokenizer
    pool: WorkerPool
    metrics: Metrics
    traces: collections.OrderedDict[str, RequestTrace] = field(default_factory=collections.OrderedDict)
    num_in_flight: int = 0

    def remember(self, trace: RequestTrace) -> None:
        self.traces[trace.request_id] = trace
        while len(self.traces) > MAX_TRACES:
            self.traces.popitem(last=False)


def _error(err: oai.OpenAIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


@dataclass
class _Prepared:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingSpec
    stop_strings: list[str]


def create_app(deps: RouterDeps) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        deps.pool.start_polling()
        try:
            yield
        finally:
            await deps.pool.stop_polling()

    app = FastAPI(title="pdserve", lifespan=lifespan)
    app.state.deps = deps
    app.include_router(dashboard_routes(deps))
    deps.pool.on_transfers = lambda _instance, transfers: deps.metrics.record_transfers(transfers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        msg = first.get("msg", "invalid request")
        return _error(oai.OpenAIError(400, f"{'.'.join(loc) or 'body'}: {msg}",
                                      param=".".join(loc) or None))

    @app.exception_handler(oai.OpenAIError)
    async def _openai_error(_req: Request, exc: oai.OpenAIError):
        return _error(exc)

    @app.get("/health")
    async def health():
        if deps.pool.is_ready():
            return {"status": "ok"}
        return _error(oai.OpenAIError(503, "workers are not ready", "service_unavailable"))

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": deps.model_name, "object": "model", "created": 0, "owned_by": "pdserve",
            "max_model_len": deps.tokenizer.max_model_len}]}

    @app.get("/metrics")
    async def metrics():
        deps.metrics.record_pool(deps.pool.all())
        deps.metrics.requests_in_flight.set(deps.num_in_flight)
        return Response(deps.metrics.exposition(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/requests/{request_id}/trace")
    async def trace(request_id: str):
        found = deps.traces.get(request_id)
        if found is None:
            raise oai.OpenAIError(404, f"no trace for request {request_id!r}", code="not_found")
        return found.to_dict()

    @app.post("/v1/completions")
    async def completions(body: oai.CompletionRequest):
        prompt = body.single_prompt()
        if isinstance(prompt, str):
            ids = deps.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            vocab_ok = all(0 <= i for i in ids)
            if not vocab_ok:
                raise oai.OpenAIError(400, "prompt token ids must be non-negative", param="prompt")
        prepared = _prepare(deps, body, ids, body.max_tokens, "cmpl")
        return await _serve(deps, prepared, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: oai.ChatCompletionRequest):
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            ids = deps.tokenizer.apply_chat_template(messages)
        except TokenizerError as e:
            raise oai.OpenAIError(400, str(e), param="messages") from e
        prepared = _prepare(deps, body, ids, body.max_new_tokens, "chatcmpl")
        return await _serve(deps, prepared, body, chat=True)

    return app


def _prepare(deps: RouterDeps, body: oai._SamplingFields, ids: list[int],
             max_tokens: int | None, prefix: str) -> _Prepared:
    if body.model != deps.model_name:
        raise oai.OpenAIError(404, f"The model `{body.model}` does not exist.",
                              "NotFoundError", param="model", code="model_not_found")
    if not ids:
        raise oai.OpenAIError(400, "the prompt is empty", param="prompt")
    limit = deps.tokenizer.max_model_len
    if len(ids) >= limit:
        raise oai.OpenAIError(
            400, f"This model's maximum context length is {limit} tokens. However, your "
            f"prompt has {len(ids)} tokens, which leaves no room for output.", param="prompt")
    if max_tokens is None:
        max_tokens = limit - len(ids)
    if len(ids) + max_tokens > limit:
        raise oai.OpenAIError(
            400, f"This model's maximum context length is {limit} tokens. However, you "
            f"requested {len(ids) + max_tokens} tokens ({len(ids)} in the prompt, {max_tokens} "
            f"for the completion). Reduce the prompt or max_tokens.", param="max_tokens")
    if body.min_tokens > max_tokens:
        raise oai.OpenAIError(400, "min_tokens must not exceed max_tokens", param="min_tokens")
    stops = body.stop_strings
    sampling = SamplingSpec(
        max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
        top_k=max(0, body.top_k), seed=body.seed, min_tokens=body.min_tokens,
        ignore_eos=body.ignore_eos, stop_token_ids=tuple(body.stop_token_ids or ()))
    return _Prepared(oai.new_id(prefix), ids, sampling, stops)


async def _serve(deps: RouterDeps, p: _Prepared, body: oai._SamplingFields, chat: bool):
    if deps.num_in_flight >= deps.config.max_pending_requests:
        raise oai.OpenAIError(503, "too many requests in flight; retry later", "service_unavailable")
    if not deps.pool.is_ready():
        raise oai.OpenAIError(503, "no worker is available", "service_unavailable")
    trace = RequestTrace(request_id=p.request_id, num_prompt_tokens=len(p.prompt_token_ids))
    deps.remember(trace)
    handoff = Handoff(deps.pool, deps.tokenizer.eos_token_ids, p.request_id,
                      p.prompt_token_ids, p.sampling, trace)
    tokens = handoff.tokens()
    text = OutputText(deps.tokenizer.detokenizer(p.prompt_token_ids), p.stop_strings)
    deps.num_in_flight += 1
    finished = False

    def finish() -> None:
        nonlocal finished
        if not finished:
            finished = True
            deps.num_in_flight -= 1
            deps.metrics.record_request(trace)

    def close_and_finish() -> None:
        """Abort what still runs and account for the request. Runs in its own task, so a
        cancelled request (client gone) cannot interrupt it."""
        closing = asyncio.ensure_future(tokens.aclose())
        closing.add_done_callback(lambda _: finish())

    # Wait for the first token before answering, so early failures get a status code.
    try:
        first_ids = await tokens.__anext__()
    except StopAsyncIteration:
        first_ids = ()
    except WorkerUnavailable as e:
        await tokens.aclose()
        finish()
        raise oai.OpenAIError(503, str(e), "service_unavailable") from e
    except RequestFailed as e:
        finish()
        raise oai.OpenAIError(500, str(e), "internal_error") from e
    except BaseException:
        await tokens.aclose()
        finish()
        raise

    async def all_text() -> AsyncIterator[str]:
        """Text deltas; ends early (closing `tokens`) when a stop string matches."""
        delta = text.add(first_ids)
        if delta.text:
            yield delta.text
        if delta.is_stopped:
            handoff.stop_early()
            return
        async for ids in tokens:
            delta = text.add(ids)
            if delta.text:
                yield delta.text
            if delta.is_stopped:
                handoff.stop_early()
                return
        rest = text.flush()
        if rest:
            yield rest

    def usage() -> dict:
        return oai.usage(len(p.prompt_token_ids), text.num_tokens)

    if not body.stream:
        try:
            pieces = [piece async for piece in all_text()]
        except RequestFailed as e:
            raise oai.OpenAIError(500, str(e), "internal_error") from e
        finally:
            close_and_finish()
        reason = trace.finish_reason or "stop"
        if chat:
            result = oai.chat_body(p.request_id, deps.model_name, "".join(pieces), reason, usage())
        else:
            result = oai.completion_body(p.request_id, deps.model_name, "".join(pieces), reason, usage())
        if body.return_token_ids:
            result["choices"][0]["token_ids"] = list(text.token_ids)
            result["prompt_token_ids"] = list(p.prompt_token_ids)
        return result

    async def sse() -> AsyncIterator[str]:
        model = deps.model_name
        try:
            if chat:
                yield _sse(oai.chat_chunk(p.request_id, model, {"role": "assistant", "content": ""}, None))
            try:
                async for piece in all_text():
                    if chat:
                        yield _sse(oai.chat_chunk(p.request_id, model, {"content": piece}, None))
                    else:
                        yield _sse(oai.completion_body(p.request_id, model, piece, None, None))
            except RequestFailed as e:
                err = oai.OpenAIError(500, str(e), "internal_error")
                yield _sse(err.body())
                yield "data: [DONE]\n\n"
                return
            reason = trace.finish_reason or "stop"
            if chat:
                yield _sse(oai.chat_chunk(p.request_id, model, {}, reason))
            else:
                yield _sse(oai.completion_body(p.request_id, model, "", reason, None))
            if body.include_usage:
                if chat:
                    yield _sse(oai.chat_chunk(p.request_id, model, {}, None, usage(), with_choice=False))
                else:
                    use_body = oai.completion_body(p.request_id, model, "", None, usage())
                    use_body["choices"] = []
                    yield _sse(use_body)
            yield "data: [DONE]\n\n"
        finally:
            close_and_finish()

    return StreamingResponse(sse(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Request-Id": p.request_id})


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
