"""Lifecycles of KV transfer as code: state enums, allowed-transition tables, a checked state.

Each table maps a state to the states it may move to; a final state maps to nothing.
`Lifecycle.move_to` rejects any other move with `IllegalTransition`, so a bug that would,
say, publish a discarded segment or load a request twice fails loudly at the wrong move
instead of corrupting ownership later. The pictures in the module docstrings of
`connector.py`, `tcp.py` and `decode_worker/worker.py` are drawn from these tables.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Generic, TypeVar

S = TypeVar("S", bound=enum.Enum)


class IllegalTransition(RuntimeError):
    """A lifecycle was asked to make a move its table does not allow."""


class Lifecycle(Generic[S]):
    """The current state of one thing (a request, a segment, a fetch) under a table."""

    __slots__ = ("_table", "_state", "name")

    def __init__(self, table: Mapping[S, frozenset[S]], initial: S, name: str):
        if initial not in table:
            raise ValueError(f"{initial} is not a state of this table")
        self._table = table
        self._state = initial
        self.name = name  # what it tracks, for the error message (e.g. a request id)

    @property
    def state(self) -> S:
        return self._state

    @property
    def is_final(self) -> bool:
        return not self._table[self._state]

    def can_move_to(self, new: S) -> bool:
        return new in self._table[self._state]

    def move_to(self, new: S) -> None:
        if new not in self._table[self._state]:
            allowed = ", ".join(s.name for s in self._table[self._state]) or "none (final)"
            raise IllegalTransition(f"{self.name}: {self._state.name} -> {new.name} is not "
                                    f"allowed (from {self._state.name}: {allowed})")
        self._state = new

    def __repr__(self) -> str:
        return f"Lifecycle({self.name}: {self._state.name})"


def check_table(table: Mapping[S, frozenset[S]]) -> None:
    """Every target is a state of the table (tests call this for each table below)."""
    for source, targets in table.items():
        for target in targets:
            if target not in table:
                raise ValueError(f"{source.name} -> {target.name}: {target.name} has no row")


# -------------------------------------------------- producer, scheduler half: per request
class SaveState(enum.Enum):
    SAVING = "saving"  # scheduled; each step's save spec stages the prompt tokens computed
    STAGED = "staged"  # prompt complete at request_finished: StagedKV in kv_transfer_params
    DISCARDED = "discarded"  # finished early or aborted: the worker half unlinks the segment


SAVE_TRANSITIONS: Mapping[SaveState, frozenset[SaveState]] = {
    SaveState.SAVING: frozenset({SaveState.STAGED, SaveState.DISCARDED}),
    SaveState.STAGED: frozenset(),
    SaveState.DISCARDED: frozenset(),
}


# -------------------------------------------------- producer, worker half: per segment
class SegmentWriteState(enum.Enum):
    WRITING = "writing"  # created (or taken from the pool); layers being gathered into it
    COMPLETE = "complete"  # header marked complete after the last prompt layer: readable
    DISCARDED = "discarded"  # given back unpublished (aborted request, shutdown)


SEGMENT_WRITE_TRANSITIONS: Mapping[SegmentWriteState, frozenset[SegmentWriteState]] = {
    SegmentWriteState.WRITING: frozenset({SegmentWriteState.COMPLETE, SegmentWriteState.DISCARDED}),
    SegmentWriteState.COMPLETE: frozenset(),
    SegmentWriteState.DISCARDED: frozenset(),
}


# -------------------------------------------------- consumer, scheduler half: per request
class LoadState(enum.Enum):
    MATCHED = "matched"  # get_num_new_matched_tokens: segment complete and fits; tokens promised
    PLANNED = "planned"  # update_state_after_alloc: blocks reserved, the load goes in the metadata
    LOADED = "loaded"  # the load ran without a load error on the request's blocks
    FAILED = "failed"  # the worker half reported load errors on its blocks
    RECOMPUTE = "recompute"  # no usable segment (or nothing to load): the engine computes it


LOAD_TRANSITIONS: Mapping[LoadState, frozenset[LoadState]] = {
    LoadState.MATCHED: frozenset({LoadState.PLANNED, LoadState.RECOMPUTE}),
    LoadState.PLANNED: frozenset({LoadState.LOADED, LoadState.FAILED}),
    LoadState.LOADED: frozenset(),
    LoadState.FAILED: frozenset(),
    LoadState.RECOMPUTE: frozenset(),
}


# -------------------------------------------------- decode worker: per request's KV
class DecodeKVState(enum.Enum):
    RECEIVED = "received"
    FETCHING_KV = "fetching_kv"  # ConsumerService.materialize runs (a thread)
    LOADING = "loading"  # the local segment is handed to the engine, which loads it before its first step
    RECOMPUTING = "recomputing"  # no KV (fetch failed, policy recompute): the engine computes the prompt
    RUNNING = "running"  # first token out
    FINISHED = "finished"
    FAILED = "failed"  # fetch failed, policy fail: an error delta, nothing computed
    ABORTED = "aborted"  # the client went away; unconsumed KV is discarded


_ABORTABLE = frozenset({DecodeKVState.ABORTED})
DECODE_KV_TRANSITIONS: Mapping[DecodeKVState, frozenset[DecodeKVState]] = {
    DecodeKVState.RECEIVED: frozenset({DecodeKVState.FETCHING_KV, DecodeKVState.RUNNING}) | _ABORTABLE,
    DecodeKVState.FETCHING_KV: frozenset({DecodeKVState.LOADING, DecodeKVState.RECOMPUTING,
                                          DecodeKVState.FAILED}) | _ABORTABLE,
    DecodeKVState.LOADING: frozenset({DecodeKVState.RUNNING, DecodeKVState.FINISHED}) | _ABORTABLE,
    DecodeKVState.RECOMPUTING: frozenset({DecodeKVState.RUNNING, DecodeKVState.FINISHED}) | _ABORTABLE,
    DecodeKVState.RUNNING: frozenset({DecodeKVState.FINISHED}) | _ABORTABLE,
    DecodeKVState.FINISHED: frozenset(),
    DecodeKVState.FAILED: frozenset(),
    DecodeKVState.ABORTED: frozenset(),
}


# -------------------------------------------------- TCP fetch (client side): per fetch
class FetchState(enum.Enum):
    REQUESTED = "requested"  # connected, authenticated, request sent
    STREAMING = "streaming"  # reply ok: the segment's bytes are arriving
    RECEIVED = "received"  # every byte and the server's SENT_INTACT: the copy is the client's
    CONSUMED = "consumed"  # ack sent: the server recycles its file
    FAILED = "failed"  # refused, short read, timeout or stale: the client removed its copy


FETCH_TRANSITIONS: Mapping[FetchState, frozenset[FetchState]] = {
    FetchState.REQUESTED: frozenset({FetchState.STREAMING, FetchState.FAILED}),
    FetchState.STREAMING: frozenset({FetchState.RECEIVED, FetchState.FAILED}),
    # An ack that cannot be sent leaves the fetch RECEIVED for good (the lost-ack case).
    FetchState.RECEIVED: frozenset({FetchState.CONSUMED}),
    FetchState.CONSUMED: frozenset(),
    FetchState.FAILED: frozenset(),
}


# -------------------------------------------------- one claim on a shared segment (n > 1)
class ClaimState(enum.Enum):
    """One of the claims a segment staged for several decodes is split into (`claims.py`).
    The segment's bytes go when its last claim ends, whichever way each one ends."""

    OUTSTANDING = "outstanding"  # the claim's name exists; its decode has not taken it yet
    TAKEN = "taken"  # a decode opened it (shm) or acked its fetch (tcp): that decode owns it
    RELEASED = "released"  # the router gave it back (its choice ended early, or was aborted)
    EXPIRED = "expired"  # nobody claimed it within the lease: the sweeper took it back


CLAIM_TRANSITIONS: Mapping[ClaimState, frozenset[ClaimState]] = {
    ClaimState.OUTSTANDING: frozenset({ClaimState.TAKEN, ClaimState.RELEASED, ClaimState.EXPIRED}),
    ClaimState.TAKEN: frozenset(),
    ClaimState.RELEASED: frozenset(),
    ClaimState.EXPIRED: frozenset(),
}

ALL_TABLES = (SAVE_TRANSITIONS, SEGMENT_WRITE_TRANSITIONS, LOAD_TRANSITIONS,
              DECODE_KV_TRANSITIONS, FETCH_TRANSITIONS, CLAIM_TRANSITIONS)
