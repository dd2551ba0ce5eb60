"""schemathesis's positive cases against a live deployment, with the fields JSON Schema
cannot constrain repaired (tests/router/test_fuzz.py's `_reachable`: model name, empty
allow-lists, `max_tokens` capped to 16), so the fuzzed sampling fields, stop strings and
both answer shapes (JSON and server-sent events) reach real engines. Every check runs but
positive_data_acceptance; fixed seed (derandomized), bounded examples per operation.

    PDSERVE_FUZZ_URL=http://127.0.0.1:8742 PDSERVE_FUZZ_EXAMPLES=100 \\
        python -m pytest bench/fuzz_live.py -q -s -p no:cacheprovider

Not collected by the test suite (it needs a running deployment); run by
bench/results/fuzz-live-cpu-2core/run.sh. Prints the statuses seen per operation."""

from __future__ import annotations

import collections
import os

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.router.test_fuzz import _reachable

URL = os.environ.get("PDSERVE_FUZZ_URL", "http://127.0.0.1:8742")
MAX_EXAMPLES = int(os.environ.get("PDSERVE_FUZZ_EXAMPLES", "100"))

reachable = schemathesis.openapi.from_url(f"{URL}/openapi.json").include(
    path_regex="^/v1/(chat/)?completions$", method="POST")
reachable.config.generation.update(modes=[GenerationMode.POSITIVE])
STATUSES: collections.Counter[tuple[str, int]] = collections.Counter()


@reachable.hook
def map_body(context, body):
    return _reachable(body)


@reachable.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_generation_on_real_engines_holds_to_its_schema(case):
    response = case.call_and_validate(excluded_checks=[positive_data_acceptance], timeout=120)
    STATUSES[(f"{case.method} {case.path}", response.status_code)] += 1


def test_statuses_seen():
    assert STATUSES, "no case ran"
    assert not [k for k in STATUSES if k[1] >= 500], STATUSES
    print("reachable cases:", sum(STATUSES.values()), "statuses:", dict(sorted(STATUSES.items())))
