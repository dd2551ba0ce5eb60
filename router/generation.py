"""One admitted request's answer: its handoff through the pools, its text, its accounting,
written back as one JSON body or as server-sent events (`serve`). `router/app.py` parses
and checks the request (`Prepared`); `router/fanout.py` runs n > 1 choices on `Generation`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi.responses import StreamingResponse

from cluster.wire import SamplingSpec, TokenDelta, TokenLogprob, WorkerUnavailable
from router import chat_output, guard
from router import openai_protocol as oai
from router.deps import RouterDeps
from router.handoff import Handoff, RequestFailed, RequestTrace
from router.logprobs import LogprobFormatter
from router.output_text import OutputText


@dataclass(frozen=True)
class OutputOptions:
    """How the answer is written back (everything the router, not an engine, does)."""

    stop_strings: list[str]
    include_stop_str: bool
    skip_special_tokens: bool
    return_token_ids: bool
    logprobs: LogprobFormatter | None


@dataclass
class Prepared:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingSpec
    output: OutputOptions
    prompt_text: str | None = None  # the rendered chat prompt, when asked for
    tool_choice: chat_output.ToolChoice = chat_output.NO_TOOLS


@dataclass
class Chunk:
    """What one step of the workers added to the answer."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]


class Generation:
    """One admitted request: its handoff through the pools, its text, its accounting.

    `start()` waits for the first token (so failures before it still get a status code),
    `chunks()` yields the answer step by step, `close()` aborts what still runs and accounts
    for the request exactly once, in its own task so a cancelled request cannot interrupt it.
    """

    def __init__(self, deps: RouterDeps, p: Prepared):
        if deps.num_in_flight >= deps.config.max_pending_requests:
            raise oai.OpenAIError(503, "too many requests in flight; retry later",
                                  "service_unavailable")
        if not deps.pool.is_ready():
            raise oai.OpenAIError(503, "no worker is available", "service_unavailable")
        self.deps = deps
        self.p = p
        self.trace = RequestTrace(request_id=p.request_id, num_prompt_tokens=len(p.prompt_token_ids),
                                  max_tokens=p.sampling.max_tokens)
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

    def _add(self, delta: TokenDelta) -> tuple[Chunk, bool]:
        if self.p.output.logprobs is not None and delta.token_ids and (
                delta.logprobs is None or len(delta.logprobs) != len(delta.token_ids)):
            raise RequestFailed("a worker returned tokens without the logprobs asked for")
        before = self.text.num_tokens
        added = self.text.add(delta.token_ids)
        num_kept = self.text.num_tokens - before  # tokens up to a stop match
        logprobs = list(delta.logprobs[:num_kept]) if delta.logprobs else []
        return Chunk(added.text, list(delta.token_ids[:num_kept]), logprobs), added.is_stopped

    async def chunks(self) -> AsyncIterator[Chunk]:
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
            yield Chunk(rest, [], [])

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


async def serve(deps: RouterDeps, p: Prepared, body: oai._SamplingFields, chat: bool):
    if body.n is not None and body.n > 1:
        # Several choices, one prefill (router/fanout.py); imported here because it builds
        # on this module. The single-choice path below is untouched.
        from router import fanout
        return await fanout.serve(deps, p, body, chat)
    gen = Generation(deps, p)
    await gen.start()
    if not body.stream:
        return await whole_body(gen, chat)
    return StreamingResponse(sse_events(gen, body, chat), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Request-Id": p.request_id})


async def whole_body(gen: Generation, chat: bool) -> dict:
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


async def sse_events(gen: Generation, body: oai._SamplingFields, chat: bool) -> AsyncIterator[str]:
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
            yield sse(first)
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
                        yield sse(event)
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
                yield sse(event)
        except RequestFailed as e:
            yield sse(oai.OpenAIError(500, str(e), "internal_error").body())
            yield "data: [DONE]\n\n"
            return
        use = gen.usage() if continuous else None
        if chat:
            for delta in deltas.end():
                yield sse(oai.chat_chunk(rid, model, delta, None, use))
            reason = chat_output.finish_reason(p.tool_choice, gen.finish_reason, deltas.calls)
            last = oai.chat_chunk(rid, model, {}, reason, use)
        else:
            last = oai.completion_body(rid, model, "", gen.finish_reason, use)
        last["choices"][0]["stop_reason"] = gen.stop_reason
        yield sse(last)
        if body.include_usage:
            if chat:
                yield sse(oai.chat_chunk(rid, model, {}, None, gen.usage(), with_choice=False))
            else:
                final = oai.completion_body(rid, model, "", None, gen.usage())
                final["choices"] = []
                yield sse(final)
        yield "data: [DONE]\n\n"
    finally:
        gen.close()


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
