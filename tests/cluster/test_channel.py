"""The worker channel (cluster/channel.py) over fake workers: calls, streams, coalescing,
cancel, lost connections and bad frames; and the whole OpenAI API served over it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct

import httpx
import pytest

from cluster.channel import (
    ChannelError,
    ChannelServer,
    Deltas,
    WorkerChannelClient,
)
from cluster.wire import EngineRequest, SamplingSpec
from tests.fakes import FakeDecodeWorker, FakePrefillWorker, make_fake_deployment, next_token, serving


def _req(rid: str, n: int = 8, prompt=(5, 6, 7)) -> EngineRequest:
    return EngineRequest(request_id=rid, prompt_token_ids=tuple(prompt),
                         sampling=SamplingSpec(max_tokens=n, ignore_eos=True))


async def _open(worker, role: str):
    server = ChannelServer(worker)
    address = await server.start()
    return server, WorkerChannelClient(address, worker.instance_id, role)


async def test_unary_calls_round_trip():
    prefill = FakePrefillWorker()
    server, client = await _open(prefill, "prefill")
    try:
        result = await client.prefill(_req("r1"))
        assert result.first_token_id == next_token((5, 6, 7))
        assert result.kv_handle is not None
        stats = await client.stats()
        assert stats.instance_id == "prefill-0" and stats.num_staged_segments == 1
        assert await client.release_kv(result.kv_handle) is True
        assert await client.release_kv(result.kv_handle) is False  # already released
        await client.abort("r1")
        assert prefill.aborted == ["r1"]
    finally:
        await client.close()
        await server.close()


async def test_a_method_the_worker_lacks_is_a_clear_error():
    decode = FakeDecodeWorker(role="colocated")
    server, client = await _open(decode, "colocated")
    try:
        with pytest.raises(ChannelError, match="does not serve prefill"):
            await client.prefill(_req("r1"))
        assert (await client.stats()).role == "colocated"  # the channel is still usable
    finally:
        await client.close()
        await server.close()


async def test_streams_of_many_requests_share_frames():
    decode = FakeDecodeWorker(role="colocated", token_delay_s=0.002)
    server, client = await _open(decode, "colocated")
    frames: list[int] = []
    # Count the frames the client decodes, by wrapping its decoder.
    real_decode = client._decoder.decode

    def counting_decode(buf):
        msg = real_decode(buf)
        if isinstance(msg, Deltas):
            frames.append(len(msg.items))
        return msg

    client._decoder = type("D", (), {"decode": staticmethod(counting_decode)})()
    try:
        async def collect(rid):
            out = []
            async for delta in client.generate(_req(rid, n=20)):
                out.extend(delta.token_ids)
            return out

        results = await asyncio.gather(*(collect(f"r{i}") for i in range(16)))
        expected = []
        ids = [5, 6, 7]
        for _ in range(20):
            tok = next_token(ids)
            ids.append(tok)
            expected.append(tok)
        assert all(r == expected for r in results)
        total_items = sum(frames)
        assert total_items >= 16  # at least the first delta of each stream
        # 16 streams x 20 tokens in lock-step: far fewer frames than deltas.
        assert len(frames) < total_items / 4, (len(frames), total_items)
        assert decode.active == set()
    finally:
        await client.close()
        await server.close()


async def test_closing_a_stream_early_cancels_the_worker_generator():
    decode = FakeDecodeWorker(role="colocated", token_delay_s=0.01)
    server, client = await _open(decode, "colocated")
    try:
        got = 0
        async with contextlib.aclosing(client.generate(_req("r1", n=1000))) as stream:
            async for delta in stream:
                got += len(delta.token_ids)
                if got >= 3:
                    break
        for _ in range(100):
            if not decode.active:
                break
            await asyncio.sleep(0.01)
        assert decode.active == set()  # the worker's generator was closed
        assert server.num_active_requests == 0
    finally:
        await client.close()
        await server.close()


async def test_a_lost_connection_fails_open_calls_and_streams_at_once():
    decode = FakeDecodeWorker(role="colocated", token_delay_s=0.05)
    server, client = await _open(decode, "colocated")

    async def consume():
        async for _ in client.generate(_req("r1", n=1000)):
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.2)
    await server.close()  # the worker process is gone
    with pytest.raises(ChannelError):
        await asyncio.wait_for(task, timeout=5)
    with pytest.raises(ChannelError, match="cannot reach"):
        await client.stats()
    await client.close()


async def test_a_bad_frame_closes_the_connection_not_the_server():
    decode = FakeDecodeWorker(role="colocated")
    server = ChannelServer(decode)
    host, port = (await server.start()).rsplit(":", 1)
    try:
        reader, writer = await asyncio.open_connection(host, int(port))
        garbage = b"\x93\xa5bogus\x01\x02"
        writer.write(struct.pack(">I", len(garbage)) + garbage)
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), timeout=5) == b""  # closed by the server
        writer.close()
        client = WorkerChannelClient(f"{host}:{port}", "colocated-0", "colocated")
        assert (await client.stats()).is_ready  # the server still serves others
        await client.close()
    finally:
        await server.close()


async def test_the_openai_api_over_channels_matches_in_process_workers():
    """The same fake deployment, once with the workers in-process and once behind
    channels: identical text, and nothing left staged or running."""
    bodies = {}
    for over_channel in (False, True):
        app, deps, prefills, decodes = make_fake_deployment("disaggregated", num_decode=2)
        servers = []
        if over_channel:
            views = deps.pool.prefill + deps.pool.decode
            for view in views:
                server = ChannelServer(view.client)
                address = await server.start()
                servers.append(server)
                view.client = WorkerChannelClient(address, view.client.instance_id, view.role)
        try:
            async with serving(app) as url:
                async with httpx.AsyncClient(base_url=url, timeout=30) as http:
                    for _ in range(100):
                        if (await http.get("/health")).status_code == 200:
                            break
                        await asyncio.sleep(0.02)
                    r = await http.post("/v1/completions", json={
                        "model": "pdserve-tiny", "prompt": "hello there", "max_tokens": 12,
                        "ignore_eos": True})
                    assert r.status_code == 200, r.text
                    streamed = []
                    async with http.stream("POST", "/v1/completions", json={
                            "model": "pdserve-tiny", "prompt": "hello there", "max_tokens": 12,
                            "ignore_eos": True, "stream": True}) as s:
                        async for line in s.aiter_lines():
                            if line.startswith("data: ") and line != "data: [DONE]":
                                chunk = json.loads(line[6:])
                                streamed.append(chunk["choices"][0]["text"])
                    bodies[over_channel] = (r.json()["choices"][0]["text"], "".join(streamed),
                                            r.json()["usage"])
            assert all(not p.staged for p in prefills)
            assert all(not d.active for d in decodes)
        finally:
            for view in deps.pool.all():
                if isinstance(view.client, WorkerChannelClient):
                    await view.client.close()
            for server in servers:
                await server.close()
    assert bodies[True] == bodies[False]
    assert bodies[True][0] == bodies[True][1]


async def test_with_a_secret_only_peers_that_prove_it_get_in():
    secret = b"s" * 32
    decode = FakeDecodeWorker(role="colocated")
    server = ChannelServer(decode, secret=secret, auth_timeout_s=2)
    address = await server.start()
    good = WorkerChannelClient(address, "colocated-0", "colocated", secret=secret)
    wrong = WorkerChannelClient(address, "colocated-0", "colocated", secret=b"x" * 32)
    none = WorkerChannelClient(address, "colocated-0", "colocated", connect_timeout_s=2)
    try:
        assert (await good.stats()).is_ready
        with pytest.raises(ChannelError, match="refused|secret"):
            await wrong.stats()
        with pytest.raises(ChannelError):
            await none.stats()  # sends frames without the handshake: dropped, never served
        await none.close()
        for _ in range(200):
            if server.num_refused == 2:
                break
            await asyncio.sleep(0.01)
        assert server.num_refused == 2
        assert decode.aborted == [] and not decode.active
    finally:
        for client in (good, wrong, none):
            await client.close()
        await server.close()
