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

import contextlib
import logging
import secrets

import msgspec
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from cluster.wire import SamplingSpec
from router import api_schema, chat_output, guard
from router import openai_protocol as oai
from router.dashboard import dashboard_routes
from router.deps import RouterDeps
from router.generation import OutputOptions, Prepared, serve
from router.logprobs import LogprobFormatter
from router.tokenizer import TokenizerError

log = logging.getLogger(__name__)


def _error(err: oai.OpenAIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


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
    guard.install(app, deps)  # API keys, body limit, 429s (router/guard.py)
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

    @app.get("/health", responses=api_schema.HEALTH)
    async def health():
        if deps.pool.is_ready():
            return {"status": "ok"}
        return _error(oai.OpenAIError(503, "workers are not ready", "service_unavailable"))

    @app.get("/v1/models", responses=api_schema.GUARDED)
    async def models():
        return {"object": "list", "data": [{
            "id": deps.model_name, "object": "model", "created": 0, "owned_by": "pdserve",
            "max_model_len": deps.tokenizer.max_model_len}]}

    @app.get("/metrics", responses=api_schema.METRICS)
    async def metrics():
        deps.metrics.record_pool(deps.pool.all())
        deps.metrics.requests_in_flight.set(deps.num_in_flight)
        return Response(deps.metrics.exposition(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/requests/{request_id}/trace", responses=api_schema.TRACE)
    async def trace(request_id: str):
        found = deps.traces.get(request_id)
        if found is None:
            raise oai.OpenAIError(404, f"no trace for request {request_id!r}", code="not_found")
        return found.to_dict()

    @app.post("/v1/completions", responses=api_schema.GENERATION)
    async def completions(body: oai.CompletionRequest):
        prompt = body.single_prompt()
        if isinstance(prompt, str):
            add_special = True if body.add_special_tokens is None else body.add_special_tokens
            ids = deps.tokenizer.encode(prompt, add_special_tokens=add_special)
        else:
            ids = list(prompt)
            if not all(0 <= i for i in ids):
                raise oai.OpenAIError(400, "prompt token ids must be non-negative", param="prompt")
        prepared = _prepare(deps, body, body.truncate(ids), body.max_tokens, "cmpl")
        return await serve(deps, prepared, body, chat=False)

    @app.post("/v1/chat/completions", responses=api_schema.GENERATION)
    async def chat_completions(body: oai.ChatCompletionRequest):
        messages = [m.for_template() for m in body.messages]
        try:
            text = deps.tokenizer.render_chat(messages, chat_template=body.chat_template,
                                              **body.template_kwargs())
        except TokenizerError as e:
            raise oai.OpenAIError(400, str(e), param="messages") from e
        ids = deps.tokenizer.encode(text, add_special_tokens=bool(body.add_special_tokens))
        prepared = _prepare(deps, body, body.truncate(ids), body.max_new_tokens, "chatcmpl")
        if body.return_prompt_text:
            prepared.prompt_text = text
        prepared.tool_choice = _tool_choice(body)
        return await serve(deps, prepared, body, chat=True)

    return app


def _tool_choice(body: oai.ChatCompletionRequest) -> chat_output.ToolChoice:
    choice = body.tool_choice
    is_parallel = body.parallel_tool_calls is not False
    if isinstance(choice, oai.NamedToolChoice):
        return chat_output.ToolChoice("named", choice.function.name, is_parallel)
    if choice in ("auto", "required"):
        return chat_output.ToolChoice(choice, None, is_parallel)
    return chat_output.NO_TOOLS


def _check_vocabulary(deps: RouterDeps, ids: list[int], body: oai._SamplingFields) -> None:
    """Token ids outside the vocabulary get 400 here: an engine would fail the request
    (a 500), and an id past 64 bits does not even fit the worker wire."""
    vocab = deps.tokenizer.vocab_size
    for name, values in (("prompt", ids), ("stop_token_ids", body.stop_token_ids or ()),
                         ("allowed_token_ids", body.allowed_token_ids or ()),
                         ("logit_bias", [i for i, _ in body.logit_bias_ids])):
        if any(not 0 <= i < vocab for i in values):
            raise oai.OpenAIError(400, f"`{name}` holds token ids outside the vocabulary "
                                  f"(0 to {vocab - 1})", param=name)


def _prepare(deps: RouterDeps, body: oai._SamplingFields, ids: list[int],
             max_tokens: int | None, prefix: str) -> Prepared:
    if body.model != deps.model_name:
        raise oai.OpenAIError(404, f"The model `{body.model}` does not exist.",
                              "NotFoundError", param="model", code="model_not_found")
    if not ids:
        raise oai.OpenAIError(400, "the prompt is empty", param="prompt")
    _check_vocabulary(deps, ids, body)
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
    sampling = SamplingSpec(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=max(0, body.top_k or 0), min_p=body.min_p or 0.0, seed=body.seed,
        min_tokens=body.min_tokens, ignore_eos=body.ignore_eos,
        stop_token_ids=tuple(body.stop_token_ids or ()),
        frequency_penalty=body.frequency_penalty or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        logit_bias=body.logit_bias_ids,
        allowed_token_ids=tuple(body.allowed_token_ids) if body.allowed_token_ids else None,
        bad_words=tuple(body.bad_words), stream_interval=body.stream_interval,
        num_logprobs=body.num_logprobs, structured=body.structured_spec())
    if sampling.depends_on_output and sampling.seed is None and sampling.temperature > 0:
        # Decode samples prefill's first token again (see Handoff._decode); with one seed
        # for both engines it draws the same token. A random seed is as random as none.
        sampling = msgspec.structs.replace(sampling, seed=secrets.randbits(63))
    output = OutputOptions(
        stop_strings=body.stop_strings, include_stop_str=body.include_stop_str_in_output,
        skip_special_tokens=body.skip_special_tokens,
        return_token_ids=bool(body.return_token_ids),
        logprobs=None if body.num_logprobs is None else LogprobFormatter(
            deps.tokenizer.decode_with_special, body.num_logprobs, bool(body.return_tokens_as_token_ids)))
    request_id = oai.new_id(prefix) if body.request_id is None else f"{prefix}-{body.request_id}"
    if body.request_id is not None:
        known = deps.traces.get(request_id)
        if known is not None and not known.state.is_final:
            raise oai.OpenAIError(400, f"request_id {body.request_id!r} is already in flight",
                                  param="request_id")
    return Prepared(request_id, ids, sampling, output)
