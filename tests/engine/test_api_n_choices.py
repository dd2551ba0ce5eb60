"""n > 1 on real engines: one shared prefill, n decodes, nothing left behind; and the
prefill work it saves against n separate requests (the numbers in docs/api.md).

Run the measurement alone and read its table with::

    pdh python -m pytest tests/engine/test_api_n_choices.py -q -s -k saving

(`PDSERVE_N_SAVING_JSON=path` also writes the raw numbers).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.engine
MODEL = "pdserve-tiny"


def _segments(live) -> list:
    from kvtransfer.names import list_segments

    return list_segments(live.staging_dir)


def _wait_clean(live, timeout_s: float = 30.0) -> None:
    """The leak check: no segment or claim left in staging, nothing running on decode."""
    deadline = time.monotonic() + timeout_s
    while True:
        decode = live.call(live.workers["decode"].stats())
        prefill = live.call(live.workers["prefill"].stats())
        if (not _segments(live) and decode.num_running_reqs == 0
                and decode.num_waiting_reqs == 0 and prefill.num_staged_segments == 0):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"left behind: segments {_segments(live)}, decode running "
                                 f"{decode.num_running_reqs}, staged {prefill.num_staged_segments}")
        time.sleep(0.1)


def _trace(url: str, rid: str) -> dict:
    return httpx.get(f"{url}/v1/requests/{rid}/trace").json()


def test_choices_share_one_prefill_and_leave_nothing_staged(live_engines):
    url = live_engines.disagg_url
    r = httpx.post(f"{url}/v1/completions", json={
        "model": MODEL, "prompt": "the decode loads what the prefill staged " * 20,
        "max_tokens": 6, "n": 3, "seed": 5, "temperature": 1.0, "ignore_eos": True}, timeout=180)
    assert r.status_code == 200, r.text
    body = r.json()
    traces = [_trace(url, f"{i}_{body['id']}") for i in range(3)]
    assert all(t["served_by"] == "transferred" for t in traces), traces
    # Each decode computed one prompt position (the last), loading the rest.
    assert [t["num_prompt_tokens_computed_on_decode"] for t in traces] == [1, 1, 1]
    assert len({t["events"]["prefill_start"] for t in traces}) == 1  # one prefill
    assert body["usage"]["completion_tokens"] == 18
    _wait_clean(live_engines)


def test_client_gone_mid_stream_aborts_every_choice_and_leaves_nothing(live_engines):
    url = live_engines.disagg_url
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "go on " * 50}],
            "max_tokens": 400, "n": 4, "ignore_eos": True, "stream": True}, timeout=180) as r:
        assert r.status_code == 200
        num_content = 0
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content":"' in line and '"role"' not in line:
                num_content += 1
                if num_content >= 2:
                    break
    _wait_clean(live_engines)


def test_a_claim_gone_before_its_decode_fails_the_request_and_leaves_nothing(live_engines):
    """One claim released before its decode came (as if expired): with the default
    `on_failure: fail` that choice's decode fails, so the request fails (as vLLM fails a
    request when one child fails); the other choices are aborted, every claim ends."""
    assert live_engines.workers["decode"]._kv.settings.on_failure == "fail"
    url = live_engines.disagg_url
    prefill = live_engines.workers["prefill"]
    real = prefill.prefill

    async def lose_claim_one(req):
        result = await real(req)
        if len(result.kv_claims) > 1:
            prefill._kv.release(result.kv_claims[1])
        return result

    prefill.prefill = lose_claim_one
    try:
        r = httpx.post(f"{url}/v1/completions", json={
            "model": MODEL, "prompt": "lost and found " * 30, "max_tokens": 50, "n": 3,
            "ignore_eos": True}, timeout=180)
    finally:
        del prefill.prefill
    assert r.status_code == 500, r.text
    assert "gone" in r.json()["error"]["message"] or "KV" in r.json()["error"]["message"]
    _wait_clean(live_engines)


# -------------------------------------------------------------------------------- saving
N = 4
PROMPT_TOKENS = 1536
TRIALS = 3


def _prompt(rng: random.Random) -> list[int]:
    return [rng.randrange(10, 1500) for _ in range(PROMPT_TOKENS)]


async def _post(client: httpx.AsyncClient, body: dict) -> dict:
    r = await client.post("/v1/completions", json={"model": MODEL, **body})
    assert r.status_code == 200, r.text
    return r.json()


async def _scenario(url: str, kind: str, prompt: list[int], prefills: list,
                    staged_bytes: list) -> dict:
    """One request with n choices, or n separate requests (concurrent or one after another)."""
    common = {"prompt": prompt, "max_tokens": 4, "ignore_eos": True, "temperature": 1.0}
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        if kind == "n":
            body = await _post(client, {**common, "n": N, "seed": 1})
            rids = [f"{i}_{body['id']}" for i in range(N)]
        elif kind == "separate-concurrent":
            bodies = await asyncio.gather(*(_post(client, {**common, "seed": 1 + i})
                                            for i in range(N)))
            rids = [b["id"] for b in bodies]
        else:
            rids = []
            for i in range(N):
                rids.append((await _post(client, {**common, "seed": 1 + i}))["id"])
        traces = [(await client.get(f"/v1/requests/{rid}/trace")).json() for rid in rids]
    wall_s = time.perf_counter() - started
    prompt_on_prefill = sum(p.num_prompt_tokens - p.num_cached_tokens for p in prefills)
    on_decode = sum(t["num_prompt_tokens_computed_on_decode"] or 0 for t in traces)
    # The prefill engine's busy span (first start to last end: concurrent requests overlap),
    # and each prefill's own span summed (it includes queueing behind the others).
    busy_s = (max(p.prefill_end_s for p in prefills) - min(p.prefill_start_s for p in prefills)
              if prefills else 0.0)
    prefill_s = sum(p.prefill_end_s - p.prefill_start_s for p in prefills)
    ttfts = [t["events"]["first_token"] - t["arrival_s"] for t in traces]
    return {"kind": kind, "num_prefills": len(prefills), "prompt_tokens_on_prefill": prompt_on_prefill,
            "prompt_tokens_on_decode": on_decode, "prompt_tokens_computed": prompt_on_prefill + on_decode,
            "prefill_busy_s": busy_s, "prefill_spans_sum_s": prefill_s,
            "segments_staged": len(prefills), "kv_bytes_staged": sum(staged_bytes),
            "mean_ttft_s": statistics.mean(ttfts), "wall_s": wall_s}


def test_prefill_saving_against_n_separate_requests(live_engines):
    """Prompt tokens computed, prefill time and KV staged: one request with n = 4 choices
    against 4 separate requests of the same prompt, sent at once and one after another,
    each with a fresh random 1536-token prompt (nothing cached before), interleaved."""
    prefill = live_engines.workers["prefill"]
    real = prefill.prefill
    seen: list = []
    staged_bytes: list[int] = []

    async def recording(req):
        from kvtransfer.handle import decode_handle
        from kvtransfer.segment import StagingSegment

        result = await real(req)
        seen.append(result)
        handle = result.kv_claims[0] if result.kv_claims else result.kv_handle
        seg = StagingSegment.open(Path(decode_handle(handle).segment_path))  # before a decode has it
        staged_bytes.append(seg.nbytes)
        seg.close()
        return result

    prefill.prefill = recording
    rng = random.Random(13)
    rows: list[dict] = []
    kinds = ("n", "separate-concurrent", "separate-sequential")
    try:
        for _ in range(TRIALS):
            for mode in ("disagg", "coloc"):
                for kind in kinds:
                    seen.clear()
                    staged_bytes.clear()
                    row = live_engines.call(_scenario(getattr(live_engines, f"{mode}_url"), kind,
                                                      _prompt(rng), seen, staged_bytes),
                                            timeout=600)
                    row["kind"] = f"{mode} {kind}"
                    rows.append(row)
                    _wait_clean(live_engines)
    finally:
        del prefill.prefill
    summary = {}
    for kind in [f"{m} {k}" for m in ("disagg", "coloc") for k in kinds]:
        mine = [r for r in rows if r["kind"] == kind]
        summary[kind] = {k: statistics.median(r[k] for r in mine)
                         for k in mine[0] if k != "kind"}
    print(f"\nn = {N}, prompt {PROMPT_TOKENS} tokens, max_tokens 4, medians of {TRIALS} trials "
          "(disaggregated, embedded tiny model, CPU)")
    keys = list(summary["disagg n"])
    print("| " + " | ".join(["request"] + keys) + " |")
    for kind, vals in summary.items():
        print("| " + " | ".join([kind] + [f"{vals[k]:.3f}" if isinstance(vals[k], float)
                                          else str(vals[k]) for k in keys]) + " |")
    if os.environ.get("PDSERVE_N_SAVING_JSON"):
        with open(os.environ["PDSERVE_N_SAVING_JSON"], "w") as f:
            json.dump({"rows": rows, "summary": summary}, f, indent=1)
    n_row = summary["disagg n"]
    assert n_row["num_prefills"] == 1 and n_row["segments_staged"] == 1
    # One prefill of the whole prompt, then one prompt position per choice on decode.
    assert n_row["prompt_tokens_on_prefill"] == PROMPT_TOKENS
    assert n_row["prompt_tokens_on_decode"] == N
    assert summary["disagg separate-concurrent"]["num_prefills"] == N
    assert n_row["prompt_tokens_computed"] <= summary["disagg separate-concurrent"]["prompt_tokens_computed"]
    assert summary["coloc n"]["num_prefills"] == 0  # colocated: no prefill pool
