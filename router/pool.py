"""The router's view of its workers: clients by role, their latest load, and routing.

Workers are reached through the small protocols below. In a deployment the launcher
supplies Ray actor adapters; tests pass the worker objects themselves (their methods have
the same names) or fakes. The router never imports a worker package.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

from cluster.config import RouterConfig
from cluster.wire import (
    EngineRequest,
    KVHandle,
    PrefillResult,
    TokenDelta,
    TransferStat,
    WorkerStats,
    WorkerUnavailable,
)

log = logging.getLogger(__name__)


class WorkerClient(Protocol):
    instance_id: str

    async def stats(self) -> WorkerStats: ...

    async def abort(self, request_id: str) -> None: ...


class PrefillClient(WorkerClient, Protocol):
    async def prefill(self, req: EngineRequest) -> PrefillResult: ...

    async def release_kv(self, handle: KVHandle) -> bool: ...


class GenerateClient(WorkerClient, Protocol):
    def generate(self, req: EngineRequest) -> AsyncIterator[TokenDelta]: ...


@dataclass
class InstanceView:
    """What routing knows about one instance."""

    client: WorkerClient
    role: str
    stats: WorkerStats | None = None
    is_healthy: bool = True
    # Router-side accounting, exact and instantaneous (stats lag by a poll interval).
    inflight_requests: int = 0
    inflight_prompt_tokens: int = 0
    blocks_reserved_since_poll: int = 0

    @property
    def instance_id(self) -> str:
        return self.client.instance_id

    @property
    def is_available(self) -> bool:
        return self.is_healthy and self.stats is not None and self.stats.is_ready

    def free_kv_blocks(self) -> float:
        if self.stats is None:
            return 0.0
        free = (1.0 - self.stats.kv_cache_usage) * self.stats.num_kv_blocks
        return free - self.blocks_reserved_since_poll


Policy = Callable[[list[InstanceView]], InstanceView]


def least_prompt_tokens(views: list[InstanceView]) -> InstanceView:
    return min(views, key=lambda v: (v.inflight_prompt_tokens, v.inflight_requests))


def most_free_kv(views: list[InstanceView]) -> InstanceView:
    return max(views, key=lambda v: (v.free_kv_blocks(), -v.inflight_requests))


def _round_robin() -> Policy:
    counter = itertools.count()

    def pick(views: list[InstanceView]) -> InstanceView:
        return views[next(counter) % len(views)]

    return pick


POLICIES: dict[str, Callable[[], Policy]] = {
    "least_prompt_tokens": lambda: least_prompt_tokens,
    "most_free_kv": lambda: most_free_kv,
    "round_robin": _round_robin,
}


@dataclass
class WorkerPool:
    config: RouterConfig
    prefill: list[InstanceView] = field(default_factory=list)
    decode: list[InstanceView] = field(default_factory=list)
    colocated: list[InstanceView] = field(default_factory=list)
    block_size: int = 16
    on_transfers: Callable[[str, tuple[TransferStat, ...]], None] | None = None

    def __post_init__(self) -> None:
        self._pick_prefill = POLICIES[self.config.prefill_policy]()
        self._pick_decode = POLICIES[self.config.decode_policy]()
        self._poller: asyncio.Task | None = None

    @classmethod
    def build(cls, config: RouterConfig, *, prefill=(), decode=(), colocated=(),
              block_size: int = 16) -> "WorkerPool":
        return cls(config=config,
                   prefill=[InstanceView(c, "prefill") for c in prefill],
                   decode=[InstanceView(c, "decode") for c in decode],
                   colocated=[InstanceView(c, "colocated") for c in colocated],
                   block_size=block_size)

    @property
    def is_disaggregated(self) -> bool:
        return bool(self.prefill)

    def all(self) -> list[InstanceView]:
        return self.prefill + self.decode + self.colocated

    def is_ready(self) -> bool:
        if self.is_disaggregated:
            return any(v.is_available for v in self.prefill) and any(v.is_available for v in self.decode)
        return any(v.is_available for v in self.colocated)

    # -- routing ----------------------------------------------------------------------
    def pick_prefill(self) -> InstanceView:
        views = self.prefill if self.is_disaggregated else self.colocated
        return self._pick(views, self._pick_prefill, "prefill" if self.is_disaggregated else "colocated")

    def pick_decode(self) -> InstanceView:
        return self._pick(self.decode, self._pick_decode, "decode")

    @staticmethod
    def _pick(views: list[InstanceView], policy: Policy, role: str) -> InstanceView:
        available = [v for v in views if v.is_available]
        if not available:
            raise WorkerUnavailable(f"no {role} instance is available")
        return policy(available)

    # -- load accounting --------------------------------------------------------------
    def begin(self, view: InstanceView, num_prompt_tokens: int) -> None:
        view.inflight_requests += 1
        view.inflight_prompt_tokens += num_prompt_tokens
        view.blocks_reserved_since_poll += -(-num_prompt_tokens // self.block_size)

    @staticmethod
    def prompt_done(view: InstanceView, num_prompt_tokens: int) -> None:
        view.inflight_prompt_tokens -= num_prompt_tokens

    @staticmethod
    def end(view: InstanceView) -> None:
        view.inflight_requests -= 1

    # -- polling ----------------------------------------------------------------------
    async def refresh(self) -> None:
        await asyncio.gather(*(self._refresh_one(v) for v in self.all()))

    async def _refresh_one(self, view: InstanceView) -> None:
        try:
            stats = await asyncio.wait_for(view.client.stats(), timeout=max(2.0, 4 * self.config.stats_interval_s))
        except Exception as e:  # a dead or hung worker: route around it until it answers
            if view.is_healthy:
                log.warning("instance %s is unhealthy: %r", view.instance_id, e)
            view.is_healthy = False
            return
        view.stats = stats
        view.is_healthy = True
        view.blocks_reserved_since_poll = 0
        if stats.transfers and self.on_transfers is not None:
            self.on_transfers(view.instance_id, stats.transfers)

    async def _poll_forever(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.config.stats_interval_s)

    def start_polling(self) -> None:
        if self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll_forever())

    async def stop_polling(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            try:
                await self._poller
            except asyncio.CancelledError:
                pass
            self._poller = None
