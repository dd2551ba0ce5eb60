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
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import msgspec
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from cluster.config import RouterConfig, SLOConfig
from cluster.wire import SamplingSpec, TokenDelta, TokenLogprob, WorkerUnavailable
from router import chat_output
from router import openai_protocol as oai
from router import api_schema, guard
from router.admission import Admission
from router.dashboard import dashboard_routes
from router.handoff import Handoff, RequestFailed, RequestTrace
from router.logprobs import LogprobFormatter
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
    admission: Admission = field(init=False)

    def __post_init__(self) -> None:
        self.admission = Admission(self.config, self.slo)

    def remember(self, trace: RequestTrace) -> None:
        self.traces[trace.request_id] = trace
        while len(self.traces) > MAX_TRACES:
            self.traces.popitem(last=False)


def _error(err: oai.OpenAIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


@dataclass(frozen=True)
class _OutputOptions:
    """How the answer is written back (everything the router, not an engine, does)."""

    stop_strings: list[str]
    include_stop_str: bool
    skip_special_tokens: bool
    return_token_ids: bool
    logprobs: LogprobFormatter | None


@dataclass
class _Prepared:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingSpec
    output: _OutputOptions
    prompt_text: str | None = None  # the rendered chat prompt, when asked for
    tool_choice: chat_output.ToolChoice = chat_output.NO_TOOLS


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
        return await _serve(deps, prepared, body, chat=False)

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
        return await _serve(deps, prepared, body, chat=True)

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
             max_tokens: int | None, prefix: str) -> _Prepared:
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
    output = _OutputOptions(
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
    return _Prepared(request_id, ids, sampling, output)


@dataclass
class _Chunk:
    """What one step of the workers added to the answer."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]


class _Generation:
    """One admitted request: its handoff through the pools, its text, its accounting.

    `start()` waits for the first token (so failures before it still get a status code),
    `chunks()` yields the answer step by step, `close()` aborts what still runs and accounts
    for the request exactly once, in its own task so a cancelled request cannot interrupt it.
    """

    def __init__(self, deps: RouterDeps, p: _Prepared):
        if deps.num_in_flight >= deps.config.max_pending_requests:
            raise oai.OpenAIError(503, "too many requests in flight; retry later",
                                  "service_unavailable")
        if not deps.pool.is_ready():
            raise oai.OpenAIError(503, "no worker is available", "service_unavailable")
        self.deps = deps
        self.p = p
        self.trace = RequestTrace(request_id=p.request_id, num_prompt_tokens=len(p.prompt_token_ids))
        self.handoff = Handoff(deps.pool, deps.tokenizer.eos_token_ids, p.request_id,
                               p.prompt_token_ids, p.sampling, self.trace)
        self._tokens = self.handoff.tokens()
        detok = deps.tokenizer.detokenizer(p.prompt_token_ids, p.output.skip_special_tokens)
        self.text = OutputText(detok, p.output.stop_strings, p.output.include_stop_str)
        self._first: TokenDelta | None = None
        self._is_finished = False
        # Admission last: nothing after it can fail, so a ticket taken is always released.
        self._ticket = guard.admit(deps, len(p.prompt_token_ids))  # 429 when overloaded
        deps.remember(self.trace)
        deps.num_in_flight += 1

    def _finish(self) -> None:
        if not self._is_finished:
            self._is_finished = True
            self._ticket.release()
            self.deps.admission.observe(self.trace)
            self.deps.num_in_flight -= 1
            self.deps.metrics.record_request(self.trace)

    def close(self) -> None:
        closing = asyncio.ensure_future(self._tokens.aclose())
        closing.add_done_callback(lambda _: self._finish())

    async def start(self) -> None:
        try:
            self._first = await self._tokens.__anext__()
        except StopAsyncIteration:
            self._first = None
        except WorkerUnavailable as e:
            await self._tokens.aclose()
            self._finish()
            raise oai.OpenAIError(503, str(e), "service_unavailable") from e
        except RequestFailed as e:
            self._finish()
            raise oai.OpenAIError(500, str(e), "internal_error") from e
        except BaseException:
            await self._tokens.aclose()
            self._finish()
            raise
        self._ticket.release()  # the first token exists: no longer queued

    def _add(self, delta: TokenDelta) -> tuple[_Chunk, bool]:
        if self.p.output.logprobs is not None and delta.token_ids and (
                delta.logprobs is None or len(delta.logprobs) != len(delta.token_ids)):
            raise RequestFailed("a worker returned tokens without the logprobs asked for")
        before = self.text.num_tokens
        added = self.text.add(delta.token_ids)
        num_kept = self.text.num_tokens - before  # tokens up to a stop match
        logprobs = list(delta.logprobs[:num_kept]) if delta.logprobs else []
        return _Chunk(added.text, list(delta.token_ids[:num_kept]), logprobs), added.is_stopped

    async def chunks(self) -> AsyncIterator[_Chunk]:
        """The answer step by step; ends early (closing the handoff) at a stop string."""
        if self._first is not None:
            chunk, is_stopped = self._add(self._first)
            yield chunk
            if is_stopped:
                self.handoff.stop_early()
                return
            async for delta in self._tokens:
                chunk, is_stopped = self._add(delta)
                yield chunk
                if is_stopped:
                    self.handoff.stop_early()
                    return
        rest = self.text.flush()
        if rest:
            yield _Chunk(rest, [], [])

    @property
    def finish_reason(self) -> str:
        return self.trace.finish_reason or "stop"

    def usage(self) -> dict:
        return oai.usage(len(self.p.prompt_token_ids), self.text.num_tokens)

    @property
    def stop_reason(self) -> str | int | None:
        """vLLM's `stop_reason`: the stop string or stop token id that ended the answer
        (None for EOS, a length limit or an abort)."""
        if self.text.matched_stop is not None:
            return self.text.matched_stop
        ids = self.text.token_ids
        if self.finish_reason != "stop" or not ids:
            return None
        tokenizer = self.deps.tokenizer
        last = ids[-1]
        if last in self.p.sampling.stop_token_ids or (
                last in tokenizer.eos_token_ids and last != tokenizer.primary_eos_token_id):
            return last
        return None


async def _serve(deps: RouterDeps, p: _Prepared, body: oai._SamplingFields, chat: bool):
    if body.n is not None and body.n > 1:
        # Several choices, one prefill (router/fanout.py); imported here because it builds
        # on this module. The single-choice path below is untouched.
        from router import fanout
        return await fanout.serve(deps, p, body, chat)
    gen = _Generation(deps, p)
    await gen.start()
    if not body.stream:
        return await _whole_body(gen, chat)
    return StreamingResponse(_sse_events(gen, body, chat), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Request-Id": p.request_id})


async def _whole_body(gen: _Generation, chat: bool) -> dict:
    p, model = gen.p, gen.deps.model_name
    pieces: list[str] = []
    logprobs: list[TokenLogprob] = []
    try:
        async for chunk in gen.chunks():
            pieces.append(chunk.text)
            logprobs.extend(chunk.logprobs)
    except RequestFailed as e:
        raise oai.OpenAIError(500, str(e), "internal_error") from e
    finally:
        gen.close()
    fmt = p.output.logprobs
    text = "".join(pieces)
    if chat:
        message, calls = chat_output.whole_message(p.tool_choice, text)
        result = oai.chat_body(p.request_id, model, message,
                               chat_output.finish_reason(p.tool_choice, gen.finish_reason, calls),
                               gen.usage(), fmt.chat(logprobs) if fmt else None)
        if p.prompt_text is not None:
            result["prompt_text"] = p.prompt_text
    else:
        result = oai.completion_body(p.request_id, model, text, gen.finish_reason, gen.usage(),
                                     fmt.completion(logprobs) if fmt else None)
    result["choices"][0]["stop_reason"] = gen.stop_reason
    if p.output.return_token_ids:
        result["choices"][0]["token_ids"] = list(gen.text.token_ids)
        # Where vLLM puts them: on the response for chat, on the choice for completions.
        (result if chat else result["choices"][0])["prompt_token_ids"] = list(p.prompt_token_ids)
    return result


async def _sse_events(gen: _Generation, body: oai._SamplingFields, chat: bool) -> AsyncIterator[str]:
    p, model, rid = gen.p, gen.deps.model_name, gen.p.request_id
    fmt = p.output.logprobs
    continuous = body.include_usage and body.continuous_usage
    num_chars = 0  # text sent so far (completions' logprob text offsets)
    try:
        if chat:
            first = oai.chat_chunk(rid, model, {"role": "assistant", "content": ""}, None)
            if p.output.return_token_ids:
                first["prompt_token_ids"] = list(p.prompt_token_ids)
            if p.prompt_text is not None:
                first["prompt_text"] = p.prompt_text
            yield _sse(first)
        deltas = chat_output.StreamDeltas(p.tool_choice)
        try:
            is_first = True
            async for chunk in gen.chunks():
                if not chunk.text and not chunk.logprobs and not (
                        p.output.return_token_ids and chunk.token_ids):
                    continue  # (a token whose text is held back still has its id to send)
                use = gen.usage() if continuous else None
                if chat:
                    ids_due = p.output.return_token_ids and chunk.token_ids
                    for i, delta in enumerate(deltas.step(chunk.text) or ([{}] if chunk.logprobs or ids_due else [])):
                        event = oai.chat_chunk(
                            rid, model, delta, None, use,
                            logprobs=fmt.chat(chunk.logprobs) if fmt and i == 0 else None)
                        if p.output.return_token_ids:
                            event["choices"][0]["token_ids"] = chunk.token_ids if i == 0 else []
                        yield _sse(event)
                    continue
                else:
                    event = oai.completion_body(
                        rid, model, chunk.text, None, use,
                        fmt.completion(chunk.logprobs, num_chars) if fmt else None)
                    if p.output.return_token_ids and is_first:
                        event["choices"][0]["prompt_token_ids"] = list(p.prompt_token_ids)
                if p.output.return_token_ids:
                    event["choices"][0]["token_ids"] = chunk.token_ids
                num_chars += len(chunk.text)
                is_first = False
                yield _sse(event)
        except RequestFailed as e:
            yield _sse(oai.OpenAIError(500, str(e), "internal_error").body())
            yield "data: [DONE]\n\n"
            return
        use = gen.usage() if continuous else None
        if chat:
            for delta in deltas.end():
                yield _sse(oai.chat_chunk(rid, model, delta, None, use))
            reason = chat_output.finish_reason(p.tool_choice, gen.finish_reason, deltas.calls)
            last = oai.chat_chunk(rid, model, {}, reason, use)
        else:
            last = oai.completion_body(rid, model, "", gen.finish_reason, use)
        last["choices"][0]["stop_reason"] = gen.stop_reason
        yield _sse(last)
        if body.include_usage:
            if chat:
                yield _sse(oai.chat_chunk(rid, model, {}, None, gen.usage(), with_choice=False))
            else:
                final = oai.completion_body(rid, model, "", None, gen.usage())
                final["choices"] = []
                yield _sse(final)
        yield "data: [DONE]\n\n"
    finally:
        gen.close()


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
