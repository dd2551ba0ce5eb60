"""The fault harness's short form (CI): bounded load through the router and real worker
channels, a fault injected mid-load, every request's ending classified."""

from __future__ import annotations

import pytest

from bench.faults import run_harness

TIMEOUT_S = 4.0


async def test_a_killed_prefill_fails_only_requests_before_their_first_token():
    result = await run_harness("kill-prefill", num_requests=48, timeout_s=TIMEOUT_S)
    assert all(result.checks.values()), (result.table(), result.checks)
    errors = [e for e in result.endings if e.outcome == "clean_error"]
    # Requests sent to it before the next stats poll marked it unhealthy get an HTTP error
    # (no token was sent yet: prefill retry would serve them elsewhere, router/recovery.py).
    assert len(errors) <= 12 and all(e.detail.startswith("HTTP ") for e in errors)


async def test_a_killed_decode_ends_its_streams_cleanly_and_capacity_returns():
    result = await run_harness("kill-decode", num_requests=48, timeout_s=TIMEOUT_S)
    checks = result.checks
    assert checks["no_broken_stream"] and checks["nothing_waited_past_the_timeout"]
    assert checks["full_capacity_returned"]
    errors = [e for e in result.endings if e.outcome == "clean_error"]
    # The streams the dead decode held end with an error event (migration would carry them
    # on: router/recovery.py, once the handoff calls it); everything else completes.
    assert errors and all("error event" in e.detail for e in errors)
    # What was in flight on it (concurrency 6), plus what was sent to it before the next
    # stats poll (0.1 s) marked it unhealthy.
    assert len(errors) <= 12
    # Their KV was the dead decode's to consume: fakes have no lease, real producers
    # reclaim it after kv_transfer.lease_s.
    assert result.leaked_staged <= len(errors)


@pytest.mark.xfail(strict=True, reason="the router has no stall timeout: a stream on a "
                   "frozen (SIGSTOPped) decode waits until the client gives up")
async def test_a_frozen_decode_past_every_timeout_ends_its_streams_in_time():
    result = await run_harness("stop-decode", num_requests=48, timeout_s=TIMEOUT_S)
    assert result.checks["full_capacity_returned"]  # holds today: new work avoids it
    assert result.checks["no_broken_stream"] and result.checks["nothing_waited_past_the_timeout"]
