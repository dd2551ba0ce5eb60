"""Hand-written hostile input against the router, over fake workers reached through the
real worker channel (msgpack over TCP), under uvicorn with pdserve's read deadline.

Every case must end in a 4xx in OpenAI's format (never a 5xx or a traceback), the
server must stay healthy and answer others meanwhile, and nothing may stay in flight."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time

import httpx
import pytest
import uvicorn

from cluster.channel import ChannelServer, WorkerChannelClient
from cluster.config import RouterConfig, ServeConfig, SLOConfig
from cluster.tiny_model import ensure_tiny_model
from router import guard
from router.build import build_router
from router.tokenizer import ModelTokenizer
from tests.fakes import FakeDecodeWorker, FakePrefillWorker

MODEL = "pdserve-tiny"
READ_TIMEOUT_S = 1.0


@contextlib.asynccontextmanager
async def hostile_deployment(token_delay_s: float = 0.0):
    prefills = [FakePrefillWorker("prefill-0")]
    decodes = [FakeDecodeWorker("decode-0", prefills=prefills, token_delay_s=token_delay_s)]
    servers = [ChannelServer(w) for w in prefills + decodes]
    addresses = [await s.start() for s in servers]
    clients = [WorkerChannelClient(addresses[0], "prefill-0", "prefill"),
               WorkerChannelClient(addresses[1], "decode-0", "decode")]
    config = ServeConfig(slo=SLOConfig(ttft_s=1.0, tpot_s=0.1),
                         router=RouterConfig(stats_interval_s=0.05, max_request_body_bytes=1 << 20))
    app, deps = build_router(config, ModelTokenizer(ensure_tiny_model("tiny")), MODEL,
                             prefill=clients[:1], decode=clients[1:])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           http=guard.read_timeout_protocol(READ_TIMEOUT_S)))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            while (await http.get("/health")).status_code != 200:
                await asyncio.sleep(0.02)
            yield http, port, deps, prefills, decodes
            # Afterwards: healthy, answering, and nothing left in flight or staged.
            assert (await http.get("/health")).status_code == 200
            r = await http.post("/v1/completions", json={"model": MODEL, "prompt": "ok?",
                                                         "max_tokens": 3})
            assert r.status_code == 200
            for _ in range(300):
                if deps.num_in_flight == 0 and not decodes[0].active and not prefills[0].staged:
                    break
                await asyncio.sleep(0.02)
            assert deps.num_in_flight == 0 and deps.admission.num_queued == 0
            assert not decodes[0].active and not prefills[0].staged
    finally:
        server.should_exit = True
        await task
        for c in clients:
            await c.close()
        for s in servers:
            await s.close()


def _as_chat(raw: str | bytes) -> str | bytes:
    """The same hostile content as a chat request: the prompt becomes the user message."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON at all: the same bytes
        return raw.replace(b'"prompt"', b'"messages": [{"role": "user", "content": "x"}], "p"') \
            if isinstance(raw, bytes) else raw.replace(
                '"prompt"', '"messages": [{"role": "user", "content": "x"}], "p"', 1)
    if isinstance(body, dict) and "prompt" in body:
        body["messages"] = [{"role": "user", "content": body.pop("prompt")}]
    return json.dumps(body)


def _body(**fields) -> str:
    return json.dumps({"model": MODEL, "prompt": "hello", "max_tokens": 4, **fields})


