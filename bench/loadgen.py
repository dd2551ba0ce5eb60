"""Open-loop load generator for an OpenAI-compatible server, measuring at the client.

Each request is sent at its scheduled offset whatever the server's state (open loop:
a slow server does not slow the arrivals down), as a streaming `POST /v1/completions`:

    {"model", "prompt", "max_tokens": n, "min_tokens": n, "ignore_eos": true,
     "stream": true, "stream_options": {"include_usage": true}, "temperature": 0}

`ignore_eos` and `min_tokens` are vLLM's extra sampling fields; together with
`max_tokens` they make the output exactly n tokens long. The prompt is plain text built
to an exact token count (`bench.prompts`), which the server tokenizes the same way.

What is measured, per request, with `time.perf_counter` from just before the request
is sent:
- a *token-bearing chunk* is an SSE `data:` event whose first choice has non-empty text
  or has no `finish_reason` yet (vLLM streams an empty-text chunk for a token that ends
  inside a multi-byte character; a chunk that only carries `finish_reason` is not a
  token);
- TTFT = arrival of the first token-bearing chunk, e2e = arrival of the last one;
- the output token count comes from the final usage chunk (`completion_tokens`), which
  is exact even when the server packs several tokens into one chunk; without usage, each
  token-bearing chunk counts as one token;
- inter-token gaps: the gap before a chunk carrying k tokens is spread evenly over its k
  tokens (k/k/k...), so the gaps sum to e2e - TTFT and number n_out - 1. k is exact when
  chunks carry cumulative usage (`--continuous-usage`, vLLM's
  `stream_options.continuous_usage_stats`); otherwise the first chunk is taken to hold
  the first token alone and the remaining n_out - 1 tokens are spread evenly over the
  later chunks. TPOT (`bench.metrics`) needs only n_out, TTFT and e2e, so it is exact
  either way.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import httpx
from tqdm import tqdm

from bench.errors import BenchError
from bench.records import RequestOutcome, RequestRecord, RunRecords
from bench.workload import RequestSpec

_MAX_ERROR_CHARS = 300


@dataclass(frozen=True)
class LoadOptions:
    base_url: str
    model: str
    request_timeout_s: float = 600.0  # per request, send -> end of stream
    # After the last send, how long unfinished requests may still run (None: until each
    # one ends or hits its request timeout).
    drain_timeout_s: float | None = None
    duration_s: float | None = None  # no request is sent later than this after the start
    continuous_usage_stats: bool = False
    show_progress: bool = True
    progress_desc: str = "requests"


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_ERROR_CHARS else text[:_MAX_ERROR_CHARS] + "..."


def request_body(spec: RequestSpec, options: LoadOptions) -> dict[str, Any]:
    stream_options: dict[str, bool] = {"include_usage": True}
    if options.continuous_usage_stats:
        stream_options["continuous_usage_stats"] = True
    return {
        "model": options.model,
        "prompt": spec.prompt,
        "max_tokens": spec.output_len,
        "min_tokens": spec.output_len,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": stream_options,
    }


def _carries_token(choice: dict[str, Any]) -> bool:
    text = choice.get("text")
    if text is None:  # chat-completions shape
        text = (choice.get("delta") or {}).get("content")
    return bool(text) or choice.get("finish_reason") is None


def tokens_per_chunk(
    num_chunks: int, num_output_tokens: int, cumulative_tokens: Sequence[int | None]
) -> list[int]:
    """How many output tokens each token-bearing chunk carried (see the module doc)."""
    if num_chunks == 0:
        return []
    if cumulative_tokens and all(c is not None for c in cumulative_tokens):
        cumulative = [int(c) for c in cumulative_tokens]  # type: ignore[arg-type]
        counts = [cumulative[0]] + [b - a for a, b in zip(cumulative, cumulative[1:])]
        if all(c >= 0 for c in counts) and counts[0] >= 1:
            return counts
    if num_output_tokens <= num_chunks:
        return [1] * num_chunks
    if num_chunks == 1:
        return [num_output_tokens]
    base, extra = divmod(num_output_tokens - 1, num_chunks - 1)
    return [1] + [base + (1 if i < extra else 0) for i in range(num_chunks - 1)]


def inter_token_gaps(chunk_times_s: Sequence[float], counts: Sequence[int]) -> tuple[float, ...]:
    """Per-token gaps after the first token; a chunk's gap is split over its tokens.

    Tokens that share the first chunk arrived with the first token (gap 0); a chunk that
    carried no token passes its gap on to the next chunk.
    """
    if not chunk_times_s:
        return ()
    gaps = [0.0] * max(counts[0] - 1, 0)
    carried_s = 0.0
    for i in range(1, len(chunk_times_s)):
        gap_s = chunk_times_s[i] - chunk_times_s[i - 1] + carried_s
        if counts[i] == 0:
            carried_s = gap_s
            continue
        carried_s = 0.0
        gaps.extend([gap_s / counts[i]] * counts[i])
    return tuple(gaps)


@dataclass
class _Stream:
    """Mutable observation state of one request while it runs."""

    spec: RequestSpec
    scheduled_s: float
    sent_s: float | None = None
    chunk_times_s: list[float] = field(default_factory=list)
    chunk_cumulative_tokens: list[int | None] = field(default_factory=list)
    usage_completion_tokens: int | None = None
    usage_prompt_tokens: int | None = None
    outcome: RequestOutcome | None = None
    error: str | None = None

    def fail(self, outcome: RequestOutcome, error: str) -> None:
        self.outcome = outcome
        self.error = _short(error)

    def to_record(self) -> RequestRecord:
        outcome = self.outcome or RequestOutcome.NOT_FINISHED
        num_chunks = len(self.chunk_times_s)
        num_output_tokens = (
            self.usage_completion_tokens if self.usage_completion_tokens is not None
            else num_chunks
        )
        counts = tokens_per_chunk(num_chunks, num_output_tokens, self.chunk_cumulative_tokens)
        return RequestRecord(
            index=self.spec.index,
            input_len=self.spec.input_len,
            output_len=self.spec.output_len,
            scheduled_s=self.scheduled_s,
            sent_s=self.sent_s,
            outcome=outcome,
            ttft_s=self.chunk_times_s[0] if num_chunks else None,
            e2e_s=self.chunk_times_s[-1] if num_chunks else None,
            num_output_tokens=num_output_tokens,
            num_prompt_tokens=self.usage_prompt_tokens,
            num_chunks=num_chunks,
            itl_s=inter_token_gaps(self.chunk_times_s, counts),
            error=self.error if outcome is not RequestOutcome.NOT_FINISHED
            else "still running at the drain deadline",
        )


def _read_usage(usage: Any) -> tuple[int | None, int | None]:
    if not isinstance(usage, dict):
        return None, None
    completion, prompt = usage.get("completion_tokens"), usage.get("prompt_tokens")
    return (completion if isinstance(completion, int) else None,
            prompt if isinstance(prompt, int) else None)


async def _stream_request(
    client: httpx.AsyncClient, url: str, state: _Stream, body: dict[str, Any]
) -> None:
    sent_at = time.perf_counter()
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            state.fail(RequestOutcome.HTTP_ERROR, f"HTTP {response.status_code}: {text}")
            return
        async for line in response.aiter_lines():
            now_s = time.perf_counter() - sent_at
            if not line.startswith("data:"):
                continue  # blank separators, comments (keep-alives), `event:` lines
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                break
            try:
                chunk = json.loads(data)
            except json.JSONDecodeError:
                state.fail(RequestOutcome.SERVER_ERROR, f"malformed SSE data: {data}")
                return
            if not isinstance(chunk, dict):
                state.fail(RequestOutcome.SERVER_ERROR, f"SSE data is not an object: {data}")
                return
            if "error" in chunk:
                state.fail(RequestOutcome.SERVER_ERROR,
                           f"error event: {json.dumps(chunk['error'])}")
                return
            completion_tokens, prompt_tokens = _read_usage(chunk.get("usage"))
            if completion_tokens is not None:
                state.usage_completion_tokens = completion_tokens
            if prompt_tokens is not None:
                state.usage_prompt_tokens = prompt_tokens
            choices = chunk.get("choices") or []
            if choices and isinstance(choices[0], dict) and _carries_token(choices[0]):
                state.chunk_times_s.append(now_s)
                state.chunk_cumulative_tokens.append(completion_tokens)
    if not state.chunk_times_s:
        state.fail(RequestOutcome.SERVER_ERROR, "the stream ended without any token")
        return
    state.outcome = RequestOutcome.OK


async def _run_one(
    client: httpx.AsyncClient, url: str, state: _Stream, options: LoadOptions
) -> None:
    body = request_body(state.spec, options)
    try:
        await asyncio.wait_for(_stream_request(client, url, state, body),
                               timeout=options.request_timeout_s)
    except (asyncio.TimeoutError, httpx.TimeoutException):
        state.fail(RequestOutcome.TIMEOUT,
                   f"no complete answer within {options.request_timeout_s:g} s")
    except httpx.HTTPError as e:
        state.fail(RequestOutcome.CONNECTION_ERROR, f"{type(e).__name__}: {e}")


async def run_load(
    requests: Sequence[RequestSpec],
    offsets_s: Sequence[float],
    options: LoadOptions,
    rate_rps: float | None = None,
) -> RunRecords:
    """Send `requests[i]` at `offsets_s[i]` after the start; wait for the answers."""
    if len(requests) != len(offsets_s):
        raise ValueError("one offset per request")
    url = options.base_url.rstrip("/") + "/v1/completions"
    timeout = httpx.Timeout(options.request_timeout_s, connect=min(10.0, options.request_timeout_s))
    # No connection cap: an open-loop client must not queue requests on its side.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    states: list[_Stream] = []
    tasks: list[asyncio.Task[None]] = []
    progress = tqdm(total=len(requests), desc=options.progress_desc, unit="req",
                    file=sys.stderr, disable=not options.show_progress, leave=False)
    # trust_env=False: a proxy configured for the internet must not see loopback traffic.
    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
        start = time.perf_counter()
        try:
            for spec, offset_s in zip(requests, offsets_s):
                if options.duration_s is not None and offset_s > options.duration_s:
                    break
                delay_s = start + offset_s - time.perf_counter()
                if delay_s > 0:
                    await asyncio.sleep(delay_s)
                state = _Stream(spec=spec, scheduled_s=float(offset_s),
                                sent_s=time.perf_counter() - start)
                states.append(state)
                task = asyncio.create_task(_run_one(client, url, state, options))
                task.add_done_callback(lambda _: progress.update(1))
                tasks.append(task)
            if tasks:
                _, pending = await asyncio.wait(tasks, timeout=options.drain_timeout_s)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for task in tasks:
                task.cancel()
            progress.close()
        wall_time_s = time.perf_counter() - start
    return RunRecords(
        records=tuple(state.to_record() for state in states),
        rate_rps=rate_rps,
        wall_time_s=wall_time_s,
        num_not_sent=len(requests) - len(states),
    )


def check_server(base_url: str, model: str | None = None, timeout_s: float = 10.0) -> str:
    """Raise BenchError unless the server answers /health with 200; return the model name.

    The name is `model` when given, else the first id the server lists at /v1/models.
    """
    base_url = base_url.rstrip("/")
    try:
        with httpx.Client(timeout=timeout_s, trust_env=False) as client:
            health = client.get(base_url + "/health")
            if health.status_code != 200:
                raise BenchError(
                    f"server at {base_url} is not ready: GET /health returned "
                    f"{health.status_code}"
                )
            if model is not None:
                return model
            models = client.get(base_url + "/v1/models")
    except httpx.HTTPError as e:
        raise BenchError(
            f"cannot reach the server at {base_url}: {type(e).__name__}: {e}"
        ) from None
    try:
        return str(models.json()["data"][0]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise BenchError(
            f"server at {base_url}: GET /v1/models did not list a model "
            f"(HTTP {models.status_code}); pass --model"
        ) from None
