"""Where the router ingress finds the engine replicas: a small Serve deployment of its own.

Every engine replica, once its engine is ready and its worker channel listens, publishes a
`ReplicaEntry` (instance id, role, channel address, Ray node) and repeats it as a heartbeat.
Each router replica polls `snapshot()` and connects to what it finds. Control plane only:
one call per replica per heartbeat and per router per poll, never one per request.

Entry lifecycle::

    (absent) ──publish──▶ LIVE ──publish(is_draining=True)──▶ DRAINING ──withdraw──▶ (absent)
                           └──no heartbeat for ttl_s (the replica died)──▶ (absent)

The registry keeps no state worth persisting: if its own replica is replaced, the engine
replicas' next heartbeats rebuild it within one heartbeat interval.

Expiry counts only time in which the registry was listening: routers ask for a snapshot
every half second and every replica beats every second, so a gap of `HELD_UP_GAP_S`
without any call means the registry itself was held up (its calls queued behind it), not
that every replica died. Entries then keep the age they had when the gap began; otherwise
the first queued call after the gap could be a snapshot that finds every entry expired
(a real-engine SIGSTOP once dropped every healthy replica that way for a second).
"""

from __future__ import annotations

import time

import msgspec

HEARTBEAT_INTERVAL_S = 1.0
ENTRY_TTL_S = 6.0
HELD_UP_GAP_S = 3 * HEARTBEAT_INTERVAL_S  # no call at all for this long: the registry was held up


class ReplicaEntry(msgspec.Struct, frozen=True):
    """One engine replica, as the router ingress needs to reach it."""

    instance_id: str
    role: str  # prefill | decode | colocated
    address: str  # its worker channel, "host:port"
    node_id: str  # Ray node id
    node_ip: str
    replica_id: str  # Ray Serve replica id (for operators and kill tests)
    is_draining: bool = False


class Registry:
    """The registry's state, a plain class (the Serve deployment wraps it in serve_app)."""

    def __init__(self, ttl_s: float = ENTRY_TTL_S, clock=time.monotonic):
        self._ttl_s = ttl_s
        self._clock = clock
        self._entries: dict[str, tuple[ReplicaEntry, float]] = {}
        self._last_call_at: float | None = None

    def _heard(self) -> float:
        """The time of this call; after a held-up gap, every entry's last heartbeat moves
        forward by the gap (the time the registry did not listen does not age them)."""
        now = self._clock()
        gap = now - self._last_call_at if self._last_call_at is not None else 0.0
        if gap > HELD_UP_GAP_S:
            self._entries = {iid: (entry, seen + gap) for iid, (entry, seen) in self._entries.items()}
        self._last_call_at = now
        return now

    def publish(self, entry: ReplicaEntry) -> None:
        """Register or refresh one replica. A replica that says it drains stays draining."""
        now = self._heard()
        known = self._entries.get(entry.instance_id)
        if known is not None and known[0].is_draining and not entry.is_draining:
            entry = msgspec.structs.replace(entry, is_draining=True)
        self._entries[entry.instance_id] = (entry, now)

    def withdraw(self, instance_id: str) -> None:
        self._heard()
        self._entries.pop(instance_id, None)

    def snapshot(self) -> list[ReplicaEntry]:
        """Live and draining entries, oldest first; entries past their ttl are dropped."""
        now = self._heard()
        for iid in [i for i, (_, seen) in self._entries.items() if now - seen > self._ttl_s]:
            del self._entries[iid]
        return [entry for entry, _ in self._entries.values()]
