"""A fake OpenAI-compatible streaming server with known latencies: the benchmark's test
double, and a way to try `pdserve bench` without an engine.

Per `/v1/completions` request with `max_tokens = n` (prompt length: tokens under
`tokenizer_path` when set, else whitespace-separated words):

    wait for a slot (at most `max_concurrency` requests are served at once; None: no cap)
    sleep ttft_s + prefill_s_per_token * prompt_len  ─▶ chunk with token 1
    sleep tpot_s * k                                 ─▶ chunk with the next k tokens
    ...                                                 (k = tokens_per_chunk; the last
                                                         chunk carries finish_reason)
    usage chunk (if stream_options.include_usage), then `data: [DONE]`

Time spent waiting for a slot counts toward TTFT, so attainment falls as the rate passes
capacity, about max_concurrency / (ttft_s + (n - 1) * tpot_s) requests per second.

Run it standalone (`python -m bench.fake_server --port 8100`) or in place of `pdserve`
(`--serve-command "python -m bench.fake_server"`): it accepts `serve --config FILE
--port P` and then serves `per_instance_concurrency` requests per configured instance.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


@dataclass(frozen=True)
class FakeTiming:
    ttft_s: float = 0.02
    tpot_s: float = 0.01
    tokens_per_chunk: int = 1
    prefill_s_per_token: float = 0.0
    max_concurrency: int | None = None
    model_id: str = "fake-model"
    # Count prompt tokens with this tokenizer (reported in usage); None: usage carries no
    # prompt_tokens and the prefill delay counts whitespace-separated words.
    tokenizer_path: str | None = None


def _chunk(model: str, text: str, finish_reason: str | None,
           usage: dict[str, int] | None = None) -> str:
    body: dict[str, Any] = {
        "id": "cmpl-fake", "object": "text_completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
    }
    if usage is not None:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n"


def make_app(timing: FakeTiming) -> Starlette:
    slots = asyncio.Semaphore(timing.max_concurrency) if timing.max_concurrency else None
    tokenizer = None
    if timing.tokenizer_path is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(timing.tokenizer_path)

    async def health(_: Request) -> Response:
        return Response(status_code=200)

    async def models(_: Request) -> Response:
        return JSONResponse({"object": "list",
                             "data": [{"id": timing.model_id, "object": "model"}]})

    async def completions(request: Request) -> Response:
        try:
            body = await request.json()
            prompt = body["prompt"]
            num_tokens = int(body["max_tokens"])
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": {"message": "need prompt and max_tokens"}},
                                status_code=400)
        if not isinstance(prompt, str) or not prompt or num_tokens < 1:
            return JSONResponse({"error": {"message": "bad prompt or max_tokens"}},
                                status_code=400)
        stream_options = body.get("stream_options") or {}
        include_usage = bool(stream_options.get("include_usage"))
        continuous = bool(stream_options.get("continuous_usage_stats"))
        if tokenizer is not None:
            prompt_len = len(tokenizer(prompt).input_ids)
        else:
            prompt_len = len(prompt.split())

        def usage(done: int) -> dict[str, int]:
            if tokenizer is None:
                return {"completion_tokens": done}
            return {"prompt_tokens": prompt_len, "completion_tokens": done,
                    "total_tokens": prompt_len + done}

        async def events() -> AsyncIterator[str]:
            if slots is not None:
                await slots.acquire()
            try:
                await asyncio.sleep(timing.ttft_s + timing.prefill_s_per_token * prompt_len)
                done = 1
                yield _chunk(timing.model_id, " tok", "length" if num_tokens == 1 else None,
                             usage(done) if continuous else None)
                while done < num_tokens:
                    k = min(timing.tokens_per_chunk, num_tokens - done)
                    await asyncio.sleep(timing.tpot_s * k)
                    done += k
                    yield _chunk(timing.model_id, " tok" * k,
                                 "length" if done == num_tokens else None,
                                 usage(done) if continuous else None)
            finally:
                if slots is not None:
                    slots.release()
            if include_usage:
                last = {"id": "cmpl-fake", "object": "text_completion",
                        "model": timing.model_id, "choices": [], "usage": usage(num_tokens)}
                yield f"data: {json.dumps(last)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[
        Route("/health", health),
        Route("/v1/models", models),
        Route("/v1/completions", completions, methods=["POST"]),
    ])


class FakeServerThread:
    """The fake server on 127.0.0.1 in a background thread (tests): `with ... as s: s.url`."""

    def __init__(self, timing: FakeTiming | None = None) -> None:
        config = uvicorn.Config(make_app(timing or FakeTiming()), host="127.0.0.1", port=0,
                                log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self.url = ""

    def __enter__(self) -> "FakeServerThread":
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("fake server did not start")
            time.sleep(0.01)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


def _concurrency_from_config(path: str, per_instance: int) -> int:
    from cluster.config import load_config

    config = load_config(path)
    return per_instance * sum(pool.num_instances for pool in config.pools().values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fake_server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", choices=["serve"],
                        help="accepted for drop-in use as `pdserve serve`")
    parser.add_argument("--config", help="a pdserve config; sets the concurrency cap")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--ttft-s", type=float, default=0.02)
    parser.add_argument("--tpot-s", type=float, default=0.01)
    parser.add_argument("--tokens-per-chunk", type=int, default=1)
    parser.add_argument("--prefill-s-per-token", type=float, default=0.0)
    parser.add_argument("--max-concurrency", type=int, default=None)
    parser.add_argument("--per-instance-concurrency", type=int, default=4)
    parser.add_argument("--model-id", default="fake-model")
    parser.add_argument("--tokenizer", default=None,
                        help="count prompt tokens with this tokenizer (reported in usage)")
    args = parser.parse_args(argv)
    max_concurrency = args.max_concurrency
    if max_concurrency is None and args.config:
        max_concurrency = _concurrency_from_config(args.config, args.per_instance_concurrency)
    timing = FakeTiming(args.ttft_s, args.tpot_s, args.tokens_per_chunk,
                        args.prefill_s_per_token, max_concurrency, args.model_id,
                        args.tokenizer)
    uvicorn.run(make_app(timing), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