HOSTILE_BODIES = {
    "invalid utf-8": b'{"model": "pdserve-tiny", "prompt": "\xff\xfe\xfd", "max_tokens": 2}',
    "invalid utf-8 in a chat message": b'{"model": "pdserve-tiny", "max_tokens": 2, '
                                       b'"messages": [{"role": "user", "content": "\xc3\x28"}]}',
    "lone surrogate escape": '{"model": "pdserve-tiny", "prompt": "\\ud800", "max_tokens": 2}',
    "huge max_tokens": _body(max_tokens=10**30),
    "negative max_tokens": _body(max_tokens=-1),
    "huge top_k": _body(top_k=2**80),
    "huge seed": _body(seed=2**70),
    "a 5000-digit number": '{"model": "pdserve-tiny", "prompt": "x", "max_tokens": ' + "9" * 5000 + "}",
    "NaN temperature": '{"model": "pdserve-tiny", "prompt": "x", "max_tokens": 2, "temperature": NaN}',
    "Infinity top_p": '{"model": "pdserve-tiny", "prompt": "x", "max_tokens": 2, "top_p": Infinity}',
    "-Infinity penalty": '{"model": "pdserve-tiny", "prompt": "x", "max_tokens": 2, '
                         '"frequency_penalty": -Infinity}',
    "1e999 temperature": '{"model": "pdserve-tiny", "prompt": "x", "max_tokens": 2, "temperature": 1e999}',
    "deeply nested prompt": '{"model": "pdserve-tiny", "max_tokens": 2, "prompt": '
                            + "[" * 50_000 + "]" * 50_000 + "}",
    "deeply nested extra field": '{"model": "pdserve-tiny", "prompt": "x", "max_tokens": 2, "x": '
                                 + '{"a": ' * 20_000 + "1" + "}" * 20_000 + "}",
    "5000 stop strings": _body(stop=[f"stop-{i}" for i in range(5000)]),
    "a 100k-character stop string": _body(stop=["s" * 100_000]),
    "prompt id past the vocabulary": _body(prompt=[5, 10**9, 7]),
    "prompt id past 64 bits": _body(prompt=[2**70]),
    "negative prompt id": _body(prompt=[-3]),
    "stop token id past the vocabulary": _body(stop_token_ids=[2**64]),
    "allowed token ids past the vocabulary": _body(allowed_token_ids=[10**7]),
    "logit bias on a token past the vocabulary": _body(logit_bias={"123456789": 1.0}),
    "a prompt list of 100k ids": _body(prompt=[5] * 100_000),
    "not an object": "[1, 2, 3]",
    "empty body": "",
    "truncated JSON": '{"model": "pdserve-tiny", "prompt": ',
}


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_hostile_bodies_get_a_clear_4xx_and_the_server_stays_up(path):
    async with hostile_deployment() as (http, _port, deps, prefills, _):
        for name, raw in HOSTILE_BODIES.items():
            if path.endswith("chat/completions"):
                raw = _as_chat(raw)
            started = time.monotonic()
            r = await http.post(path, content=raw, headers={"Content-Type": "application/json"})
            assert 400 <= r.status_code < 500, (name, r.status_code, r.text[:200])
            err = r.json()["error"]
            assert err["message"] and set(err) == {"message", "type", "param", "code"}, name
            # Refused without queueing. (Known cost: pydantic builds one error per item of
            # an invalid 100k-item chat content list, ~2 s of CPU here; see docs/reliability.md.)
            assert time.monotonic() - started < 5.0, name
            assert "Traceback" not in r.text
        assert prefills[0].num_prefills == 0  # none of it reached a worker


async def test_a_client_that_never_reads_its_stream_holds_only_its_own_request():
    async with hostile_deployment(token_delay_s=0.001) as (http, port, deps, _prefills, decodes):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills at once
        sock.connect(("127.0.0.1", port))
        body = _body(stream=True, max_tokens=3000, ignore_eos=True).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                     b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        for _ in range(200):
            if decodes[0].active:
                break
            await asyncio.sleep(0.01)
        assert decodes[0].active  # it is streaming (into a full socket buffer)
        # Meanwhile everyone else is served, promptly.
        started = time.monotonic()
        rs = await asyncio.gather(*(http.post("/v1/completions", json={
            "model": MODEL, "prompt": f"other {i}", "max_tokens": 5}) for i in range(5)))
        assert all(r.status_code == 200 for r in rs)
        assert time.monotonic() - started < 3.0
        sock.close()  # the reader finally goes away: its request is aborted and accounted
        for _ in range(300):
            if deps.num_in_flight == 0 and not decodes[0].active:
                break
            await asyncio.sleep(0.02)
        assert deps.num_in_flight == 0 and not decodes[0].active


async def test_slowloris_header_trickle_is_cut_off_at_the_read_deadline():
    async with hostile_deployment() as (http, port, *_):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        await writer.drain()
        started = time.monotonic()
        closed_after = None
        with contextlib.suppress(ConnectionError):
            for _ in range(int(10 / 0.2)):
                await asyncio.sleep(0.2)
                writer.write(b"X")  # one header byte at a time, never finishing
                await writer.drain()
                if reader.at_eof() or (await _read_some(reader)) == b"":
                    closed_after = time.monotonic() - started
                    break
        closed_after = closed_after or time.monotonic() - started
        assert READ_TIMEOUT_S * 0.8 <= closed_after < READ_TIMEOUT_S + 2.0
        writer.close()
        # A slow but complete request on a kept-alive connection is unaffected.
        r1 = await http.get("/health")
        await asyncio.sleep(READ_TIMEOUT_S * 0.5)
        r2 = await http.get("/health")
        assert r1.status_code == r2.status_code == 200


async def test_a_body_trickle_is_cut_off_too():
    async with hostile_deployment() as (http, port, *_):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                     b"\r\nContent-Length: 100000\r\n\r\n{")
        await writer.drain()
        started = time.monotonic()
        with contextlib.suppress(ConnectionError):
            for _ in range(50):
                await asyncio.sleep(0.2)
                writer.write(b" ")
                await writer.drain()
                if (await _read_some(reader)) == b"" or reader.at_eof():
                    break
        assert time.monotonic() - started < READ_TIMEOUT_S + 2.0
        writer.close()


async def _read_some(reader: asyncio.StreamReader) -> bytes | None:
    try:
        return await asyncio.wait_for(reader.read(1024), 0.01)
    except asyncio.TimeoutError:
        return None
