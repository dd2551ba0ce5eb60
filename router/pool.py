"""The router's view of its workers: clients by role, their latest load, and routing.

Workers are reached through the small protocols below. In a deployment the launcher
supplies Ray actor adapters; tests pass the worker objects themselves (their methods have
the same names) or fakes. The router never imports a worker package.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

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
from router.prefix import PrefixIndex, block_hashes
from router.recovery import Recovery

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


@dataclass(frozen=True)
class RouteRequest:
    """What routing needs to know about one request."""

    prompt_token_ids: tuple[int, ...]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


@dataclass
class InstanceView:
    """What routing knows about one instance."""

    client: WorkerClient
    role: str
    stats: WorkerStats | None = None
    is_healthy: bool = True
    polled_at: float | None = None  # time.monotonic() of its last answered stats poll
    # Router-side accounting, exact and instantaneous (stats lag by a poll interval).
    inflight_requests: int = 0
    inflight_prompt_tokens: int = 0
    blocks_reserved_since_poll: int = 0
    prefixes: PrefixIndex | None = None  # None: prefix-aware routing is off
    node_id: str | None = None  # the node it runs on, when the deployment says (affinity)

    @property
    def instance_id(self) -> str:
        return self.client.instance_id

    @property
    def is_available(self) -> bool:
        return (self.is_healthy and self.stats is not None and self.stats.is_ready
                and not self.stats.is_draining)

    @property
    def block_size(self) -> int:
        return self.stats.block_size if self.stats is not None else 0

    def free_kv_blocks(self) -> float:
        if self.stats is None:
            return 0.0
        free = (1.0 - self.stats.kv_cache_usage) * self.stats.num_kv_blocks
        return free - self.blocks_reserved_since_poll

    def num_cached_tokens(self, route: RouteRequest) -> int:
        """Prompt tokens this instance is believed to hold in its prefix cache (whole
        blocks; never the last prompt token, which the engine always computes)."""
        size = self.block_size
        if self.prefixes is None or size <= 0:
            return 0
        hashes = block_hashes(route.prompt_token_ids[:-1], size)
        return self.prefixes.num_matched_blocks(hashes) * size

    def remember_prefix(self, route: RouteRequest) -> None:
        size = self.block_size
        if self.prefixes is not None and size > 0:
            self.prefixes.insert(block_hashes(route.prompt_token_ids[:-1], size))


Policy = Callable[[list[InstanceView], RouteRequest], InstanceView]


def least_prompt_tokens(views: list[InstanceView], route: RouteRequest) -> InstanceView:
    """The instance that would start computing this prompt soonest: fewest prompt tokens
    queued ahead of it plus the tokens of this prompt it does not hold cached."""
    return min(views, key=lambda v: (v.inflight_prompt_tokens + route.num_prompt_tokens
                                     - v.num_cached_tokens(route), v.inflight_requests))


def most_free_kv(views: list[InstanceView], route: RouteRequest) -> InstanceView:
    return max(views, key=lambda v: (v.free_kv_blocks(), -v.inflight_requests))


def _round_robin() -> Policy:
    counter = itertools.count()

    def pick(views: list[InstanceView], route: RouteRequest) -> InstanceView:
        return views[next(counter) % len(views)]

    return pick


POLICIES: dict[str, Callable[[], Policy]] = {
    "least_prompt_tokens": lambda: least_prompt_tokens,
    "most_free_kv": lambda: most_free_kv,
    "round_robin": _round_robin,
}

PathKind = Literal["disaggregated", "local_prefill"]
PathReason = Literal["default", "short_prompt", "prefill_saturated", "no_prefill_available"]


@dataclass(frozen=True)
class PathChoice:
    """Where a request's prompt is computed: on a prefill instance, then handed off
    (disaggregated), or on the decode instance that will decode it (local_prefill)."""

    kind: PathKind
    reason: PathReason
    decode: InstanceView | None = None  # set for local_prefill


@dataclass
class WorkerPool:
    config: RouterConfig
    prefill: list[InstanceView] = field(default_factory=list)
    decode: list[InstanceView] = field(default_factory=list)
    colocated: list[InstanceView] = field(default_factory=list)
    on_transfers: Callable[[str, tuple[TransferStat, ...]], None] | None = None
    # placement.affinity "high": prefer a decode on the node of the prefill that computed
    # the prompt (its KV then moves within the node), as the plan placed them.
    prefer_same_node: bool = False

    def __post_init__(self) -> None:
        self._pick_prefill = POLICIES[self.config.prefill_policy]()
        self._pick_decode = POLICIES[self.config.decode_policy]()
        # Retry policy, per-instance circuit breakers, stall watch (router/recovery.py).
        self.recovery = Recovery.from_config(self.config)
        self._poller: asyncio.Task | None = None
        # Clean-up that must finish even when the request that started it is cancelled.
        self._background: set[asyncio.Task] = set()

    @classmethod
    def build(cls, config: RouterConfig, *, prefill=(), decode=(), colocated=()) -> "WorkerPool":
        pool = cls(config=config)
        for role, clients in (("prefill", prefill), ("decode", decode), ("colocated", colocated)):
            for client in clients:
                pool.add(client, role)
        return pool

    @property
    def is_disaggregated(self) -> bool:
        return bool(self.prefill) or (bool(self.decode) and not self.colocated)

    def all(self) -> list[InstanceView]:
        return self.prefill + self.decode + self.colocated

    def is_ready(self) -> bool:
        if self.is_disaggregated:
            return any(v.is_available for v in self.prefill) and any(v.is_available for v in self.decode)
        return any(v.is_available for v in self.colocated)

    # -- membership (elastic pools: replicas join once ready, leave after draining) -----
    def _views(self, role: str) -> list[InstanceView]:
        return {"prefill": self.prefill, "decode": self.decode, "colocated": self.colocated}[role]

    def add(self, client: WorkerClient, role: str, node_id: str | None = None) -> InstanceView:
        """A new instance (on `node_id`, when known); it takes requests once its first
        stats poll says it is ready."""
        views = self._views(role)
        if any(v.instance_id == client.instance_id for v in self.all()):
            raise ValueError(f"instance {client.instance_id!r} is already in the pool")
        prefixes = PrefixIndex(0) if self.config.prefix_aware_routing else None
        view = InstanceView(client, role, prefixes=prefixes, node_id=node_id)
        views.append(view)
        return view

    def remove(self, instance_id: str) -> InstanceView | None:
        """Forget an instance (it drained, or its replica is gone). Requests it still holds
        keep their view and end as they would."""
        for views in (self.prefill, self.decode, self.colocated):
            for view in views:
                if view.instance_id == instance_id:
                    views.remove(view)
                    return view
        return None

    # -- routing ----------------------------------------------------------------------
    def pick_prefill(self, route: RouteRequest, exclude: Collection[str] = ()) -> InstanceView:
        """A prefill (colocated) instance for `route`, none of `exclude` (ids already tried)."""
        views = self.prefill if self.is_disaggregated else self.colocated
        return self._pick(views, self._pick_prefill, "prefill" if self.is_disaggregated else "colocated",
                          route, exclude)

    def pick_decode(self, route: RouteRequest, exclude: Collection[str] = (),
                    near: InstanceView | None = None) -> InstanceView:
        """A decode instance for `route`, none of `exclude`. With `prefer_same_node` and
        `near` (the prefill that staged the prompt's KV) on a known node, the policy
        chooses among the decodes on that node, and among all only when none there is
        available."""
        if self.prefer_same_node and near is not None and near.node_id is not None:
            same_node = [v for v in self.decode if v.node_id == near.node_id]
            with contextlib.suppress(WorkerUnavailable):
                return self._pick(same_node, self._pick_decode, "decode", route, exclude)
        return self._pick(self.decode, self._pick_decode, "decode", route, exclude)

    def choose_path(self, route: RouteRequest) -> PathChoice:
        """Conditional disaggregation: prefill where the request will decode when its
        uncached prompt is short, or when the prefill pool is backed up and a decode
        instance has room; otherwise the prefill pool."""
        cfg = self.config
        if cfg.local_prefill_max_tokens == 0 and cfg.local_prefill_queue_tokens is None:
            return PathChoice("disaggregated", "default")
        decodes = self.recovery.breakers.allowed([v for v in self.decode if v.is_available],
                                                 time.monotonic())
        if not decodes:
            return PathChoice("disaggregated", "default")  # pick_decode raises later
        decode = self._pick_decode(decodes, route)
        uncached = route.num_prompt_tokens - decode.num_cached_tokens(route)
        if uncached <= cfg.local_prefill_max_tokens:
            return PathChoice("local_prefill", "short_prompt", decode)
        prefills = [v for v in self.prefill if v.is_available]
        if not prefills:
            return PathChoice("local_prefill", "no_prefill_available", decode)
        if cfg.local_prefill_queue_tokens is not None:
            best = self._pick_prefill(prefills, route)
            backlog = best.inflight_prompt_tokens
            has_room = (decode.inflight_prompt_tokens + uncached <= cfg.local_prefill_queue_tokens
                        and decode.free_kv_blocks() * max(1, decode.block_size) > route.num_prompt_tokens)
            if backlog >= cfg.local_prefill_queue_tokens and has_room:
                return PathChoice("local_prefill", "prefill_saturated", decode)
        return PathChoice("disaggregated", "default")

    def _pick(self, views: list[InstanceView], policy: Policy, role: str, route: RouteRequest,
              exclude: Collection[str] = ()) -> InstanceView:
        """Available instances, less those excluded and those whose circuit breaker is open."""
        now = time.monotonic()
        available = self.recovery.breakers.allowed(
            [v for v in views if v.is_available and v.instance_id not in exclude], now)
        if not available:
            raise WorkerUnavailable(f"no {role} instance is available")
        view = policy(available, route)
        self.recovery.breakers.on_attempt(view.instance_id, now)
        return view

    def in_background(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run `coro` to completion even if the task that started it is cancelled."""
        task = asyncio.get_running_loop().create_task(_quietly(coro))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- load accounting --------------------------------------------------------------
    @staticmethod
    def begin(view: InstanceView, num_prompt_tokens: int) -> None:
        view.inflight_requests += 1
        view.inflight_prompt_tokens += num_prompt_tokens
        if view.block_size > 0:  # known once the engine reported it
            view.blocks_reserved_since_poll += -(-num_prompt_tokens // view.block_size)

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
        view.polled_at = time.monotonic()
        self.recovery.breakers.poll_answered(view.instance_id, time.monotonic())
        view.blocks_reserved_since_poll = 0
        if view.prefixes is not None and view.prefixes.capacity_blocks != stats.num_kv_blocks:
            view.prefixes.resize(stats.num_kv_blocks)
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
        await self.recovery.stall_watch.stop()
        if self._background:
            await asyncio.wait(list(self._background), timeout=10)


async def _quietly(coro) -> None:
    with contextlib.suppress(Exception):
        await coro
