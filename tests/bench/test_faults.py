"""The fault harness's short form (CI): bounded load through the router and real worker
channels, a fault injected mid-load, every request's ending classified and every answer
compared token for token with the uninterrupted one."""

from __future__ import annotations

import asyncio

import httpx

from bench.faults import _classify, run_harness
from tests.fakes import make_fake_deployment, next_token, serving

TIMEOUT_S = 4.0
STALL_TIMEOUT_S = 1.0


def _recovered(result, outcome):
    return [e for e in result.endings if e.outcome == outcome]


async def test_a_killed_prefill_loses_no_request():
    result = await run_harness("kill-prefill", num_requests=48, timeout_s=TIMEOUT_S)
    assert all(result.checks.values()), (result.table(), result.checks)
    # Requests sent to it before the next stats poll marked it unhealthy are retried on the
    # other prefill (none had a token yet): nobody gets an error.
    assert not _recovered(result, "clean_error"), result.table()
    assert all("instance_lost" in e.detail for e in _recovered(result, "retried"))


async def test_a_killed_decode_migrates_its_streams_and_capacity_returns():
    result = await run_harness("kill-decode", num_requests=48, timeout_s=TIMEOUT_S)
    assert all(result.checks.values()), (result.table(), result.checks)
    migrated = _recovered(result, "migrated")
    # The streams it held (concurrency 6) move to the other decode mid-way, each answer
    # exactly the uninterrupted one (checks: no_token_repeated_or_missing).
    assert migrated and all("instance_lost" in e.detail and e.is_exact for e in migrated)
    assert not _recovered(result, "clean_error")


async def test_a_killed_decode_without_migration_ends_its_streams_cleanly():
    result = await run_harness("kill-decode", num_requests=48, timeout_s=TIMEOUT_S,
                               migration_limit=0)
    checks = result.checks
    assert checks["no_broken_stream"] and checks["nothing_waited_past_the_timeout"]
    assert checks["full_capacity_returned"] and checks["no_token_repeated_or_missing"]
    errors = _recovered(result, "clean_error")
    assert errors and all("error event" in e.detail for e in errors)
    assert not _recovered(result, "migrated")
    # The KV a dead decode never claimed goes back to its producer: nothing is left.
    assert checks["no_staged_kv_left"]


async def test_a_frozen_decode_past_every_timeout_ends_its_streams_in_time():
    result = await run_harness("stop-decode", num_requests=48, timeout_s=TIMEOUT_S,
                               stall_timeout_s=STALL_TIMEOUT_S)
    assert result.checks["full_capacity_returned"]  # holds today: new work avoids it
    assert result.checks["no_broken_stream"] and result.checks["nothing_waited_past_the_timeout"]
    assert all(result.checks.values()), (result.table(), result.checks)
    migrated = _recovered(result, "migrated")
    assert migrated and all("stalled" in e.detail for e in migrated)
    # Detected within the stall timeout plus two scan periods, then finished elsewhere.
    assert max(e.seconds for e in migrated) < TIMEOUT_S


async def test_a_frozen_prefill_is_retried_once_its_poll_fails():
    result = await run_harness("stop-prefill", num_requests=48, timeout_s=TIMEOUT_S,
                               stall_timeout_s=STALL_TIMEOUT_S)
    assert all(result.checks.values()), (result.table(), result.checks)
    assert not _recovered(result, "clean_error")
    assert all("stalled" in e.detail for e in _recovered(result, "retried"))


async def test_a_transfer_stalled_mid_segment_ends_in_recompute(tmp_path, monkeypatch):
    monkeypatch.setenv("PDSERVE_TEST_TRANSFER_STALL", str(tmp_path / "stall"))
    result = await run_harness("stall-transfer", num_requests=48, timeout_s=TIMEOUT_S)
    assert all(result.checks.values()), (result.table(), result.checks)
    assert not (tmp_path / "stall").exists()  # the harness turned the switch off
    # The stalled requests waited for the transfer timeout (0.5 s), then decode recomputed.
    assert max(e.seconds for e in result.endings if e.phase == "fault") >= 0.5


async def test_streamed_token_ids_hold_every_token_even_when_its_text_is_held_back():
    """The harness's token check reads streamed `token_ids`: a token whose text is held back
    (an incomplete character, a possible stop string) must still send its id."""
    app, deps, _, _ = make_fake_deployment(num_prefill=1, num_decode=1)
    async with serving(app) as url:
        async with httpx.AsyncClient(base_url=url) as http:
            while (await http.get("/health")).status_code != 200:
                await asyncio.sleep(0.02)
            body = {"model": "pdserve-tiny", "prompt": "request 1 " * 8, "max_tokens": 40,
                    "ignore_eos": True, "temperature": 0.0, "return_token_ids": True}
            whole = (await http.post("/v1/completions", json=body)).json()["choices"][0]
            r = await http.post("/v1/completions", json=body | {"stream": True})
    outcome, _, prompt_ids, streamed = _classify(r.status_code, r.text)
    ids = list(prompt_ids)
    for _ in range(40):
        ids.append(next_token(ids))
    assert outcome == "complete" and streamed == whole["token_ids"] == ids[len(prompt_ids):]
