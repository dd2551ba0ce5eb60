"""Fake engine workers for Serve replicas (tests only): the in-process fakes of tests/fakes.py
with the worker lifecycle (`start`, `shutdown`) a replica drives. Each replica process has
its own fakes, so a decode never finds its prefill's KV and recomputes (served_by
"recomputed"); the tokens are the same either way (a hash of the sequence)."""

from __future__ import annotations

import os

from tests.fakes import FakeDecodeWorker, FakePrefillWorker


class _Lifecycle:
    async def start(self) -> str:
        return self.instance_id

    async def shutdown(self) -> None:
        pass


class ServePrefill(_Lifecycle, FakePrefillWorker):
    def num_staged_segments(self) -> int:
        # No decode process ever claims these fakes' staged prompts (a real decode claims
        # them at once), so a draining fake prefill waits for its channel requests only,
        # not for its drain bound.
        return 0


class ServeDecode(_Lifecycle, FakeDecodeWorker):
    """Each token after `token_delay_s` plus `per_request_s` for each request in flight on
    the replica: a decode step that grows with the batch, as a profile's `a + c*B`."""

    def __init__(self, instance_id: str, role: str, token_delay_s: float, per_request_s: float = 0.0):
        self.per_request_s = per_request_s
        super().__init__(instance_id, role=role, token_delay_s=token_delay_s)

    @property
    def token_delay_s(self) -> float:
        return self._base_delay_s + self.per_request_s * len(self.active)

    @token_delay_s.setter
    def token_delay_s(self, value: float) -> None:
        self._base_delay_s = value


def make_worker(role, instance_id, spec, kv, advertise_host):
    if role == "prefill":
        return ServePrefill(instance_id)
    delay = float(os.environ.get("PDSERVE_FAKE_TOKEN_DELAY_S", "0.01"))
    per_request = float(os.environ.get("PDSERVE_FAKE_TOKEN_DELAY_PER_REQUEST_S", "0"))
    return ServeDecode(instance_id, role=role, token_delay_s=delay, per_request_s=per_request)
