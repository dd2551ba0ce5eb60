"""The stream relay (pdserve/stream_relay.py) in front of real router apps over fake
workers, without Ray: the relay streams over HTTP from router servers (uvicorn), as it
does from router replicas; `choose_router` stands in for Serve's choice of replica."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket

import httpx
import uvicorn

from pdserve.stream_relay import (Relay, RelayOutcome, RouterChooser, RouterLost, http_forward,
                                  relay_client)
from tests.fakes import assert_nothing_held, make_fake_deployment, serving, settle_pool

MODEL = "pdserve-tiny"
STREAM = {"model": MODEL, "prompt": "a long answer", "max_tokens": 40, "stream": True}


def events(text: str) -> list[str]:
    return [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]


def texts(text: str) -> list[str]:
    return [json.loads(e)["choices"][0]["text"] for e in events(text)[:-1]]


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens once closed


class Router:
    """A router app over fakes under uvicorn, which a test can kill like a replica that
    dies: its listener and every connection it holds are gone at once."""

    def __init__(self, **fake_kwargs):
        self.app, self.deps, self.prefills, self.decodes = make_fake_deployment(**fake_kwargs)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0,
                                                    log_level="warning"))
        self.url = ""

    async def __aenter__(self):
        self._task = asyncio.create_task(self.server.serve())
        while not self.server.started:
            await asyncio.sleep(0.01)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"
        async with httpx.AsyncClient(base_url=self.url) as c:
            for _ in range(200):
                if (await c.get("/health")).status_code == 200:
                    break
                await asyncio.sleep(0.02)
        return self

    def kill(self) -> None:
        for server in self.server.servers:
            server.close()
        for connection in list(self.server.server_state.connections):
            connection.transport.abort()

    async def __aexit__(self, *exc):
        self.server.should_exit = True
        await self._task


async def assert_aborted_and_nothing_held(router: Router, rid: str) -> None:
    """The router saw its connection go and aborted `rid`; nothing is held after."""
    for _ in range(100):
        if rid in router.decodes[0].aborted:
            break
        await asyncio.sleep(0.02)
    assert rid in router.decodes[0].aborted
    await settle_pool(router.deps.pool)
    assert_nothing_held(router.deps.pool, router.prefills, router.decodes)


@contextlib.asynccontextmanager
async def relayed(ask, *, max_body_bytes=1 << 20):
    """A relay over HTTP whose router replicas are learnt from `ask` (Serve, in a
    deployment)."""
    outcomes: list[RelayOutcome] = []
    async with relay_client() as client:
        relay = Relay(http_forward(client, RouterChooser(ask, expected=1)),
                      max_body_bytes=max_body_bytes,
                      retry_backoff_s=0.01, on_outcome=outcomes.append)
        async with serving(relay) as url:
            async with httpx.AsyncClient(base_url=url, timeout=10) as c:
                yield c, outcomes


async def test_a_relayed_request_is_answered_as_a_direct_one():
    async with Router() as router:
        async def choose():
            return router.url
        async with relayed(choose) as (client, outcomes), \
                httpx.AsyncClient(base_url=router.url, timeout=10) as direct:
            body = {**STREAM, "temperature": 0}
            via_relay = await client.post("/v1/completions", json=body)
            plain = await direct.post("/v1/completions", json=body)
            assert via_relay.status_code == 200
            assert via_relay.headers["content-type"].startswith("text/event-stream")
            assert texts(via_relay.text) == texts(plain.text) and len(texts(plain.text)) > 1
            assert events(via_relay.text)[-1] == "[DONE]"
            whole = await client.post("/v1/completions?x=1", json={**body, "stream": False})
            assert whole.json()["choices"][0]["text"] == "".join(texts(plain.text))
            assert whole.headers["content-length"] == str(len(whole.content))
            assert (await client.get("/health")).status_code == 200
            assert "pdserve_requests_total" in (await client.get("/metrics")).text
            bad = await client.post("/v1/completions", json={"prompt": "no model"})
            assert bad.status_code == 400 and bad.json()["error"]["message"]
            assert outcomes == [RelayOutcome.ENDED] * 5


async def test_a_router_lost_mid_stream_ends_the_stream_with_an_error_event():
    async with Router(token_delay_s=0.02) as router:
        async def choose():
            return router.url
        async with relayed(choose) as (client, outcomes):
            async with client.stream("POST", "/v1/completions", json=STREAM) as r:
                lines = []
                async for line in r.aiter_lines():
                    lines.append(line)
                    if len(events("\n".join(lines))) == 3:
                        router.kill()
            sent = events("\n".join(lines))
            assert sent[-1] == "[DONE]"
            error = json.loads(sent[-2])["error"]
            assert error["type"] == "service_unavailable" and "router replica" in error["message"]
            tokens = [json.loads(e) for e in sent[:-2]]
            assert len(tokens) >= 3 and all("choices" in t for t in tokens)  # what was sent stands
            assert outcomes == [RelayOutcome.ERROR_EVENT]
            # The router saw its connection go and aborted the request: nothing is held.
            rid = tokens[0]["id"]
            await assert_aborted_and_nothing_held(router, rid)


async def test_a_router_lost_before_the_response_is_asked_again():
    async with Router() as router:
        choices = [closed_port_url(), "lost", router.url]

        async def choose():
            url = choices.pop(0)
            if url == "lost":
                raise RouterLost("Serve found no live replica")
            return url
        async with relayed(choose) as (client, outcomes), \
                httpx.AsyncClient(base_url=router.url, timeout=10) as direct:
            body = {**STREAM, "temperature": 0}
            r = await client.post("/v1/completions", json=body)
            assert r.status_code == 200 and choices == []
            assert texts(r.text) == texts((await direct.post("/v1/completions", json=body)).text)
            assert outcomes == [RelayOutcome.ENDED]


async def test_no_router_after_every_attempt_is_a_503_with_retry_after():
    async def choose():
        return closed_port_url()
    async with relayed(choose) as (client, outcomes):
        r = await client.post("/v1/completions", json=STREAM)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "service_unavailable"
        assert outcomes == [RelayOutcome.UNAVAILABLE]


async def test_a_body_over_the_limit_gets_413_without_reaching_a_router():
    asked = []

    async def choose():
        asked.append(1)
        return closed_port_url()
    async with relayed(choose, max_body_bytes=1024) as (client, outcomes):
        r = await client.post("/v1/completions", json={**STREAM, "prompt": "x" * 2048})
        assert r.status_code == 413 and "1024 bytes" in r.json()["error"]["message"]
        assert asked == []


async def test_a_client_that_leaves_the_relay_aborts_its_request():
    async with Router(token_delay_s=0.05) as router:
        async def choose():
            return router.url
        async with relayed(choose) as (client, outcomes):
            async with client.stream("POST", "/v1/completions",
                                     json={**STREAM, "max_tokens": 200}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and '"text"' in line:
                        break
                rid = json.loads(line[6:])["id"]
            await assert_aborted_and_nothing_held(router, rid)
            assert router.deps.num_in_flight == 0


async def test_the_chooser_learns_replicas_from_serve_and_sends_to_the_least_busy():
    answers = ["http://a", "http://b", "http://b", "http://c"]
    asked = []
    now = [0.0]

    async def ask():
        asked.append(answers[0])
        return answers.pop(0)
    routers = RouterChooser(ask, expected=2, refresh_s=5.0, clock=lambda: now[0])
    assert await routers.choose() == "http://a"  # one known of two: ask
    assert await routers.choose() == "http://b"  # a is busy, b is new
    assert await routers.choose() in ("http://a", "http://b") and len(asked) == 2
    routers.done("http://a")
    routers.done("http://a")
    assert await routers.choose() == "http://a"  # both known: no call, least in flight
    assert len(asked) == 2
    now[0] = 6.0  # a refresh is due: Serve is asked once, b was known already
    await routers.choose()
    assert len(asked) == 3 and set(routers.in_flight) == {"http://a", "http://b"}
    routers.lost("http://b")  # lost: forgotten at once, and the next request asks again
    assert await routers.choose() == "http://c"  # asked, and c (new) is the least busy
    assert routers.in_flight == {"http://a": 2, "http://c": 1}


async def test_the_chooser_keeps_known_replicas_when_serve_cannot_answer():
    async def ask():
        raise RouterLost("no live replica")
    routers = RouterChooser(ask, expected=2)
    try:
        await routers.choose()
    except RouterLost:
        pass
    else:
        raise AssertionError("nothing known and nothing learnt must be RouterLost")
    routers.in_flight["http://a"] = 0
    assert await routers.choose() == "http://a"
