"""Schemathesis over the router's OpenAPI schema, in process, over fake workers.

Every operation (streaming ones included: `stream` is one of the generated fields, and
server-sent events are parsed) gets a bounded number of generated cases, positive and
negative, with a fixed seed, and every schemathesis check but one: no 5xx, every status, header and body as the schema
declares, invalid input rejected. The exception is "schema-valid request rejected"
(positive_data_acceptance): some rules cannot be said in JSON Schema (a prompt must fit
the context after tokenization, an allow-list may not be empty, min_tokens <= max_tokens),
and their 400 is the right answer; those cases are tallied by message instead, so a
rejection no rule explains still shows. Afterwards the router must be healthy and hold no
request, queue ticket or staged KV.

A second run ("reachable") keeps schemathesis's positive cases but repairs the few fields
whose rules the schema cannot state (see `_reachable`), so the fuzzed sampling fields,
stop strings, stream options and both response shapes (JSON and server-sent events) reach
the handoff and the workers instead of stopping at a 400.

`PDSERVE_FUZZ_EXAMPLES` raises the per-operation budget for a longer run (CI: 15)."""

from __future__ import annotations

import asyncio
import collections
import os

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance
from starlette.testclient import TestClient

from cluster.config import RouterConfig
from tests.fakes import make_fake_deployment

MAX_EXAMPLES = int(os.environ.get("PDSERVE_FUZZ_EXAMPLES", "15"))

app, deps, prefills, decodes = make_fake_deployment(
    router_config=RouterConfig(stats_interval_s=0.05, max_request_body_bytes=256 * 1024))
asyncio.run(deps.pool.refresh())  # workers known before the first case (no 503 race)
schema = schemathesis.openapi.from_asgi("/openapi.json", app)
reachable = schemathesis.openapi.from_asgi("/openapi.json", app).include(
    path_regex="^/v1/(chat/)?completions$", method="POST")
reachable.config.generation.update(modes=[GenerationMode.POSITIVE])
STATUSES: collections.Counter[tuple[str, int]] = collections.Counter()
POSITIVE_REJECTED: collections.Counter[str] = collections.Counter()  # message -> cases


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_every_operation_holds_to_its_schema(case):
    response = case.call_and_validate(excluded_checks=[positive_data_acceptance])
    STATUSES[(f"{case.method} {case.path}", response.status_code)] += 1
    if case.meta is not None and case.meta.generation.mode == GenerationMode.POSITIVE \
            and response.status_code == 400:
        POSITIVE_REJECTED[response.json()["error"]["message"][:70]] += 1


@reachable.hook
def map_body(context, body):
    return _reachable(body)


def _reachable(body):
    """A schema-valid body with the rules JSON Schema cannot carry made to hold."""
    if not isinstance(body, dict):
        return body
    body = dict(body, model="pdserve-tiny")
    for name in ("allowed_token_ids", "logit_bias", "n", "tools", "tool_choice", "best_of",
                 "logprobs", "top_logprobs", "seed", "truncate_prompt_tokens"):
        body.pop(name, None)
    if not body.get("stream"):
        body.pop("stream_options", None)
    for name in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(name), int):
            body[name] = 1 + body[name] % 16
    body["min_tokens"] = 0
    if "prompt" in body and not (isinstance(body["prompt"], str) and body["prompt"]):
        body["prompt"] = "fuzzed prompt"
    if "messages" in body:
        body["messages"] = [m for m in body["messages"] if isinstance(m, dict)
                            and isinstance(m.get("content"), str)] or [
            {"role": "user", "content": "fuzzed message"}]
    return body


@reachable.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_generation_reached_with_fuzzed_fields_holds_to_its_schema(case):
    response = case.call_and_validate(excluded_checks=[positive_data_acceptance])
    STATUSES[(f"{case.method} {case.path} (reachable)", response.status_code)] += 1


def test_the_router_is_healthy_and_idle_afterwards():
    assert STATUSES, "the fuzz cases did not run"
    assert not [k for k in STATUSES if k[1] >= 500]
    for path in ("/v1/completions", "/v1/chat/completions"):  # the answers were exercised
        assert STATUSES[(f"POST {path} (reachable)", 200)] >= 5, STATUSES
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        r = client.post("/v1/completions", json={"model": "pdserve-tiny", "prompt": "still fine",
                                                 "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert deps.num_in_flight == 0 and deps.admission.num_queued == 0
    assert all(p.staged == {} for p in prefills) and all(not d.active for d in decodes)
    print("fuzz cases:", sum(STATUSES.values()), "statuses:", dict(sorted(STATUSES.items())))
    print("schema-valid but rejected (400):", dict(POSITIVE_REJECTED.most_common()))
