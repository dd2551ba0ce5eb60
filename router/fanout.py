"""`n > 1`: several choices of one request, with the prompt computed once.

Disaggregated (the way only a disaggregated server can)::

    one prefill, num_kv_claims=n ──▶ the prompt's KV staged once, split into n claims
        choice i ──Handoff.tokens_from_claim(claim i)──▶ a decode (prompt alone, seed + i):
            loads the KV of every prompt token but the last, computes that one, samples
            choice i's own first token, decodes on
        a claim whose choice never reaches its decode is released; one nobody takes in
        time is reclaimed by the prefill's lease (kvtransfer/claims.py)

Why each decode samples its own first token: prefill samples one token from one generator,
and choice i needs a draw of its own (vLLM's seed rule: child i of a request with seed s
samples with seed s + i, `vllm/v1/engine/parallel_sampling.py`; without a seed, n
independent draws). vLLM's engine cannot return n samples of one prefill's first position
(its `n` fans out into n child requests, `ParentRequest`), so prefill would need n separate
requests anyway. Decode recomputing the last prompt position costs one position per choice,
the same path output-dependent sampling already takes (`Handoff._decode`), and it keeps
each choice's sampler state (grammar, penalties, seed) whole from its first token. The token
prefill samples is not any choice's: it is dropped.

Colocated: n whole requests on the colocated pool, seeds s + i, which is exactly what vLLM's
own engine does with `n` (n child requests, the prompt's blocks shared through the prefix
cache). Routing one request's choices to the same instance keeps that sharing: the router's
prefix-aware pick prefers the instance that holds the prompt.

The response is vLLM's: choices indexed 0..n-1 (streamed: chat's role chunk per choice
first, then each chunk with its choice's index, a finish chunk per choice as it ends);
usage counts the prompt once and sums the choices' completion tokens.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from fastapi.responses import StreamingResponse

from cluster.wire import EngineRequest, KVHandle, PrefillResult, SamplingSpec
from router import chat_output
from router import openai_protocol as oai
from router.deps import RouterDeps
from router.generation import Generation, Prepared, sse, whole_body
from router.handoff import RequestFailed, RequestState
from router.pool import InstanceView, RouteRequest

# What prefill samples for a fan-out: one token nobody uses (each decode samples its own),
# so no constraint, logprobs or penalty is computed for it.
_PREFILL_ONLY = SamplingSpec(max_tokens=1, temperature=0.0)


def child_sampling(sampling: SamplingSpec, seed: int | None, index: int) -> SamplingSpec:
    """Choice `index`'s sampling: vLLM's rule (`ParentRequest._get_child_sampling_params`),
    seed + index when the client set a seed, else no seed (n independent draws). `seed` is
    the client's, not a seed the router drew for the replayed-first-token path: choices
    replay nothing."""
    return msgspec.structs.replace(sampling, seed=None if seed is None else seed + index)


def child_request_id(request_id: str, index: int) -> str:
    return f"{index}_{request_id}"  # vLLM's child request ids


class _Choice(Generation):
    """One choice: a `Generation` whose tokens come from a claim on a shared prefill
    (disaggregated) or from its own whole request (colocated)."""

    def __init__(self, deps: RouterDeps, p: Prepared, index: int):
        super().__init__(deps, p)
        self.index = index
        # Disaggregated: this choice's claim and the prefill holding it, until its token
        # stream starts (then the handoff owns the claim: it hands it to a decode or
        # releases it).
        self.claim: tuple[InstanceView, KVHandle] | None = None

    def attach_claim(self, prefill: InstanceView, result: PrefillResult, claim: KVHandle) -> None:
        self._tokens = self.handoff.tokens_from_claim(
            prefill, claim, (result.prefill_start_s, result.prefill_end_s))
        self.claim = (prefill, claim)


async def serve(deps: RouterDeps, p: Prepared, body: oai._SamplingFields, chat: bool):
    n = body.n or 1
    choices: list[_Choice] = []
    try:
        for i in range(n):  # admission (429/503) before any work
            choices.append(_Choice(deps, dataclasses.replace(
                p, request_id=child_request_id(p.request_id, i),
                sampling=child_sampling(p.sampling, body.seed, i)), i))
    except BaseException:
        _fail_unstarted(choices, "not admitted")
        raise
    if deps.pool.is_disaggregated:
        try:
            view, result = await _prefill_once(deps, p, n)
        except BaseException as e:
            _fail_unstarted(choices, str(e))
            raise
        for choice, claim in zip(choices, result.kv_claims):
            choice.attach_claim(view, result, claim)
    await _start_all(deps, choices)
    if not body.stream:
        return await _whole_bodies(p, choices, chat)
    return StreamingResponse(_sse_events(deps, p, choices, body, chat),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Request-Id": p.request_id})


async def _prefill_once(deps: RouterDeps, p: Prepared, n: int
                        ) -> tuple[InstanceView, PrefillResult]:
    """The shared prefill: the prompt computed once, its KV staged in n claims."""
    pool = deps.pool
    route = RouteRequest(tuple(p.prompt_token_ids))
    try:
        view = pool.pick_prefill(route)
    except Exception as e:
        raise oai.OpenAIError(503, str(e), "service_unavailable") from e
    view.remember_prefix(route)
    num_prompt = len(p.prompt_token_ids)
    pool.begin(view, num_prompt)
    try:
        result = await view.client.prefill(EngineRequest(  # type: ignore[attr-defined]
            request_id=p.request_id, prompt_token_ids=tuple(p.prompt_token_ids),
            sampling=_PREFILL_ONLY, num_kv_claims=n))
    except asyncio.CancelledError:
        pool.in_background(view.client.abort(p.request_id))  # it releases what it staged
        raise
    except Exception as e:
        raise oai.OpenAIError(500, f"prefill failed on {view.instance_id}: {e}",
                              "internal_error") from e
    finally:
        pool.prompt_done(view, num_prompt)
        pool.end(view)
    if len(result.kv_claims) != n:
        for handle in (*result.kv_claims, *([result.kv_handle] if result.kv_handle else [])):
            pool.in_background(view.client.release_kv(handle))  # type: ignore[attr-defined]
        raise oai.OpenAIError(500, f"prefill on {view.instance_id} staged {len(result.kv_claims)} "
                              f"claims for {n} choices", "internal_error")
    return view, result


def _fail_unstarted(choices: list[_Choice], error: str) -> None:
    for choice in choices:
        if choice.trace.state == RequestState.QUEUED:
            choice.trace.error = error
            choice.trace.finish_reason = "error"
            choice.trace.move_to(RequestState.FAILED)
        choice.close()


def _release_untaken_claims(deps: RouterDeps, choices: list[_Choice]) -> None:
    """A choice whose token stream never ran never took its claim: give it back."""
    for choice in choices:
        # The handoff names the prefill in its trace the moment it takes the claim.
        if choice.claim is not None and choice.trace.prefill_instance is None:
            view, claim = choice.claim
            deps.pool.in_background(view.client.release_kv(claim))  # type: ignore[attr-defined]
        choice.claim = None


async def _start_all(deps: RouterDeps, choices: list[_Choice]) -> None:
    """Every choice's first token (so a failure still gets a status code); any failure
    closes them all."""
    tasks = [asyncio.ensure_future(c.start()) for c in choices]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        _fail_unstarted(choices, "another choice failed")
        _release_untaken_claims(deps, choices)
        raise


async def _whole_bodies(p: Prepared, choices: list[_Choice], chat: bool) -> dict[str, Any]:
    tasks = [asyncio.ensure_future(whole_body(c, chat)) for c in choices]
    try:
        results = await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()  # one failed or the client left: the rest stop (each closes itself)
    merged = {**results[0], "id": p.request_id, "usage": _usage(p, choices), "choices": []}
    for choice, result in zip(choices, results):
        body = result["choices"][0]
        body["index"] = choice.index
        merged["choices"].append(body)
    return merged


def _usage(p: Prepared, choices: list[_Choice]) -> dict[str, int]:
    """The prompt once, the choices' completion tokens summed (vLLM's accounting)."""
    return oai.usage(len(p.prompt_token_ids), sum(c.text.num_tokens for c in choices))


def _indexed(event: dict[str, Any], index: int) -> dict[str, Any]:
    event["choices"][0]["index"] = index
    return event


async def _choice_events(choice: _Choice, rid: str, body: oai._SamplingFields, chat: bool
                         ) -> AsyncIterator[dict[str, Any]]:
    """One choice's stream events (generation.sse_events' per-choice part, with its index)."""
    p, model, index = choice.p, choice.deps.model_name, choice.index
    fmt = p.output.logprobs
    continuous = body.include_usage and body.continuous_usage
    num_chars = 0
    deltas = chat_output.StreamDeltas(p.tool_choice)
    is_first = True
    async for chunk in choice.chunks():
        if not chunk.text and not chunk.logprobs:
            continue
        use = choice.usage() if continuous else None
        if chat:
            for i, delta in enumerate(deltas.step(chunk.text) or ([{}] if chunk.logprobs else [])):
                event = oai.chat_chunk(rid, model, delta, None, use,
                                       logprobs=fmt.chat(chunk.logprobs) if fmt and i == 0 else None)
                if p.output.return_token_ids:
                    event["choices"][0]["token_ids"] = chunk.token_ids if i == 0 else []
                yield _indexed(event, index)
            continue
        event = oai.completion_body(rid, model, chunk.text, None, use,
                                    fmt.completion(chunk.logprobs, num_chars) if fmt else None)
        if p.output.return_token_ids:
            if is_first:
                event["choices"][0]["prompt_token_ids"] = list(p.prompt_token_ids)
            event["choices"][0]["token_ids"] = chunk.token_ids
        num_chars += len(chunk.text)
        is_first = False
        yield _indexed(event, index)
    use = choice.usage() if continuous else None
    if chat:
        for delta in deltas.end():
            yield _indexed(oai.chat_chunk(rid, model, delta, None, use), index)
        reason = chat_output.finish_reason(p.tool_choice, choice.finish_reason, deltas.calls)
        last = oai.chat_chunk(rid, model, {}, reason, use)
    else:
        last = oai.completion_body(rid, model, "", choice.finish_reason, use)
    last["choices"][0]["stop_reason"] = choice.stop_reason
    yield _indexed(last, index)


async def _pump(choice: _Choice, rid: str, body: oai._SamplingFields, chat: bool,
                queue: asyncio.Queue) -> None:
    try:
        async for event in _choice_events(choice, rid, body, chat):
            await queue.put(event)
        await queue.put(None)  # this choice is done
    except Exception as e:  # RequestFailed, or a router bug: the merger reports it
        await queue.put(e)
    finally:
        choice.close()


async def _sse_events(deps: RouterDeps, p: Prepared, choices: list[_Choice],
                      body: oai._SamplingFields, chat: bool) -> AsyncIterator[str]:
    rid, model = p.request_id, deps.model_name
    queue: asyncio.Queue = asyncio.Queue()
    tasks: list[asyncio.Task] = []
    try:
        if chat:  # vLLM: every choice's role chunk first
            for choice in choices:
                first = _indexed(oai.chat_chunk(rid, model, {"role": "assistant", "content": ""},
                                                None), choice.index)
                if p.output.return_token_ids:
                    first["prompt_token_ids"] = list(p.prompt_token_ids)
                if p.prompt_text is not None:
                    first["prompt_text"] = p.prompt_text
                yield sse(first)
        tasks = [asyncio.ensure_future(_pump(c, rid, body, chat, queue)) for c in choices]
        num_running = len(tasks)
        while num_running:
            item = await queue.get()
            if item is None:
                num_running -= 1
            elif isinstance(item, RequestFailed):
                yield sse(oai.OpenAIError(500, str(item), "internal_error").body())
                yield "data: [DONE]\n\n"
                return
            elif isinstance(item, BaseException):
                raise item
            else:
                yield sse(item)
        if body.include_usage:
            use = _usage(p, choices)
            if chat:
                yield sse(oai.chat_chunk(rid, model, {}, None, use, with_choice=False))
            else:
                final = oai.completion_body(rid, model, "", None, use)
                final["choices"] = []
                yield sse(final)
        yield "data: [DONE]\n\n"
    finally:
        for t in tasks:
            t.cancel()
        for choice in choices:
            choice.close()
